"""Inference only: scale-by-scale sampling of token maps, with or without a key/value cache.

The cached path feeds each scale's new tokens only; the no-cache path recomputes the whole prefix at
every scale and is kept as the reference for tests and benchmarks. Both draw the same random numbers
in the same order, so for one seed they yield the same tokens (up to float round-off in the logits).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .image_encoder import ImageFeatures
from .quantizer import MultiScaleQuantizer
from .segmentor import NextScaleSegmentor


def sample_from_logits(logits_BlV: torch.Tensor, temperature: float, top_k: int, top_p: float,
                       generator: Optional[torch.Generator]) -> torch.Tensor:
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
    # inverse-CDF sampling: one uniform number per token (cheaper on a CPU than torch.multinomial)
    cdf = logits.softmax(-1).view(-1, V).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return (cdf < u).sum(-1).clamp_(max=V - 1).view(logits_BlV.shape[:-1])


@torch.inference_mode()
def sample_tokens(segmentor: NextScaleSegmentor, quantizer: MultiScaleQuantizer, feats: ImageFeatures,
                  temperatures: Sequence[float], top_k: int = 0, top_p: float = 0.0,
                  generator: Optional[torch.Generator] = None, use_cache: bool = True,
                  on_scale: Optional[Callable[[int], None]] = None, crop_of_row: Optional[torch.Tensor] = None
                  ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One sequence per crop of `feats`, or, with crop_of_row, one per row (row r samples crop
    crop_of_row[r]). Returns (idx_Bl per scale, partial sum F_hat_k per scale), one row per sequence."""
    if crop_of_row is None:
        crop_of_row = torch.arange(feats.cond_BD.shape[0], device=feats.cond_BD.device)
    cond_BD = feats.cond_BD[crop_of_row]
    idx_list, partial_sums = [], []
    f_hat, x_next = None, None
    prefix: List[torch.Tensor] = []  # no-cache path: every scale's input tokens so far
    segmentor.kv_caching(use_cache)
    try:
        for si, pn in enumerate(segmentor.scales):
            context_BlD = segmentor.scale_context(feats, si)[crop_of_row]  # computed once per crop
            x_new = segmentor.embed_scale(cond_BD, si, x_next, context_BlD)
            if use_cache:
                logits_BlV = segmentor.run_blocks(x_new, cond_BD, None)
            else:
                prefix.append(x_new)
                e = segmentor.begin_ends[si][1]
                logits_BlV = segmentor.run_blocks(torch.cat(prefix, 1), cond_BD, segmentor.bias_LL[:e, :e],
                                                  last_tokens=pn * pn)
            idx_Bl = sample_from_logits(logits_BlV, temperatures[si], top_k, top_p, generator)
            f_hat, x_next = quantizer.next_scale_input(f_hat, idx_Bl, si)
            idx_list.append(idx_Bl)
            partial_sums.append(f_hat)
            if on_scale is not None:
                on_scale(si)
    finally:
        segmentor.kv_caching(False)
    return idx_list, partial_sums
