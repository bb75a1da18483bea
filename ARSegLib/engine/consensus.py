"""Consensus over N samples: majority mask, disagreement, per-sample IoU, consensus after each scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class ConsensusResult:
    """Everything the user sees for B crops. Label maps are uint8 (binary: 0/1)."""

    samples_BNhw: np.ndarray  # every sample's final mask
    consensus_Bhw: np.ndarray  # per-pixel majority of the samples
    disagreement_Bhw: np.ndarray  # float32: fraction of samples whose label differs from the consensus
    probability_Bhw: np.ndarray  # float32: fraction of samples voting for the consensus label's foreground
    sample_iou_BN: np.ndarray  # float32: IoU of each sample's foreground with the consensus foreground
    scale_consensus_BKhw: np.ndarray  # consensus after each scale (coarse to fine)
    presence_B: np.ndarray  # float32: predicted fraction of readers marking each crop
    tokens: Optional[SampleTokens] = None  # each kept sample's token maps, when the caller asked for them

    @property
    def n_scales(self) -> int:
        return self.scale_consensus_BKhw.shape[1]


@dataclass
class SampleTokens:
    """The token maps behind B crops' N kept samples, so that a later run can keep a sample's coarse scales.

    idx_BNL: every scale's tokens, scale after scale in raster order (L = sum of s_k^2), uint8 when the
    vocabulary fits; view_BN: the symmetric view (views.py) the sample was drawn on, its tokens live there;
    drawn_BN: False for an empty sample (the presence gate drew none), whose tokens are meaningless zeros."""

    idx_BNL: np.ndarray
    view_BN: np.ndarray
    drawn_BN: np.ndarray

    def scale_tokens(self, scales, upto: int):
        """Token maps of scales 1..upto as (B, N, s_k^2) arrays, coarse to fine."""
        out, b = [], 0
        for pn in tuple(scales)[:upto]:
            out.append(self.idx_BNL[..., b:b + pn * pn])
            b += pn * pn
        return out


def token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.int32


MAX_SAMPLES = 255  # votes are counted in uint8


def foreground_votes(samples_BNhw: torch.Tensor, n_classes: int) -> torch.Tensor:
    """How many samples mark each pixel (int16). Counted in uint8, which on a CPU is an order of magnitude
    faster than a comparison followed by a wider sum; binary label maps are 0/1 already (the decoder's
    output), multi-class ones are clamped to 0/1 first."""
    if samples_BNhw.shape[1] > MAX_SAMPLES:
        raise ValueError(f"at most {MAX_SAMPLES} samples, got {samples_BNhw.shape[1]}")
    fg = samples_BNhw if n_classes <= 1 else samples_BNhw.clamp(max=1)
    return fg.to(torch.uint8).sum(1, dtype=torch.uint8).to(torch.int16)


def majority(samples_BNhw: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-pixel majority label. Binary: foreground when at least half the samples say so."""
    if n_classes <= 1:
        return (2 * foreground_votes(samples_BNhw, n_classes) >= samples_BNhw.shape[1]).to(torch.uint8)
    votes = torch.stack([(samples_BNhw == c).sum(1) for c in range(n_classes)], 1)
    return votes.argmax(1).to(torch.uint8)


def pairwise_iou_fg(a_BNhw: torch.Tensor, b_BMhw: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, N, M) IoU of the foregrounds (label > 0) of each a with each b of the same crop; IoU(empty, empty) = 1.

    The intersections are one batched matrix product of 0/1 floats, exact integer counts in float32 below 2^24
    pixels (float64 above): summing boolean maps converts them to int64 first, which at a click's batch cost four
    times as much. The ratios are taken in `dtype`, or in float64 where the counts are."""
    counts = torch.float32 if a_BNhw[0, 0].numel() < 2 ** 24 else torch.float64
    a_BNP = (a_BNhw > 0).flatten(2).to(counts)
    b_BMP = a_BNP if b_BMhw is a_BNhw else (b_BMhw > 0).flatten(2).to(counts)  # a set against itself: once
    ratio = torch.promote_types(counts, dtype)
    inter = torch.bmm(a_BNP, b_BMP.transpose(1, 2)).to(ratio)
    area_a = a_BNP.sum(-1).to(ratio)
    area_b = area_a if b_BMP is a_BNP else b_BMP.sum(-1).to(ratio)
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_fg(a_BNhw: torch.Tensor, b_Bhw: torch.Tensor) -> torch.Tensor:
    """IoU of foreground (label > 0) of each sample with a reference; IoU(empty, empty) = 1."""
    return pairwise_iou_fg(a_BNhw, b_Bhw[:, None])[..., 0].float()


def aggregate(scale_samples_KBNhw: torch.Tensor, presence_B: torch.Tensor, n_classes: int = 1) -> ConsensusResult:
    """scale_samples_KBNhw: every sample decoded after every scale (uint8 label maps; binary: 0/1), scale
    major, so each scale's votes are counted on contiguous memory; the last scale is the samples' result."""
    K, B, N = scale_samples_KBNhw.shape[:3]
    samples_BNhw = scale_samples_KBNhw[-1]
    votes = foreground_votes(samples_BNhw, n_classes)
    consensus = majority(samples_BNhw, n_classes)
    if n_classes <= 1:  # the samples against a binary consensus: the minority's share
        differing = torch.where(consensus > 0, N - votes, votes)
    else:
        differing = (samples_BNhw != consensus[:, None]).sum(1, dtype=torch.int16)
    scale_cons = majority(scale_samples_KBNhw.flatten(0, 1), n_classes).view(K, B, *consensus.shape[-2:])
    return ConsensusResult(
        samples_BNhw=samples_BNhw.cpu().numpy().astype(np.uint8),
        consensus_Bhw=consensus.cpu().numpy(),
        disagreement_Bhw=(differing.float() / N).cpu().numpy(),
        probability_Bhw=(votes.float() / N).cpu().numpy(),
        sample_iou_BN=iou_fg(samples_BNhw, consensus).cpu().numpy().astype(np.float32),
        scale_consensus_BKhw=scale_cons.transpose(0, 1).cpu().numpy(),
        presence_B=presence_B.float().cpu().numpy().astype(np.float32),
    )
