"""Keeping n of a crop's P candidate samples so that they represent all P as well as n masks can: greedy kernel
herding (Chen, Welling & Smola, UAI 2010) with the kernel IoU(a, b), IoU(empty, empty) = 1.

Sixteen independent draws over- or under-represent a mode by chance (say 11 outlines where the model's
distribution has 8); herding picks, one at a time, the candidate that brings the kept set's mean similarity
profile closest to that of the whole pool, a quasi-Monte-Carlo choice of n samples of the same distribution.
Multi-class label maps are compared on their foreground (label > 0)."""

from __future__ import annotations

import torch

from .consensus import pairwise_iou_fg


def kernel_herding(masks_BPhw: torch.Tensor, n: int, repeat: bool = False) -> torch.Tensor:
    """Indices (B, n) of the kept candidates, in the order herding picks them (the most typical first); each
    candidate is kept at most once, or, with repeat, as often as herding picks it (n may then exceed P: fewer
    candidates than samples, each repeated about as often as it represents the pool). Ties go to the lower
    index, so the choice is deterministic."""
    B, P = masks_BPhw.shape[:2]
    if n < 1 or (n > P and not repeat):
        raise ValueError(f"cannot keep {n} of {P} candidates")
    k_BPP = pairwise_iou_fg(masks_BPhw, masks_BPhw, torch.float64)  # float64: herding sums P of them
    target_BP = k_BPP.mean(2)  # each candidate's mean similarity to the whole pool
    kept_sum_BP = torch.zeros(B, P, dtype=k_BPP.dtype, device=k_BPP.device)
    taken_BP = torch.zeros(B, P, dtype=torch.bool, device=k_BPP.device)
    picks = []
    for t in range(n):
        score_BP = (target_BP - kept_sum_BP / (t + 1)).masked_fill(taken_BP, float("-inf"))
        j_B = score_BP.argmax(1)
        picks.append(j_B)
        if not repeat:
            taken_BP[torch.arange(B), j_B] = True
        kept_sum_BP += k_BPP[torch.arange(B), :, j_B]
    return torch.stack(picks, 1)
