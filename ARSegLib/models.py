"""Model cards: find a model by name or card path, check the card and its weights, load it; export shippable weights.

A model is two files side by side: `NAME.safetensors` (fp16 weights, keys `autoencoder.*` and
`segmentor.*`) and `NAME.json`, the card: sha256 and size of the weights, the engine configuration, crop size,
pixel spacing, intensity preparation, modes, training data, cost and measured metrics.

A card is checked before anything is built from it: every field it has a use for (types, ranges, finiteness:
one ModelError naming the field), and `card_sha256`, a digest of its result-changing fields (SEALED_FIELDS), so
that a card edited after export is refused instead of changing results under the same model name. Then the
weights: their size and sha256 against the card, their tensors' shapes against the card's architecture (built
with shapes only, which allocates nothing), and only then the model itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:  # torch is imported only to load or export weights: finding and reading cards works without it
    from .engine import ARSegConfig

CARD_FORMAT = "arseg-model/1"
DEFAULT_MODEL = "lidc-nodule"
SHIPPED, USER_PATH, GIVEN_PATH = "shipped", "ARSEG_MODEL_PATH", "given path"

# the fields whose values change what a model computes (or what it is called and allowed to do); card_sha256 is
# the sha256 of their canonical JSON. Descriptions, training records and metrics are free to change.
SEALED_FIELDS = ("name", "format", "weights", "weights_bytes", "sha256", "config", "crop_size", "pixel_spacing_mm",
                 "intensity", "labels", "modes", "task")
# a model name is a file stem in a model folder: no separators, no "..", so that it cannot climb out of it
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")
MODES = ("click", "volume")  # pipeline.MODE_CLICK, pipeline.MODE_VOLUME


class ModelError(Exception):
    """A model that cannot be found, is damaged, or does not match its card."""


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    origin: str  # SHIPPED or USER_PATH


def model_folders() -> List[ModelFolder]:
    """Where named models are looked up, in order of preference: the shipped ones, then $ARSEG_MODEL_PATH
    (os.pathsep-separated). The shipped folders come first so that a card of the same name elsewhere cannot take
    the place of a shipped model unnoticed; such a card is used when given by its path."""
    here = Path(__file__).resolve().parent
    shipped = [here.parent / "Resources" / "Models",  # source checkout / pip install -e
               here.parent / "ARSeg" / "Resources" / "Models",
               here / "Resources" / "Models"]  # installed Slicer extension (resources copied beside the lib)
    folders = [ModelFolder(p, SHIPPED) for p in shipped]
    folders += [ModelFolder(Path(p), USER_PATH) for p in os.environ.get("ARSEG_MODEL_PATH", "").split(os.pathsep) if p]
    return folders


def model_dirs() -> List[Path]:
    """The folders of model_folders(), in the same order."""
    return [f.path for f in model_folders()]


def available_models() -> List[str]:
    names = set()
    for d in model_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.json") if MODEL_NAME.match(p.stem))
    return sorted(names)


@dataclass(frozen=True)
class CardLocation:
    """Where a model's card was found: its path, the kind of folder (SHIPPED, USER_PATH or GIVEN_PATH), and the
    other cards of the same name that were passed over (they are said, not silently ignored)."""

    path: Path
    origin: str
    passed_over: Tuple[Tuple[Path, str], ...] = ()


def _is_path(text: str) -> bool:
    return text.lower().endswith(".json") or "/" in text or os.sep in text or bool(os.altsep and os.altsep in text)


def locate_card(name_or_path) -> CardLocation:
    """A card by its path (a .json file, or anything with a folder in it) or by model name (a plain file stem,
    looked up in model_folders(), shipped first). Names that are not plain stems are refused: '../..' must not
    reach outside the model folders."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or _is_path(text):
        p = Path(text)
        if not p.is_file():
            raise ModelError(f"model card not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
        return CardLocation(p, GIVEN_PATH)
    if not MODEL_NAME.match(text) or ".." in text:
        raise ModelError(f"{text!r} is not a model name (letters, digits, '.', '_', '+', '-'; no folders): give a "
                         f"model name ({', '.join(available_models()) or 'none available'}) or a card file (.json)")
    found: List[Tuple[Path, str]] = []
    for folder in model_folders():
        card = folder.path / f"{text}.json"
        if card.is_file() and all(card.resolve() != p.resolve() for p, _ in found):
            found.append((card, folder.origin))
    if not found:
        raise ModelError(f"unknown model {text!r} (available: {', '.join(available_models()) or 'none'})")
    return CardLocation(found[0][0], found[0][1], tuple(found[1:]))


def find_card(name_or_path) -> Path:
    return locate_card(name_or_path).path


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def card_digest(data: Dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the card's SEALED_FIELDS (sorted keys, no spaces)."""
    sealed = {k: data[k] for k in SEALED_FIELDS if k in data}
    text = json.dumps(sealed, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal_card(data: Dict[str, Any]) -> Dict[str, Any]:
    """The card with card_sha256 set to its digest; weights_bytes and card_sha256 follow sha256 (export_model and
    tools/seal_card.py)."""
    digest = card_digest(data)
    out: Dict[str, Any] = {}
    for k, v in data.items():
        if k in ("weights_bytes", "card_sha256"):
            continue
        out[k] = v
        if k == "sha256":
            if "weights_bytes" in data:
                out["weights_bytes"] = data["weights_bytes"]
            out["card_sha256"] = digest
    out.setdefault("card_sha256", digest)
    return out


# --------------------------------------------------------------------------------------------- card checks

class _CardCheck:
    """Checks one card's fields; every failure is one ModelError that names the card and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, name: str, what: str, value: Any):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ModelError(f"model card {self.path}: {name} must be {what}, got {shown}")

    def whole(self, name: str, value: Any, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(name, f"a whole number from {lo} to {hi}", value)
        return value

    def real(self, name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (ok and (value > lo if lo_open else value >= lo) and value <= hi):
            span = f"above {lo} and at most {hi}" if lo_open else f"from {lo} to {hi}"
            self.fail(name, f"a finite number {span}", value)
        return float(value)

    def text(self, name: str, value: Any, pattern: Optional[re.Pattern] = None, what: str = "a non-empty string"):
        if not isinstance(value, str) or not value or (pattern is not None and not pattern.match(value)):
            self.fail(name, what, value)
        return value

    def mapping(self, name: str, value: Any) -> Dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(name, "a JSON object", value)
        return value

    def wholes(self, name: str, value: Any, lo: int, hi: int, max_len: int) -> List[int]:
        if not isinstance(value, list) or not 1 <= len(value) <= max_len:
            self.fail(name, f"a list of 1 to {max_len} whole numbers", value)
        return [self.whole(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(value)]


# the engine's configuration fields: (kind, low, high); "ints" are lists. Upper bounds are far above any model
# this CPU-first engine can run, low enough that a typo cannot ask for gigabytes.
_ARCHITECTURE = {
    "autoencoder": {"crop_size": ("int", 8, 1024), "n_classes": ("int", 1, 64), "latent_size": ("int", 1, 128),
                    "channels": ("ints", 1, 4096), "decoder_channels": ("int", 1, 4096),
                    "vocab_size": ("int", 2, 65536), "code_dim": ("int", 1, 4096), "scales": ("ints", 1, 128),
                    "beta": ("real", 0.0, 100.0)},
    "segmentor": {"in_channels": ("int", 1, 16), "unet_channels": ("ints", 1, 4096), "embed_dim": ("int", 1, 4096),
                  "depth": ("int", 1, 64), "heads": ("int", 1, 64), "mlp_ratio": ("real", 0.0, 16.0),
                  "dropout": ("real", 0.0, 0.99), "presence_gate": ("bool", 0, 1)},
}
_SAMPLING = ("n_samples", "temperature", "temperature_per_scale", "top_k", "top_p", "seed", "views", "oversample",
             "selection_scale",
             "presence_logit_shift")


def _check_config(c: _CardCheck, config: Any) -> None:
    config = c.mapping("config", config)
    unknown = set(config) - {"autoencoder", "segmentor", "sampling"}
    if unknown:
        c.fail("config", "an object of autoencoder, segmentor and sampling", sorted(unknown))
    for part, rules in _ARCHITECTURE.items():
        values = c.mapping(f"config.{part}", config.get(part, {}))
        for key, value in values.items():
            name = f"config.{part}.{key}"
            if key not in rules:
                c.fail(f"config.{part}", f"made of known fields ({', '.join(rules)})", key)
            kind, lo, hi = rules[key]
            if kind == "int":
                c.whole(name, value, lo, hi)
            elif kind == "ints":
                c.wholes(name, value, lo, hi, 128 if key == "scales" else 16)
            elif kind == "real":
                c.real(name, value, lo, hi, lo_open=key == "mlp_ratio")
            elif not isinstance(value, bool):
                c.fail(name, "true or false", value)
    # relations between fields, where the card states them (an export states every field; a missing one takes the
    # engine's default, checked when the model is built with shapes only)
    ae, seg = config.get("autoencoder", {}), config.get("segmentor", {})
    scales = list(ae.get("scales", []))
    if scales and (any(b <= a for a, b in zip(scales, scales[1:])) or
                   ("latent_size" in ae and scales[-1] != ae["latent_size"])):
        c.fail("config.autoencoder.scales", f"increasing token map sides ending at latent_size "
                                            f"{ae.get('latent_size')}", scales)
    if "crop_size" in ae and "latent_size" in ae:
        ratio = ae["crop_size"] / ae["latent_size"]
        if ratio < 1 or ratio != 2 ** round(math.log2(ratio)):
            c.fail("config.autoencoder.crop_size", f"latent_size {ae['latent_size']} times a power of two",
                   ae["crop_size"])
    if "embed_dim" in seg and "heads" in seg and seg["embed_dim"] % seg["heads"]:
        c.fail("config.segmentor.embed_dim", f"a multiple of heads ({seg['heads']})", seg["embed_dim"])
    _check_sampling(c, c.mapping("config.sampling", config.get("sampling", {})), len(scales) or None)


def _check_sampling(c: _CardCheck, sampling: Dict[str, Any], n_scales: Optional[int]) -> None:
    """The same limits as a user's own settings (pipeline.SegmentSettings.check), so a card cannot ask for what
    `--temperature` or `--views` may not."""
    from .pipeline import SegmentSettings, SettingsError

    unknown = set(sampling) - set(_SAMPLING)
    if unknown:
        c.fail("config.sampling", f"made of known fields ({', '.join(_SAMPLING)})", sorted(unknown)[0])
    per_scale = sampling.get("temperature_per_scale", [])
    if not isinstance(per_scale, list) or (n_scales is not None and len(per_scale) not in (0, n_scales)):
        c.fail("config.sampling.temperature_per_scale", f"a list of 0 or {n_scales or 'one per scale'} temperatures",
               per_scale)
    for i, t in enumerate(per_scale):
        c.real(f"config.sampling.temperature_per_scale[{i}]", t, 0.0, SegmentSettings.MAX_TEMPERATURE, lo_open=True)
    fields = {k: v for k, v in sampling.items() if k != "temperature_per_scale"}
    fields.setdefault("temperature", 1.0)  # SamplingConfig's default; SegmentSettings takes None as "the card's"
    if "temperature" in sampling and sampling["temperature"] is None:
        c.fail("config.sampling.temperature", "a finite number", None)
    try:
        SegmentSettings(**fields).check()
    except (SettingsError, TypeError) as e:  # the message starts with the field's name
        raise ModelError(f"model card {c.path}: config.sampling.{e}") from None


def validate_card(path: Path, data: Any) -> None:
    """ModelError naming the first field of the card that is missing, of the wrong type or out of range."""
    c = _CardCheck(path)
    if not isinstance(data, dict) or data.get("format") != CARD_FORMAT or "config" not in data or "sha256" not in data:
        raise ModelError(f"{path} is not an ARSeg model card (format {CARD_FORMAT!r} with config and sha256)")
    c.text("name", data.get("name"), MODEL_NAME, "a model name (letters, digits, '.', '_', '+', '-')")
    c.text("weights", data.get("weights"), re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\.safetensors\Z"),
           "a .safetensors file name beside the card (no folders)")
    c.text("sha256", data.get("sha256"), re.compile(r"[0-9a-f]{64}\Z"), "64 lowercase hexadecimal digits")
    c.whole("weights_bytes", data.get("weights_bytes"), 8, 1 << 40)
    c.text("card_sha256", data.get("card_sha256"), re.compile(r"[0-9a-f]{64}\Z"),
           "64 lowercase hexadecimal digits (the digest of the card's result-changing fields, written by "
           "export_model or tools/seal_card.py)")
    _check_config(c, data["config"])
    crop = data["config"].get("autoencoder", {}).get("crop_size", 128)
    if "crop_size" in data and data["crop_size"] != crop:
        c.fail("crop_size", f"the configuration's crop size {crop}", data["crop_size"])
    if data.get("pixel_spacing_mm") is not None:
        c.real("pixel_spacing_mm", data["pixel_spacing_mm"], 0.0, 20.0, lo_open=True)
    if "intensity" in data:
        c.text("intensity.method", c.mapping("intensity", data["intensity"]).get("method"))
    if "labels" in data:
        for key, label in c.mapping("labels", data["labels"]).items():
            if not key.isdigit() or int(key) < 1:
                c.fail("labels", "an object from label values (1, 2, ...) to names", key)
            c.text(f"labels.{key}", label)
    if "modes" in data:
        modes = data["modes"]
        if not isinstance(modes, list) or not modes or len(set(map(str, modes))) != len(modes) or \
                not all(m in MODES for m in modes):
            c.fail("modes", f"a list of distinct modes out of {', '.join(MODES)}", modes)
    if "description" in data:
        c.text("description", data["description"])
    if "task" in data:
        _check_task(c, data["task"], data["config"], data.get("intensity"))


_INPUT_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def _check_task(c: _CardCheck, task: Any, config: Dict[str, Any], data_intensity: Any = None) -> None:
    """The task block (task.py): inputs as many as the segmentor's image channels, each with a known intensity
    preparation; classes exactly the label values of the engine's label maps; regions made of those classes."""
    from .task import INTENSITY_METHODS

    task = c.mapping("task", task)
    if "name" in task:
        c.text("task.name", task["name"])
    in_channels = config.get("segmentor", {}).get("in_channels", 1)
    inputs = task.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != in_channels:
        c.fail("task.inputs", f"a list of {in_channels} inputs (the segmentor's in_channels)", inputs)
    names = []
    for i, entry in enumerate(inputs):
        entry = c.mapping(f"task.inputs[{i}]", entry)
        names.append(c.text(f"task.inputs[{i}].name", entry.get("name"), _INPUT_NAME,
                            "a lowercase name (letters, digits, '_'; e.g. flair)"))
        if "title" in entry:
            c.text(f"task.inputs[{i}].title", entry["title"])
        intensity = c.mapping(f"task.inputs[{i}].intensity", entry.get("intensity"))
        method = intensity.get("method")
        if method not in INTENSITY_METHODS:
            c.fail(f"task.inputs[{i}].intensity.method", f"one of {', '.join(INTENSITY_METHODS)}", method)
        if "clip" in intensity:
            clip = intensity["clip"]
            if not isinstance(clip, list) or len(clip) != 2:
                c.fail(f"task.inputs[{i}].intensity.clip", "a list [low, high]", clip)
            lo = c.real(f"task.inputs[{i}].intensity.clip[0]", clip[0], -1e6, 1e6)
            c.real(f"task.inputs[{i}].intensity.clip[1]", clip[1], lo, 1e6, lo_open=True)
    if len(set(names)) != len(names):
        c.fail("task.inputs", "inputs of distinct names", names)
    top = data_intensity.get("method") if isinstance(data_intensity, dict) else None
    for i, entry in enumerate(inputs):  # the card's older, top-level field must say the same
        if top is not None and entry["intensity"]["method"] != top:
            c.fail(f"task.inputs[{i}].intensity.method", f"the card's intensity.method {top!r}",
                   entry["intensity"]["method"])
    n_classes = config.get("autoencoder", {}).get("n_classes", 1)
    expected = [str(v) for v in range(1, max(n_classes, 2))]
    classes = c.mapping("task.classes", task.get("classes"))
    if sorted(classes, key=lambda k: (len(k), k)) != expected:
        c.fail("task.classes", f"an object of the label values {', '.join(expected)} (the autoencoder's "
                               f"n_classes {n_classes}, 0 being background) to names", sorted(classes))
    for key, value in classes.items():
        c.text(f"task.classes.{key}", value)
    regions = task.get("regions")
    if not isinstance(regions, list) or not 1 <= len(regions) <= 16:
        c.fail("task.regions", "a list of 1 to 16 regions", regions)
    region_names = []
    for i, region in enumerate(regions):
        where = f"task.regions[{i}]"
        region = c.mapping(where, region)
        region_names.append(c.text(f"{where}.name", region.get("name")))
        members = c.wholes(f"{where}.classes", region.get("classes"), 1, len(expected), len(expected))
        if len(set(members)) != len(members):
            c.fail(f"{where}.classes", "distinct class values", members)
        if "color" in region:
            color = region["color"]
            if not isinstance(color, list) or len(color) != 3:
                c.fail(f"{where}.color", "a list of three numbers from 0 to 1 (red, green, blue)", color)
            for j, v in enumerate(color):
                c.real(f"{where}.color[{j}]", v, 0.0, 1.0)
        if "terminology" in region:
            c.text(f"{where}.terminology", region["terminology"])
    if len(set(region_names)) != len(region_names):
        c.fail("task.regions", "regions of distinct names", region_names)
    if task.get("fill_value") is not None:
        c.real("task.fill_value", task["fill_value"], -1e9, 1e9)


def check_seal(path: Path, data: Dict[str, Any]) -> None:
    if card_digest(data) != data["card_sha256"]:
        raise ModelError(f"model card {path} was edited after export: its result-changing fields "
                         f"({', '.join(k for k in SEALED_FIELDS if k in data)}) no longer match its card_sha256; "
                         f"refusing a model whose card may change its results under the same name (undo the edit, "
                         f"or give the model a new name and seal it: python tools/seal_card.py CARD)")


# --------------------------------------------------------------------------------------------- cards

@dataclass
class ModelCard:
    path: Path
    data: Dict[str, Any]
    origin: str = GIVEN_PATH  # SHIPPED, USER_PATH or GIVEN_PATH
    passed_over: Tuple[Tuple[Path, str], ...] = field(default=())  # other cards of the same name, not used

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
    def task(self):
        """What the model segments (task.Task): the card's task block, or the lung-nodule defaults of a card
        without one."""
        from .task import task_from_card

        return task_from_card(self.data, self.modes, self.crop_size)

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

    def notice(self) -> Optional[str]:
        """One line when other cards of this name were passed over: which folder the model came from."""
        if not self.passed_over:
            return None
        others = "; ".join(f"{p} ({origin})" for p, origin in self.passed_over)
        return (f"model {self.name!r} is in more than one model folder: using {self.path} ({self.origin}), not "
                f"{others}; give a card's path as the model to use another")

    def extra(self) -> Dict[str, Any]:
        """Everything but what `export_model` writes itself: carried over when a model is re-exported."""
        own = ("name", "format", "weights", "weights_bytes", "sha256", "card_sha256", "config")
        return {k: v for k, v in self.data.items() if k not in own}


def read_card(name_or_path) -> ModelCard:
    """The card, found (locate_card), read and checked (validate_card, check_seal): no torch, no weights read."""
    where = locate_card(name_or_path)
    path = where.path
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model card {path} is not valid JSON: {e}") from e
    validate_card(path, data)
    check_seal(path, data)
    return ModelCard(path, data, where.origin, where.passed_over)


# --------------------------------------------------------------------------------------------- weights

def safetensors_shapes(path: Path, size: int) -> Dict[str, Tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header (8-byte length, then JSON), reading nothing else; the
    header must describe exactly `size` bytes."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= min(size - 8, 100 << 20):
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        end, shapes = 0, {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            shapes[key] = tuple(int(v) for v in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ModelError(f"weights {path} are not a safetensors file ({e})") from e
    if 8 + n + end != size:
        raise ModelError(f"weights {path} are damaged: the header describes {8 + n + end} bytes, the file has {size}")
    return shapes


def _shapes_only():
    """A torch function mode in which a module's constructor allocates nothing: every new tensor (torch.empty,
    zeros, ones, full, rand, randn) is one element broadcast to its shape (no memory), and torch.nn.init leaves
    tensors as they are. The parameters then have their true shapes, which is all a shape check needs. (torch's
    meta device would do the same, but its first use imports torch._dynamo: 3 s more for the first model load.)"""
    import torch
    from torch.overrides import TorchFunctionMode

    skipped = {f for name, f in vars(torch.nn.init).items() if callable(f) and name.endswith("_")}
    factories = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full}

    class ShapesOnly(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in skipped:
                return args[0] if args else kwargs.get("tensor")
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor):
                return args[0]  # an in-place write (zero_, fill_, masked_fill_): values do not matter here
            if func in factories:
                size = args[0] if func is torch.full else args
                size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
                return torch.zeros((), dtype=kwargs.get("dtype") or torch.get_default_dtype()).expand(*size)
            return func(*args, **kwargs)

    return ShapesOnly()


def _check_architecture(card: ModelCard, config, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """The weights' tensor names and shapes against the card's architecture, built with shapes only (no memory,
    no time): a card whose architecture differs from its weights is refused before the model is built."""
    from .engine import build_arseg

    try:
        with _shapes_only():
            autoencoder, segmentor = build_arseg(config)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as e:
        raise ModelError(f"model card {card.path}: its configuration cannot be built ({e})") from None
    expected = {prefix + k: tuple(v.shape) for prefix, module in (("autoencoder.", autoencoder),
                                                                  ("segmentor.", segmentor))
                for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or extra or wrong:
        what = (f"{wrong[0]} is {list(shapes[wrong[0]])} in the weights, {list(expected[wrong[0]])} by the card"
                if wrong else f"{len(missing)} tensors missing ({', '.join(missing[:2])}), {len(extra)} unexpected "
                              f"({', '.join(extra[:2])})")
        raise ModelError(f"weights {card.weights_path} do not fit the architecture in {card.path}: {what}")


def check_weights(card: ModelCard, verify: bool = True) -> Dict[str, Tuple[int, ...]]:
    """The weights file against the card: present, its size, its sha256 (unless verify is False), a readable
    safetensors header. Returns the tensors' shapes."""
    wpath = card.weights_path
    if not wpath.is_file():
        raise ModelError(f"weights of model {card.name!r} not found: {wpath}")
    size = wpath.stat().st_size
    if size != card.data["weights_bytes"]:
        raise ModelError(f"weights {wpath} have {size} bytes, but the card {card.path} says "
                         f"{card.data['weights_bytes']}: the file is damaged or was replaced; refusing to load it")
    if verify:
        got = sha256_file(wpath)
        if got != card.data["sha256"]:
            raise ModelError(f"weights {wpath} have sha256 {got}, but the card {card.path} says "
                             f"{card.data['sha256']}: the file is damaged or was replaced; refusing to load it")
    return safetensors_shapes(wpath, size)


def load_model(name_or_path=DEFAULT_MODEL, device: str = "cpu", verify: bool = True):
    """Returns (predictor, card). In this order, each step refusing with one ModelError before the next: find the
    card (a name cannot leave the model folders), read and check it, check the weights' size and sha256 against it
    and their shapes against its architecture (built with shapes only), and only then build the model and load the
    weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .engine import ARSegPredictor, build_arseg

    card = read_card(name_or_path)
    shapes = check_weights(card, verify)
    config = card.config
    _check_architecture(card, config, shapes)
    wpath = card.weights_path
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot read weights {wpath}: {e}") from e
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
    """Write OUT.safetensors (fp16 unless dtype says otherwise) and the sealed card OUT.json; returns the card
    path. The card is checked as read_card will check it, so an export never writes a card that cannot load."""
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
    cpath = out_base.with_suffix(".json")
    tmp = wpath.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    card = seal_card({"name": out_base.name, "format": CARD_FORMAT, "weights": wpath.name, "sha256": sha256_file(tmp),
                      "weights_bytes": tmp.stat().st_size, "config": config.to_dict(), **card_extra})
    card = json.loads(json.dumps(card))  # tuples become lists, as the card is read back
    try:
        validate_card(cpath, card)
    except ModelError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, wpath)
    cpath.write_text(json.dumps(card, indent=2) + "\n")
    return cpath
