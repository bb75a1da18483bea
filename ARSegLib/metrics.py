"""Multi-reader metrics (GED, HM-IoU, Soft-Dice) and Dice/IoU: the one implementation for everything.

Pure functions of binary masks, following ../shared/data/README.md: IoU(empty, empty) = 1 and
Dice(empty, empty) = 1; GED in its squared form D^2_GED over all ordered pairs, identical indices
included. `MetricAccumulator` averages them over a split.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

SOFT_DICE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _flat(masks) -> np.ndarray:
    m = np.asarray(masks)
    return (m.reshape(m.shape[0], -1) > 0).astype(np.float64)


def pairwise_iou(a_Nhw, b_Mhw) -> np.ndarray:
    """N x M matrix of IoU between two sets of binary masks."""
    a, b = _flat(a_Nhw), _flat(b_Mhw)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def iou(a_hw, b_hw) -> float:
    return float(pairwise_iou(np.asarray(a_hw)[None], np.asarray(b_hw)[None])[0, 0])


def dice(a_hw, b_hw) -> float:
    a, b = np.asarray(a_hw) > 0, np.asarray(b_hw) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def ged(samples_Nhw, readers_Mhw) -> float:
    """Generalized energy distance (squared form) with d = 1 - IoU."""
    d_sy = 1 - pairwise_iou(samples_Nhw, readers_Mhw)
    d_ss = 1 - pairwise_iou(samples_Nhw, samples_Nhw)
    d_yy = 1 - pairwise_iou(readers_Mhw, readers_Mhw)
    return float(2 * d_sy.mean() - d_ss.mean() - d_yy.mean())


def hm_iou(samples_Nhw, readers_Mhw) -> float:
    """Hungarian-matched IoU: the readers repeated to N masks, the assignment maximising total IoU."""
    n, m = len(samples_Nhw), len(readers_Mhw)
    if n % m:
        raise ValueError(f"HM-IoU needs the number of samples ({n}) to be a multiple of readers ({m})")
    iou_NM = pairwise_iou(samples_Nhw, readers_Mhw)
    iou_NN = np.tile(iou_NM, (1, n // m))
    rows, cols = linear_sum_assignment(iou_NN, maximize=True)
    return float(iou_NN[rows, cols].mean())


def soft_dice(samples_Nhw, readers_Mhw, thresholds: Sequence[float] = SOFT_DICE_THRESHOLDS,
              strict: bool = False) -> float:
    """Mean over thresholds t of Dice(P >= t, G >= t), P the samples' mean and G the readers'. strict: P > t and
    G > t, the AR-Seg authors' definition (their BerDiff evaluation script); the two differ only at t = 0.5, where
    strict means 3 of 4 readers instead of 2."""
    p = (np.asarray(samples_Nhw) > 0).mean(0)
    g = (np.asarray(readers_Mhw) > 0).mean(0)
    if strict:
        return float(np.mean([dice(p > t, g > t) for t in thresholds]))
    return float(np.mean([dice(p >= t, g >= t) for t in thresholds]))


def multi_reader_metrics(samples_Nhw, readers_Mhw) -> Dict[str, float]:
    """soft_dice: the inclusive (>=) definition kept for continuity; soft_dice_strict: the authors' (>), the one
    to compare with the AR-Seg paper."""
    return {"ged": ged(samples_Nhw, readers_Mhw), "hm_iou": hm_iou(samples_Nhw, readers_Mhw),
            "soft_dice": soft_dice(samples_Nhw, readers_Mhw),
            "soft_dice_strict": soft_dice(samples_Nhw, readers_Mhw, strict=True)}


class MetricAccumulator:
    """Mean of per-image metrics over a split (every image counted, none excluded)."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.n_images = 0

    def add(self, values: Dict[str, float]):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n_images += 1

    def result(self) -> Dict[str, float]:
        out = {k: v / max(self.n_images, 1) for k, v in self.sums.items()}
        out["n_images"] = self.n_images
        return out


# --------------------------------------------------------------------------------------------- regions (BraTS)
# A multi-class label map is scored per region, a region being a union of classes (BraTS: whole tumour = the
# classes of labels 1, 2 and 4; tumour core = 1 and 4; enhancing tumour = 4), each region's Dice a binary Dice.

def region_mask(label_map, classes: Sequence[int]) -> np.ndarray:
    """Where the label map holds one of the region's classes (bool)."""
    labels = np.asarray(label_map)
    return np.isin(labels, np.asarray(list(classes)))


def region_dice(pred_labels, true_labels, regions: Dict[str, Sequence[int]]) -> Dict[str, float]:
    """Dice per region of two label maps of one shape; regions: {name: classes}. Dice(empty, empty) = 1."""
    pred, true = np.asarray(pred_labels), np.asarray(true_labels)
    if pred.shape != true.shape:
        raise ValueError(f"label maps of different shapes: {pred.shape} and {true.shape}")
    return {name: dice(region_mask(pred, classes), region_mask(true, classes)) for name, classes in regions.items()}
