"""Presence calibration: refit the presence head (which fraction of readers marks a crop) on frozen image
features, choosing the epoch on val. The joint training shares the image encoder with four other losses and
can leave this small head close to the prior; a few seconds of focused fitting calibrates it."""

from __future__ import annotations

import copy
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.views import dihedral
from .trainer import TrainData


def reader_presence(masks_NRhw: np.ndarray) -> torch.Tensor:
    """Fraction of readers who mark anything in each crop."""
    return torch.from_numpy((masks_NRhw.reshape(len(masks_NRhw), masks_NRhw.shape[1], -1).max(2) > 0)
                            .mean(1).astype(np.float32))


@torch.no_grad()
def pooled_features(image_encoder, images_NChw: np.ndarray, batch: int = 64, flips: bool = False) -> torch.Tensor:
    image_encoder.eval()
    views = range(8) if flips else [0]
    out = []
    for k in views:
        feats = []
        for b in range(0, len(images_NChw), batch):
            x = dihedral(torch.from_numpy(np.ascontiguousarray(images_NChw[b:b + batch])), k)
            feats.append(image_encoder.pooled_features(x))
        out.append(torch.cat(feats))
    return torch.cat(out)


def fit_presence_head(image_encoder, train: TrainData, val: TrainData, epochs: int = 300, lr: float = 3e-3,
                      seed: int = 0, flips: bool = False) -> Dict[str, float]:
    """Refit image_encoder.presence_head in place; returns val BCE / mean absolute error before and after.
    flips: also fit on the 8 flips/rotations of every training crop (8x the feature extraction)."""
    torch.manual_seed(seed)
    x_tr = pooled_features(image_encoder, train.images_NChw, flips=flips)
    y_tr = reader_presence(train.masks_NRhw).repeat(8 if flips else 1)
    x_va, y_va = pooled_features(image_encoder, val.images_NChw), reader_presence(val.masks_NRhw)
    head = image_encoder.presence_head

    def val_scores():
        with torch.no_grad():
            logit = head(x_va)[:, 0]
            return (F.binary_cross_entropy_with_logits(logit, y_va).item(),
                    (torch.sigmoid(logit) - y_va).abs().mean().item())

    before = val_scores()
    best, best_state = before, copy.deepcopy(head.state_dict())
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(x_tr), generator=g)
        for b in range(0, len(perm), 512):
            i = perm[b:b + 512]
            loss = F.binary_cross_entropy_with_logits(head(x_tr[i])[:, 0], y_tr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = val_scores()
        if score[0] < best[0]:
            best, best_state = score, copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    head.eval()
    return {"val_bce_before": before[0], "val_abs_err_before": before[1],
            "val_bce_after": best[0], "val_abs_err_after": best[1]}
