"""Model cards: find a model by name or card path, verify its sha256, load it; export shippable weights.

A model is two files side by side: `NAME.safetensors` (fp16 weights, keys `autoencoder.*` and
`segmentor.*`) and `NAME.json`, the card: sha256 of the weights, the engine configuration, crop size,
pixel spacing, intensity preparation, training data, cost and measured metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # torch is imported only to load or export weights: finding and reading cards works without it
    from .engine import ARSegConfig

CARD_FORMAT = "arseg-model/1"
DEFAULT_MODEL = "lidc-nodule"


class ModelError(Exception):
    """A model that cannot be found, is damaged, or does not match its card."""


def model_dirs() -> List[Path]:
    """Where named models are looked up: $ARSEG_MODEL_PATH (os.pathsep-separated), then the shipped ones."""
    dirs = [Path(p) for p in os.environ.get("ARSEG_MODEL_PATH", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    dirs += [here.parent / "Resources" / "Models",  # source checkout / pip install -e
             here.parent / "ARSeg" / "Resources" / "Models",
             here / "Resources" / "Models"]  # installed Slicer extension (resources copied beside the lib)
    return dirs


def available_models() -> List[str]:
    names = set()
    for d in model_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def find_card(name_or_path) -> Path:
    p = Path(str(name_or_path))
    if p.suffix == ".json" or p.exists():
        if not p.exists():
            raise ModelError(f"model card not found: {p}")
        return p
    for d in model_dirs():
        if (d / f"{name_or_path}.json").exists():
            return d / f"{name_or_path}.json"
    known = ", ".join(available_models()) or "none"
    raise ModelError(f"unknown model {name_or_path!r} (available: {known})")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ModelCard:
    path: Path
    data: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.data.get("name", self.path.stem)

    @property
    def weights_path(self) -> Path:
        return self.path.parent / self.data.get("weights", self.path.stem + ".safetensors")

    @property
    def config(self) -> ARSegConfig:
        from .engine import ARSegConfig

        return ARSegConfig.from_dict(self.data["config"])

    @property
    def pixel_spacing_mm(self) -> Optional[float]:
        return self.data.get("pixel_spacing_mm")

    @property
    def intensity(self) -> Dict[str, Any]:
        return self.data.get("intensity", {"method": "minmax_per_crop"})

    @property
    def modes(self):
        """The modes the model was trained and validated for: "click" and/or "volume" (pipeline.card_modes)."""
        from .pipeline import card_modes

        return card_modes(self)

    def supports(self, mode: str) -> bool:
        return mode in self.modes

    @property
    def crop_size(self) -> int:
        return self.config.autoencoder.crop_size

    def extra(self) -> Dict[str, Any]:
        """Everything but what `export_model` writes itself: carried over when a model is re-exported."""
        return {k: v for k, v in self.data.items() if k not in ("name", "format", "weights", "sha256", "config")}


def read_card(name_or_path) -> ModelCard:
    path = find_card(name_or_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"model card {path} is not valid JSON: {e}") from e
    if data.get("format") != CARD_FORMAT or "config" not in data or "sha256" not in data:
        raise ModelError(f"{path} is not an ARSeg model card (format {CARD_FORMAT!r} with config and sha256)")
    return ModelCard(path, data)


def load_model(name_or_path=DEFAULT_MODEL, device: str = "cpu", verify: bool = True):
    """Returns (predictor, card). Refuses weights whose sha256 differs from the card's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .engine import ARSegPredictor, build_arseg

    card = read_card(name_or_path)
    wpath = card.weights_path
    if not wpath.exists():
        raise ModelError(f"weights of model {card.name!r} not found: {wpath}")
    if verify:
        got = sha256_file(wpath)
        if got != card.data["sha256"]:
            raise ModelError(f"weights {wpath} have sha256 {got}, but the card {card.path} says "
                             f"{card.data['sha256']}: the file is damaged or was replaced; refusing to load it")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot read weights {wpath}: {e}") from e
    config = card.config
    autoencoder, segmentor = build_arseg(config)
    for prefix, module in (("autoencoder.", autoencoder), ("segmentor.", segmentor)):
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelError(f"weights {wpath} do not fit the architecture in {card.path}: {e}") from e
    return ARSegPredictor(config, autoencoder, segmentor, device), card


def export_model(out_base, config: ARSegConfig, autoencoder, segmentor, card_extra: Dict[str, Any],
                 dtype=None) -> Path:
    """Write OUT.safetensors (fp16 unless dtype says otherwise) and the card OUT.json; returns the card path."""
    import torch
    from safetensors.torch import save_file

    dtype = torch.float16 if dtype is None else dtype
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in (("autoencoder.", autoencoder), ("segmentor.", segmentor)):
        for k, v in module.state_dict().items():
            tensors[prefix + k] = v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
    wpath = out_base.with_suffix(".safetensors")
    tmp = wpath.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, wpath)
    card = {"name": out_base.name, "format": CARD_FORMAT, "weights": wpath.name,
            "sha256": sha256_file(wpath), "config": config.to_dict(), **card_extra}
    cpath = out_base.with_suffix(".json")
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return cpath
