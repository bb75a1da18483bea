"""The bundled demo CT: a slab of LIDC-IDRI-0001's chest CT around its lung nodule (Resources/Demo, cut by
tools/make_demo.py, CC BY 3.0: see Resources/Demo/SOURCE.md). It lets the README's main command, Slicer's Sample
Data entry ("ARSeg lung nodule CT") and the tests run with no data of one's own. No Qt, no MRML here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

DEMO_NAME = "ARSeg lung nodule CT"
DEMO_VOLUME = "lung1-slab.nrrd"
DEMO_LABEL = "lung1-slab-label.nrrd"
DEMO_INFO = "lung1-slab.json"


def demo_dirs() -> List[Path]:
    """Where the demo is looked up: the source checkout, then an installed Slicer extension (resources copied
    beside the library, as for the models)."""
    here = Path(__file__).resolve().parent
    return [here.parent / "Resources" / "Demo", here.parent / "ARSeg" / "Resources" / "Demo",
            here / "Resources" / "Demo"]


def demo_dir() -> Path:
    for d in demo_dirs():
        if (d / DEMO_VOLUME).is_file():
            return d
    raise FileNotFoundError(f"the bundled demo {DEMO_VOLUME} is missing (looked in "
                            f"{', '.join(str(d) for d in demo_dirs())}); tools/make_demo.py cuts it")


def demo_volume_path() -> Path:
    return demo_dir() / DEMO_VOLUME


def demo_label_path() -> Path:
    return demo_dir() / DEMO_LABEL


def demo_info() -> Dict[str, Any]:
    """Where the slab comes from: slab_index_kji (its box in lung1), nodule_centroid_ras_mm, source, licence."""
    return json.loads((demo_dir() / DEMO_INFO).read_text())


def demo_point_ras() -> Tuple[float, float, float]:
    """The nodule's centroid in RAS (mm): the click of the README's main command."""
    return tuple(float(v) for v in demo_info()["nodule_centroid_ras_mm"])


def demo_sha256() -> str:
    import hashlib

    return hashlib.sha256(demo_volume_path().read_bytes()).hexdigest()


def sample_data_source() -> Dict[str, Any]:
    """Keyword arguments for Slicer's SampleData.SampleDataLogic.registerCustomSampleDataSource, so that the
    Sample Data module offers the demo ("ARSeg lung nodule CT") from the extension's own file (a file:// URI:
    nothing is downloaded). The module adds its thumbnail (thumbnailFileName) and registers it."""
    path = demo_volume_path()
    return {"category": "ARSeg", "sampleName": DEMO_NAME, "uris": path.as_uri(), "fileNames": path.name,
            "nodeNames": "ARSegLungNoduleCT", "loadFileType": "VolumeFile", "checksums": f"SHA256:{demo_sha256()}"}
