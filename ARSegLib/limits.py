"""The limits and defaults of a run's settings, in one place that imports nothing: pipeline.SegmentSettings checks
them, and the Slicer module's parameter node bounds its widgets by them at import, before the packages the
pipeline needs (numpy, scipy) may be installed."""

MAX_SAMPLES = 64  # samples are kept as bits of one integer per voxel
DEFAULT_SAMPLES = 16
# a temperature this high flattens the token distribution into noise (lung1: 100 gives an empty consensus)
MAX_TEMPERATURE = 5.0
MAX_HALF_HEIGHT_MM = 200.0
DEFAULT_HALF_HEIGHT_MM = 20.0
MAX_SEED = 2 ** 63 - 1  # the sampler's generator takes a 64-bit seed
