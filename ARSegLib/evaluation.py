"""Evaluate a predictor on multi-reader data with the protocol of ../shared/data/README.md, plus the
coarse-to-fine story: per scale, Soft-Dice of the consensus after that scale and its IoU with the
final consensus."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from .engine import ARSegPredictor, SamplingConfig
from .metrics import MetricAccumulator, iou, multi_reader_metrics, soft_dice


def evaluate(predictor: ARSegPredictor, images_NChw: np.ndarray, masks_NRhw: np.ndarray,
             sampling: Optional[SamplingConfig] = None, batch: int = 8,
             progress: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    acc = MetricAccumulator()
    for b in range(0, len(images_NChw), batch):
        res = predictor.segment(images_NChw[b:b + batch], sampling)
        for i in range(res.samples_BNhw.shape[0]):
            readers = masks_NRhw[b + i]
            row = multi_reader_metrics(res.samples_BNhw[i], readers)
            final = res.consensus_Bhw[i]
            for k in range(res.n_scales):
                cons_k = res.scale_consensus_BKhw[i, k]
                row[f"scale{k + 1}_soft_dice"] = soft_dice(cons_k[None], readers)
                row[f"scale{k + 1}_iou_final"] = iou(cons_k, final)
            row["presence_abs_err"] = abs(float(res.presence_B[i]) - float((readers.reshape(len(readers), -1)
                                                                             .max(1) > 0).mean()))
            acc.add(row)
        if progress is not None:
            progress(res.samples_BNhw.shape[0])
    return acc.result()
