"""The MRML node contract on slicer-core's headless scene, with real nodes: names, visibility, geometry,
.seg.nrrd round trip into a fresh scene, the scale sequence, the report, user nodes untouched, atomic errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from ARSegLib import mrml, pipeline  # noqa: E402
from ARSegLib.models import ModelError, load_model  # noqa: E402
from ARSegLib.pipeline import SegmentSettings  # noqa: E402

N_SAMPLES = 4


@pytest.fixture(scope="module")
def click_result(lung1, tiny):
    predictor, card = tiny
    return pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                                  SegmentSettings(n_samples=N_SAMPLES, half_height_mm=7.5))



def _segment(volume, predictor, card, points, settings):
    """The console's path (the run service in this process): a nodule at each point."""
    from ARSegLib import runs

    return runs.RunService(runs.LocalBackend(predictor, card)).segment_node(volume, runs.clicks(points), settings)

def _scene_with_volume(lung1, name="lung1"):
    scene = slicer.vtkMRMLScene()
    volume = mrml.add_scalar_volume(scene, name, lung1.array, lung1.ijk_to_ras)
    return scene, volume


def _user_segmentation(scene, volume):
    """A segmentation the user made: one segment, not ARSeg's."""
    mrml.register_segmentation_converters()
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName("my nodule")
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mask = np.zeros(volume.GetImageData().GetDimensions()[::-1], np.uint8)
    mask[5:9, 60:80, 60:80] = 1
    labelmap = mrml._oriented_labelmap(mask, (0, 0, 0), mrml.local_ijk_to_ras(volume))
    segment = mrml._segment("mine", "Mine", (0, 1, 0), labelmap)
    node.GetSegmentation().AddSegment(segment, "mine")
    return node


def _snapshot(scene):
    """Every node's ID, class and modification time: what 'unchanged' means."""
    out = {}
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        out[n.GetID()] = (n.GetClassName(), n.GetMTime())
    return out


def test_node_contract(lung1, click_result):
    scene, volume = _scene_with_volume(lung1)
    nodes = mrml.write_result(scene, volume, click_result, mrml.OutputOptions(include_samples=True))
    r, K = click_result, click_result.n_scales
    seg = nodes.segmentation

    # names and visibility: the first click is Nodule 1
    assert nodes.nodule == "Nodule_1" and nodes.nodule_ids == ["Nodule_1"]
    assert seg.GetName() == "lung1 ARSeg" and seg.GetScene() is scene
    expected = ["Nodule 1", "Nodule 1 disagreement", "Nodule 1 if present"] + \
               [f"Nodule 1 scale {k}/{K}" for k in range(1, K + 1)] + \
               [f"Nodule 1 sample {i}" for i in range(1, N_SAMPLES + 1)]
    assert mrml.segment_names(seg) == expected
    assert mrml.segment_ids(seg)[:3] == ["Nodule_1", "Nodule_1_Disagreement", "Nodule_1_IfPresent"]
    display = seg.GetDisplayNode()
    visible = {sid: display.GetSegmentVisibility(sid) for sid in mrml.segment_ids(seg)}
    assert visible.pop("Nodule_1") is True and not any(visible.values())  # the consensus is not empty here
    consensus = seg.GetSegmentation().GetSegment("Nodule_1")
    assert "27925004^Nodule" in consensus.GetTerminology() and "39607008^Lung" in consensus.GetTerminology()
    assert mrml.segment_tag(consensus, mrml.NODULE_TAG) == "Nodule_1"
    assert mrml.segment_tag(consensus, mrml.KIND_TAG) == "consensus"
    assert nodes.disagreement_volume.GetName() == "lung1 ARSeg disagreement"
    assert nodes.table.GetName() == "lung1 ARSeg report"
    assert nodes.sequence.GetName() == "lung1 ARSeg scales" and nodes.proxy.GetName() == "lung1 ARSeg scale"
    for node in (seg, nodes.disagreement_volume, nodes.sequence, nodes.browser, nodes.proxy, nodes.table,
                 nodes.disagreements):
        assert node.GetAttribute(mrml.SOURCE_ATTRIBUTE) == volume.GetID() and node.GetAttribute(mrml.ROLE_ATTRIBUTE)

    # geometry: the volume's, voxel for voxel
    m, shape = mrml.reference_geometry_of(seg)
    np.testing.assert_allclose(m, mrml.local_ijk_to_ras(volume), atol=1e-6)
    assert shape == lung1.array.shape
    cons = mrml.segment_array(seg, "Nodule_1", shape, m)
    np.testing.assert_array_equal(cons, r.full(r.consensus))
    np.testing.assert_array_equal(mrml.segment_array(seg, "Nodule_1_Disagreement", shape, m),
                                  r.full(r.disagreement > 0))
    np.testing.assert_array_equal(mrml.segment_array(seg, "Nodule_1_IfPresent", shape, m), r.full(r.if_present))
    for k in range(1, K + 1):
        np.testing.assert_array_equal(mrml.segment_array(seg, f"Nodule_1_Scale_{k}", shape, m),
                                      r.full(r.scale_mask(k)))

    # the disagreement volume sits on the volume's voxels, with the heat colour table
    dv = nodes.disagreement_volume
    dm = mrml.local_ijk_to_ras(dv)
    box_start = np.array([r.box[2][0], r.box[1][0], r.box[0][0], 1.0])
    np.testing.assert_allclose(dm[:, 3], mrml.local_ijk_to_ras(volume) @ box_start, atol=1e-6)
    np.testing.assert_allclose(dm[:3, :3], mrml.local_ijk_to_ras(volume)[:3, :3], atol=1e-9)
    np.testing.assert_allclose(mrml.volume_array(dv), r.disagreement)
    assert dv.GetDisplayNode().GetColorNode().GetName() == mrml.HEAT_COLORMAP_NAME

    # the sequence: K items, item k = segment Scale k, and the proxy follows the browser (the scale slider)
    assert nodes.sequence.GetNumberOfDataNodes() == K
    assert nodes.browser.GetMasterSequenceNode() is nodes.sequence
    for k in range(1, K + 1):
        item = nodes.sequence.GetNthDataNode(k - 1)
        assert item.GetSegmentation().GetSegment("Scale").GetName() == f"Nodule 1 scale {k}/{K}"
        np.testing.assert_array_equal(mrml.segment_array(item, "Scale", shape, m), r.full(r.scale_mask(k)))
    assert nodes.proxy.GetDisplayNode().GetVisibility() == 0  # hidden until the slider moves
    mrml.select_scale(nodes, 2)
    np.testing.assert_array_equal(mrml.segment_array(nodes.proxy, "Scale", shape, m), r.full(r.scale_mask(2)))
    assert nodes.proxy.GetDisplayNode().GetVisibility() == 1

    # the report agrees with the masks: a row per nodule, the selected nodule's numbers at the top
    rep = json.loads(nodes.table.GetAttribute(mrml.REPORT_ATTRIBUTE))
    assert [n["id"] for n in rep["nodules"]] == ["Nodule_1"] and rep["selected_nodule"] == "Nodule_1"
    row = rep["nodules"][0]
    voxel = abs(np.linalg.det(m[:3, :3]))
    assert row["consensus_volume_mm3"] == rep["consensus_volume_mm3"] == pytest.approx(cons.sum() * voxel, rel=1e-6)
    sample_counts = [mrml.segment_array(seg, f"Nodule_1_Sample_{i}", shape, m).sum() for i in range(1, N_SAMPLES + 1)]
    assert row["sample_volumes_mm3"] == pytest.approx([c * voxel for c in sample_counts], rel=1e-6)
    assert row["sample_volume_mm3"]["min"] == pytest.approx(min(sample_counts) * voxel, rel=1e-6)
    assert row["sample_volume_mm3"]["max"] == pytest.approx(max(sample_counts) * voxel, rel=1e-6)
    assert row["samples_marking"] == sum(c > 0 for c in sample_counts)
    for i in range(1, N_SAMPLES + 1):
        s = mrml.segment_array(seg, f"Nodule_1_Sample_{i}", shape, m).astype(bool)
        union = (s | (cons > 0)).sum()
        iou = 1.0 if union == 0 else (s & (cons > 0)).sum() / union
        assert row["sample_iou_with_consensus"][i - 1] == pytest.approx(iou, abs=1e-4)
    table = nodes.table
    assert table.GetNumberOfRows() == 1 and table.GetTable().GetColumnName(0) == "Nodule"
    cells = {table.GetTable().GetColumnName(c): table.GetCellText(0, c) for c in range(table.GetNumberOfColumns())}
    assert cells["Nodule"] == "Nodule 1" and float(cells["Consensus (mm3)"]) == pytest.approx(
        rep["consensus_volume_mm3"], abs=0.05)
    assert cells["Model"] == rep["model"]

    rules = {r.GetClassName() for r in slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules()}
    assert "vtkBinaryLabelmapToClosedSurfaceConversionRule" in rules


def test_converters_make_the_closed_surface_on_slicer_core(lung1):
    """As Slicer's Segmentations module registers them: without the rules no 3D view of a segment."""
    scene, volume = _scene_with_volume(lung1)
    mrml.register_segmentation_converters()
    node = _user_segmentation(scene, volume)
    assert node.GetSegmentation().CreateRepresentation("Closed surface")
    surface = node.GetSegmentation().GetSegment("mine").GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 100


def test_seg_nrrd_round_trip_into_a_fresh_scene(lung1, click_result, tmp_path):
    scene, volume = _scene_with_volume(lung1)
    nodes = mrml.write_result(scene, volume, click_result, mrml.OutputOptions(include_samples=True))
    path = mrml.save_segmentation(nodes.segmentation, tmp_path / "lung1.seg.nrrd")
    header = path.read_bytes().split(b"\n\n", 1)[0].decode("latin-1")
    names = dict(re.findall(r"^Segment(\d+)_Name:=(.*)$", header, re.M))
    assert [names[str(i)] for i in range(len(names))] == mrml.segment_names(nodes.segmentation)
    assert "space: left-posterior-superior" in header

    fresh = slicer.vtkMRMLScene()
    loaded = mrml.load_segmentation(fresh, path)
    assert mrml.segment_ids(loaded) == mrml.segment_ids(nodes.segmentation)
    assert mrml.segment_names(loaded) == mrml.segment_names(nodes.segmentation)
    m0, shape0 = mrml.reference_geometry_of(nodes.segmentation)
    m1, shape1 = mrml.reference_geometry_of(loaded)
    np.testing.assert_allclose(m1, m0, atol=1e-5)
    assert shape1 == shape0
    for sid in mrml.segment_ids(loaded):
        np.testing.assert_array_equal(mrml.segment_array(loaded, sid, shape1, m1),
                                      mrml.segment_array(nodes.segmentation, sid, shape0, m0), err_msg=sid)
    segment = loaded.GetSegmentation().GetSegment("Nodule_1")
    assert "27925004" in segment.GetTerminology()
    # which nodule and what kind each segment is travels in the file (segment tags)
    assert mrml.segment_tag(segment, mrml.NODULE_TAG) == "Nodule_1"
    assert mrml.nodule_segment_ids(loaded, "Nodule_1") == mrml.segment_ids(loaded)


def test_rerun_replaces_only_arsegs_nodes_and_never_touches_user_nodes(lung1, click_result):
    scene, volume = _scene_with_volume(lung1)
    other_volume = mrml.add_scalar_volume(scene, "other", lung1.array, lung1.ijk_to_ras)
    mine = _user_segmentation(scene, volume)
    mine_before = mrml.segment_array(mine, "mine", lung1.array.shape, mrml.local_ijk_to_ras(volume))
    user_nodes = _snapshot(scene)

    first = mrml.write_result(scene, volume, click_result)
    on_other = mrml.write_result(scene, other_volume, click_result)
    after_first = scene.GetNumberOfNodes()
    def ids_by_role():
        nodes = mrml.result_nodes_of(scene, volume)
        history = {n.GetID() for n in nodes if n.GetAttribute(mrml.ROLE_ATTRIBUTE) == mrml.ROLE_HISTORY}
        return {n.GetID() for n in nodes} - history, history

    first_ids, first_history = ids_by_role()
    second = mrml.write_result(scene, volume, click_result)

    assert scene.GetNumberOfNodes() == after_first  # replaced, not added
    second_ids, second_history = ids_by_role()
    assert len(second_ids) == len(first_ids) == 7 and not (first_ids & second_ids)
    assert len(first_history) == 1 and second_history == first_history  # the undo history is kept across runs
    assert second.nodule_ids == ["Nodule_1"]  # the same click again: inside Nodule 1, which is redone
    assert first.segmentation.GetScene() is None and second.segmentation.GetScene() is scene
    assert on_other.segmentation.GetScene() is scene  # another volume's results stay
    assert len(mrml._nodes_with_attribute(scene, "vtkMRMLSegmentationNode", mrml.ROLE_ATTRIBUTE, "segmentation")) == 2
    # the user's nodes: same nodes, not modified
    now = _snapshot(scene)
    for nid, (cls, mtime) in user_nodes.items():
        assert now[nid] == (cls, mtime), f"{nid} ({cls}) was modified"
    np.testing.assert_array_equal(
        mrml.segment_array(mine, "mine", lung1.array.shape, mrml.local_ijk_to_ras(volume)), mine_before)
    assert mrml.segment_names(mine) == ["Mine"]


def _assert_unchanged(scene, before):
    assert _snapshot(scene) == before


@pytest.mark.parametrize("case", ["2D", "4D", "constant", "NaN", "outside"])
def test_bad_input_gets_a_clear_error_and_leaves_the_scene_unchanged(case, lung1, tiny):
    predictor, card = tiny
    scene, volume = _scene_with_volume(lung1)
    _user_segmentation(scene, volume)
    point = lung1.nodule_ras
    if case == "2D":
        target = mrml.add_scalar_volume(scene, "slice", lung1.array[10:11], lung1.ijk_to_ras)
    elif case == "4D":
        target = mrml.add_scalar_volume(scene, "vectors", np.stack([lung1.array] * 3, axis=-1), lung1.ijk_to_ras)
    elif case == "constant":
        target = mrml.add_scalar_volume(scene, "flat", np.full(lung1.array.shape, -1000, np.int16), lung1.ijk_to_ras)
    elif case == "NaN":
        bad = lung1.array.astype(np.float32)
        bad[3, 4, 5] = np.nan
        target = mrml.add_scalar_volume(scene, "nan", bad, lung1.ijk_to_ras)
    else:
        target, point = volume, (500.0, 0.0, 0.0)
    before = _snapshot(scene)
    with pytest.raises(pipeline.VolumeError) as info:
        _segment(target, predictor, card, [point], SegmentSettings(n_samples=2))
    message = str(info.value)
    assert len(message) > 20 and "\n" not in message
    _assert_unchanged(scene, before)


def test_corrupt_file_and_unknown_model_leave_the_scene_unchanged(lung1, tmp_path):
    scene, volume = _scene_with_volume(lung1)
    before = _snapshot(scene)
    corrupt = tmp_path / "broken.nrrd"
    corrupt.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n\x00\x01")
    with pytest.raises(mrml.ResultError, match="cannot read"):
        mrml.load_volume(scene, corrupt)
    with pytest.raises(mrml.ResultError, match="not found"):
        mrml.load_volume(scene, tmp_path / "missing.nrrd")
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model")
    assert set(_snapshot(scene)) == set(before)
    for nid, state in before.items():
        assert _snapshot(scene)[nid] == state


def test_a_result_for_another_volume_is_refused_without_changes(lung1, click_result):
    scene, volume = _scene_with_volume(lung1)
    smaller = mrml.add_scalar_volume(scene, "small", lung1.array[:, :100], lung1.ijk_to_ras)
    mrml.write_result(scene, volume, click_result)
    before = _snapshot(scene)
    with pytest.raises(mrml.ResultError, match="shape"):
        mrml.write_result(scene, smaller, click_result)
    _assert_unchanged(scene, before)


def test_parent_transform_is_followed(lung1, click_result, tiny):
    """A volume under a linear transform: the click is in world RAS, the result follows the volume."""
    predictor, card = tiny
    scene, volume = _scene_with_volume(lung1)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.5)
    transform.SetMatrixTransformToParent(mrml._numpy_to_matrix(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world_point = np.asarray(lung1.nodule_ras) + shift[:3, 3]
    nodes = _segment(volume, predictor, card, [world_point], SegmentSettings(n_samples=N_SAMPLES, half_height_mm=7.5))
    assert nodes.segmentation.GetTransformNodeID() == transform.GetID()
    m, shape = mrml.reference_geometry_of(nodes.segmentation)
    np.testing.assert_array_equal(mrml.segment_array(nodes.segmentation, "Nodule_1", shape, m),
                                  click_result.full(click_result.consensus))


def test_results_are_found_again_and_shown_in_slice_views(lung1, click_result):
    scene, volume = _scene_with_volume(lung1)
    composite = slicer.vtkMRMLSliceCompositeNode()
    scene.AddNode(composite)
    assert mrml.find_results(scene, volume) is None
    written = mrml.write_result(scene, volume, click_result)
    found = mrml.find_results(scene, volume)
    assert found.segmentation is written.segmentation and found.proxy is written.proxy
    assert found.report["consensus_volume_mm3"] == written.report["consensus_volume_mm3"]
    mrml.show_disagreement(scene, found, True)
    assert composite.GetForegroundVolumeID() == written.disagreement_volume.GetID()
    mrml.show_disagreement(scene, found, False)
    assert composite.GetForegroundVolumeID() is None
    mrml.select_scale(found, 1)
    assert found.browser.GetSelectedItemNumber() == 0


# --------------------------------------------------------------------------------------------- several nodules

def _disc_results(lung1, tiny, offsets_mm, **kwargs):
    """Click results of the ball-drawing stand-in model at the nodule and at points offset from it."""
    from arseg_volumes import DiscPredictor

    predictor, card = tiny
    fake = DiscPredictor(predictor.config, **kwargs)
    settings = SegmentSettings(n_samples=16, half_height_mm=7.5)
    return [pipeline.segment_click(lung1.array, lung1.ijk_to_ras, np.add(lung1.nodule_ras, off), fake, card, settings)
            for off in offsets_mm]


def test_each_click_adds_a_nodule_and_a_click_inside_one_redoes_it(lung1, tiny):
    first, second, again = _disc_results(lung1, tiny, [(0, 0, 0), (30.0, -15.0, 0), (2.0, 1.0, 0)])
    scene, volume = _scene_with_volume(lung1)
    mine = _user_segmentation(scene, volume)
    user_nodes = _snapshot(scene)

    one = mrml.write_result(scene, volume, first)
    two = mrml.write_result(scene, volume, second)
    assert (one.nodule, two.nodule) == ("Nodule_1", "Nodule_2") and two.nodule_ids == ["Nodule_1", "Nodule_2"]
    seg = two.segmentation
    m, shape = mrml.reference_geometry_of(seg)
    np.testing.assert_array_equal(mrml.segment_array(seg, "Nodule_1", shape, m), first.full(first.consensus))
    np.testing.assert_array_equal(mrml.segment_array(seg, "Nodule_2", shape, m), second.full(second.consensus))
    assert seg.GetSegmentation().GetSegment("Nodule_1").GetColor() != seg.GetSegmentation().GetSegment(
        "Nodule_2").GetColor()
    assert two.table.GetNumberOfRows() == 2 and [n["name"] for n in two.report["nodules"]] == ["Nodule 1", "Nodule 2"]
    assert len(mrml._nodes_with_attribute(scene, "vtkMRMLSegmentationNode", mrml.ROLE_ATTRIBUTE, "segmentation")) == 1
    # the slider and the heat map show the nodule just made
    np.testing.assert_array_equal(mrml.segment_array(two.proxy, "Scale", shape, m), second.full(second.scale_mask(8)))
    np.testing.assert_allclose(mrml.volume_array(two.disagreement_volume), second.disagreement)

    # a click 2.2 mm from nodule 1's centre is inside it: nodule 1 is redone, nodule 2 stays as it was
    assert mrml.nodule_at_point(scene, volume, again.point_ras) == "Nodule_1"
    count = scene.GetNumberOfNodes()
    three = mrml.write_result(scene, volume, again)
    assert three.nodule == "Nodule_1" and three.nodule_ids == ["Nodule_1", "Nodule_2"]
    assert scene.GetNumberOfNodes() == count
    np.testing.assert_array_equal(mrml.segment_array(three.segmentation, "Nodule_1", shape, m),
                                  again.full(again.consensus))
    np.testing.assert_array_equal(mrml.segment_array(three.segmentation, "Nodule_2", shape, m),
                                  second.full(second.consensus))
    assert three.report["nodules"][0]["point_ras_mm"] == pytest.approx(list(again.point_ras), abs=1e-3)
    now = _snapshot(scene)
    for nid, state in user_nodes.items():
        assert now[nid] == state, f"{nid} was modified"
    assert mrml.segment_names(mine) == ["Mine"]


def test_select_delete_and_clear_nodules(lung1, tiny):
    first, second = _disc_results(lung1, tiny, [(0, 0, 0), (30.0, -15.0, 0)], radius_mm=5.0)
    scene, volume = _scene_with_volume(lung1)
    _user_segmentation(scene, volume)
    user = _snapshot(scene)
    mrml.write_result(scene, volume, first)
    mrml.write_result(scene, volume, second)
    infos = mrml.list_nodules(scene, volume)
    assert [(i.id, i.name, i.selected) for i in infos] == [("Nodule_1", "Nodule 1", False),
                                                            ("Nodule_2", "Nodule 2", True)]
    assert infos[0].consensus_volume_mm3 == pytest.approx(first.consensus_volume_mm3)

    nodes = mrml.select_nodule(scene, volume, "Nodule_1")
    m, shape = mrml.reference_geometry_of(nodes.segmentation)
    assert nodes.nodule == "Nodule_1" and mrml.find_results(scene, volume).nodule == "Nodule_1"
    for k in (2, 5, 8):  # the slider now scrubs nodule 1's scales
        mrml.select_scale(nodes, k)
        np.testing.assert_array_equal(mrml.segment_array(nodes.proxy, "Scale", shape, m),
                                      first.full(first.scale_mask(k)))
    np.testing.assert_allclose(mrml.volume_array(nodes.disagreement_volume), first.disagreement)
    selected = mrml.nodule_report(nodes)
    assert selected["consensus_volume_mm3"] == nodes.report["consensus_volume_mm3"]
    assert selected["consensus_volume_mm3"] == pytest.approx(first.consensus_volume_mm3, abs=1e-3)

    after = mrml.delete_nodule(scene, volume, "Nodule_1")  # the selected one: Nodule 2 is selected instead
    assert after.nodule_ids == ["Nodule_2"] and after.nodule == "Nodule_2"
    assert all(sid.startswith("Nodule_2") for sid in mrml.segment_ids(after.segmentation))
    assert after.table.GetNumberOfRows() == 1 and after.disagreements.GetDataNodeAtValue("Nodule_1") is None
    np.testing.assert_allclose(mrml.volume_array(after.disagreement_volume), second.disagreement)
    with pytest.raises(mrml.ResultError, match="no nodule"):
        mrml.delete_nodule(scene, volume, "Nodule_7")

    # the next click is Nodule 3: numbers are not reused
    third = _disc_results(lung1, tiny, [(-20.0, 10.0, 0)])[0]
    assert mrml.write_result(scene, volume, third).nodule_ids == ["Nodule_2", "Nodule_3"]
    assert mrml.clear_nodules(scene, volume) > 0
    assert mrml.find_results(scene, volume) is None and mrml.list_nodules(scene, volume) == []
    now = _snapshot(scene)
    for nid, state in user.items():
        assert now[nid] == state


def test_samples_split_on_presence_the_nodule_is_shown_if_present(lung1, tiny):
    """7 of 16 samples mark the nodule: the plain consensus is empty, 'Nodule 1 if present' holds the consensus of
    those 7 and is the visible segment; the report says 7 of 16."""
    (split,) = _disc_results(lung1, tiny, [(0, 0, 0)], marking=7)
    assert split.consensus_volume_mm3 == 0 and split.samples_marking == 7
    assert split.presence_fraction == pytest.approx(7 / 16)
    assert split.if_present_volume_mm3 > 300  # a ball of 6 mm radius: ~900 mm3 on the volume's grid
    scene, volume = _scene_with_volume(lung1)
    nodes = mrml.write_result(scene, volume, split)
    display = nodes.segmentation.GetDisplayNode()
    assert display.GetSegmentVisibility("Nodule_1_IfPresent") and display.GetSegmentVisibility("Nodule_1")
    m, shape = mrml.reference_geometry_of(nodes.segmentation)
    shown = mrml.segment_array(nodes.segmentation, "Nodule_1_IfPresent", shape, m)
    assert shown.sum() * split.voxel_volume_mm3 == pytest.approx(split.if_present_volume_mm3)
    assert nodes.report["samples_marking"] == 7 and nodes.report["presence_fraction"] == pytest.approx(0.4375)
    cells = [nodes.table.GetCellText(0, c) for c in range(nodes.table.GetNumberOfColumns())]
    assert "7 of 16" in cells
    assert mrml.list_nodules(scene, volume)[0].presence_fraction == pytest.approx(0.4375)
    # a click inside what the marking samples agree on redoes that nodule (the plain consensus is empty)
    assert mrml.nodule_at_point(scene, volume, lung1.nodule_ras) == "Nodule_1"


def test_a_failure_while_adding_leaves_every_nodule_as_it_was(lung1, tiny, monkeypatch):
    first, second = _disc_results(lung1, tiny, [(0, 0, 0), (30.0, -15.0, 0)])
    scene, volume = _scene_with_volume(lung1)
    mrml.write_result(scene, volume, first)
    before = _snapshot(scene)

    class Broken:
        def UpdateProxyNodesFromSequences(self, browser):
            raise RuntimeError("proxy failed")

    monkeypatch.setattr(mrml, "sequences_logic", lambda scene: Broken())
    with pytest.raises(RuntimeError, match="proxy failed"):
        mrml.write_result(scene, volume, second)
    _assert_unchanged(scene, before)
    assert mrml.find_results(scene, volume).nodule_ids == ["Nodule_1"]


class _SegmentWithoutSetTerminology:
    """A vtkSegment as Slicer 5.8 wraps it: no SetTerminology / GetTerminology."""

    def __init__(self, segment):
        self._segment = segment

    def __getattr__(self, name):
        if name in ("SetTerminology", "GetTerminology"):
            raise AttributeError(name)
        return getattr(self._segment, name)


def test_terminology_falls_back_to_the_tag_where_set_terminology_is_missing():
    real = slicer.vtkSegment()
    old = _SegmentWithoutSetTerminology(real)
    assert not hasattr(old, "SetTerminology")
    mrml.set_terminology(old, mrml.NODULE_TERMINOLOGY)
    assert mrml.segment_tag(real, "TerminologyEntry") == mrml.NODULE_TERMINOLOGY
    assert mrml.get_terminology(old) == mrml.NODULE_TERMINOLOGY
    assert real.GetTerminology() == mrml.NODULE_TERMINOLOGY  # what Slicer >= 5.10 reads back


def test_a_click_just_outside_a_nodule_that_finds_the_same_nodule_redoes_it(lung1, tiny):
    """2.5 mm outside the edge of nodule 1, the kept component is nodule 1 again: it is redone, not drawn twice.
    A click whose mask is another object makes a new nodule."""
    from arseg_volumes import DiscPredictor

    predictor, card = tiny
    settings = SegmentSettings(n_samples=16, half_height_mm=7.5)
    centre = np.asarray(lung1.nodule_ras)
    first = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, centre, DiscPredictor(predictor.config), card,
                                   settings)
    beside = centre + (8.5, 0.0, 0.0)  # the ball has a 6 mm radius: this click is outside it
    same = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, beside,
                                  DiscPredictor(predictor.config, offset_mm=(-8.5, 0.0)), card, settings)
    assert same.consensus_volume_mm3 == pytest.approx(first.consensus_volume_mm3, rel=0.05)
    scene, volume = _scene_with_volume(lung1)
    mrml.write_result(scene, volume, first)
    assert mrml.nodule_at_point(scene, volume, beside) is None
    assert mrml.write_result(scene, volume, same).nodule_ids == ["Nodule_1"]
    other = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, beside, DiscPredictor(predictor.config), card,
                                   settings)  # a ball around the new click: mostly not nodule 1
    assert mrml.write_result(scene, volume, other).nodule_ids == ["Nodule_1", "Nodule_2"]


# --------------------------------------------------------------------------------------------- 3D view, hierarchy

def _surface(segmentation_node, segment_id):
    return segmentation_node.GetSegmentation().GetSegment(segment_id).GetRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())


def test_each_nodules_consensus_gets_a_closed_surface_for_the_3d_view(lung1, tiny):
    """Issue 25 item 11: before, the segmentation had only labelmaps, so Slicer's 3D view drew nothing of the
    nodule until the user pressed Segment Editor's "Show 3D". Now every nodule's consensus has its surface (the
    ball of the stand-in model: 12 mm across), the hidden segments have none (each costs the click about 10 ms),
    and the 3D view's representation is the closed surface."""
    first, second = _disc_results(lung1, tiny, [(0, 0, 0), (30.0, -15.0, 0)])
    scene, volume = _scene_with_volume(lung1)
    mrml.write_result(scene, volume, first, mrml.OutputOptions(include_samples=True))
    nodes = mrml.write_result(scene, volume, second, mrml.OutputOptions(include_samples=True))
    seg = nodes.segmentation
    for nid, result in (("Nodule_1", first), ("Nodule_2", second)):
        surface = _surface(seg, nid)  # nodule 1's consensus was copied into the new node: it has one again
        assert surface is not None and surface.GetNumberOfPoints() > 100, nid
        bounds = surface.GetBounds()
        extent = [bounds[1] - bounds[0], bounds[3] - bounds[2]]
        assert extent == pytest.approx([12.0, 12.0], abs=2.0), (nid, bounds)  # R and A across the ball
        centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2]
        assert centre == pytest.approx(list(result.point_ras[:2]), abs=1.5)
        for sid in mrml.nodule_segment_ids(seg, nid):
            kind = mrml.segment_tag(seg.GetSegmentation().GetSegment(sid), mrml.KIND_TAG)
            if kind in (mrml.KIND_SCALE, mrml.KIND_SAMPLE, mrml.KIND_DISAGREEMENT, mrml.KIND_IF_PRESENT):
                assert _surface(seg, sid) is None, sid
    display = seg.GetDisplayNode()
    assert display.GetVisibility3D() and display.GetSegmentVisibility3D("Nodule_1")
    assert display.GetDisplayRepresentationName3D() == "Closed surface"
    # deleting the first nodule leaves a first segment with a surface: the 3D view keeps drawing the rest
    after = mrml.delete_nodule(scene, volume, "Nodule_1")
    assert after.segmentation.GetDisplayNode().GetDisplayRepresentationName3D() == "Closed surface"
    assert _surface(after.segmentation, "Nodule_2").GetNumberOfPoints() > 100


def test_a_nodule_shown_if_present_has_that_surface_in_3d(lung1, tiny):
    """7 of 16 samples mark the nodule: the plain consensus is empty and its "if present" segment is the one shown,
    in 3D too (the empty consensus still carries the representation, so that Slicer's 3D view uses it)."""
    (split,) = _disc_results(lung1, tiny, [(0, 0, 0)], marking=7)
    assert split.consensus_volume_mm3 == 0
    scene, volume = _scene_with_volume(lung1)
    nodes = mrml.write_result(scene, volume, split)
    assert _surface(nodes.segmentation, "Nodule_1_IfPresent").GetNumberOfPoints() > 100
    assert _surface(nodes.segmentation, "Nodule_1") is not None
    assert nodes.segmentation.GetDisplayNode().GetDisplayRepresentationName3D() == "Closed surface"


def test_results_go_under_the_volumes_study_in_subject_hierarchy(lung1, click_result):
    """Issue 25 item 10: before, ARSeg's nodes sat at the scene's top level, away from the CT's study. Now every
    result node is an item of the CT's study (after a redo too), and the CT and the user's nodes stay where they
    were."""
    scene, volume = _scene_with_volume(lung1)
    hierarchy = scene.GetSubjectHierarchyNode()
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "LIDC-IDRI-0001")
    study = hierarchy.CreateStudyItem(patient, "CT chest")
    volume_item = hierarchy.CreateItem(study, volume)
    mine = _user_segmentation(scene, volume)
    mine_item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), mine)
    for _ in range(2):  # the second run redoes nodule 1 with new nodes: they go under the study too
        nodes = mrml.write_result(scene, volume, click_result)
        placed = [nodes.segmentation, nodes.disagreement_volume, nodes.table, nodes.sequence, nodes.browser,
                  nodes.proxy, nodes.disagreements]
        for node in placed:
            item = hierarchy.GetItemByDataNode(node)
            assert item and hierarchy.GetItemParent(item) == study, node.GetName()
        assert hierarchy.GetItemByDataNode(volume) == volume_item and hierarchy.GetItemParent(volume_item) == study
        assert hierarchy.GetItemParent(mine_item) == hierarchy.GetSceneItemID()
    children = vtk_id_list_ids(hierarchy, study)
    assert volume_item in children and len(children) == 1 + len(placed)  # the first run's items went with its nodes


def vtk_id_list_ids(hierarchy, parent):
    import vtk

    ids = vtk.vtkIdList()
    hierarchy.GetItemChildren(parent, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]
