"""A compact Probabilistic U-Net (Kohl et al., "A Probabilistic U-Net for Segmentation of Ambiguous Images",
NeurIPS 2018), the standard multi-reader baseline on LIDC, sized for training on a CPU.

A U-Net gives a feature map of the image; a prior net (image only) and a posterior net (image and one
reader's mask) each give an axis-aligned Gaussian over a small latent z; fcomb (1 x 1 convolutions) combines
z, broadcast over the map, with the U-Net's last features into mask logits. Training: a random reader's mask
per crop, z drawn from the posterior (reparameterised), loss = BCE(logits, mask) summed over pixels +
beta * KL(posterior || prior). Inference: the U-Net once per image, then N draws of z from the prior, each
through fcomb only.

As in the repository's own U-Net (`engine/image_encoder.py`), the first level can sit at half the crop size
(`stem_stride = 2`; full-resolution convolutions cost most of the CPU time) with the logits upsampled
bilinearly to the crop; `stem_stride = 1` is the paper's full-resolution layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ProbUNetConfig:
    """Every hyperparameter of the model and its loss."""

    in_channels: int = 1
    crop_size: int = 128
    channels: Tuple[int, ...] = (16, 32, 64, 128)  # U-Net widths per level (4 levels)
    stem_stride: int = 2  # 2: the first level at half the crop size; 1: full resolution (the paper)
    latent_dim: int = 6  # the paper's LIDC setting
    prior_channels: Tuple[int, ...] = (8, 16, 32, 64)  # encoder widths of the prior and posterior nets
    fcomb_channels: int = 32
    fcomb_layers: int = 3  # 1 x 1 convolutions before the output one (the paper: 3 of 32 channels)
    output_bias_init: float = -4.0  # the output's initial logit: a nodule covers a few % of a crop
    beta: float = 1.0  # weight of KL(posterior || prior)
    grad_clip: float = 1e4  # training: clip the gradient norm (the loss sums BCE over the crop's pixels)
    threshold: float = 0.5  # inference: a sample's mask is sigmoid(logits) > threshold
    temperature: float = 1.0  # inference: z = mu + temperature * sigma * eps (1: the prior itself)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> ProbUNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ProbUNetConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def tiny_prob_unet_config(crop_size: int = 32) -> ProbUNetConfig:
    """For tests and smoke runs."""
    return ProbUNetConfig(crop_size=crop_size, channels=(4, 8, 8, 16), prior_channels=(4, 8, 8, 8), fcomb_channels=8)


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """Two 3 x 3 convolutions (the first may downsample), GroupNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(8, c_out), c_out),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(8, c_out), c_out),
                         nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """A U-Net encoder: one block per level, each level after the first at half the previous size."""

    def __init__(self, in_channels: int, channels: Tuple[int, ...], stem_stride: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            conv_block(in_channels if i == 0 else channels[i - 1], c, stem_stride if i == 0 else 2)
            for i, c in enumerate(channels))

    def forward(self, x_BChw: torch.Tensor):
        feats = []
        for block in self.blocks:
            x_BChw = block(x_BChw)
            feats.append(x_BChw)
        return feats  # finest first


class UNet(nn.Module):
    """Image -> features at the first level's resolution (channels[0])."""

    def __init__(self, cfg: ProbUNetConfig):
        super().__init__()
        ch = cfg.channels
        self.encoder = Encoder(cfg.in_channels, ch, cfg.stem_stride)
        self.up = nn.ModuleList(conv_block(ch[i + 1] + ch[i], ch[i]) for i in reversed(range(len(ch) - 1)))

    def forward(self, image_BChw: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(image_BChw)
        x_BChw = feats[-1]
        for up, skip_BChw in zip(self.up, reversed(feats[:-1])):
            x_BChw = F.interpolate(x_BChw, size=skip_BChw.shape[-2:], mode="bilinear", align_corners=False)
            x_BChw = up(torch.cat([x_BChw, skip_BChw], 1))
        return x_BChw


class GaussianNet(nn.Module):
    """Prior (image) or posterior (image + mask) net: an encoder, global average pooling, a 1 x 1 convolution
    to the mean and log standard deviation of an axis-aligned Gaussian over z."""

    def __init__(self, in_channels: int, cfg: ProbUNetConfig):
        super().__init__()
        self.encoder = Encoder(in_channels, cfg.prior_channels, 2)
        self.head = nn.Conv2d(cfg.prior_channels[-1], 2 * cfg.latent_dim, 1)
        nn.init.normal_(self.head.weight, std=1e-3)  # start near N(0, 1), as the paper's initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, x_BChw: torch.Tensor) -> torch.distributions.Independent:
        pooled_BC11 = self.encoder(x_BChw)[-1].mean((2, 3), keepdim=True)
        mu_BZ, log_sigma_BZ = self.head(pooled_BC11).flatten(1).chunk(2, 1)
        return torch.distributions.Independent(torch.distributions.Normal(mu_BZ, log_sigma_BZ.exp()), 1)


class ProbUNet(nn.Module):
    def __init__(self, cfg: ProbUNetConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg)
        self.prior = GaussianNet(cfg.in_channels, cfg)
        self.posterior = GaussianNet(cfg.in_channels + 1, cfg)
        layers, c = [], cfg.channels[0] + cfg.latent_dim
        for _ in range(cfg.fcomb_layers):
            layers += [nn.Conv2d(c, cfg.fcomb_channels, 1), nn.ReLU(inplace=True)]
            c = cfg.fcomb_channels
        layers.append(nn.Conv2d(c, 1, 1))
        nn.init.constant_(layers[-1].bias, cfg.output_bias_init)  # skips the first steps spent learning the prior
        self.fcomb = nn.Sequential(*layers)

    def combine(self, feat_BChw: torch.Tensor, z_BNZ: torch.Tensor) -> torch.Tensor:
        """fcomb: N latents per image, each broadcast over the U-Net's map and concatenated with it, through the
        1 x 1 convolutions -> mask logits at the crop size (B, N, H, W). The first convolution's feature part
        is computed once per image and its latent part added per sample (the same as convolving the
        concatenation, without repeating the feature map N times)."""
        first, rest = self.fcomb[0], self.fcomb[1:]
        C = feat_BChw.shape[1]
        w_feat_OC11, w_z_OZ = first.weight[:, :C], first.weight[:, C:, 0, 0]
        h_BOhw = F.conv2d(feat_BChw, w_feat_OC11, first.bias)
        z_BNO = z_BNZ @ w_z_OZ.T
        B, N, O = z_BNO.shape
        h_BNOhw = h_BOhw[:, None] + z_BNO[..., None, None]
        logits_M1hw = rest(h_BNOhw.reshape(B * N, O, *h_BOhw.shape[-2:]))
        if logits_M1hw.shape[-1] != self.cfg.crop_size:
            logits_M1hw = F.interpolate(logits_M1hw, size=(self.cfg.crop_size,) * 2, mode="bilinear",
                                        align_corners=False)
        return logits_M1hw.view(B, N, *logits_M1hw.shape[-2:])

    # ---------------------------------------------------------------------------------------------- training

    def training_loss(self, image_BChw: torch.Tensor, mask_B1hw: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One reader's mask per crop (float 0/1). rec: BCE summed over pixels, mean over the batch;
        kl: KL(posterior || prior), mean over the batch; loss = rec + beta * kl."""
        feat_BChw = self.unet(image_BChw)
        prior = self.prior(image_BChw)
        posterior = self.posterior(torch.cat([image_BChw, 2 * mask_B1hw - 1], 1))
        z_BZ = posterior.rsample()
        logits_B1hw = self.combine(feat_BChw, z_BZ[:, None])
        rec = F.binary_cross_entropy_with_logits(logits_B1hw, mask_B1hw, reduction="none").sum((1, 2, 3)).mean()
        kl = torch.distributions.kl_divergence(posterior, prior).mean()
        return {"loss": rec + self.cfg.beta * kl, "rec": rec, "kl": kl}

    # --------------------------------------------------------------------------------------------- inference

    @torch.inference_mode()
    def sample_logits(self, image_BChw: torch.Tensor, n_samples: int,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """N draws of z from the prior per image -> logits (B, N, H, W). The U-Net and the prior run once."""
        feat_BChw = self.unet(image_BChw)
        prior = self.prior(image_BChw)
        mu_BZ, sigma_BZ = prior.base_dist.loc, prior.base_dist.scale
        B, Z = mu_BZ.shape
        eps_BNZ = torch.randn(B, n_samples, Z, generator=generator, device=mu_BZ.device)
        z_BNZ = mu_BZ[:, None] + self.cfg.temperature * sigma_BZ[:, None] * eps_BNZ
        return self.combine(feat_BChw, z_BNZ)

    def sample(self, image_BChw: torch.Tensor, n_samples: int = 16,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """N binary masks per image (B, N, H, W) uint8."""
        logits_BNhw = self.sample_logits(image_BChw, n_samples, generator)
        return (torch.sigmoid(logits_BNhw) > self.cfg.threshold).to(torch.uint8)


def build_prob_unet(cfg: ProbUNetConfig) -> ProbUNet:
    return ProbUNet(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ evaluation

def sample_masks(model: ProbUNet, images_NChw: np.ndarray, n_samples: int = 16, seed: int = 0, batch: int = 32,
                 device: str = "cpu"):
    """Yields (start index, samples (b, N, H, W) uint8) batch by batch; one generator seeded once, so the
    samples depend on the seed and the batch size only."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    for b in range(0, len(images_NChw), batch):
        x = torch.as_tensor(np.asarray(images_NChw[b:b + batch], np.float32), device=device)
        yield b, model.sample(x, n_samples, g).cpu().numpy()


def evaluate_prob_unet(model: ProbUNet, images_NChw: np.ndarray, readers_NRhw: np.ndarray, n_samples: int = 16,
                       seed: int = 0, batch: int = 32, device: str = "cpu", progress=None) -> Dict[str, float]:
    """The protocol's metrics (ARSegLib.metrics, the one implementation) of N prior samples per image."""
    from ..metrics import MetricAccumulator, multi_reader_metrics

    acc = MetricAccumulator()
    for b, samples_bNhw in sample_masks(model, images_NChw, n_samples, seed, batch, device):
        for i, samples_Nhw in enumerate(samples_bNhw):
            acc.add(multi_reader_metrics(samples_Nhw, readers_NRhw[b + i]))
        if progress is not None:
            progress(len(samples_bNhw))
    return acc.result()


def save_prob_unet(path, model: ProbUNet, extra: Optional[dict] = None):
    """Weights and configuration (no optimizer state): what `load_prob_unet` reads."""
    from ..training.checkpoint import save_checkpoint

    save_checkpoint(path, {"kind": "prob_unet", "config": model.cfg.to_dict(),
                           "models": {"prob_unet": model.state_dict()}, "extra": extra or {}})


def load_prob_unet(path, device: str = "cpu") -> Tuple[ProbUNet, dict]:
    """A ProbUNet from a training checkpoint (prob_unet.pt) or a best-weights file (prob_unet_best.pt)."""
    from ..training.checkpoint import load_checkpoint

    st = load_checkpoint(path)
    if st is None:
        raise FileNotFoundError(f"Probabilistic U-Net checkpoint not found: {path}")
    if st.get("kind") != "prob_unet":
        raise ValueError(f"{path} is a {st.get('kind')!r} checkpoint, not a Probabilistic U-Net")
    model = ProbUNet(ProbUNetConfig.from_dict(st["config"]))
    model.load_state_dict(st["models"]["prob_unet"])
    return model.to(device).eval(), st
