"""Transformer blocks: self-attention with an optional key/value cache, AdaLN conditioning (VAR-style)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.capacity = 0  # > 0: key/value caching on, for sequences of at most this many tokens
        self.cached_kv: Optional[torch.Tensor] = None  # (B, capacity, 2 * dim): keys then values, per token
        self.filled = 0

    def kv_caching(self, capacity: int):
        """capacity > 0: cache keys and values of up to `capacity` tokens (sampling); 0: off, cache freed.
        The cache is allocated once for the whole sequence, token-major as the qkv projection lays them out, and
        each scale writes its own rows: concatenating at every scale would copy the growing prefix again and
        again, and a head-major cache would need a strided gather (at a click's batch, tens of MB per block
        and scale on a CPU)."""
        self.capacity, self.cached_kv, self.filled = capacity, None, 0

    def keep_rows(self, rows_R: torch.Tensor):
        """Only these rows of the batch go on sampling: the cache keeps theirs (a copy of the kept rows only)."""
        if self.cached_kv is not None:
            self.cached_kv = self.cached_kv[rows_R]

    def forward(self, x_BLC: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x_BLC.shape
        qkv_BL3C = fused.linear(self.qkv, x_BLC)
        if self.capacity:  # inference: this call holds only the newest scale; earlier scales come from the cache
            if self.cached_kv is None:
                self.cached_kv = qkv_BL3C.new_empty(B, self.capacity, 2 * C)
            end = self.filled + L
            if end > self.capacity:
                raise RuntimeError(f"key/value cache holds {self.capacity} tokens, asked for {end}")
            self.cached_kv[:, self.filled:end] = qkv_BL3C[:, :, C:]
            self.filled = end
            q = qkv_BL3C[:, :, :C].view(B, L, self.heads, self.head_dim).transpose(1, 2)
            k, v = self.cached_kv[:, :end].view(B, end, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = qkv_BL3C.view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop)
        return fused.linear(self.proj, o.transpose(1, 2).reshape(B, L, C))


class AdaLNBlock(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the condition c."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads, dropout)
        hidden = int(dim * mlp_ratio)
        # kept as a Sequential for the weights' names; mlp_forward runs it (Linear, tanh-GELU, Linear)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def modulation(self, cond_BC: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(1 + gate_attn, 1 + gate_mlp, 1 + scale_attn, 1 + scale_mlp, shift_attn, shift_mlp), each (B, 1, C)."""
        g1, g2, s1, s2, b1, b2 = self.ada(cond_BC)[:, None].chunk(6, dim=-1)
        return 1 + g1, 1 + g2, 1 + s1, 1 + s2, b1, b2

    def forward(self, x_BLC, cond_BC, attn_bias, modulation: Optional[Tuple[torch.Tensor, ...]] = None):
        """modulation: self.modulation(cond_BC), when the caller computed it once for many calls (sampling: every
        scale; it is the same at every scale)."""
        g1, g2, s1, s2, b1, b2 = self.modulation(cond_BC) if modulation is None else modulation
        # addcmul: modulation and gated residual in one pass each (these element-wise passes over every token
        # cost about as much as the matrix products on a CPU)
        x_BLC = torch.addcmul(x_BLC, g1, self.attn(torch.addcmul(b1, self.norm(x_BLC), s1), attn_bias))
        return torch.addcmul(x_BLC, g2, self.mlp_forward(torch.addcmul(b2, self.norm(x_BLC), s2)))

    def mlp_forward(self, h_BLC: torch.Tensor) -> torch.Tensor:
        """self.mlp(h); at CPU inference its first layer and the GELU run as one fused oneDNN kernel."""
        return fused.linear(self.mlp[2], fused.linear(self.mlp[0], h_BLC, gelu=True))


class AdaLNHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, vocab_size)

    def modulation(self, cond_BC: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(1 + scale, shift), each (B, 1, C)."""
        scale, shift = self.ada(cond_BC)[:, None].chunk(2, dim=-1)
        return 1 + scale, shift

    def forward(self, x_BLC, cond_BC, modulation: Optional[Tuple[torch.Tensor, ...]] = None):
        scale, shift = self.modulation(cond_BC) if modulation is None else modulation
        return fused.linear(self.out, torch.addcmul(shift, self.norm(x_BLC), scale))


def block_causal_bias(scales, device=None) -> torch.Tensor:
    """L x L additive mask: a token of scale k sees every token of scales <= k (its own included)."""
    level_L = torch.cat([torch.full((s * s,), k) for k, s in enumerate(scales)])
    allowed = level_L[:, None] >= level_L[None, :]
    bias = torch.zeros(allowed.shape)
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.to(device)
