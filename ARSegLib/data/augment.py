"""Augmentation of image + reader masks: the 8 flips/right-angle rotations, small rotations, and
intensity windowing (so a model trained on per-crop scaled PNGs copes with other HU windows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F

from ..engine.views import dihedral  # the same 8 views the model is sampled on


@dataclass
class AugmentConfig:
    dihedral: bool = True
    rotate_deg: float = 15.0  # uniform in [-rotate_deg, rotate_deg]; 0: off
    rotate_prob: float = 0.3
    window_low: Tuple[float, float] = (0.0, 0.15)  # new black point drawn from this range
    window_high: Tuple[float, float] = (0.8, 1.0)  # new white point
    gamma: Tuple[float, float] = (0.8, 1.25)
    intensity_prob: float = 0.5


def rotate(x_BChw: torch.Tensor, angle_B: torch.Tensor, mode: str) -> torch.Tensor:
    cos, sin = torch.cos(angle_B), torch.sin(angle_B)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, list(x_BChw.shape), align_corners=False)
    return F.grid_sample(x_BChw, grid, mode=mode, padding_mode="border", align_corners=False)


def augment_batch(image_BChw: torch.Tensor, masks_BRhw: torch.Tensor, cfg: AugmentConfig,
                  g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """image in [0, 1] (float), masks uint8 label maps; the same geometric transform for both."""
    B = image_BChw.shape[0]
    if cfg.dihedral:
        ks = torch.randint(0, 8, (B,), generator=g)
        image_BChw = torch.stack([dihedral(image_BChw[b], int(ks[b])) for b in range(B)])
        masks_BRhw = torch.stack([dihedral(masks_BRhw[b], int(ks[b])) for b in range(B)])
    if cfg.rotate_deg > 0:
        pick = torch.rand(B, generator=g) < cfg.rotate_prob
        if pick.any():
            ang = (torch.rand(int(pick.sum()), generator=g) * 2 - 1) * cfg.rotate_deg * torch.pi / 180
            image_BChw[pick] = rotate(image_BChw[pick], ang, "bilinear")
            m = masks_BRhw[pick].float()
            masks_BRhw[pick] = rotate(m, ang, "nearest").round().to(masks_BRhw.dtype)
    if cfg.intensity_prob > 0:
        pick = torch.rand(B, generator=g) < cfg.intensity_prob
        n = int(pick.sum())
        if n:
            lo = cfg.window_low[0] + torch.rand(n, generator=g) * (cfg.window_low[1] - cfg.window_low[0])
            hi = cfg.window_high[0] + torch.rand(n, generator=g) * (cfg.window_high[1] - cfg.window_high[0])
            gm = cfg.gamma[0] * (cfg.gamma[1] / cfg.gamma[0]) ** torch.rand(n, generator=g)
            x = ((image_BChw[pick] - lo[:, None, None, None]) / (hi - lo)[:, None, None, None]).clamp(0, 1)
            image_BChw[pick] = x ** gm[:, None, None, None]
    return image_BChw, masks_BRhw
