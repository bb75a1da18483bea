"""The task in the model card (task.py, models.validate_card), regions and per-region Dice, several inputs on one
grid (volume_regions.py), and the brats-glioma model end to end on a few slices of a BraTS case."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BRATS, need

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "Resources" / "Models"
TEST_CASE = "brats_2013_pat0005_1"  # data/brats.SPLIT["test"]: never seen in training


# --------------------------------------------------------------------------------------------- regions, Dice

def test_regions_are_unions_of_classes_by_hand():
    from ARSegLib.data.brats import brats_task
    from ARSegLib.task import task_from_card

    task = task_from_card({"task": brats_task(), "pixel_spacing_mm": 2.0}, ("volume",), 128)
    labels = np.array([[0, 1, 2, 3],
                       [3, 3, 0, 2]], dtype=np.uint8)
    masks = task.region_masks(labels)
    assert list(masks) == ["Whole tumour", "Tumour core", "Enhancing tumour"]
    assert masks["Whole tumour"].tolist() == [[False, True, True, True], [True, True, False, True]]
    assert masks["Tumour core"].tolist() == [[False, True, False, True], [True, True, False, False]]
    assert masks["Enhancing tumour"].tolist() == [[False, False, False, True], [True, True, False, False]]


def test_region_dice_by_hand():
    from ARSegLib.metrics import region_dice

    true = np.array([0, 1, 2, 3, 3, 0, 2, 2], dtype=np.uint8)
    pred = np.array([0, 1, 1, 3, 0, 2, 2, 0], dtype=np.uint8)
    d = region_dice(pred, true, {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,), "none": (4,)})
    # WT: pred {1,2,3,5,6}, true {1,2,3,4,6,7}: 2*4/(5+6); TC: pred {1,2,3}, true {1,3,4}: 2*2/6; ET: {3} vs {3,4}
    assert d["WT"] == pytest.approx(8 / 11)
    assert d["TC"] == pytest.approx(4 / 6)
    assert d["ET"] == pytest.approx(2 / 3)
    assert d["none"] == 1.0  # empty against empty
    with pytest.raises(ValueError, match="different shapes"):
        region_dice(pred[:4], true, {"WT": (1,)})


# --------------------------------------------------------------------------------------------- the card's task

def _brats_like_card():
    """A lung card turned into a two-input, four-class one on paper (for validate_card, which reads no weights)."""
    from ARSegLib.data.brats import brats_card

    data = json.loads((MODELS / "lidc-nodule.json").read_text())
    data["config"]["segmentor"]["in_channels"] = 2
    data["config"]["autoencoder"]["n_classes"] = 4
    for key, value in brats_card().items():
        data[key] = value
    return data


def _set(data, dotted, value):
    keys = dotted.split(".")
    target = data
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


@pytest.mark.parametrize("field, value, named", [
    ("task.inputs", [{"name": "flair", "intensity": {"method": "zscore_in_brain"}}], "task.inputs"),
    ("task.inputs.1.name", "flair", "task.inputs"),  # two inputs of one name
    ("task.inputs.0.name", "FLAIR!", "task.inputs[0].name"),
    ("task.inputs.1.intensity", {"method": "histogram_magic"}, "task.inputs[1].intensity.method"),
    ("task.inputs.0.intensity", {"method": "zscore_in_brain", "clip": [3, 1]}, "task.inputs[0].intensity.clip[1]"),
    ("task.inputs.0.intensity", {"method": "minmax_per_crop"}, "task.inputs[0].intensity.method"),  # != top level
    ("task.classes", {"1": "core", "2": "oedema"}, "task.classes"),
    ("task.classes.2", "", "task.classes.2"),
    ("task.regions", [], "task.regions"),
    ("task.regions.2.classes", [4], "task.regions[2].classes[0]"),
    ("task.regions.2.classes", [3, 3], "task.regions[2].classes"),
    ("task.regions.1.color", [0.2, 1.5, 0.0], "task.regions[1].color[1]"),
    ("task.regions.1.color", "red", "task.regions[1].color"),
    ("task.regions.1.name", "Whole tumour", "task.regions"),
    ("task.fill_value", float("nan"), "task.fill_value"),
    ("task", ["flair"], "task"),
])
def test_card_task_fields_are_checked_with_the_field_named(field, value, named):
    from ARSegLib.models import ModelError, validate_card

    data = _brats_like_card()
    validate_card(Path("brats-like.json"), data)  # the card as exported is valid
    broken = copy.deepcopy(data)
    _set(broken, field, value)
    with pytest.raises(ModelError) as e:
        validate_card(Path("brats-like.json"), broken)
    assert f": {named} must be" in str(e.value), str(e.value)


def test_the_task_is_sealed():
    from ARSegLib.models import SEALED_FIELDS, card_digest

    data = _brats_like_card()
    edited = copy.deepcopy(data)
    edited["task"]["regions"][0]["classes"] = [1, 2]
    assert "task" in SEALED_FIELDS and card_digest(edited) != card_digest(data)


def test_a_card_without_task_reads_as_the_lung_task_and_the_lung_card_states_it():
    from ARSegLib.models import read_card
    from ARSegLib.task import LUNG_TERMINOLOGY, task_from_card

    card = read_card("lidc-nodule")
    assert "task" in card.data
    old = {k: v for k, v in card.data.items() if k != "task"}  # a card from before tasks
    assert task_from_card(old, card.modes, card.crop_size) == card.task
    task = card.task
    assert task.input_names == ("volume",) and task.inputs[0].method == "minmax_per_crop"
    assert task.region_names == ("Nodule",) and task.regions[0].classes == (1,)
    assert task.regions[0].terminology == LUNG_TERMINOLOGY and task.modes == ("click",)
    assert task.pixel_spacing_mm == 0.7 and task.crop_size == 128 and task.fill_value is None


# --------------------------------------------------------------------------------------------- several inputs

def _task():
    from ARSegLib.data.brats import brats_task
    from ARSegLib.task import task_from_card

    return task_from_card({"task": brats_task(), "pixel_spacing_mm": 2.0}, ("volume",), 128)


def test_inputs_must_be_the_tasks_and_share_one_grid():
    from ARSegLib.volume_regions import InputsError, check_inputs

    g = np.random.default_rng(0)
    a, b = g.normal(size=(4, 6, 5)).astype(np.float32), g.normal(size=(4, 6, 5)).astype(np.float32)
    m = np.diag([-1.0, -1.0, 1.0, 1.0])
    m[:3, 3] = (10.0, 20.0, -30.0)
    stack, m_out = check_inputs({"t1ce": (b, m), "flair": (a, m)}, _task())
    assert stack.shape == (2, 4, 6, 5) and np.array_equal(stack[0], a) and np.array_equal(stack[1], b)  # task order
    assert np.array_equal(m_out, m)
    near = m.copy()
    near[0, 3] += 0.004  # within GRID_TOLERANCE_MM
    check_inputs({"flair": (a, m), "t1ce": (b, near)}, _task())
    with pytest.raises(InputsError, match="missing t1ce"):
        check_inputs({"flair": (a, m)}, _task())
    with pytest.raises(InputsError, match="unknown t2"):
        check_inputs({"flair": (a, m), "t1ce": (b, m), "t2": (b, m)}, _task())
    with pytest.raises(InputsError, match=r"input t1ce has shape \(4, 6, 4\)"):
        check_inputs({"flair": (a, m), "t1ce": (b[..., :4], m)}, _task())
    shifted = m.copy()
    shifted[1, 3] += 1.0  # one voxel off
    with pytest.raises(InputsError, match="t1ce lies up to 1 mm away from input flair"):
        check_inputs({"flair": (a, m), "t1ce": (b, shifted)}, _task())
    finer = m.copy()
    finer[:3, :3] *= 0.5  # the same shape, half the spacing
    with pytest.raises(InputsError, match="must share one grid"):
        check_inputs({"flair": (a, m), "t1ce": (b, finer)}, _task())
    nan = b.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="input t1ce: the volume contains 1 NaN"):
        check_inputs({"flair": (a, m), "t1ce": (nan, m)}, _task())


def test_zscored_inputs_are_clipped_and_empty_crops_skipped():
    from ARSegLib.volume_regions import prepare_input_crops

    crops = np.zeros((3, 2, 4, 4), dtype=np.float32)
    crops[0, 0] = np.linspace(-8, 12, 16).reshape(4, 4)
    crops[1, 1, 0, 0] = 2.0  # one channel has signal: the crop goes to the model
    prepared, signal = prepare_input_crops(crops, _task())
    assert signal.tolist() == [True, True, False]
    assert prepared[0, 0].min() == -5.0 and prepared[0, 0].max() == 10.0  # the card's clip
    assert np.array_equal(prepared[0, 0][(crops[0, 0] > -5) & (crops[0, 0] < 10)],
                          crops[0, 0][(crops[0, 0] > -5) & (crops[0, 0] < 10)])
    assert prepared[1, 1, 0, 0] == 2.0 and not prepared[2].any()


# --------------------------------------------------------------------------------------------- the model, end to end

def _brats_model():
    from ARSegLib.models import available_models, load_model

    if "brats-glioma" not in available_models():
        pytest.skip("the brats-glioma model is not in Resources/Models")
    return load_model("brats-glioma")


@pytest.fixture(scope="module")
def test_case_slab():
    return brats_test_slab()


def brats_test_slab():
    """12 slices through the tumour of the test patient (FLAIR, T1ce, label), on the case's own 1 mm grid."""
    from ARSegLib.data.brats import BRATS_LABELS, read_volume_ras

    case = need(BRATS / TEST_CASE)
    flair, m = read_volume_ras(case / f"{TEST_CASE}_flair.nii.gz")
    t1ce, _ = read_volume_ras(case / f"{TEST_CASE}_t1ce.nii.gz")
    seg, _ = read_volume_ras(case / f"{TEST_CASE}_seg.nii.gz")
    k = int(np.argmax((seg > 0).sum((1, 2))))
    ks = slice(k - 6, k + 6)
    m_slab = m.copy()
    m_slab[:3, 3] = (m @ np.array([0.0, 0.0, ks.start, 1.0]))[:3]
    lut = np.zeros(256, np.uint8)
    for src, dst in BRATS_LABELS.items():
        lut[src] = dst
    return flair[ks].astype(np.float32), t1ce[ks].astype(np.float32), lut[seg[ks]], m_slab


def test_brats_glioma_whole_volume_regions_on_the_test_patient(test_case_slab):
    from ARSegLib.metrics import dice
    from ARSegLib.pipeline import SegmentSettings, UnsupportedModeError, check_mode
    from ARSegLib.volume_regions import segment_volume_regions

    predictor, card = _brats_model()
    flair, t1ce, labels, m = test_case_slab
    with pytest.raises(UnsupportedModeError):
        check_mode(card, "click")  # validated for whole volume only
    result = segment_volume_regions({"flair": (flair, m), "t1ce": (t1ce, m)}, predictor, card,
                                    SegmentSettings(n_samples=4))
    assert result.n_lesions >= 1 and [p.region for p in result.parts[:3]] == list(card.task.region_names)
    wt, tc, et = (result.region_consensus(n) for n in card.task.region_names)
    # the consensus of nested regions is nested: a voxel most samples put in ET, most put in TC and WT too
    assert not (et & ~tc).any() and not (tc & ~wt).any()
    truth = card.task.region_masks(labels)
    assert dice(wt, truth["Whole tumour"]) > 0.5  # trained on three other patients; see BENCHMARKS.md
    report = result.report("slab")
    assert [r["name"] for r in report["regions"]] == ["Whole tumour", "Tumour core", "Enhancing tumour"]
    for r in report["regions"]:
        v = r["sample_volume_ml"]
        assert v["min"] <= v["mean"] <= v["max"]
        assert r["consensus_volume_ml"] == pytest.approx(
            float(result.region_consensus(r["name"]).sum()) * result.voxel_volume_mm3 / 1000, abs=1e-3)
    part = result.parts[0].result
    assert 0 <= part.disagreement.min() and part.disagreement.max() <= 1 and part.n_samples == 4


def test_arseg_segment_with_several_inputs_writes_regions(test_case_slab, tmp_path):
    """The CLI through the run service: T1ce given on a grid of its own (the slab cropped by 4 voxels in-plane) is
    resampled onto FLAIR's, which the output and the report's settings say; a point is refused (the card: whole
    volume only), and so is a missing input, before any work, writing nothing."""
    import SimpleITK as sitk

    from ARSegLib.mrml import load_segmentation, new_scene, segment_names

    _brats_model()
    flair, t1ce, _, m = test_case_slab
    m_crop = m.copy()
    m_crop[:3, 3] = (m @ np.array([4.0, 4.0, 0.0, 1.0]))[:3]
    paths = {}
    for name, array, grid_m in (("flair", flair, m), ("t1ce", t1ce[:, 4:-4, 4:-4], m_crop)):
        image = sitk.GetImageFromArray(array)
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid_m
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
        image.SetOrigin(lps[:3, 3].tolist())
        paths[name] = tmp_path / f"slab_{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    out, report, png = tmp_path / "slab.seg.nrrd", tmp_path / "slab.json", tmp_path / "slab.png"
    cmd = [sys.executable, "-m", "ARSegLib.cli", "segment", "--model", "brats-glioma", "--samples", "4",
           "--input", f"flair={paths['flair']}", "--input", f"t1ce={paths['t1ce']}", "--out", str(out),
           "--report", str(report), "--png", str(png), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Whole tumour:" in proc.stdout and out.is_file() and png.stat().st_size > 1000
    assert "note: t1ce: resampled onto flair's grid" in proc.stdout
    rep = json.loads(report.read_text())
    assert len(rep["settings"]["inputs_aligned"]) == 1 and "covers 9" in rep["settings"]["inputs_aligned"][0]
    assert [r["name"] for r in rep["regions"]] == ["Whole tumour", "Tumour core", "Enhancing tumour"]
    assert rep["sources"] == {k: str(v) for k, v in paths.items()}
    names = segment_names(load_segmentation(new_scene(), out))
    assert {"Whole tumour", "Tumour core", "Enhancing tumour"} <= set(names) or \
        {"Whole tumour 1", "Tumour core 1", "Enhancing tumour 1"} <= set(names), names
    # a missing input is refused before any work, and nothing is written
    out2 = tmp_path / "missing.seg.nrrd"
    proc = subprocess.run(cmd[:10] + ["--out", str(out2)], capture_output=True, text=True, encoding="utf-8", cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2 and "t1ce" in proc.stderr and not out2.exists()
    # a click: the card lists whole volume only (its modes_note: click mode is not validated), so it is refused
    proc = subprocess.run(cmd[:12] + ["--point", "0,0,0", "--out", str(out2)], capture_output=True, text=True,
                          encoding="utf-8", cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "not validated for click" in proc.stderr and not out2.exists(), proc.stderr
    # one VOLUME for a model of two inputs: refused before the model loads
    proc = subprocess.run([sys.executable, "-m", "ARSegLib.cli", "segment", str(paths["flair"]), "--model",
                           "brats-glioma", "--out", str(out2)], capture_output=True, text=True, encoding="utf-8",
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "--input flair=PATH --input t1ce=PATH" in proc.stderr and not out2.exists()
