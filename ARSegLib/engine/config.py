"""Every hyperparameter of the engine, in one place (dataclasses, serialised into the model card)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

from .views import N_VIEWS


@dataclass
class AutoencoderConfig:
    crop_size: int = 128  # masks are crop_size x crop_size
    n_classes: int = 1  # 1: binary mask (sigmoid); >1: label map 0..n_classes-1 (softmax, one-hot input)
    latent_size: int = 8  # the latent F is code_dim x latent_size x latent_size
    channels: Tuple[int, ...] = (16, 32, 48, 64)  # encoder widths, one per stride-2 stage
    decoder_channels: int = 48
    vocab_size: int = 256  # one codebook shared by every scale
    code_dim: int = 16
    scales: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)  # side of each token map, coarse to fine
    beta: float = 0.25  # commitment weight

    @property
    def n_tokens(self) -> int:
        return sum(s * s for s in self.scales)


@dataclass
class SegmentorConfig:
    in_channels: int = 1  # image channels (CT: 1; BraTS: FLAIR + T1ce = 2)
    unet_channels: Tuple[int, ...] = (24, 32, 48, 64)  # U-Net levels at crop/2, /4, ..., the latent size
    embed_dim: int = 160
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # Presence gate: a head predicts which fraction of readers marks anything in this crop; at
    # sampling that fraction of the N samples is drawn from the transformer, the rest are empty.
    # The transformer is then trained on non-empty reader masks only (see DESIGN: presence is most
    # of the gap, and a token model draws "empty" at the prior rate whatever the image).
    presence_gate: bool = True


@dataclass
class SamplingConfig:
    n_samples: int = 16
    temperature: float = 1.0  # applied at every scale unless temperature_per_scale is set
    temperature_per_scale: Tuple[float, ...] = ()
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0: off
    seed: int = 0
    # Test-time augmentation: the candidates of a crop are drawn in turn from this many of its 8 symmetric
    # views (views.py; training sees all 8) and mapped back; the presence gate averages the views. 1: off.
    views: int = 1
    # Draw oversample x n_samples candidates per crop and keep the n_samples that represent them best
    # (kernel herding, selection.py): fewer chance over- or under-represented modes. 1: off.
    oversample: int = 1
    # With oversampling: the scale (1-based) whose partial sums herding compares; only the kept candidates draw the
    # finer scales (the fine scales cost most, and the coarse ones already decide a candidate's mode). 0: the last
    # scale (every candidate drawn to the end).
    selection_scale: int = 0
    # Added to the presence head's logit before the gate: a calibration of the predicted fraction of readers,
    # measured on val (the model card says how). 0: the head as trained.
    presence_logit_shift: float = 0.0

    def check(self):
        """Refuses settings the engine cannot run, before any work."""
        if not 1 <= int(self.views) <= N_VIEWS:
            raise ValueError(f"views must be between 1 and {N_VIEWS} (the symmetries of the square), got {self.views}")
        if int(self.oversample) < 1:
            raise ValueError(f"oversample must be at least 1, got {self.oversample}")
        if int(self.selection_scale) < 0:
            raise ValueError(f"selection_scale must be 0 (the last scale) or a scale, got {self.selection_scale}")
        if not math.isfinite(float(self.presence_logit_shift)):
            raise ValueError(f"presence_logit_shift must be finite, got {self.presence_logit_shift}")

    @property
    def n_candidates(self) -> int:
        return int(self.n_samples) * int(self.oversample)

    def temperatures(self, n_scales: int) -> Tuple[float, ...]:
        if self.temperature_per_scale:
            if len(self.temperature_per_scale) != n_scales:
                raise ValueError(f"temperature_per_scale has {len(self.temperature_per_scale)} values, "
                                 f"the model has {n_scales} scales")
            return tuple(float(t) for t in self.temperature_per_scale)
        return (float(self.temperature),) * n_scales


@dataclass
class ARSegConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    segmentor: SegmentorConfig = field(default_factory=SegmentorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> ARSegConfig:
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            return kind(**kw)

        return cls(
            autoencoder=build(AutoencoderConfig, d.get("autoencoder", {})),
            segmentor=build(SegmentorConfig, d.get("segmentor", {})),
            sampling=build(SamplingConfig, d.get("sampling", {})),
        )


def tiny_config(n_classes: int = 1, in_channels: int = 1, crop_size: int = 32) -> ARSegConfig:
    """A configuration small enough for unit tests (seconds on a CPU)."""
    latent = crop_size // 16 if crop_size >= 64 else 4
    stages = {32: (8, 16, 16), 64: (8, 16, 16, 16), 128: (8, 16, 16, 16)}[crop_size]
    scales = tuple(range(1, latent + 1))
    return ARSegConfig(
        autoencoder=AutoencoderConfig(crop_size=crop_size, n_classes=n_classes, latent_size=latent,
                                      channels=stages, decoder_channels=16, vocab_size=32, code_dim=8,
                                      scales=scales),
        segmentor=SegmentorConfig(in_channels=in_channels, unet_channels=(8, 16, 16, 16)[: len(stages)],
                                  embed_dim=32, depth=2, heads=2),
    )
