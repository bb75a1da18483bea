"""Model cards: load by path, refuse tampered weights, unknown names and broken cards clearly."""

from __future__ import annotations

import json
import shutil

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
