"""A compact U-Net image encoder: fast on a CPU, trained with a direct dense loss.

It gives the segmentor everything it conditions on: a global embedding c (AdaLN), a feature map on
the latent grid (added to every scale's input at that scale's size), a dense soft mask (auxiliary
loss against the readers' soft consensus) and a presence logit (which fraction of readers marks
anything in this crop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_norm_act(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    k = 4 if stride == 2 else 3
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=1),
                         nn.GroupNorm(min(8, c_out), c_out), nn.SiLU())


@dataclass
class ImageFeatures:
    cond_BD: torch.Tensor  # global condition c
    feat_BDhw: torch.Tensor  # features on the latent grid, projected to the transformer width
    dense_logits_BChw: torch.Tensor  # dense prediction at crop resolution (aux loss)
    presence_logit_B: torch.Tensor  # logit of the fraction of readers who mark this crop


class UNetImageEncoder(nn.Module):
    def __init__(self, in_channels: int, channels, embed_dim: int, n_classes: int, latent_size: int,
                 crop_size: int):
        super().__init__()
        self.latent_size, self.crop_size = latent_size, crop_size
        self.out_ch = max(n_classes, 1)
        # the first level is at half the crop size: full-resolution convolutions would cost most of the
        # CPU time, and the dense head's half-resolution logits upsample smoothly (masks are smooth)
        self.stem = conv_norm_act(in_channels, channels[0], stride=2)
        self.down = nn.ModuleList(
            nn.Sequential(conv_norm_act(channels[i], channels[i + 1], stride=2),
                          conv_norm_act(channels[i + 1], channels[i + 1]))
            for i in range(len(channels) - 1))
        self.up = nn.ModuleList(
            conv_norm_act(channels[i + 1] + channels[i], channels[i]) for i in reversed(range(len(channels) - 1)))
        self.dense_head = nn.Conv2d(channels[0], self.out_ch, 1)
        patch = crop_size // 2 // latent_size
        # latent-grid features: bottleneck + the dense soft mask folded onto the grid (pixel unshuffle),
        # so even the coarse scales see the full-resolution outline
        self.unshuffle = nn.PixelUnshuffle(patch)
        self.to_feat = nn.Conv2d(channels[-1] + channels[-2] + self.out_ch * patch * patch, embed_dim, 1)
        pooled = 2 * channels[-1] + 2 * self.out_ch
        self.to_cond = nn.Sequential(nn.Linear(pooled, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.presence_head = nn.Sequential(nn.Linear(pooled, 64), nn.SiLU(), nn.Linear(64, 1))

    def dense_prob(self, logits_BChw):
        return torch.sigmoid(logits_BChw) if self.out_ch == 1 else torch.softmax(logits_BChw, 1)

    def trunk(self, image_BChw: torch.Tensor):
        """U-Net pass: (bottleneck, decoder features at twice the latent size, dense logits at half the crop)."""
        skips = [self.stem(image_BChw)]
        for layer in self.down:
            skips.append(layer(skips[-1]))
        bott = skips[-1]
        x, second = bott, None
        for layer, skip in zip(self.up, reversed(skips[:-1])):
            x = layer(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], 1))
            if second is None:
                second = x
        return bott, second, self.dense_head(x)

    @staticmethod
    def pool(bott, prob) -> torch.Tensor:
        """The global summary behind c and the presence head."""
        return torch.cat([bott.mean((2, 3)), bott.amax((2, 3)), prob.mean((2, 3)), prob.amax((2, 3))], 1)

    def forward(self, image_BChw: torch.Tensor) -> ImageFeatures:
        bott, second, half_logits = self.trunk(image_BChw)
        prob = self.dense_prob(half_logits)
        dense_logits = F.interpolate(half_logits, scale_factor=2, mode="bilinear", align_corners=False)
        n = self.latent_size
        feat = self.to_feat(torch.cat([bott, F.interpolate(second, size=(n, n), mode="area"),
                                       self.unshuffle(prob)], 1))
        pooled = self.pool(bott, prob)
        return ImageFeatures(self.to_cond(pooled), feat, dense_logits, self.presence_head(pooled)[:, 0])

    def pooled_features(self, image_BChw: torch.Tensor) -> torch.Tensor:
        bott, _, half_logits = self.trunk(image_BChw)
        return self.pool(bott, self.dense_prob(half_logits))
