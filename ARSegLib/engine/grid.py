"""Resizing square grids (token maps, latents, feature maps) by a precomputed matrix.

Area and bicubic resizing are linear maps, so for the few grid sizes the model uses we tabulate each
once (by resizing the identity with F.interpolate: the same map, by construction) and apply it as one
matrix product. On a CPU, F.interpolate on these small grids costs up to 100x more than the product
(per-element index arithmetic for a 2 x 2 to 8 x 8 output), and sampling resizes at every scale.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _resize_matrix(src: int, dst: int, mode: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # built outside inference mode: a matrix first made while sampling must still serve training's autograd
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(src * src, dtype=torch.float64).view(src * src, 1, src, src)
        return F.interpolate(eye, size=(dst, dst), mode=mode).view(src * src, dst * dst).to(device, dtype)


def resize_grid(x_BChw: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """F.interpolate(x, size=(size, size), mode=mode) for a square grid, up to float round-off."""
    B, C, h, w = x_BChw.shape
    if h != w:
        raise ValueError(f"resize_grid takes square grids, got {h} x {w}")
    if h == size:
        return x_BChw
    m = _resize_matrix(h, size, mode, x_BChw.device, x_BChw.dtype)
    return (x_BChw.reshape(B * C, h * h) @ m).view(B, C, size, size)
