"""Several inputs in every front end (issue 23): the inputs aligned onto the first's grid (resampled, or refused
when they do not overlap), volumes preselected by name, requests of several inputs checked on the caller's side
before any work, the console's segment({"flair": ..., "t1ce": ...}) through the run service and the worker on
slicer-core's real MRML, and the module's one selector per input of the card."""

from __future__ import annotations

import numpy as np
import pytest
import test_slicer_module

TEST_CASE = "brats_2013_pat0005_1"  # data/brats.SPLIT["test"]
widget = test_slicer_module.widget  # its real ARSegWidget with plain objects for the Qt widgets (fixture)


def _task():
    from ARSegLib.data.brats import brats_task
    from ARSegLib.task import task_from_card

    return task_from_card({"task": brats_task(), "pixel_spacing_mm": 2.0}, ("volume",), 128)


def _linear(shape, m):
    """A volume whose voxels hold a linear function of their RAS position: trilinear resampling reproduces it."""
    k, j, i = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(np.float64)
    ras = m[:3, 0, None, None, None] * i + m[:3, 1, None, None, None] * j + m[:3, 2, None, None, None] * k + \
        m[:3, 3, None, None, None]
    return (0.5 * ras[0] - 0.25 * ras[1] + 2.0 * ras[2] + 100.0).astype(np.float32)


# --------------------------------------------------------------------------------------------- alignment

def test_an_input_on_another_grid_is_resampled_onto_the_firsts_and_one_that_misses_it_is_refused():
    from ARSegLib.volume_regions import InputsError, align_inputs

    task = _task()
    m = np.diag([-1.0, -1.0, 1.0, 1.0])
    m[:3, 3] = (10.0, 20.0, -5.0)
    flair = _linear((8, 20, 24), m)
    # t1ce: 2 mm in-plane, 1.5 mm slices, shifted, and larger than flair: it covers flair's grid whole
    m2 = np.diag([-2.0, -2.0, 1.5, 1.0])
    m2[:3, 3] = (14.0, 24.0, -8.0)
    t1ce = _linear((12, 16, 18), m2)
    aligned = align_inputs({"t1ce": (t1ce, m2), "flair": (flair, m)}, task)
    assert aligned.names == ("flair", "t1ce") and np.array_equal(aligned.ijk_to_ras, m)
    assert aligned.stack.shape == (2, 8, 20, 24) and np.array_equal(aligned.stack[0], flair)
    np.testing.assert_allclose(aligned.stack[1], flair, atol=1e-3)  # the same function, on flair's voxels
    assert list(aligned.resampled) == ["t1ce"]
    assert "resampled onto flair's grid" in aligned.resampled["t1ce"] and "covers 100%" in aligned.resampled["t1ce"]
    assert aligned.notices == [f"t1ce: {aligned.resampled['t1ce']}"]

    # half of flair's planes outside t1ce: those are the task's fill value (0), and the note says how much it covers
    m3 = m.copy()
    m3[2, 3] = -1.0  # starts at flair's plane 4
    part = align_inputs({"flair": (flair, m), "t1ce": (_linear((8, 20, 24), m3), m3)}, task)
    np.testing.assert_allclose(part.stack[1, 4:], flair[4:], atol=1e-3)
    assert not part.stack[1, :3].any()
    assert "covers 5" in part.resampled["t1ce"] and "filled with 0" in part.resampled["t1ce"]

    # the same grid: nothing done, nothing said
    same = align_inputs({"flair": (flair, m), "t1ce": (flair * 2, m.copy())}, task)
    assert same.resampled == {} and np.array_equal(same.stack[1], flair * 2)

    far = m.copy()
    far[:3, 3] += 500.0
    with pytest.raises(InputsError, match="t1ce does not overlap input flair"):
        align_inputs({"flair": (flair, m), "t1ce": (flair, far)}, task)
    with pytest.raises(InputsError, match="t1ce is on another grid than input flair.*resample t1ce"):
        align_inputs({"flair": (flair, m), "t1ce": (t1ce, m2)}, task, resample=False)
    with pytest.raises(InputsError, match="missing t1ce"):
        align_inputs({"flair": (flair, m)}, task)


# --------------------------------------------------------------------------------------------- on slicer-core

def test_volumes_are_preselected_by_name(arseg_module):
    from ARSegLib import mrml

    _, slicer = arseg_module
    scene = mrml.new_scene()
    a = np.zeros((3, 4, 5), np.float32)
    m = np.eye(4)
    own = mrml.add_scalar_volume(scene, "FLAIR", a, m)
    own.SetAttribute(mrml.ROLE_ATTRIBUTE, "disagreement")  # ARSeg's own volume: never an input
    mrml.add_scalar_volume(scene, "case7_t1", a, m)  # T1 is not T1ce
    by_word = mrml.add_scalar_volume(scene, "case7_T1ce", a, m)
    exact = mrml.add_scalar_volume(scene, "flair.nii", a, m)
    task = _task()
    assert mrml.volumes_for_inputs(scene, task) == {"flair": exact, "t1ce": by_word}
    exact_t1ce = mrml.add_scalar_volume(scene, "T1CE", a, m)
    assert mrml.volumes_for_inputs(scene, task)["t1ce"] is exact_t1ce  # an exact name before a word of one
    assert mrml.volumes_for_inputs(mrml.new_scene(), task) == {}


def _service(model):
    """A run service on the model's card with no model behind it: whatever it refuses, it refuses before any work."""
    from ARSegLib.models import read_card
    from ARSegLib.runs import LocalBackend, RunService

    return RunService(LocalBackend(None, read_card(model)))


def test_requests_of_several_inputs_are_checked_before_any_work(arseg_module):
    from ARSegLib import mrml, runs
    from ARSegLib.models import available_models
    from ARSegLib.pipeline import UnsupportedModeError
    from ARSegLib.prompts import include
    from ARSegLib.volume_regions import InputsError

    if "brats-glioma" not in available_models():
        pytest.skip("the brats-glioma model is not in Resources/Models")
    scene = mrml.new_scene()
    m = np.diag([-1.0, -1.0, 1.0, 1.0])
    flair = mrml.add_scalar_volume(scene, "FLAIR", _linear((6, 20, 24), m), m)
    m2 = np.diag([-2.0, -2.0, 1.0, 1.0])
    t1ce = mrml.add_scalar_volume(scene, "T1ce", _linear((6, 12, 14), m2), m2)
    service = _service("brats-glioma")
    request = service.check(service.request_for_inputs({"FLAIR": flair, "t1ce": t1ce}))  # a title is a name too
    assert request.input_names == ("flair", "t1ce") and request.shape == (6, 20, 24)
    assert request.volume.shape == (2, 6, 20, 24) and np.allclose(request.ijk_to_ras, m)
    assert len(request.input_notes) == 1 and request.input_notes[0].startswith("t1ce: resampled onto flair's grid")
    assert request.mode == "volume" and request.volume_key == (runs.volume_key_of(flair), runs.volume_key_of(t1ce))

    with pytest.raises(InputsError, match="missing t1ce"):
        service.request_for_inputs({"flair": flair})
    with pytest.raises(InputsError, match="unknown t2"):
        service.request_for_inputs({"flair": flair, "t1ce": t1ce, "t2": t1ce})
    with pytest.raises(InputsError, match="flair is given twice"):
        service.request_for_inputs({"flair": flair, "FLAIR": flair, "t1ce": t1ce})
    with pytest.raises(InputsError, match="not a volume node"):
        service.request_for_inputs({"flair": flair, "t1ce": None})
    with pytest.raises(UnsupportedModeError, match="not validated for click"):  # the card: whole volume only
        service.check(service.request_for_inputs({"flair": flair, "t1ce": t1ce}, click=include((0.0, 0.0, 2.0))))
    with pytest.raises(InputsError, match=r"takes the inputs flair \(FLAIR\), t1ce \(T1ce\)"):
        service.check(service.request_for_node(flair))  # one volume for a model of two
    far_m = m2.copy()
    far_m[0, 3] += 900.0
    far = mrml.add_scalar_volume(scene, "elsewhere", _linear((6, 12, 14), far_m), far_m)
    with pytest.raises(InputsError, match="does not overlap"):
        service.request_for_inputs({"flair": flair, "t1ce": far})
    lung = _service("lidc-nodule")
    with pytest.raises(InputsError, match="model 'lidc-nodule' takes one volume \\(CT\\)"):
        lung.request_for_inputs({"flair": flair, "t1ce": t1ce})


@pytest.fixture(scope="module")
def slab():
    """12 slices through the tumour of the test patient (FLAIR, T1ce), on the case's own 1 mm grid."""
    from test_brats_task import brats_test_slab

    flair, t1ce, _, m = brats_test_slab()
    return flair, t1ce, m


def test_console_segments_several_inputs_through_the_worker_on_slicer_core(arseg_module, slab, tmp_path):
    """ARSegLogic().segment({"flair": f, "t1ce": t}, model="brats-glioma"): refused before any work where it must
    be (no worker starts), else run in the worker and written as one segmentation of the first input with a
    segment per region per lesion, its disagreement and scales, and the report per region in mL."""
    from arseg_volumes import Volume, write_nrrd

    from ARSegLib import mrml, pipeline
    from ARSegLib.models import available_models
    from ARSegLib.volume_regions import InputsError

    if "brats-glioma" not in available_models():
        pytest.skip("the brats-glioma model is not in Resources/Models")
    module, slicer = arseg_module
    flair_array, t1ce_array, m = slab
    scene = mrml.new_scene()
    flair = mrml.add_scalar_volume(scene, "FLAIR", flair_array, m)
    t1ce = mrml.add_scalar_volume(scene, "t1ce.nii", t1ce_array, m)
    logic = module.ARSegLogic()
    kw = dict(model="brats-glioma", device="cpu", samples=4)
    try:
        before = logic.worker("brats-glioma", "cpu").pid  # a worker an earlier test left, or none
        with pytest.raises(InputsError, match="missing t1ce"):
            logic.segment({"flair": flair}, **kw)
        with pytest.raises(pipeline.UnsupportedModeError, match="not validated for click"):
            logic.segment({"flair": flair, "t1ce": t1ce}, point=(0.0, 0.0, 0.0), **kw)
        with pytest.raises(InputsError, match="takes the inputs flair"):
            logic.segment(flair, **kw)  # one volume for a model of two
        assert logic.worker("brats-glioma", "cpu").pid == before  # nothing started

        nodes = logic.segment({"flair": flair, "t1ce": t1ce}, **kw)
        assert isinstance(nodes, mrml.RegionNodes) and nodes.notices == []  # one grid: nothing resampled
        assert nodes.segmentation.GetScene() is scene and nodes.segmentation.GetName() == "FLAIR ARSeg"
        names = mrml.segment_names(nodes.segmentation)
        result = nodes.result
        assert result.n_lesions >= 1
        regions = ["Whole tumour", "Tumour core", "Enhancing tumour"]
        first = [p.name for p in result.parts[:3]]
        assert first == (regions if result.n_lesions == 1 else [f"{r} 1" for r in regions])
        for part in first:
            assert part in names and f"{part} disagreement" in names and f"{part} scale 1/8" in names
        report = nodes.report
        assert [r["name"] for r in report["regions"]] == regions and report["inputs"] == ["flair", "t1ce"]
        for r in report["regions"]:
            v = r["sample_volume_ml"]
            assert v["min"] <= v["mean"] <= v["max"]
            assert r["consensus_volume_ml"] == pytest.approx(
                float(result.region_consensus(r["name"]).sum()) * result.voxel_volume_mm3 / 1000, abs=1e-3)
        assert report["n_samples"] == 4
        assert "Whole tumour:" in logic.reportSummary(report) and " mL (samples " in logic.reportSummary(report)
        assert logic.results(flair).segmentation is nodes.segmentation  # the module finds it again
        # a consensus segment is the region's voxels, on the first input's grid
        seg_id = result.parts[0].name.replace(" ", "_")
        mask = mrml.segment_array(nodes.segmentation, seg_id, flair_array.shape, m)
        assert np.array_equal(mask > 0, result.region_consensus(result.parts[0].region) > 0)

        # files: each case {input name: path}, in a scene of its own, named after its first input
        paths = {name: write_nrrd(Volume(array, m), tmp_path / f"case_{name}.nrrd")
                 for name, array in (("flair", flair_array), ("t1ce", t1ce_array))}
        reports = logic.segmentFiles([paths], tmp_path / "out", **kw)
        assert reports[0]["sources"] == {k: str(v) for k, v in paths.items()}
        out = tmp_path / "out"
        assert (out / "case_flair.seg.nrrd").is_file() and (out / "case_flair.report.json").is_file()
        assert [r["consensus_volume_ml"] for r in reports[0]["regions"]] == \
            [r["consensus_volume_ml"] for r in report["regions"]]  # the same voxels, the same seed: the same result
    finally:
        logic.stopWorker()


# --------------------------------------------------------------------------------------------- the module's selectors

class _Selector:
    def __init__(self):
        self.node, self.proxy = None, type("Proxy", (), {"hiddenNodeIDs": []})()

    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node

    def sortFilterProxyModel(self):
        return self.proxy


class _FormLayout:
    def __init__(self):
        self.rows = []

    def insertRow(self, row, label, widget):
        self.rows.insert(row - 1, (label, widget))

    def removeRow(self, widget):
        self.rows = [r for r in self.rows if r[1] is not widget]


def test_the_module_shows_one_selector_per_input_of_the_card_preselected_by_name(widget, arseg_module, monkeypatch):
    import types

    from ARSegLib import mrml
    from ARSegLib.models import available_models

    if "brats-glioma" not in available_models():
        pytest.skip("the brats-glioma model is not in Resources/Models")
    w, scene, shown = widget
    module, _ = arseg_module
    monkeypatch.setattr(module.slicer, "mrmlScene", scene, raising=False)
    layout = _FormLayout()
    w.ui.inputsCollapsibleButton = types.SimpleNamespace(layout=lambda: layout)
    w.ui.inputVolumeLabel = types.SimpleNamespace(text="Input volume:")
    w._newInputSelector = lambda name, title: (f"{title} volume:", _Selector())
    a, m = np.zeros((3, 4, 5), np.float32), np.eye(4)
    ct = mrml.add_scalar_volume(scene, "ct", a, m)
    t1ce = mrml.add_scalar_volume(scene, "T1ce", a, m)
    flair = mrml.add_scalar_volume(scene, "flair.nii", a, m)
    w._parameterNode = types.SimpleNamespace(inputVolume=t1ce, model="lidc-nodule")

    w.updateInputSelectors()  # the lung card: the .ui's one selector, untouched
    assert layout.rows == [] and w.ui.inputVolumeLabel.text == "Input volume:" and w._selectedInputs() is t1ce

    w._parameterNode.model = "brats-glioma"
    w.updateInputSelectors()
    assert [label for label, _ in layout.rows] == ["T1ce volume:"] and w.ui.inputVolumeLabel.text == "FLAIR volume:"
    assert w._parameterNode.inputVolume is flair  # was T1ce, a volume named for another input
    assert w._selectedInputs() == {"flair": flair, "t1ce": t1ce}
    layout.rows[0][1].setCurrentNode(None)
    with pytest.raises(ValueError, match="Select the T1ce volume first"):
        w._selectedInputs()
    w._parameterNode.inputVolume = ct  # chosen by the user: a model change keeps it
    w.updateInputSelectors()
    assert w._parameterNode.inputVolume is ct and layout.rows[0][1].currentNode() is t1ce

    w._parameterNode.model = "lidc-nodule"
    w.updateInputSelectors()
    assert layout.rows == [] and w.ui.inputVolumeLabel.text == "Input volume:" and w._selectedInputs() is ct


# --------------------------------------------------------------------------------------------- the card's words

def test_a_click_results_terminology_and_colour_and_the_mode_hint_come_from_the_cards_task(arseg_module, tiny):
    """Above the engine the task is the card's: a one-input card whose region is a "Lesion" coded as a neoplasm
    writes its masks with that terminology and colour, and its mode hint names a lesion; the lung card's task (the
    tiny card has none: the lung defaults) writes what it always wrote."""
    import dataclasses

    from ARSegLib import mrml, pipeline, runs
    from ARSegLib.task import LUNG_TERMINOLOGY

    predictor, card = tiny
    neoplasm = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
                "~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^")
    task = {"name": "liver lesion", "inputs": [{"name": "volume", "title": "CT",
                                                "intensity": {"method": "minmax_per_crop"}}],
            "classes": {"1": "lesion"},
            "regions": [{"name": "Lesion", "classes": [1], "color": [0.1, 0.3, 0.9], "terminology": neoplasm}]}
    liver = dataclasses.replace(card, data=dict(card.data, task=task, modes=["volume"]))
    with pytest.raises(pipeline.UnsupportedModeError, match="not validated for click"):
        pipeline.check_mode(liver, "click")
    with pytest.raises(pipeline.UnsupportedModeError, match="Give a point on the lesion"):
        pipeline.check_mode(dataclasses.replace(card, data=dict(card.data, task=task, modes=["click"])), "volume")
    with pytest.raises(pipeline.UnsupportedModeError, match="Give a point on the nodule"):
        pipeline.check_mode(dataclasses.replace(card, data=dict(card.data, modes=["click"])), "volume")
    liver = dataclasses.replace(card, data=dict(card.data, task=task))
    k, j, i = np.mgrid[:6, :80, :80]
    array = np.where((j - 40) ** 2 + (i - 40) ** 2 < 100, 40, -850).astype(np.int16)
    settings = pipeline.SegmentSettings(n_samples=2, half_height_mm=0.0)
    for which, expected_terminology, expected_color in ((liver, neoplasm, (0.1, 0.3, 0.9)),
                                                        (card, LUNG_TERMINOLOGY, mrml.OutputOptions().consensus_color)):
        scene = mrml.new_scene()
        volume = mrml.add_scalar_volume(scene, "blob", array, np.diag([-0.7, -0.7, 2.0, 1.0]))
        nodes = runs.RunService(runs.LocalBackend(predictor, which)).segment_node(
            volume, runs.clicks([(-28.0, -28.0, 4.0)]), settings)
        segment = nodes.segmentation.GetSegmentation().GetSegment("Nodule_1")
        assert mrml.get_terminology(segment) == expected_terminology
        assert tuple(segment.GetColor()) == pytest.approx(expected_color)
        scale = nodes.segmentation.GetSegmentation().GetSegment(mrml.scale_segment_id(1, "Nodule_1"))
        assert mrml.get_terminology(scale) == expected_terminology
