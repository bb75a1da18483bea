"""A click's first outline (issue 22): a fast pass on the plane through the click, handed to segment_click's
on_outline before the full sampling; the worker sends it ahead of the result; the front ends show it as a node of
its own that the result replaces (write_result removes it in the same scene update), outside the nodule's history.
The shipped model on the bundled demo slab of lung1: the outline agrees with the final result on that plane."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from arseg_volumes import read_nrrd_ras
from held_runs import HeldClient

from ARSegLib import pipeline, worker
from ARSegLib.metrics import dice
from ARSegLib.prompts import include

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "Resources" / "Demo"


@pytest.fixture(scope="module")
def demo():
    array, m = read_nrrd_ras(DEMO / "lung1-slab.nrrd")
    point = json.loads((DEMO / "lung1-slab.json").read_text())["nodule_centroid_ras_mm"]
    return array, m, point


@pytest.fixture(scope="module")
def click_with_outline(shipped, demo):
    predictor, card = shipped
    array, m, point = demo
    events = []
    result = pipeline.segment_click(array, m, point, predictor, card, pipeline.SegmentSettings(),
                                    progress=lambda done, total: events.append(("progress", done)),
                                    on_outline=lambda o: events.append(("outline", o)))
    return result, events


def test_the_outline_comes_first_and_agrees_with_the_result_on_the_clicked_plane(click_with_outline, demo):
    result, events = click_with_outline
    kinds = [kind for kind, _ in events]
    assert kinds.count("outline") == 1 and kinds[0] == "outline", kinds[:3]  # before any step of the full run
    outline = events[0][1]
    assert isinstance(outline, pipeline.Outline)
    assert outline.mask.shape == result.preview.consensus.shape and outline.grid.shape == (1,) + outline.mask.shape
    assert outline.grid.origin_ras[2] == pytest.approx(result.preview.plane_s_mm)
    assert outline.mask.sum() > 500  # the nodule: about 880 pixels on this plane
    assert dice(outline.mask, result.preview.consensus) >= 0.9, "the fast pass disagrees with the full sampling"
    # on the volume's grid: one slice of the axial scan, the slice through the click, inside the result there
    marked = np.argwhere(outline.volume_mask > 0)
    slices = np.unique(marked[:, 0] + outline.box[0][0])
    assert slices.tolist() == [result.preview.slice_index]
    final_slice = result.full(result.consensus)[slices[0]]
    mine = np.zeros_like(final_slice)
    (_, _), (j0, j1), (i0, i1) = outline.box
    mine[j0:j1, i0:i1] = outline.volume_mask[slices[0] - outline.box[0][0]]
    assert dice(mine, final_slice) >= 0.9
    assert outline.area_mm2 == pytest.approx(outline.mask.sum() * 0.7 ** 2)
    assert 0 < outline.seconds


def test_the_outline_changes_nothing_in_the_result(shipped, demo, click_with_outline):
    predictor, card = shipped
    array, m, point = demo
    with_outline, _ = click_with_outline
    plain = pipeline.segment_click(array, m, point, predictor, card, pipeline.SegmentSettings())
    for name in ("consensus", "disagreement", "scale_bits", "sample_bits", "if_present"):
        np.testing.assert_array_equal(getattr(with_outline, name), getattr(plain, name), err_msg=name)


def test_a_cancelled_click_stops_at_the_outline(shipped, demo):
    from ARSegLib.engine import Cancelled

    predictor, card = shipped
    array, m, point = demo
    outlines = []
    with pytest.raises(Cancelled):
        pipeline.segment_click(array, m, point, predictor, card, pipeline.SegmentSettings(),
                               cancel=lambda: True, on_outline=outlines.append)
    assert outlines == []


def test_the_front_ends_show_the_outline_until_the_result_replaces_it(click_with_outline, demo):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from ARSegLib import mrml

    result, events = click_with_outline
    outline = events[0][1]
    array, m, _ = demo
    scene = mrml.new_scene()
    volume = mrml.add_scalar_volume(scene, "demo", array, m)
    node = mrml.show_outline(scene, volume, outline)
    assert mrml.outline_node(scene, volume) is node and node.GetScene() is scene
    shape, local_m = mrml.volume_array_shape(volume), mrml.local_ijk_to_ras(volume)
    drawn = mrml.segment_array(node, mrml.OUTLINE_SEGMENT_ID, shape, local_m)
    np.testing.assert_array_equal(drawn[tuple(slice(a, b) for a, b in outline.box)], outline.volume_mask)
    assert drawn.sum() == outline.volume_mask.sum()
    assert not node.GetDisplayNode().GetVisibility2DFill() and node.GetDisplayNode().GetVisibility2DOutline()
    assert mrml.find_results(scene, volume) is None and mrml.list_nodules(scene, volume) == []
    mrml.show_outline(scene, volume, outline)  # a second outline replaces the first: one at a time
    assert len([n for n in mrml.result_nodes_of(scene, volume)
                if n.GetAttribute(mrml.ROLE_ATTRIBUTE) == mrml.ROLE_OUTLINE]) == 1

    mrml.write_result(scene, volume, result)  # the result replaces it in the same update
    assert mrml.outline_node(scene, volume) is None
    assert [n.id for n in mrml.list_nodules(scene, volume)] == ["Nodule_1"]
    assert mrml.remove_outline(scene, volume) == 0
    # a redo's outline is no step of the history: one undo brings back the nodule's first result, a second none
    mrml.show_outline(scene, volume, outline)
    mrml.write_result(scene, volume, result)
    assert mrml.outline_node(scene, volume) is None
    mrml.undo_last(scene, volume)
    assert [n.id for n in mrml.list_nodules(scene, volume)] == ["Nodule_1"]
    mrml.undo_last(scene, volume)
    assert mrml.list_nodules(scene, volume) == [] and not mrml.can_undo(scene, volume)
    # a run that wrote nothing: the front end removes the outline
    mrml.show_outline(scene, volume, outline)
    assert mrml.remove_outline(scene, volume) >= 1 and mrml.outline_node(scene, volume) is None
    with pytest.raises(mrml.ResultError):  # an outline of another volume is refused
        other = mrml.add_scalar_volume(scene, "other", array[:-1], m)
        mrml.show_outline(scene, other, outline)


def test_the_worker_sends_the_outline_before_the_result(tiny_model_card, tiny):
    predictor, card = tiny
    k, j, i = np.mgrid[:12, :100, :100]
    volume = np.where(((k - 6) * 2.0) ** 2 + ((j - 50) * 0.7) ** 2 + ((i - 50) * 0.7) ** 2 < 64, 40, -850)
    volume = volume.astype(np.int16)
    m = np.diag([-0.7, -0.7, 2.0, 1.0])
    point = tuple((m @ np.array([50, 50, 6, 1.0]))[:3])
    settings = pipeline.SegmentSettings(n_samples=4, seed=3, half_height_mm=4)
    client = worker.InferenceClient(str(tiny_model_card), "cpu")
    try:
        run = client.segment(volume, m, include(point), settings, volume_key="blob")
        seen = []
        while not run.poll():
            outline = run.take_outline()
            if outline is not None:
                seen.append(outline)
            client.wait_for_message(0.05)
        assert run.error is None, run.error
        assert len(seen) == 1 and run.take_outline() is None  # once, and never after the result
        here = []
        pipeline.segment_click(volume, m, point, predictor, card, settings, on_outline=here.append)
        np.testing.assert_array_equal(seen[0].mask, here[0].mask)
        np.testing.assert_array_equal(seen[0].volume_mask, here[0].volume_mask)
        assert 0 < run.outline_seconds <= run.seconds
        quiet = client.segment(None, m, include(point), settings, volume_key="blob", outline=False)
        assert quiet.wait(120) and quiet.error is None and quiet.outline is None
    finally:
        client.shutdown()


def test_the_page_shows_the_outline_until_the_result_replaces_it(tiny, tmp_path):
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    from ARSegLib import mrml
    from ARSegLib.web.catalog import VolumeCatalog
    from ARSegLib.web.review import ReviewSession

    k, j, i = np.mgrid[:6, :80, :80]
    array = np.where((j - 40) ** 2 + (i - 40) ** 2 < 100, 40, -850).astype(np.int16)
    m = np.diag([0.7, 0.7, 2.5, 1.0])
    source = mrml.new_scene()
    node = mrml.add_scalar_volume(source, "blob", array, m)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "blob.nrrd"))
    assert storage.WriteData(node)

    scene, client = mrml.new_scene(), HeldClient()
    session = ReviewSession(scene, VolumeCatalog.from_arguments([tmp_path / "blob.nrrd"]), client)
    volume = session.open_volume("v0")
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    point = tuple((m @ np.array([40, 40, 3, 1.0]))[:3])
    predictor, card = tiny
    outlines = []
    result = pipeline.segment_click(array, m, point, predictor, card,
                                    pipeline.SegmentSettings(n_samples=2, half_height_mm=0), on_outline=outlines.append)
    session.start(point)
    run = client.runs[-1]
    session.poll()
    assert mrml.outline_node(scene, volume) is None  # nothing yet
    run.outline, run.outline_seconds = outlines[0], 0.25
    status = session.poll()
    assert mrml.outline_node(scene, volume) is not None and "first outline" in status.message
    assert session.nodules() == []  # no nodule yet, and nothing to undo
    run.result, run.finished = result, True
    status = session.poll()
    assert status.state == "done" and status.seconds["first_outline"] == 0.25
    assert mrml.outline_node(scene, volume) is None and [n.id for n in session.nodules()] == ["Nodule_1"]
    # a run that fails after its outline leaves no outline behind
    session.start(point)
    run = client.runs[-1]
    run.outline, run.outline_seconds = outlines[0], 0.25
    session.poll()
    assert mrml.outline_node(scene, volume) is not None
    run.error, run.finished = RuntimeError("boom"), True
    assert session.poll().state == "failed" and mrml.outline_node(scene, volume) is None
    assert [n.id for n in session.nodules()] == ["Nodule_1"]
