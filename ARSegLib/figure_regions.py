"""The figure `arseg segment --png` writes for a model with several regions (volume_regions.RegionsResult): the
axial slice where the first region's consensus is largest, the first input in grey with every region's consensus
outlined in its card colour, and beside it the disagreement (the largest fraction of samples differing from a
region's consensus), each region's volume and the samples' range above. No MRML, no Qt: matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from .pipeline import _axis_nearest_s


def write_regions_figure(result, image_kji: np.ndarray, path, report: Optional[Dict[str, Any]] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = report or result.report()
    axis = 2 - _axis_nearest_s(result.ijk_to_ras)  # the numpy axis of the slices nearest axial
    first = result.task.regions[0].name
    area = result.region_consensus(first).sum(axis=tuple(a for a in range(3) if a != axis))
    index = int(np.argmax(area)) if area.any() else image_kji.shape[axis] // 2

    def plane(a):
        return np.take(a, index, axis=axis)

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    lo, hi = np.percentile(plane(image_kji), (1, 99.5))
    disagreement = np.zeros(plane(image_kji).shape, dtype=np.float32)
    for ax in axes:
        ax.imshow(plane(image_kji), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        ax.set_axis_off()
    for region in result.task.regions:
        mask = plane(result.region_consensus(region.name))
        if mask.any():
            axes[0].contour(mask, levels=[0.5], colors=[tuple(region.color)], linewidths=1.4)
        for part in result.region_parts(region.name):
            disagreement = np.maximum(disagreement, plane(part.result.full(part.result.disagreement)))
    shown = axes[1].imshow(np.ma.masked_equal(disagreement, 0), cmap="hot", vmin=0, vmax=1, alpha=0.8,
                           interpolation="nearest")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, label="fraction of samples differing")
    lines = [f"{r['name']}: {r['consensus_volume_ml']:.1f} mL (samples {r['sample_volume_ml']['min']:.1f}-"
             f"{r['sample_volume_ml']['max']:.1f})" for r in report["regions"]]
    axes[0].set_title(f"slice {index}: consensus per region", fontsize=9)
    axes[1].set_title("disagreement (largest over regions)", fontsize=9)
    fig.suptitle(f"{result.model_name}: " + "; ".join(lines), fontsize=9)
    path = Path(path)
    fig.savefig(str(path), dpi=110, format="png")
    plt.close(fig)
    return path
