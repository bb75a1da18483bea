"""The 8 symmetries of the square (right-angle rotations and their mirror images) on the last two axes.

Training augments with all 8, so at inference each view of a crop is an image the model knows; sampling
some of a crop's candidates from each view and mapping them back averages out the model's residual
orientation preferences (test-time augmentation)."""

from __future__ import annotations

import torch

N_VIEWS = 8  # the symmetries of the square


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View k (0..7) of the last two axes: rotation by k * 90 degrees, mirrored left-right for k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of dihedral(., k): maps a mask drawn on view k back onto the crop."""
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -(k % 4), dims=(-2, -1))
