"""Evaluate a predictor on multi-reader data with the protocol of ../shared/data/README.md, plus the
coarse-to-fine story: per scale, Soft-Dice of the consensus after that scale and its IoU with the
final consensus."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import torch

from .engine import ARSegPredictor, SamplingConfig
from .metrics import MetricAccumulator, iou, multi_reader_metrics, soft_dice


def evaluate(predictor: ARSegPredictor, images_NChw: np.ndarray, masks_NRhw: np.ndarray,
             sampling: Optional[SamplingConfig] = None, batch: int = 8,
             progress: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    acc = MetricAccumulator()
    for b in range(0, len(images_NChw), batch):
        res = predictor.segment(images_NChw[b:b + batch], sampling, crop_ids=range(b, min(b + batch, len(images_NChw))))
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


@torch.inference_mode()
def dense_logits(predictor: ARSegPredictor, images_NChw: np.ndarray, batch: int = 32):
    """The image encoder's dense head (a U-Net trained on the readers' soft consensus), batch by batch."""
    for b in range(0, len(images_NChw), batch):
        x = torch.as_tensor(np.asarray(images_NChw[b:b + batch], np.float32), device=predictor.device)
        yield predictor.segmentor.image_encoder(x).dense_logits_BChw


def dense_baseline_masks(predictor: ARSegPredictor, images_NChw: np.ndarray, batch: int = 32) -> np.ndarray:
    """The deterministic U-Net baseline: the dense head thresholded at 0.5 (binary) or its argmax."""
    return np.concatenate([predictor.autoencoder.logits_to_mask(logits).cpu().numpy()
                           for logits in dense_logits(predictor, images_NChw, batch)])


def evaluate_dense_levels(predictor: ARSegPredictor, images_NChw: np.ndarray, readers_NRhw: np.ndarray,
                          n_samples: int = 16, batch: int = 32) -> Dict[str, float]:
    """A simple probabilistic baseline: the U-Net's soft foreground map P thresholded at N evenly spaced levels
    (sample i = P > (i + 0.5) / N), so the samples' mean is P itself. Binary models only."""
    if predictor.n_classes > 1:
        raise ValueError("the dense-levels baseline is defined for binary models")
    levels = torch.tensor([(i + 0.5) / n_samples for i in range(n_samples)])
    acc, i = MetricAccumulator(), 0
    for logits in dense_logits(predictor, images_NChw, batch):
        prob_Bhw = torch.sigmoid(logits[:, 0]).cpu()
        samples_BNhw = (prob_Bhw[:, None] > levels[None, :, None, None]).to(torch.uint8).numpy()
        for samples in samples_BNhw:
            acc.add(multi_reader_metrics(samples, readers_NRhw[i]))
            i += 1
    return acc.result()


def evaluate_deterministic(masks_Nhw: np.ndarray, readers_NRhw: np.ndarray, n_samples: int = 16) -> Dict[str, float]:
    """A deterministic model's N "samples" are N copies of its one output (the protocol)."""
    acc = MetricAccumulator()
    for m, readers in zip(masks_Nhw, readers_NRhw):
        acc.add(multi_reader_metrics(np.repeat(m[None], n_samples, 0), readers))
    return acc.result()
