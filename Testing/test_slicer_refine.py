"""Issue 21 section 3 in the Slicer module: refining the selected nodule (include / exclude points, "Resample finer
than this scale", browsing and using a sample) through ARSegLogic on slicer-core's real MRML and the worker, the
widget's behaviour with plain objects for Qt (test_slicer_module's fixtures), and the refinement's run under an
emulated Slicer main thread."""

from __future__ import annotations

import types

import numpy as np
import pytest

# the fixtures are test_slicer_module's (imported, pytest finds them here; the tests ask for them by name through
# request.getfixturevalue, so that no parameter shadows the import)
from test_slicer_module import UI, _blob, _FinishedRun, _tiny_result, _ui_widgets, widget  # noqa: F401

from ARSegLib import mrml, pipeline, prompts, runs


def _edge_ras(result, volume_node, inside: bool = True):
    """A voxel some samples mark and some do not (inside or outside the consensus) in RAS: where an exclude or
    include point changes something."""
    samples = np.stack([result.full(result.sample_mask(i + 1)) for i in range(result.n_samples)])
    votes = samples.sum(0)
    consensus = result.full(result.consensus) > 0
    where = np.argwhere((votes > 0) & (votes < result.n_samples) & (consensus if inside else ~consensus))
    if not len(where):
        where = np.argwhere(consensus if inside else votes > 0)
    k, j, i = (int(v) for v in where[len(where) // 2])
    return tuple(float(v) for v in (mrml.world_ijk_to_ras(volume_node) @ np.array([i, j, k, 1.0]))[:3])


def _voxel(volume_node, ras):
    i, j, k = np.rint(np.linalg.inv(mrml.world_ijk_to_ras(volume_node)) @ np.append(ras, 1.0))[:3].astype(int)
    return k, j, i


# ------------------------------------------------------------- (a) the console / logic path on real MRML


def test_a_refinement_updates_the_nodule_in_place_keeps_its_prompts_and_undo_restores_it(request, lung1,
                                                                                          tiny_model_card):
    module, slicer = request.getfixturevalue("arseg_module")
    scene = slicer.vtkMRMLScene()
    volume = mrml.add_scalar_volume(scene, "lung1", lung1.array, lung1.ijk_to_ras)
    logic = module.ARSegLogic()
    kw = dict(model=str(tiny_model_card), device="cpu")
    key = runs.volume_key_of(volume)
    try:
        first = logic.segment(volume, point=lung1.nodule_ras, samples=4, halfHeightMm=5, **kw)
        clicked = first.results[0]
        ids, count = mrml.segment_ids(first.segmentation), scene.GetNumberOfNodes()
        names = sorted(n.GetName() for n in mrml.result_nodes_of(scene, volume))
        exclude = _edge_ras(clicked, volume)

        refined = logic.refine(volume, "Nodule 1", exclude=[exclude], **kw)
        result = refined.results[0]
        assert refined.nodule_ids == ["Nodule_1"] and refined.nodule == "Nodule_1"  # no "Nodule 2"
        assert mrml.segment_ids(refined.segmentation) == ids  # the same segments, rewritten
        assert scene.GetNumberOfNodes() == count  # the nodes replaced, none added
        assert sorted(n.GetName() for n in mrml.result_nodes_of(scene, volume)) == names
        assert logic.results(volume).segmentation is refined.segmentation
        # the voxel: not in the consensus, nor in a kept sample unless the result says that not all could be kept
        k, j, i = _voxel(volume, exclude)
        marking = sum(int(result.full(result.sample_mask(s + 1))[k, j, i]) for s in range(result.n_samples))
        (said,) = result.settings["prompt_satisfaction"]
        assert said["kind"] == "exclude" and said["every_kept_sample_satisfies"] == (marking == 0)
        if marking == 0:
            assert result.full(result.consensus)[k, j, i] == 0
        notices = logic.promptNotices(result)  # what the panel's status adds
        assert (notices == []) == (marking == 0)
        if notices:
            assert notices[0].startswith("The exclude point at") and "satisfy it" in notices[0]

        # the prompts on the nodes: the report (segmentation attribute and table) and the nodule list
        (info,) = logic.nodules(volume)
        assert [p.get("kind") for p in info.prompts] == ["click", None]
        assert info.prompts[1]["prompts"][0]["kind"] == "exclude"
        assert logic.promptSummary(info.prompts) == "1 click, 1 exclude"
        assert logic.noduleSummary(info).endswith("; 1 click, 1 exclude")
        report = mrml.find_results(scene, volume).report
        assert [p.get("kind") for p in report["nodules"][0]["prompts"]] == ["click", None]
        table = refined.table.GetTable()
        column = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())].index("Prompts")
        assert "exclude" in table.GetValue(0, column).ToString()
        assert runs.shared_memory().get(key, "Nodule_1").result is result

        # undo: the nodule's previous result, and the service refines from that one again
        nodes, words = logic.undo(volume)
        assert words.startswith("Nodule 1 back to its previous result")
        (info,) = logic.nodules(volume)
        assert info.n_prompts == 1 and info.consensus_volume_mm3 == pytest.approx(clicked.consensus_volume_mm3,
                                                                                  abs=1e-2)
        assert mrml.segment_ids(nodes.segmentation) == ids
        assert runs.shared_memory().get(key, "Nodule_1").result is clicked
        used = logic.refine(volume, 1, sample=2, **kw)
        np.testing.assert_array_equal(used.results[0].full(used.results[0].consensus),
                                      clicked.full(clicked.sample_mask(2)))
        assert logic.promptSummary(logic.nodules(volume)[0].prompts) == "1 click, sample 2 used"
    finally:
        logic.stopWorker()


def test_one_sample_shows_over_the_ct_from_memory_or_kept_segments_and_a_new_result_clears_it(request, tiny):
    module, slicer = request.getfixturevalue("arseg_module")
    scene = mrml.new_scene()
    volume, array, m = _blob(scene)
    logic = module.ARSegLogic()
    result = _tiny_result(tiny, array, m, (-28, -28, 4))
    nodes = logic.applyResult(volume, result)
    display = nodes.segmentation.GetDisplayNode()
    view = logic.showSample(volume, 2)  # no sample segments kept: from the result the service remembers
    assert logic.shownSample(volume) == 2 and mrml.shown_sample(scene, volume) == ("Nodule_1", 2)
    shown = mrml.segment_array(view, mrml.SAMPLE_VIEW_SEGMENT_ID, array.shape, mrml.local_ijk_to_ras(volume))
    np.testing.assert_array_equal(shown > 0, result.full(result.sample_mask(2)) > 0)
    assert display.GetSegmentOpacity2DFill("Nodule_1") == 0.0  # the consensus as an outline beside it
    assert [n.id for n in logic.nodules(volume)] == ["Nodule_1"]  # a view, no nodule
    logic.showSample(volume, None)
    assert logic.shownSample(volume) is None and mrml.sample_view_node(scene, volume) is None
    assert display.GetSegmentOpacity2DFill("Nodule_1") == 1.0
    with pytest.raises(mrml.ResultError, match="samples 1 to 2"):
        logic.showSample(volume, 3)

    logic.showSample(volume, 1)
    again = logic.applyResult(volume, result)  # a new result of the nodule: the views show its consensus
    assert mrml.sample_view_node(scene, volume) is None and logic.shownSample(volume) is None
    assert again.segmentation.GetDisplayNode().GetSegmentOpacity2DFill("Nodule_1") == 1.0

    runs.shared_memory().forget(runs.volume_key_of(volume))  # e.g. a scene loaded from disk: nothing remembered
    with pytest.raises(mrml.ResultError, match="not kept"):
        logic.showSample(volume, 1)
    assert mrml.sample_view_node(scene, volume) is None
    kept = logic.applyResult(volume, result, includeSamples=True)  # "Keep every sample": from its segment
    runs.shared_memory().forget(runs.volume_key_of(volume))
    view = logic.showSample(volume, 1)
    shown = mrml.segment_array(view, mrml.SAMPLE_VIEW_SEGMENT_ID, array.shape, mrml.local_ijk_to_ras(volume))
    np.testing.assert_array_equal(shown > 0, result.full(result.sample_mask(1)) > 0)
    assert kept.segmentation.GetDisplayNode().GetSegmentOpacity2DFill("Nodule_1") == 0.0


def test_the_nodule_list_says_each_nodules_prompts(request):
    module, _ = request.getfixturevalue("arseg_module")
    history = prompts.PromptHistory((1.0, 2.0, 3.0), [prompts.refinement(exclude_points=[(0, 0, 0), (1, 1, 1)]),
                                                      prompts.refinement(include_points=[(2, 2, 2)]),
                                                      prompts.refinement(lock_scales=3, from_sample=2)])
    summary = module.ARSegLogic.promptSummary
    assert summary(history.to_list()) == "1 click, 1 include, 2 exclude, lock 1..3 of sample 2"
    assert summary(prompts.PromptHistory((0, 0, 0), [prompts.refinement(lock_scales=2)]).to_list()) == \
        "1 click, lock 1..2"
    assert summary([{"kind": "click", "point_ras": [0, 0, 0]}]) == "1 click"
    info = mrml.NoduleInfo(id="Nodule_1", name="Nodule 1", consensus_volume_mm3=100.0, presence_fraction=1.0,
                           if_present_volume_mm3=0.0, point_ras_mm=None, selected=True, n_prompts=4,
                           prompts=tuple(history.to_list()))
    assert module.ARSegLogic.noduleSummary(info) == \
        "Nodule 1: 100 mm\u00b3; 1 click, 1 include, 2 exclude, lock 1..3 of sample 2"
    assert module.ARSegLogic.refinementWords(exclude=[(1.0, 2.0, 3.0)]) == "exclude at 1.0, 2.0, 3.0"
    unmet = types.SimpleNamespace(settings={"prompt_satisfaction": [
        {"kind": "exclude", "point_ras": [1.0, 2.0, 3.0], "candidates": 64, "satisfying": 5,
         "every_kept_sample_satisfies": False},
        {"kind": "include", "point_ras": [0.0, 0.0, 0.0], "candidates": 64, "satisfying": 64,
         "every_kept_sample_satisfies": True}]})
    assert module.ARSegLogic.promptNotices(unmet) == [
        "The exclude point at 1.0, 2.0, 3.0 could not be met by every sample: 5 of 64 candidates satisfy it."]
    assert module.ARSegLogic.promptNotices(types.SimpleNamespace(settings={})) == []
    assert "scales 1-2 of sample 3 kept" in module.ARSegLogic.refinementWords(lock_scales=2, sample=3)


# ------------------------------------------------------------- the widget, Qt replaced by plain objects


class _Recorded:
    """logic.startRefinement recorded: the run it returns finishes with the result given later."""

    def __init__(self):
        self.calls = []

    def __call__(self, volume, **kw):
        self.calls.append(kw)
        return _FinishedRun(result=None)


def _widget_with_nodule(request, tiny, monkeypatch):
    w, scene, shown = request.getfixturevalue("widget")
    volume, array, m = _blob(scene)
    w._parameterNode = types.SimpleNamespace(inputVolume=volume, model="lidc-nodule", device="cpu",
                                             includeSamples=False)
    monkeypatch.setattr(w.logic, "setupPythonRequirements", lambda: True)
    recorded = _Recorded()
    monkeypatch.setattr(w.logic, "startRefinement", recorded)
    w.setRunning = lambda running: None
    return w, scene, shown, volume, array, m, recorded


def test_an_exclude_point_refines_the_selected_nodule_or_says_why_not(request, tiny, monkeypatch):
    w, scene, shown, volume, array, m, recorded = _widget_with_nodule(request, tiny, monkeypatch)
    excludes = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    w._promptNodes = {"exclude": excludes}
    import vtk

    excludes.AddControlPointWorld(vtk.vtkVector3d(-30.0, -28.0, 4.0))
    w.onPromptPointPlaced(excludes, None)  # no nodule yet: a message, no run, the point taken off
    assert recorded.calls == [] and "Select a nodule first" in w.ui.statusLabel.text
    assert excludes.GetNumberOfControlPoints() == 0 and w._run is None

    nodes = w.logic.applyResult(volume, _tiny_result(tiny, array, m, (-28, -28, 4)))
    w.showResults(nodes)
    excludes.AddControlPointWorld(vtk.vtkVector3d(-30.0, -28.0, 4.0))
    w.onPromptPointPlaced(excludes, None)
    assert recorded.calls == [dict(model="lidc-nodule", device="cpu", exclude=[(-30.0, -28.0, 4.0)],
                                   nodule="Nodule_1")]
    assert w._run is not None and w.ui.statusLabel.text.startswith("Refining Nodule 1 (exclude at -30.0, -28.0")
    assert excludes.GetNumberOfControlPoints() == 1  # the point stays: it is one of the nodule's prompts

    # two more points while that run is in flight: they wait, together, and run when it ends
    w.requestRefinement(exclude=[(1.0, 1.0, 1.0)])
    w.requestRefinement(include=[(2.0, 2.0, 2.0)])
    assert len(recorded.calls) == 1
    assert w._pendingRefinement == dict(nodule="Nodule_1", exclude=[(1.0, 1.0, 1.0)], include=[(2.0, 2.0, 2.0)])
    w._run.cancelled = True
    w.onPoll()
    assert recorded.calls[-1] == dict(model="lidc-nodule", device="cpu", nodule="Nodule_1",
                                      exclude=[(1.0, 1.0, 1.0)], include=[(2.0, 2.0, 2.0)])
    assert w._pendingRefinement is None and shown["errors"] == []


def test_a_refinement_updates_the_same_row_and_undo_restores_it(request, tiny, monkeypatch):
    """The worker's refined result applied by onPoll (with the run's request, as the service starts it): the same
    row, its prompts, the scale and sample widgets follow; Undo brings the click's result back."""
    w, scene, shown, volume, array, m, recorded = _widget_with_nodule(request, tiny, monkeypatch)
    predictor, card = tiny
    click = _tiny_result(tiny, array, m, (-28, -28, 4))
    w._run, w._runVolume = _FinishedRun(result=click), volume
    w.onPoll()
    assert w.ui.noduleList.items == [w.logic.noduleSummary(w.logic.nodules(volume)[0])]
    assert "click" not in w.ui.noduleList.items[0]  # a plain click lists no prompts
    assert (w.ui.sampleSlider.maximum, w.ui.sampleSlider.value, w.ui.sampleLabel.text) == (2, 0, "Consensus")
    assert w.ui.sampleSlider.enabled and not w.ui.useSampleButton.enabled
    n = w.ui.scaleSlider.maximum
    assert not w.ui.resampleFinerButton.enabled  # the finest scale: nothing finer to draw

    refinement = prompts.refinement(lock_scales=2)
    refined = pipeline.segment_click(array, m, (-28, -28, 4), predictor, card,
                                     pipeline.SegmentSettings(n_samples=2, half_height_mm=0), refinement=refinement,
                                     previous=click)
    run = _FinishedRun(result=refined)
    run.request = runs.RunRequest(ijk_to_ras=m, volume_shape=array.shape, nodule="Nodule_1", refinement=refinement,
                                  replace_with_empty=True)
    w._run, w._runVolume = run, volume
    w.onPoll()
    assert len(w.ui.noduleList.items) == 1 and w.ui.noduleList.items[0].startswith("Nodule 1:")
    assert w.ui.noduleList.items[0].endswith("; 1 click, lock 1..2")
    assert w.ui.scaleSlider.maximum == n and w.ui.statusLabel.text.startswith("Done in")
    w.onUndo()
    assert w.ui.noduleList.items == [w.logic.noduleSummary(w.logic.nodules(volume)[0])]
    assert not w.ui.noduleList.items[0].endswith("lock 1..2")
    assert w.logic.nodules(volume)[0].consensus_volume_mm3 == pytest.approx(click.consensus_volume_mm3, abs=1e-2)
    assert shown["errors"] == []


def test_resample_finer_and_the_sample_slider_ask_for_their_refinements(request, tiny, monkeypatch):
    w, scene, shown, volume, array, m, recorded = _widget_with_nodule(request, tiny, monkeypatch)
    nodes = w.logic.applyResult(volume, _tiny_result(tiny, array, m, (-28, -28, 4)))
    w.showResults(nodes)
    n = w.ui.scaleSlider.maximum
    w.ui.scaleSlider.value = 2
    w.onScaleChanged(2)
    assert w.ui.resampleFinerButton.enabled and "most typical sample" in w.ui.resampleFinerButton.toolTip
    assert f"draw scales 3-{n} again" in w.ui.resampleFinerButton.toolTip
    w.onResampleFiner()
    assert recorded.calls[-1] == dict(model="lidc-nodule", device="cpu", lock_scales=2, sample=None,
                                      nodule="Nodule_1")
    w._run = None

    w.ui.sampleSlider.value = 2  # the user drags the sample slider: sample 2 over the CT
    w.onSampleChanged(2)
    assert w.logic.shownSample(volume) == 2 and w.ui.sampleLabel.text == "Sample 2/2"
    assert w.ui.useSampleButton.enabled and "the sample shown" in w.ui.resampleFinerButton.toolTip
    w.onResampleFiner()  # the coarse scales of the sample shown
    assert recorded.calls[-1]["lock_scales"] == 2 and recorded.calls[-1]["sample"] == 2
    w._run = None
    w.onUseSample()
    assert recorded.calls[-1] == dict(model="lidc-nodule", device="cpu", sample=2, nodule="Nodule_1")
    w._run = None
    w.updateResultsGui()  # a parameter change keeps the sample shown and the slider on it
    assert w.ui.sampleSlider.value == 2 and w.logic.shownSample(volume) == 2
    w.onSampleChanged(0)
    assert w.logic.shownSample(volume) is None and w.ui.sampleLabel.text == "Consensus"
    assert not w.ui.useSampleButton.enabled

    runs.shared_memory().forget(runs.volume_key_of(volume))  # samples neither kept nor remembered: it says so
    w.ui.sampleSlider.value = 1
    w.onSampleChanged(1)
    assert "not kept" in shown["errors"][-1] and w.ui.sampleSlider.value == 0
    w.ui.scaleSlider.value = n
    w.onScaleChanged(n)
    assert not w.ui.resampleFinerButton.enabled and "nothing finer" in w.ui.resampleFinerButton.toolTip


def test_the_ui_has_the_refinement_widgets():
    """The .ui check (test_slicer_module) covers every widget ARSeg.py uses; here their kinds and the place widgets'
    scene connection, which Qt Designer's file must say for a qSlicerMarkupsPlaceWidget to place anything."""
    import xml.etree.ElementTree as ET

    root, widgets = _ui_widgets()
    for name, cls in (("includePlaceWidget", "qSlicerMarkupsPlaceWidget"),
                      ("excludePlaceWidget", "qSlicerMarkupsPlaceWidget"), ("resampleFinerButton", "QPushButton"),
                      ("sampleSlider", "QSlider"), ("sampleLabel", "QLabel"), ("useSampleButton", "QPushButton")):
        assert widgets.get(name) == cls, name
    receivers = {c.find("receiver").text for c in ET.parse(UI).getroot().iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert {"clickPlaceWidget", "includePlaceWidget", "excludePlaceWidget"} <= receivers
    scale_row = next(layout for layout in root.iter("layout") if layout.get("name") == "scaleLayout")
    assert {w.get("name") for w in scale_row.iter("widget")} >= {"scaleSlider", "resampleFinerButton"}


def test_the_parameter_node_reads_the_settings_limits(request):
    """Issue 21: the Slicer parameter node spelled its own limits (1..64 samples, temperature 5, 200 mm); now they
    are pipeline.SegmentSettings' (ARSegLib.limits), and the .ui spells none of them."""
    import ast
    from pathlib import Path

    from ARSegLib import limits

    source = Path(request.getfixturevalue("arseg_module")[0].__file__).read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "ARSegParameterNode")
    text = ast.get_source_segment(source, node)
    assert "limits.MAX_SAMPLES" in text and "limits.MAX_TEMPERATURE" in text and "limits.MAX_HALF_HEIGHT_MM" in text
    assert not any(isinstance(c, ast.Constant) and c.value in (64, 5.0, 200.0, 16, 20.0) for c in ast.walk(node))
    assert pipeline.MAX_SAMPLES == limits.MAX_SAMPLES
    assert pipeline.SegmentSettings.MAX_TEMPERATURE == limits.MAX_TEMPERATURE
    assert pipeline.SegmentSettings().n_samples == limits.DEFAULT_SAMPLES
    ui = UI.read_text()
    for spelled in ("<number>64</number>", "<double>5.0000000", "<double>200.0000000"):
        assert spelled not in ui


# ------------------------------------------------------------- (b) a refinement under an emulated Slicer main thread


def test_a_refinement_under_emulated_slicer_main_thread(request, lung1):
    """The module's refinement path (startRefinement -> run.poll() each 25 ms tick, the GIL held in between ->
    applyResult) with the shipped model in the worker: the main thread's longest stretch stays short beside the
    refinement itself, and the result is the one the pipeline gives in this process from the same click."""
    import time

    from ARSegLib.bench import run_like_slicer
    from ARSegLib.models import find_card, load_model

    module, slicer = request.getfixturevalue("arseg_module")
    try:
        find_card("lidc-nodule")
    except Exception:
        pytest.skip("the shipped model lidc-nodule is not installed")
    scene = mrml.new_scene()
    volume = mrml.add_scalar_volume(scene, "lung1", lung1.array, lung1.ijk_to_ras)
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    logic = module.ARSegLogic()
    try:
        assert logic.preload("lidc-nodule", "cpu").wait(300)
        nodes = logic.segment(volume, point=lung1.nodule_ras, device="cpu", samples=8)
        click = nodes.results[0]
        exclude = _edge_ras(click, volume, inside=False)
        started = {}

        def start():
            started["run"] = logic.startRefinement(volume, "Nodule_1", exclude=[exclude], device="cpu")
            return started["run"]

        def finish(result):
            started["nodes"] = logic.applyResult(volume, result, request=started["run"].request)

        emulated_s, longest = run_like_slicer(start, finish)
    finally:
        logic.stopWorker()
    predictor, card = load_model("lidc-nodule", "cpu")
    t0 = time.perf_counter()
    direct = pipeline.segment_click(array, m, lung1.nodule_ras, predictor, card,
                                    runs.shared_memory().get(runs.volume_key_of(volume), "Nodule_1").settings,
                                    refinement=prompts.refinement(exclude_points=[exclude]), previous=click)
    direct_s = time.perf_counter() - t0
    print(f"\nlung1 refinement (8 samples, one exclude point): direct {direct_s:.2f} s, emulated Slicer "
          f"{emulated_s:.2f} s, longest main-thread block {longest * 1000:.0f} ms (node writing included)")
    refined = started["nodes"]
    assert refined.nodule_ids == ["Nodule_1"] and refined.nodule == "Nodule_1"
    assert longest < 0.5 * direct_s  # the main thread never runs the model
    result = refined.results[0]
    np.testing.assert_array_equal(result.consensus, direct.consensus)
    assert result.box == direct.box
    assert [p.get("kind") for p in logic.nodules(volume)[0].prompts] == ["click", None]
