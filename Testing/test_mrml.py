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

    # names and visibility
    assert seg.GetName() == "lung1 ARSeg" and seg.GetScene() is scene
    expected = ["Consensus", "Disagreement"] + [f"Scale {k}/{K}" for k in range(1, K + 1)] + \
               [f"Sample {i}" for i in range(1, N_SAMPLES + 1)]
    assert mrml.segment_names(seg) == expected
    display = seg.GetDisplayNode()
    visible = {sid: display.GetSegmentVisibility(sid) for sid in mrml.segment_ids(seg)}
    assert visible.pop("Consensus") is True and not any(visible.values())
    consensus = seg.GetSegmentation().GetSegment("Consensus")
    assert "27925004^Nodule" in consensus.GetTerminology() and "39607008^Lung" in consensus.GetTerminology()
    assert nodes.disagreement_volume.GetName() == "lung1 ARSeg disagreement"
    assert nodes.table.GetName() == "lung1 ARSeg report"
    assert nodes.sequence.GetName() == "lung1 ARSeg scales" and nodes.proxy.GetName() == "lung1 ARSeg scale"
    for node in (seg, nodes.disagreement_volume, nodes.sequence, nodes.browser, nodes.proxy, nodes.table):
        assert node.GetAttribute(mrml.SOURCE_ATTRIBUTE) == volume.GetID() and node.GetAttribute(mrml.ROLE_ATTRIBUTE)

    # geometry: the volume's, voxel for voxel
    m, shape = mrml.reference_geometry_of(seg)
    np.testing.assert_allclose(m, mrml.local_ijk_to_ras(volume), atol=1e-6)
    assert shape == lung1.array.shape
    cons = mrml.segment_array(seg, "Consensus", shape, m)
    np.testing.assert_array_equal(cons, r.full(r.consensus))
    np.testing.assert_array_equal(mrml.segment_array(seg, "Disagreement", shape, m), r.full(r.disagreement > 0))
    for k in range(1, K + 1):
        np.testing.assert_array_equal(mrml.segment_array(seg, f"Scale_{k}", shape, m), r.full(r.scale_mask(k)))

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
        assert item.GetSegmentation().GetSegment("Scale").GetName() == f"Scale {k}/{K}"
        np.testing.assert_array_equal(mrml.segment_array(item, "Scale", shape, m), r.full(r.scale_mask(k)))
    assert nodes.proxy.GetDisplayNode().GetVisibility() == 0  # hidden until the slider moves
    mrml.select_scale(nodes, 2)
    np.testing.assert_array_equal(mrml.segment_array(nodes.proxy, "Scale", shape, m), r.full(r.scale_mask(2)))
    assert nodes.proxy.GetDisplayNode().GetVisibility() == 1

    # the report agrees with the masks
    rep = json.loads(nodes.table.GetAttribute(mrml.REPORT_ATTRIBUTE))
    voxel = abs(np.linalg.det(m[:3, :3]))
    assert rep["consensus_volume_mm3"] == pytest.approx(cons.sum() * voxel, rel=1e-6)
    sample_counts = [mrml.segment_array(seg, f"Sample_{i}", shape, m).sum() for i in range(1, N_SAMPLES + 1)]
    assert rep["sample_volumes_mm3"] == pytest.approx([c * voxel for c in sample_counts], rel=1e-6)
    assert rep["sample_volume_mm3"]["min"] == pytest.approx(min(sample_counts) * voxel, rel=1e-6)
    assert rep["sample_volume_mm3"]["max"] == pytest.approx(max(sample_counts) * voxel, rel=1e-6)
    for i in range(1, N_SAMPLES + 1):
        s = mrml.segment_array(seg, f"Sample_{i}", shape, m).astype(bool)
        union = (s | (cons > 0)).sum()
        iou = 1.0 if union == 0 else (s & (cons > 0)).sum() / union
        assert rep["sample_iou_with_consensus"][i - 1] == pytest.approx(iou, abs=1e-4)
    rows = {nodes.table.GetCellText(i, 0): nodes.table.GetCellText(i, 1) for i in range(nodes.table.GetNumberOfRows())}
    assert float(rows["Consensus volume"]) == pytest.approx(rep["consensus_volume_mm3"], abs=0.05)
    assert rows["Model"] == rep["model"]

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
    tags = loaded.GetSegmentation().GetSegment("Consensus").GetTerminology()
    assert "27925004" in tags


def test_rerun_replaces_only_arsegs_nodes_and_never_touches_user_nodes(lung1, click_result):
    scene, volume = _scene_with_volume(lung1)
    other_volume = mrml.add_scalar_volume(scene, "other", lung1.array, lung1.ijk_to_ras)
    mine = _user_segmentation(scene, volume)
    mine_before = mrml.segment_array(mine, "mine", lung1.array.shape, mrml.local_ijk_to_ras(volume))
    user_nodes = _snapshot(scene)

    first = mrml.write_result(scene, volume, click_result)
    on_other = mrml.write_result(scene, other_volume, click_result)
    after_first = scene.GetNumberOfNodes()
    first_ids = {n.GetID() for n in mrml.result_nodes_of(scene, volume)}
    second = mrml.write_result(scene, volume, click_result)

    assert scene.GetNumberOfNodes() == after_first  # replaced, not added
    second_ids = {n.GetID() for n in mrml.result_nodes_of(scene, volume)}
    assert len(second_ids) == len(first_ids) == 6 and not (first_ids & second_ids)
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
        mrml.segment_node(target, predictor, card, point_ras=point, settings=SegmentSettings(n_samples=2))
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
    nodes = mrml.segment_node(volume, predictor, card, point_ras=world_point,
                              settings=SegmentSettings(n_samples=N_SAMPLES, half_height_mm=7.5))
    assert nodes.segmentation.GetTransformNodeID() == transform.GetID()
    m, shape = mrml.reference_geometry_of(nodes.segmentation)
    np.testing.assert_array_equal(mrml.segment_array(nodes.segmentation, "Consensus", shape, m),
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
