"""Shared fixtures: where the real data is (tests skip, saying why, when it is absent), tiny models.

ARSEG_DATA: the shared data folder (default ../shared/data beside the checkout). Tests that need only the region
of lung1 around its nodule use the bundled demo slab (Resources/Demo) and never skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# tests share two cores with anything else on the machine: keep torch to what is needed
torch.set_num_threads(int(os.environ.get("ARSEG_TEST_THREADS", "2")))

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("ARSEG_DATA", ROOT.parent / "shared" / "data"))
LIDC_TAR = DATA / "lidc" / "lidc-idri-slices.tar"
LUNG1 = DATA / "ct" / "lung1"
BRATS = DATA / "brats"


def need(path: Path):
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set ARSEG_DATA to the shared data folder; "
                    f"tests that need only the lung1 nodule region run on the bundled demo)")
    return path


@pytest.fixture(scope="session")
def lidc_tar():
    return need(LIDC_TAR)


@pytest.fixture(scope="session")
def lung1_dir():
    return need(LUNG1)


@pytest.fixture(scope="session")
def brats_dir():
    return need(BRATS)


@pytest.fixture(scope="session")
def tiny_model_card(tmp_path_factory):
    """A tiny, untrained model at the real crop size (128) written as a card + safetensors.

    Its outputs are meaningless; it checks contracts (shapes, nodes, files), never accuracy."""
    from ARSegLib.engine import build_arseg, tiny_config
    from ARSegLib.models import export_model

    torch.manual_seed(0)
    cfg = tiny_config(crop_size=128)
    ae, seg = build_arseg(cfg)
    with torch.no_grad():  # make the presence gate draw most samples, so masks are not all empty
        seg.image_encoder.presence_head[-1].bias.fill_(2.0)
    out = tmp_path_factory.mktemp("models") / "tiny-test"
    return export_model(out, cfg, ae, seg, {
        "description": "tiny untrained test model", "crop_size": 128, "pixel_spacing_mm": 0.7,
        "intensity": {"method": "minmax_per_crop"}, "labels": {"1": "Lung nodule"},
        # both modes, so that the whole-volume path can be tested; the shipped lidc-nodule is click-only
        "modes": ["click", "volume"]})


@pytest.fixture(scope="module")
def tiny(tiny_model_card):
    """(predictor, card) of the tiny untrained test model."""
    from ARSegLib.models import load_model

    return load_model(tiny_model_card)


@pytest.fixture(scope="module")
def lung1():
    """A region of lung1 around its nodule (image, label, IJK->RAS), see arseg_volumes.lung1_region; cut from the
    bundled demo slab (the same voxels: test_demo.py checks it against ../shared when present)."""
    from arseg_volumes import demo_region

    return demo_region()


@pytest.fixture
def arseg_module(monkeypatch):
    """ARSeg.py imported on slicer-core: Slicer's GUI-side modules stubbed, so that the console API
    (ARSegLogic.segment / segmentFiles) runs on real MRML nodes without the application."""
    import importlib.util
    import sys
    import types

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

    class Stub:
        def __init__(self, *args, **kwargs):
            pass

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (Stub,), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = Stub
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    spec = importlib.util.spec_from_file_location("ARSeg_under_test", ROOT / "ARSeg" / "ARSeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, slicer


SHIPPED = ROOT / "Resources" / "Models" / "lidc-nodule.json"


@pytest.fixture(scope="module")
def shipped():
    """(predictor, card) of the shipped lung-nodule model."""
    if not SHIPPED.exists():
        pytest.skip("shipped model Resources/Models/lidc-nodule.json not present")
    from ARSegLib.models import load_model

    return load_model(SHIPPED)


@pytest.fixture(scope="module")
def lung1_click(lung1, shipped):
    """The shipped model's click at the centre of lung1's nodule (the demo region's voxels)."""
    from ARSegLib import pipeline

    predictor, card = shipped
    return pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card)
