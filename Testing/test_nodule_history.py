"""Nothing lost when a click redoes a nodule (issue 26 item 4), on slicer-core's real MRML nodes: a redo that
found nothing keeps the nodule (unless asked), a redo says what it replaced, and undo_last restores the nodule's
previous segments, report row and disagreement, or removes the nodule the last run added."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from arseg_volumes import DiscPredictor  # noqa: E402

from ARSegLib import mrml, pipeline  # noqa: E402
from ARSegLib.pipeline import SegmentSettings  # noqa: E402

SETTINGS = SegmentSettings(n_samples=16, half_height_mm=7.5)


def _click(lung1, tiny, offset_mm=(0, 0, 0), **kwargs):
    predictor, card = tiny
    return pipeline.segment_click(lung1.array, lung1.ijk_to_ras, np.add(lung1.nodule_ras, offset_mm),
                                  DiscPredictor(predictor.config, **kwargs), card, SETTINGS)


def _scene(lung1):
    scene = slicer.vtkMRMLScene()
    return scene, mrml.add_scalar_volume(scene, "lung1", lung1.array, lung1.ijk_to_ras)


def _segments(nodes, nid):
    m, shape = mrml.reference_geometry_of(nodes.segmentation)
    return {sid: mrml.segment_array(nodes.segmentation, sid, shape, m)
            for sid in mrml.nodule_segment_ids(nodes.segmentation, nid)}


def _voxels(volume_node):
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1]).copy()


def _snapshot(scene):
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}


def test_an_empty_redo_keeps_the_nodule_unless_asked(lung1, tiny):
    found = _click(lung1, tiny)
    nothing = _click(lung1, tiny, (2.0, 1.0, 0.0), marking=0)  # inside nodule 1; no sample marks anything
    assert found.consensus_volume_mm3 > 0 and not nothing.consensus.any()
    scene, volume = _scene(lung1)
    before = _segments(mrml.write_result(scene, volume, found), "Nodule_1")
    unchanged = _snapshot(scene)

    kept = mrml.write_result(scene, volume, nothing)
    assert _snapshot(scene) == unchanged  # not a node touched
    assert kept.nodule_ids == ["Nodule_1"] and len(kept.notices) == 1
    assert "Nodule 1 kept as it was" in kept.notices[0] and "0 of 16 samples" in kept.notices[0]
    after = _segments(kept, "Nodule_1")
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)

    asked = mrml.write_result(scene, volume, nothing, replace_with_empty=True)
    assert asked.nodule_ids == ["Nodule_1"] and asked.report["nodules"][0]["consensus_volume_mm3"] == 0
    assert "redone" in asked.notices[0]


def test_undo_restores_a_redone_nodule_and_removes_an_added_one(lung1, tiny):
    first = _click(lung1, tiny, radius_mm=6.0, marking=10)  # 6 of 16 samples disagree inside the ball
    smaller = _click(lung1, tiny, (1.0, 0.0, 0.0), radius_mm=4.0, marking=12)  # a redo of nodule 1 with another answer
    other = _click(lung1, tiny, (30.0, -15.0, 0.0))
    scene, volume = _scene(lung1)
    assert not mrml.can_undo(scene, volume)
    with pytest.raises(mrml.ResultError, match="nothing to undo"):
        mrml.undo_last(scene, volume)

    one = mrml.write_result(scene, volume, first)
    original, original_entry = _segments(one, "Nodule_1"), one.report["nodules"][0]
    original_fraction = _voxels(one.disagreement_volume)
    two = mrml.write_result(scene, volume, other)
    redone = mrml.write_result(scene, volume, smaller)
    assert redone.nodule_ids == ["Nodule_1", "Nodule_2"] and redone.nodule == "Nodule_1"
    assert redone.notices and redone.notices[0].startswith("Nodule 1 redone: ")
    assert redone.report["nodules"][0]["consensus_volume_mm3"] < original_entry["consensus_volume_mm3"]
    nodule_2 = _segments(two, "Nodule_2")
    assert not np.array_equal(_voxels(redone.disagreement_volume), original_fraction)

    restored, words = mrml.undo_last(scene, volume)
    assert "Nodule 1 back to its previous result" in words
    assert restored.nodule_ids == ["Nodule_1", "Nodule_2"] and restored.nodule == "Nodule_1"
    back = _segments(restored, "Nodule_1")
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert restored.segmentation.GetSegmentation().GetSegment("Nodule_1").GetRepresentation(surface) is not None
    assert back.keys() == original.keys() and all(np.array_equal(back[k], original[k]) for k in original)
    assert restored.report["nodules"][0] == original_entry
    assert all(np.array_equal(_segments(restored, "Nodule_2")[k], nodule_2[k]) for k in nodule_2)
    # the disagreement heat map and the scale slider show nodule 1's own again
    np.testing.assert_array_equal(_voxels(restored.disagreement_volume), original_fraction)
    assert restored.sequence.GetNumberOfDataNodes() == first.n_scales
    proxy = mrml.segment_array(restored.proxy, restored.proxy.GetSegmentation().GetNthSegmentID(0),
                               lung1.array.shape, mrml.local_ijk_to_ras(volume))
    np.testing.assert_array_equal(proxy, first.full(first.scale_mask(first.n_scales)))
    # the table node shows the restored row
    assert mrml.find_results(scene, volume).report == restored.report

    # then the run that added nodule 2, then the one that added nodule 1: nothing left, nothing to undo
    after_two, words = mrml.undo_last(scene, volume)
    assert "Nodule 2 removed" in words and after_two.nodule_ids == ["Nodule_1"]
    gone, _ = mrml.undo_last(scene, volume)
    assert gone is None and mrml.find_results(scene, volume) is None
    assert mrml.result_nodes_of(scene, volume) == [] and not mrml.can_undo(scene, volume)


def test_deleting_a_nodule_drops_its_undo_steps(lung1, tiny):
    scene, volume = _scene(lung1)
    mrml.write_result(scene, volume, _click(lung1, tiny))
    mrml.write_result(scene, volume, _click(lung1, tiny, (30.0, -15.0, 0.0)))
    mrml.write_result(scene, volume, _click(lung1, tiny, (31.0, -15.0, 0.0), radius_mm=4.0))  # redo of nodule 2
    mrml.delete_nodule(scene, volume, "Nodule_2")
    nodes, words = mrml.undo_last(scene, volume)  # the only step left is nodule 1's
    assert "Nodule 1 removed" in words and nodes is None


def test_undo_steps_are_bounded(lung1, tiny):
    scene, volume = _scene(lung1)
    results = [_click(lung1, tiny, (0.2 * i, 0, 0), radius_mm=4.0 + 0.1 * (i % 3)) for i in range(3)]
    for i in range(mrml.MAX_UNDO_STEPS + 3):
        mrml.write_result(scene, volume, results[i % 3])
    history = mrml._history_node(scene, volume)
    assert len(mrml._undo_steps(history)) == mrml.MAX_UNDO_STEPS
    assert history.GetNumberOfDataNodes() == 2 * mrml.MAX_UNDO_STEPS  # segments and disagreement of each redo
