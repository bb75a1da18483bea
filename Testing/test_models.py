"""Model cards: load by path, refuse tampered weights, unknown names and broken cards clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ARSegLib.models import ModelError, load_model, read_card


def test_card_loads_and_predicts(tiny_model_card):
    pred, card = load_model(tiny_model_card)
    assert card.crop_size == 128 and card.pixel_spacing_mm == 0.7
    r = pred.segment(np.random.rand(1, 128, 128).astype(np.float32))
    assert r.consensus_Bhw.shape == (1, 128, 128)


def test_tampered_weights_are_refused(tiny_model_card, tmp_path):
    card = tmp_path / "m.json"
    shutil.copy(tiny_model_card, card)
    w = tmp_path / json.loads(card.read_text())["weights"]
    data = bytearray(read_card(tiny_model_card).weights_path.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(card)


def test_unknown_model_and_broken_card(tmp_path):
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(bad)
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="not an ARSeg model card"):
        load_model(bad)


def test_model_cards_are_listed_and_read_without_importing_torch():
    """The Slicer module lists models before it has installed torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; import ARSegLib.models as m; names = m.available_models(); card = m.read_card(names[0]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "lidc-nodule" in out.stdout


# --------------------------------------------------------------------------------------------- issue 26, item 6

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def edited_copy(folder: Path, edit=None, name: str = "lidc-nodule", seal: bool = False) -> Path:
    """A real copy of the shipped card in folder (its weights beside it, linked), edited by edit(data) and, with
    seal, sealed again as tools/seal_card.py does."""
    from ARSegLib.models import seal_card

    folder.mkdir(parents=True, exist_ok=True)
    data = json.loads((SHIPPED_DIR / "lidc-nodule.json").read_text())
    if edit is not None:
        edit(data)
    if seal:
        data = seal_card(data)
    card = folder / f"{name}.json"
    card.write_text(json.dumps(data, indent=2) + "\n")
    weights = folder / data["weights"] if isinstance(data.get("weights"), str) else None
    if weights is not None and "/" not in data["weights"] and not weights.exists():
        weights.symlink_to(SHIPPED_DIR / "lidc-nodule.safetensors")
    return card


def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


@pytest.fixture
def builds(monkeypatch):
    """Each build of a model: 'shapes' when its parameters hold (almost) no memory (the shape check), else 'real'."""
    from ARSegLib import engine

    kinds = []
    real = engine.build_arseg

    def recording(config):
        modules = real(config)
        params = [p for m in modules for p in m.parameters()]
        held = sum(p.untyped_storage().nbytes() for p in params)
        kinds.append("shapes" if held < 0.01 * sum(p.numel() * p.element_size() for p in params) else "real")
        return modules

    monkeypatch.setattr(engine, "build_arseg", recording)
    return kinds


@pytest.mark.parametrize("field, value, words", [
    # the values of issue 26: NaN temperature (a 175,534 mm3 "nodule"), modes as a string (read letter by letter),
    # embed_dim 16000 (6.6 GB allocated before the weights failed), a string pixel spacing (a traceback)
    ("config.sampling.temperature", float("nan"), "config.sampling.temperature must be a finite number"),
    ("modes", "volume", "modes must be a list of distinct modes out of click, volume"),
    ("config.segmentor.embed_dim", 16000, "config.segmentor.embed_dim must be a whole number from 1 to 4096"),
    ("pixel_spacing_mm", "0.7", "pixel_spacing_mm must be a finite number above 0"),
    # and the others of the kind
    ("config.sampling.temperature", 0, "config.sampling.temperature must be a finite number above 0"),
    ("config.sampling.views", 9, "config.sampling.views must be a whole number between 1 and 8"),
    ("config.sampling.n_samples", 16.5, "config.sampling.n_samples must be a whole number"),
    ("config.sampling.presence_logit_shift", float("inf"), "config.sampling.presence_logit_shift"),
    ("config.sampling.temperature_per_scale", [0.5, 0.5], "temperature_per_scale must be a list of 0 or 8"),
    ("config.segmentor.presence_gate", "yes", "config.segmentor.presence_gate must be true or false"),
    ("config.segmentor.dropout", 1.5, "config.segmentor.dropout must be a finite number from 0.0 to 0.99"),
    ("config.segmentor.heads", 3, "config.segmentor.embed_dim must be a multiple of heads (3)"),
    ("config.autoencoder.scales", [1, 2, 4, 3, 5, 6, 7, 8], "config.autoencoder.scales must be increasing"),
    ("config.autoencoder.crop_size", 96, "config.autoencoder.crop_size must be"),
    ("config.segmentor.width", 3, "config.segmentor must be made of known fields"),
    ("crop_size", 64, "crop_size must be the configuration's crop size 128"),
    ("modes", ["click", "everything"], "modes must be a list"),
    ("modes", [], "modes must be a list"),
    ("intensity", "minmax", "intensity must be a JSON object"),
    ("weights", "../../lidc-nodule.safetensors", "weights must be a .safetensors file name beside the card"),
    ("sha256", "abc", "sha256 must be 64 lowercase hexadecimal digits"),
    ("weights_bytes", -1, "weights_bytes must be a whole number"),
    ("name", "../x", "name must be a model name"),
])
def test_each_bad_card_value_is_one_error_naming_the_field_before_the_weights(field, value, words, tmp_path, builds,
                                                                              monkeypatch):
    from ARSegLib import models

    hashed = []
    monkeypatch.setattr(models, "sha256_file", lambda path: hashed.append(path) or "0" * 64)
    card = edited_copy(tmp_path, _set(field, value))
    with pytest.raises(ModelError) as info:
        load_model(card)
    message = str(info.value)
    assert words in message and str(card) in message and "\n" not in message, message
    assert not hashed and not builds  # refused before the weights were read or anything was built


def test_an_edited_card_is_refused_even_with_valid_values(tmp_path, builds):
    """A card whose result-changing values were edited after export (here: whole-volume runs enabled for the
    click-only model, a temperature of 0.9) is refused: its card_sha256 no longer matches."""
    for i, (field, value) in enumerate([("modes", ["click", "volume"]), ("config.sampling.temperature", 0.9),
                                        ("pixel_spacing_mm", 0.8), ("intensity.description", "edited"),
                                        ("task.name", "a lump")]):
        card = edited_copy(tmp_path / str(i), _set(field, value))
        with pytest.raises(ModelError, match="was edited after export"):
            read_card(card)
    assert not builds
    # what does not change results may change; a deliberately changed card, sealed again, loads
    notes = edited_copy(tmp_path / "notes", _set("description", "my notes"))
    assert read_card(notes).data["description"] == "my notes"
    import subprocess
    import sys

    card = edited_copy(tmp_path / "resealed", _set("modes", ["click", "volume"]), name="lidc-nodule-both")
    proc = subprocess.run([sys.executable, str(SHIPPED_DIR.parents[1] / "tools" / "seal_card.py"), str(card)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_card(card).supports("volume")


def test_the_shipped_card_is_sealed_and_its_weights_untouched():
    from ARSegLib.models import card_digest, sha256_file

    card = read_card("lidc-nodule")
    assert card.origin == "shipped" and card.data["card_sha256"] == card_digest(card.data)
    assert card.data["sha256"] == "2c71f1da0fe187e1518e1676e90227482fd029c996520bf6a563b92661cbfc44"
    assert card.weights_path.stat().st_size == card.data["weights_bytes"]
    assert sha256_file(card.weights_path) == card.data["sha256"]


def test_weights_size_hash_and_shapes_are_checked_before_the_model_is_built(tmp_path, builds):
    import shutil

    # a byte appended: refused by its size, before hashing 8 MB
    card = edited_copy(tmp_path / "longer")
    weights = card.with_suffix(".safetensors")
    weights.unlink()
    shutil.copy(SHIPPED_DIR / "lidc-nodule.safetensors", weights)
    with open(weights, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="have 7895813 bytes, but the card .* says 7895812"):
        load_model(card)
    # an architecture that the weights do not have (valid, sealed; 4096 would take gigabytes): refused from the
    # weights' header, the model built with shapes only (no memory)
    import resource

    card = edited_copy(tmp_path / "wider", _set("config.segmentor.embed_dim", 4096), seal=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelError, match=r"do not fit the architecture .*\[960\] in the weights, \[24576\] by"):
        load_model(card)
    assert builds == ["shapes"], builds
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # kB: the real model is ~3 GB
    builds.clear()
    predictor, card = load_model("lidc-nodule")
    assert builds == ["shapes", "real"] and predictor.config.segmentor.embed_dim == 160


def test_a_shipped_name_is_not_shadowed_and_names_stay_in_the_model_folders(tmp_path, monkeypatch):
    import os

    from ARSegLib.models import locate_card

    other = tmp_path / "mine"
    edited_copy(other, _set("description", "someone else's lidc-nodule"))
    edited_copy(other, name="my-model")
    monkeypatch.setenv("ARSEG_MODEL_PATH", str(other))
    card = read_card("lidc-nodule")
    assert card.path.parent.resolve() == SHIPPED_DIR.resolve() and card.origin == "shipped"
    assert [p for p, _ in card.passed_over] == [other / "lidc-nodule.json"]
    notice = card.notice()
    assert str(card.path) in notice and str(other / "lidc-nodule.json") in notice and "ARSEG_MODEL_PATH" in notice
    assert read_card(other / "lidc-nodule.json").data["description"] == "someone else's lidc-nodule"  # asked for
    assert read_card("my-model").origin == "ARSEG_MODEL_PATH" and read_card("my-model").notice() is None

    # a name climbing out of the model folders reached any card on the machine; now a name is a file stem
    outside = edited_copy(tmp_path / "outside", name="evil")
    climb = os.path.relpath(outside.with_suffix(""), SHIPPED_DIR)
    assert climb.startswith("..") and (SHIPPED_DIR / (climb + ".json")).resolve() == outside.resolve()
    monkeypatch.chdir(tmp_path / "mine")
    for name in (climb, "..", "../outside/evil", "lidc-nodule/..", "..lidc"):
        with pytest.raises(ModelError, match="not a model name|model card not found"):
            locate_card(name)
