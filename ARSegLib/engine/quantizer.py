"""Residual multi-scale vector quantizer (VAR-style) with one shared codebook and a shared phi.

For k = 1..K: the residual F - F_hat_{k-1} is area-downsampled to s_k x s_k, each vector takes its
nearest code (token map r_k), the codes are upsampled back to the latent grid, refined by phi and
added to the partial sum F_hat_k. Decoding F_hat_k gives the coarse-to-fine masks.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grid import resize_grid


class SharedPhi(nn.Module):
    """One 3x3 convolution shared by all scales, blended with its input by a per-scale weight."""

    def __init__(self, code_dim: int, n_scales: int):
        super().__init__()
        self.conv = nn.Conv2d(code_dim, code_dim, 3, padding=1)
        self.blend_K = nn.Parameter(torch.full((n_scales,), 0.5))

    def forward(self, h_BChw: torch.Tensor, si: int) -> torch.Tensor:
        w = self.blend_K[si]
        return h_BChw * (1 - w) + self.conv(h_BChw) * w


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int, code_dim: int, scales: Tuple[int, ...], latent_size: int,
                 beta: float = 0.25):
        super().__init__()
        if scales[-1] != latent_size:
            raise ValueError(f"the last scale ({scales[-1]}) must equal the latent size ({latent_size})")
        self.vocab_size, self.code_dim, self.beta = vocab_size, code_dim, beta
        self.scales, self.latent_size = tuple(scales), latent_size
        self.codebook = nn.Embedding(vocab_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        self.phi = SharedPhi(code_dim, len(scales))
        # How often each code was chosen since the last reset (for dead-code re-seeding in training).
        self.register_buffer("usage_V", torch.zeros(vocab_size), persistent=False)

    # -- building blocks -------------------------------------------------------------------------
    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        e_VC = self.codebook.weight
        d_NV = z_NC.pow(2).sum(1, keepdim=True) - 2 * z_NC @ e_VC.t() + e_VC.pow(2).sum(1)[None]
        return d_NV.argmin(1)

    def down(self, f_BChw: torch.Tensor, pn: int) -> torch.Tensor:
        return resize_grid(f_BChw, pn, "area")

    def up(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return resize_grid(z_BChw, self.latent_size, "bicubic")

    def idx_to_h(self, idx_Bl: torch.Tensor, si: int) -> torch.Tensor:
        """Token map of scale si -> its refined contribution phi(up(z)) on the latent grid."""
        pn = self.scales[si]
        z_BChw = self.codebook(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.code_dim, pn, pn)
        return self.phi(self.up(z_BChw), si)

    # -- training forward ------------------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor, quantize: bool = True):
        """Returns (f_hat with straight-through gradient, vq_loss, idx_Bl per scale)."""
        if not quantize:  # warm-up of the autoencoder before the codebook is seeded
            return f_BChw, f_BChw.new_zeros(()), []
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list: List[torch.Tensor] = []
        vq_loss = f_BChw.new_zeros(())
        for si, pn in enumerate(self.scales):
            r_BChw = self.down(f_rest, pn)
            idx_N = self.nearest_code(r_BChw.permute(0, 2, 3, 1).reshape(-1, self.code_dim))
            if self.training:
                self.usage_V += torch.bincount(idx_N, minlength=self.vocab_size).to(self.usage_V)
            idx_Bl = idx_N.view(f_BChw.shape[0], pn * pn)
            h_BChw = self.idx_to_h(idx_Bl, si)
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            idx_list.append(idx_Bl)
            # codebook/phi pulled towards the encoder, encoder committed to its quantization
            vq_loss = vq_loss + F.mse_loss(f_hat, f_BChw.detach()) + self.beta * F.mse_loss(
                f_hat.detach(), f_BChw)
        vq_loss = vq_loss / len(self.scales)
        f_hat_st = (f_hat.detach() - f_BChw.detach()) + f_BChw + (f_hat - f_hat.detach())
        return f_hat_st, vq_loss, idx_list

    @torch.no_grad()
    def residuals(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """All scales' residual vectors (N x C), as the quantizer sees them: for seeding codes."""
        f_rest, out = f_BChw.clone(), []
        for si, pn in enumerate(self.scales):
            r_BChw = self.down(f_rest, pn)
            out.append(r_BChw.permute(0, 2, 3, 1).reshape(-1, self.code_dim))
            idx = self.nearest_code(out[-1]).view(f_BChw.shape[0], pn * pn)
            f_rest = f_rest - self.idx_to_h(idx, si)
        return torch.cat(out)

    @torch.no_grad()
    def reseed(self, vectors_NC: torch.Tensor, only_dead: bool, generator: Optional[torch.Generator] = None
               ) -> int:
        """Replace dead codes (or all codes) with randomly chosen residual vectors. Returns how many."""
        dead = (self.usage_V == 0) if only_dead else torch.ones_like(self.usage_V, dtype=torch.bool)
        n = int(dead.sum())
        if n:
            pick = torch.randint(0, vectors_NC.shape[0], (n,), generator=generator)
            noise = 0.01 * vectors_NC.std() * torch.randn(n, self.code_dim, generator=generator)
            self.codebook.weight.data[dead] = vectors_NC[pick].to(self.codebook.weight) + noise.to(
                self.codebook.weight)
        self.usage_V.zero_()
        return n

    # -- tokens <-> partial sums -----------------------------------------------------------------
    @torch.no_grad()
    def f_to_idx(self, f_BChw: torch.Tensor) -> List[torch.Tensor]:
        f_rest, idx_list = f_BChw.clone(), []
        for si, pn in enumerate(self.scales):
            r_BChw = self.down(f_rest, pn)
            idx_Bl = self.nearest_code(r_BChw.permute(0, 2, 3, 1).reshape(-1, self.code_dim)).view(
                f_BChw.shape[0], pn * pn)
            f_rest = f_rest - self.idx_to_h(idx_Bl, si)
            idx_list.append(idx_Bl)
        return idx_list

    def idx_to_partial_sums(self, idx_list: List[torch.Tensor]) -> List[torch.Tensor]:
        """F_hat_1 .. F_hat_k for the given token maps: what the coarse-to-fine decoding uses."""
        f_hat, out = None, []
        for si, idx_Bl in enumerate(idx_list):
            h = self.idx_to_h(idx_Bl, si)
            f_hat = h if f_hat is None else f_hat + h
            out.append(f_hat)
        return out

    def idx_to_teacher_input(self, idx_list: List[torch.Tensor]) -> torch.Tensor:
        """VAR teacher forcing: the input of scale k+1 is F_hat_k downsampled to s_{k+1}.

        Returns x_BLC for scales 2..K (L = n_tokens - 1), tokens in raster order per scale.
        """
        partial = self.idx_to_partial_sums(idx_list[:-1])
        parts = [self.down(f_hat, self.scales[si + 1]).flatten(2).transpose(1, 2)
                 for si, f_hat in enumerate(partial)]
        return torch.cat(parts, dim=1)

    def next_scale_input(self, f_hat_BChw: Optional[torch.Tensor], idx_Bl: torch.Tensor, si: int):
        """Sampling step: add scale si's tokens, return (new partial sum, input for scale si+1 or None)."""
        h = self.idx_to_h(idx_Bl, si)
        f_hat_BChw = h if f_hat_BChw is None else f_hat_BChw + h
        if si + 1 == len(self.scales):
            return f_hat_BChw, None
        return f_hat_BChw, self.down(f_hat_BChw, self.scales[si + 1]).flatten(2).transpose(1, 2)
