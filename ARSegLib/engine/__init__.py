"""The AR-Seg engine: multi-scale mask autoencoder, next-scale segmentor, sampler, consensus.

`build_arseg(config)` is the one builder; every hyperparameter lives in `ARSegConfig`.
"""

from __future__ import annotations

from typing import Tuple

from .autoencoder import MaskAutoencoder
from .config import ARSegConfig, AutoencoderConfig, SamplingConfig, SegmentorConfig, tiny_config
from .consensus import ConsensusResult, aggregate
from .predictor import ARSegPredictor, Cancelled
from .segmentor import NextScaleSegmentor


def build_arseg(config: ARSegConfig) -> Tuple[MaskAutoencoder, NextScaleSegmentor]:
    return MaskAutoencoder(config.autoencoder), NextScaleSegmentor(config.segmentor, config.autoencoder)


__all__ = ["ARSegConfig", "AutoencoderConfig", "SegmentorConfig", "SamplingConfig", "tiny_config",
           "MaskAutoencoder", "NextScaleSegmentor", "ARSegPredictor", "ConsensusResult", "aggregate",
           "Cancelled", "build_arseg"]
