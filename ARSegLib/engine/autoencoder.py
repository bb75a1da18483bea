"""Multi-scale mask autoencoder: convolutional encoder -> multi-scale quantizer -> convolutional decoder."""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused
from .config import AutoencoderConfig
from .quantizer import MultiScaleQuantizer


def n_stride2_stages(crop_size: int, latent_size: int) -> int:
    n = int(round(math.log2(crop_size / latent_size)))
    if latent_size * 2 ** n != crop_size:
        raise ValueError(f"crop size {crop_size} is not latent size {latent_size} times a power of two")
    return n


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        # conv1 and the SiLU after it are one kernel at CPU inference (fused.conv2d; plain ops in training)
        return x + fused.conv2d(self.conv2, fused.conv2d(self.conv1, F.silu(x), silu=True))


class MaskEncoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        n = n_stride2_stages(cfg.crop_size, cfg.latent_size)
        if len(cfg.channels) != n:
            raise ValueError(f"channels needs {n} widths (one per stride-2 stage), got {cfg.channels}")
        layers, c_in = [], max(cfg.n_classes, 1)
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.SiLU()]
            c_in = c
        layers += [ResBlock(c_in), nn.Conv2d(c_in, cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x_BChw):
        return self.net(x_BChw)


class MaskDecoder(nn.Module):
    """Latent -> logits. Learned 2x upsampling to a quarter of the crop, then a 4x pixel shuffle:
    masks are smooth, and the full-resolution convolutions would dominate the CPU time of decoding
    every scale of every sample."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        n = n_stride2_stages(cfg.crop_size, cfg.latent_size)
        c = cfg.decoder_channels
        self.out_ch = max(cfg.n_classes, 1)
        layers = [nn.Conv2d(cfg.code_dim, c, 3, padding=1), ResBlock(c)]
        shuffle = 4 if n >= 2 else 2 ** n
        for _ in range(n - int(math.log2(shuffle))):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(c, self.out_ch * shuffle * shuffle, 1), nn.PixelShuffle(shuffle)]
        self.net = nn.Sequential(*layers)

    def forward(self, f_BChw):
        return self.net(f_BChw)

    def labels(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Label maps (B, h, w) uint8, the same as thresholding / argmax of forward(), cheaper at inference:
        channels-last activations (oneDNN's native layout: about 30 % faster decoding on a CPU), each convolution
        with the SiLU after it as one kernel, and the decision taken per pixel before the pixel shuffle, which
        then moves whole runs of labels instead of floats."""
        x = f_BChw.contiguous(memory_format=torch.channels_last)
        layers = list(self.net[:-1])
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                x = fused.conv2d(layer, x, silu=i + 1 < len(layers) and isinstance(layers[i + 1], nn.SiLU))
            elif not (isinstance(layer, nn.SiLU) and i > 0 and isinstance(layers[i - 1], nn.Conv2d)):  # fused above
                x = layer(x)
        B, _, h, w = x.shape
        pre_BhwC = x.permute(0, 2, 3, 1)  # a view of channels-last memory
        r = self.net[-1].upscale_factor
        if self.out_ch == 1:
            labels_BhwS = (pre_BhwC > 0).to(torch.uint8)
        else:
            labels_BhwS = pre_BhwC.reshape(B, h, w, self.out_ch, r * r).argmax(3).to(torch.uint8)
        return pixel_shuffle_labels(labels_BhwS.contiguous(), r)


def pixel_shuffle_labels(labels_BhwS: torch.Tensor, r: int) -> torch.Tensor:
    """(B, h, w, r * r) uint8, sub-pixel (i, j) at i * r + j -> (B, h * r, w * r), as nn.PixelShuffle lays it out.
    A run of r labels (j = 0..r-1) moves as one r-byte word: a byte-wise permutation costs several times more."""
    B, h, w, _ = labels_BhwS.shape
    word = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(r)
    if word is None:
        return labels_BhwS.view(B, h, w, r, r).permute(0, 1, 3, 2, 4).reshape(B, h * r, w * r)
    rows_Bhiw = labels_BhwS.view(word).view(B, h, w, r).permute(0, 1, 3, 2).contiguous()
    return rows_Bhiw.view(torch.uint8).view(B, h * r, w * r)


class MaskAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = MaskEncoder(cfg)
        self.quantizer = MultiScaleQuantizer(cfg.vocab_size, cfg.code_dim, cfg.scales, cfg.latent_size, cfg.beta)
        self.decoder = MaskDecoder(cfg)

    @property
    def binary(self) -> bool:
        return self.cfg.n_classes <= 1

    def mask_to_input(self, mask_Bhw: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return (mask_Bhw > 0).float()[:, None]
        return F.one_hot(mask_Bhw.long(), self.cfg.n_classes).permute(0, 3, 1, 2).float()

    def forward(self, mask_Bhw: torch.Tensor, quantize: bool = True):
        """Returns (logits, vq_loss, idx list)."""
        f_BChw = self.encoder(self.mask_to_input(mask_Bhw))
        f_hat, vq_loss, idx_list = self.quantizer(f_BChw, quantize=quantize)
        return self.decoder(f_hat), vq_loss, idx_list

    def reconstruction_loss(self, logits, mask_Bhw):
        if self.binary:
            target = (mask_Bhw > 0).float()[:, None]
            prob = torch.sigmoid(logits)
            inter = (prob * target).sum((1, 2, 3))
            dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
            return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()
        return F.cross_entropy(logits, mask_Bhw.long())

    @torch.no_grad()
    def mask_to_idx(self, mask_Bhw: torch.Tensor) -> List[torch.Tensor]:
        return self.quantizer.f_to_idx(self.encoder(self.mask_to_input(mask_Bhw)))

    def logits_to_mask(self, logits_BChw: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return (logits_BChw[:, 0] > 0).to(torch.uint8)
        return logits_BChw.argmax(1).to(torch.uint8)

    def decode_masks(self, f_hat_BChw: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """Partial sums -> label maps (uint8), in chunks: they bound memory, and a chunk's activations that
        stay in the CPU's caches decode about a quarter faster than larger ones (`arseg bench`)."""
        return torch.cat([self.decoder.labels(f_hat_BChw[i:i + chunk]) for i in range(0, f_hat_BChw.shape[0], chunk)])

    @torch.no_grad()
    def idx_to_masks(self, idx_list: List[torch.Tensor]) -> List[torch.Tensor]:
        """Coarse-to-fine masks: the decoded partial sum after each scale."""
        return [self.decode_masks(f) for f in self.quantizer.idx_to_partial_sums(idx_list)]
