"""Next-scale segmentor: a block-causal transformer over all scales' tokens, conditioned on the image.

Sequence layout (L = sum s_k^2 tokens): scale 1's single token is a start token made from c; the
tokens of scale k+1 are the partial sum F_hat_k area-downsampled to s_{k+1} x s_{k+1} (teacher
forcing, as in VAR). Every token also gets a position embedding, a scale embedding and the image
features resized to its scale's grid. Training only: `forward`. Sampling lives in `sampler.py`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .blocks import AdaLNBlock, AdaLNHead, block_causal_bias
from .config import AutoencoderConfig, SegmentorConfig
from .grid import resize_grid
from .image_encoder import ImageFeatures, UNetImageEncoder


class NextScaleSegmentor(nn.Module):
    def __init__(self, cfg: SegmentorConfig, ae_cfg: AutoencoderConfig):
        super().__init__()
        self.cfg, self.scales = cfg, tuple(ae_cfg.scales)
        D, self.vocab_size = cfg.embed_dim, ae_cfg.vocab_size
        self.n_tokens = ae_cfg.n_tokens
        self.image_encoder = UNetImageEncoder(cfg.in_channels, cfg.unet_channels, D, ae_cfg.n_classes,
                                              ae_cfg.latent_size, ae_cfg.crop_size)
        self.start = nn.Linear(D, D)
        self.word_embed = nn.Linear(ae_cfg.code_dim, D)
        self.pos_1LD = nn.Parameter(torch.randn(1, self.n_tokens, D) * 0.02)
        self.level_embed = nn.Embedding(len(self.scales), D)
        nn.init.normal_(self.level_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(AdaLNBlock(D, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.head = AdaLNHead(D, ae_cfg.vocab_size)
        level_L = torch.cat([torch.full((s * s,), k) for k, s in enumerate(self.scales)])
        self.register_buffer("level_L", level_L, persistent=False)
        self.register_buffer("bias_LL", block_causal_bias(self.scales), persistent=False)
        begin = [0]
        for s in self.scales:
            begin.append(begin[-1] + s * s)
        self.begin_ends = [(begin[k], begin[k + 1]) for k in range(len(self.scales))]

    # -- pieces shared by training and sampling ------------------------------------------------
    def image_tokens(self, feats: ImageFeatures, si: int) -> torch.Tensor:
        """Image features resized to scale si's grid, as tokens (B, s*s, D)."""
        return resize_grid(feats.feat_BDhw, self.scales[si], "area").flatten(2).transpose(1, 2)

    def scale_embedding(self, si: int) -> torch.Tensor:
        b, e = self.begin_ends[si]
        return self.pos_1LD[:, b:e] + self.level_embed(self.level_L[b:e])[None]

    def scale_context(self, feats: ImageFeatures, si: int) -> torch.Tensor:
        """What every input token of scale si gets besides its content: position, scale and image features
        (B, s*s, D). The same for all samples of a crop, so sampling computes it once per crop."""
        return self.scale_embedding(si) + self.image_tokens(feats, si)

    def embed_scale(self, cond_BD: torch.Tensor, si: int, x_BlC: Optional[torch.Tensor],
                    context_BlD: torch.Tensor) -> torch.Tensor:
        """Input tokens of scale si: the start token made from c (si = 0) or the embedded downsampled partial
        sum, plus the scale's context."""
        tok = self.start(cond_BD)[:, None] if si == 0 else self.word_embed(x_BlC)
        return tok + context_BlD

    def modulations(self, cond_BD: torch.Tensor) -> List[Tuple[torch.Tensor, ...]]:
        """Every block's and the head's AdaLN modulation for condition c: the same at every scale, so sampling
        computes them once per run (as VAR does) instead of once per scale."""
        return [block.modulation(cond_BD) for block in self.blocks] + [self.head.modulation(cond_BD)]

    def run_blocks(self, x_BLD, cond_BD, bias, last_tokens: Optional[int] = None,
                   modulations: Optional[List[Tuple[torch.Tensor, ...]]] = None):
        """Logits of every token, or of the last `last_tokens` only (the no-cache reference needs the newest
        scale's logits, and computing the others would slow it for nothing)."""
        mods = modulations or [None] * (len(self.blocks) + 1)
        for block, mod in zip(self.blocks, mods):
            x_BLD = block(x_BLD, cond_BD, bias, mod)
        return self.head(x_BLD if last_tokens is None else x_BLD[:, -last_tokens:], cond_BD, mods[-1])

    # -- training -----------------------------------------------------------------------------
    def forward(self, image_BChw: torch.Tensor, x_BLC: torch.Tensor):
        """Teacher-forced logits of every scale. x_BLC: `quantizer.idx_to_teacher_input` (L-1 tokens).

        Returns (logits_BLV, image features) so the caller can add the dense and presence losses.
        """
        feats = self.image_encoder(image_BChw)
        parts, b = [], 0
        for si, pn in enumerate(self.scales):
            parts.append(self.embed_scale(feats.cond_BD, si, None if si == 0 else x_BLC[:, b:b + pn * pn],
                                          self.scale_context(feats, si)))
            b += 0 if si == 0 else pn * pn
        x_BLD = torch.cat(parts, dim=1)
        return self.run_blocks(x_BLD, feats.cond_BD, self.bias_LL), feats

    def keep_cached_rows(self, rows_R: torch.Tensor):
        """Sampling: only these rows of the batch go on; every block's key/value cache keeps theirs."""
        for block in self.blocks:
            block.attn.keep_rows(rows_R)

    def kv_caching(self, enable: bool):
        """Sampling with a key/value cache sized for the whole token sequence (on), or none (off)."""
        for block in self.blocks:
            block.attn.kv_caching(self.n_tokens if enable else 0)
