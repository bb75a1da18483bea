"""Inference only: scale-by-scale sampling of token maps, with or without a key/value cache.

The cached path feeds each scale's new tokens only; the no-cache path recomputes the whole prefix at
every scale and is kept as the reference for tests and benchmarks. Both draw the same random numbers
in the same order, so for one seed they yield the same tokens (up to float round-off in the logits).
Randomness comes from one stream per crop (CropStreams), so batching never changes a crop's samples.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .image_encoder import ImageFeatures
from .quantizer import MultiScaleQuantizer
from .segmentor import NextScaleSegmentor

# (token maps per scale so far, partial sums so far) -> the rows (ascending) that draw the finer scales
RowSelector = Callable[[List[torch.Tensor], List[torch.Tensor]], torch.Tensor]


class CropStreams:
    """One random stream per crop, seeded by (seed, crop id): a crop's samples depend on its image, the seed and
    its id only, never on which other crops share the call (a click's chunks of planes, whole-volume tiles,
    evaluation batches). With views > 1 (test-time augmentation), one stream per (view, crop), view-major;
    view 0's are the crops' own streams."""

    def __init__(self, seed: int, crop_ids: Sequence[int], device: torch.device, views: int = 1):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(stream_seed(seed, c, k))
                           for k in range(views) for c in crop_ids]

    def __len__(self) -> int:
        return len(self.generators)

    def uniform(self, rows_per_crop: Sequence[int], per_row: int) -> torch.Tensor:
        """U[0, 1) numbers (sum(rows_per_crop), per_row); rows grouped by crop, in crop order."""
        parts = [torch.rand(int(n), per_row, generator=g, device=self.device)
                 for g, n in zip(self.generators, rows_per_crop) if n]
        return torch.cat(parts) if parts else torch.empty(0, per_row, device=self.device)


def stream_seed(seed: int, crop_id: int, view: int = 0) -> int:
    if crop_id < 0:
        raise ValueError(f"crop ids are non-negative, got {crop_id}")
    base = ((int(seed) & 0xFFFFFFFF) << 31) ^ (int(crop_id) & 0x7FFFFFFF)
    return (base + int(view) * 0x9E3779B97F4A7C15) % (1 << 64)  # views: far apart in the 64-bit seed space


def sample_from_logits(logits_BlV: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       u_Bl: torch.Tensor) -> torch.Tensor:
    """Draw one token per position from softmax(logits / T) (top-k / top-p filtered), by the inverse CDF of one
    given uniform number per position (u_Bl, same shape as logits_BlV without V): cheaper on a CPU than
    torch.multinomial, and the caller decides where the randomness comes from."""
    if temperature <= 0:
        return logits_BlV.argmax(-1)
    logits = logits_BlV.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) > top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    cdf = logits.softmax(-1).view(-1, V).cumsum(-1)
    u = u_Bl.reshape(-1, 1).to(cdf.dtype) * cdf[:, -1:]
    return (cdf < u).sum(-1).clamp_(max=V - 1).view(logits_BlV.shape[:-1])


@torch.inference_mode()
def sample_tokens(segmentor: NextScaleSegmentor, quantizer: MultiScaleQuantizer, feats: ImageFeatures,
                  temperatures: Sequence[float], top_k: int, top_p: float, streams: CropStreams,
                  use_cache: bool = True, on_scale: Optional[Callable[[int], None]] = None,
                  crop_of_row: Optional[torch.Tensor] = None,
                  prefix_idx: Sequence[torch.Tensor] = (),
                  select: Optional[Tuple[int, RowSelector]] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One sequence per crop of `feats`, or, with crop_of_row (sorted), one per row: row r samples crop
    crop_of_row[r]. Returns (idx_Bl per scale, partial sum F_hat_k per scale), one row per sequence.

    prefix_idx: token maps (R, s_k^2) of scales 1..k given for every row: those scales are teacher-forced
    through the same blocks (so the key/value cache holds them as if drawn) and only the finer ones are drawn.
    select: (si, selector): after scale si (0-based) the selector gets the token maps and partial sums so far and
    returns the rows that go on (ascending); only those draw the finer scales (the returned lists hold those rows
    only). Their keys and values (or, without the cache, their input tokens) are kept as drawn, so a kept row goes
    on as it would have without the selection, except for the random numbers of its finer scales."""
    n_crops = feats.cond_BD.shape[0]
    if select is not None and not 0 <= select[0] < len(segmentor.scales) - 1:
        raise ValueError(f"rows can be selected after scales 0..{len(segmentor.scales) - 2}, not {select[0]}")
    if crop_of_row is None:
        crop_of_row = torch.arange(n_crops, device=feats.cond_BD.device)
    if len(streams) != n_crops or (crop_of_row.diff() < 0).any():
        raise ValueError("one random stream per crop, and rows grouped by crop in crop order")
    rows_per_crop = torch.bincount(crop_of_row, minlength=n_crops).tolist()
    cond_BD = feats.cond_BD[crop_of_row]
    modulations = segmentor.modulations(cond_BD)
    idx_list, partial_sums = [], []
    f_hat, x_next = None, None
    prefix: List[torch.Tensor] = []  # no-cache path: every scale's input tokens so far
    segmentor.kv_caching(use_cache)
    try:
        for si, pn in enumerate(segmentor.scales):
            context_BlD = segmentor.scale_context(feats, si)[crop_of_row]  # computed once per crop
            x_new = segmentor.embed_scale(cond_BD, si, x_next, context_BlD)
            if use_cache:
                logits_BlV = segmentor.run_blocks(x_new, cond_BD, None, modulations=modulations)
            else:
                prefix.append(x_new)
                e = segmentor.begin_ends[si][1]
                logits_BlV = segmentor.run_blocks(torch.cat(prefix, 1), cond_BD, segmentor.bias_LL[:e, :e],
                                                  last_tokens=pn * pn, modulations=modulations)
            if si < len(prefix_idx):
                idx_Bl = prefix_idx[si].to(device=logits_BlV.device, dtype=torch.long)
            else:
                idx_Bl = sample_from_logits(logits_BlV, temperatures[si], top_k, top_p,
                                            streams.uniform(rows_per_crop, pn * pn))
            f_hat, x_next = quantizer.next_scale_input(f_hat, idx_Bl, si)
            idx_list.append(idx_Bl)
            partial_sums.append(f_hat)
            if select is not None and si == select[0]:
                rows_R = select[1](idx_list, partial_sums)
                crop_of_row, cond_BD = crop_of_row[rows_R], cond_BD[rows_R]
                rows_per_crop = torch.bincount(crop_of_row, minlength=n_crops).tolist()
                modulations = [tuple(m[rows_R] for m in mods) for mods in modulations]
                idx_list, partial_sums = [t[rows_R] for t in idx_list], [f[rows_R] for f in partial_sums]
                f_hat, x_next = f_hat[rows_R], x_next[rows_R]
                prefix = [x[rows_R] for x in prefix]
                segmentor.keep_cached_rows(rows_R)
            if on_scale is not None:
                on_scale(si)
    finally:
        segmentor.kv_caching(False)
    return idx_list, partial_sums
