"""What a radiologist reads, through the real MRML nodes (slicer-core): the axial diameters with the samples'
range, the mean intensity and the prompts in the report JSON, the table, the report rows, the nodule list and the
CLI's line; the disagreement heat map transparent where the samples agree, on the display node's own output and
in the figure's pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from vtk.util import numpy_support  # noqa: E402

from ARSegLib import figure, mrml, pipeline  # noqa: E402
from ARSegLib.cli import _nodule_line  # noqa: E402  (the printed summary line; tests may import the command)

N = 16
SPACING = (0.8, 0.8, 2.0)  # i, j, k in mm


def _ellipse(shape, a_vox, b_vox):
    r, c = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    return ((r - shape[0] // 2) / a_vox) ** 2 + ((c - shape[1] // 2) / b_vox) ** 2 <= 1.0


def synthetic_result(volume):
    """A click result on (k, j, i) = (6, 40, 40) whose disagreement takes known values: the consensus an
    ellipse of 10 x 5 voxels (16 x 8 mm) on plane 3; samples 1-3 drop the consensus's top half and sample 4 its
    top left quarter (3-4 of 16 differ there: the samples agree), samples 5-12 add a block beside it (8 of 16
    differ: they split)."""
    m = np.diag(SPACING + (1.0,))
    box = ((1, 5), (5, 35), (5, 35))
    shape = (4, 30, 30)
    cons = np.zeros(shape, np.uint8)
    cons[2] = _ellipse(shape[1:], 10, 5)
    top = np.zeros(shape, bool)
    top[2, :15] = True
    extra = np.zeros(shape, bool)
    extra[2, 13:17, 22:26] = True
    samples = np.repeat(cons[None], N, 0).astype(bool)
    samples[0:3] &= ~top
    samples[3] &= ~(top & (np.arange(30)[None, None, :] < 15))
    samples[4:12] |= extra
    disagreeing = (samples != cons[None].astype(bool)).sum(0)
    voxel = float(np.prod(SPACING))
    inter = (samples & cons[None].astype(bool)).sum((1, 2, 3))
    union = (samples | cons[None].astype(bool)).sum((1, 2, 3))
    preview = pipeline.Preview(image=np.zeros((30, 30), np.float32), scale_consensus=cons[None, 2].copy(),
                               consensus=cons[2].copy(), disagreement=disagreeing[2].astype(np.float32) / N,
                               image_hu=volume[3, 5:35, 5:35].astype(np.float32), pixel_spacing_mm=0.8,
                               click_rc=(15.0, 15.0), scale_sides=(8,))
    return pipeline.VolumeResult(
        mode="click", volume_shape=volume.shape, ijk_to_ras=m, box=box, consensus=cons,
        disagreement=disagreeing.astype(np.float32) / N, scale_bits=pipeline.pack_masks(cons[None]),
        sample_bits=pipeline.pack_masks(samples), n_scales=1, n_samples=N, voxel_volume_mm3=voxel,
        consensus_volume_mm3=float(cons.sum()) * voxel, sample_volumes_mm3=samples.sum((1, 2, 3)) * voxel,
        sample_iou=(inter / union).astype(np.float32), model_name="synthetic",
        settings={"pixel_spacing_mm": 0.8}, point_ras=tuple((m @ np.array([20.0, 20.0, 3.0, 1.0]))[:3]),
        preview=preview, samples_marking=N, if_present=cons.copy(), if_present_volume_mm3=float(cons.sum()) * voxel)


@pytest.fixture()
def written():
    volume = np.full((6, 40, 40), -850, np.int16)
    result = synthetic_result(volume)
    inside = result.full(result.consensus) > 0
    volume[inside] = 30
    volume[3, 20, 20] = 230  # one brighter voxel: the mean is known by hand
    scene = mrml.new_scene()
    node = mrml.add_scalar_volume(scene, "ct", volume, result.ijk_to_ras)
    return scene, node, result, mrml.write_result(scene, node, result), (30 * (inside.sum() - 1) + 230) / inside.sum()


def test_report_json_table_rows_list_and_cli_line(written):
    scene, node, result, nodes, mean_hu = written
    entry = mrml.nodule_report(nodes)
    d = entry["diameters_mm"]
    # the consensus: 20 x 10 voxel centres apart along j and i, 0.8 mm voxels: 16 x 8 mm on the volume's slice 3
    assert (d["long"], d["short"], d["mean"], d["slice_index"]) == (16.0, 8.0, 12.0, 3)
    # the samples: sample 1 kept the lower half ellipse, whose longest chord runs from the centre row's end
    # (0, -5) to (9, 2) (voxels from the centre: 9/10 squared + 2/5 squared <= 1): 0.8 * sqrt(81 + 49) mm;
    # samples 5-12 reach the block beside it
    assert d["samples"]["long"]["min"] == pytest.approx(round(0.8 * np.sqrt(130), 2))
    assert d["samples"]["long"]["max"] == pytest.approx(16.0)
    assert d["samples"]["short"]["max"] > 8.0
    assert entry["mean_intensity"] == pytest.approx(round(mean_hu, 1))
    assert entry["prompts"] == [{"kind": "click", "point_ras": [round(v, 3) for v in result.point_ras]}]
    # the same in the JSON on the table node, in its columns, in the rows the page shows, in the module's list
    stored = json.loads(nodes.table.GetAttribute(mrml.REPORT_ATTRIBUTE))["nodules"][0]
    assert stored["diameters_mm"] == d and stored["mean_intensity"] == entry["mean_intensity"]
    table = nodes.table
    cells = {table.GetTable().GetColumnName(c): table.GetCellText(0, c) for c in range(table.GetNumberOfColumns())}
    assert (cells["Long axis (mm)"], cells["Short axis (mm)"], cells["Mean diameter (mm)"]) == ("16.0", "8.0", "12.0")
    assert cells["Samples long axis (mm)"] == "9.1-16.0"
    assert cells["Mean intensity"] == f"{entry['mean_intensity']:.1f}"
    assert cells["Prompts"].startswith("click at 16.0, 16.0, 6.0")
    rows = {a: (b, c) for a, b, c in mrml.report_rows(nodes.report)}
    assert rows["Long axis (axial slice 3)"] == ("16.0", "mm") and rows["Short axis"] == ("8.0", "mm")
    assert rows["Mean diameter"] == ("12.0", "mm") and rows["Long axis, samples"] == ("9.1-16.0", "mm")
    assert rows["Mean intensity in the consensus"][0] == f"{entry['mean_intensity']:.1f}"
    assert rows["Prompt 1"][0] == "click at 16.0, 16.0, 6.0"
    info = mrml.list_nodules(scene, node)[0]
    assert (info.long_axis_mm, info.short_axis_mm, info.n_prompts) == (16.0, 8.0, 1)
    line = _nodule_line(entry)
    assert "axial 16.0 x 8.0 mm (mean 12.0, samples " in line


def test_refinement_prompts_are_reported():
    volume = np.zeros((6, 40, 40), np.int16)
    volume[0, 0, 0] = 1
    result = synthetic_result(volume)
    result.settings["prompt_history"] = [
        {"kind": "click", "point_ras": [16.0, 16.0, 6.0]},
        {"prompts": [{"kind": "exclude", "point_ras": [20.0, 12.5, 6.0]}], "lock_scales": 3, "from_sample": 2}]
    report = result.report("ct")
    assert report["prompts"] == result.settings["prompt_history"]
    rows = {a: b for a, b, _ in mrml.report_rows(report)}
    assert rows["Prompt 2"] == "exclude at 20.0, 12.5, 6.0; scales 1-3 of sample 2 kept, finer ones redrawn"
    assert "mean_intensity" not in report  # no voxels given


def _display_rgba(display_node, volume_node):
    """The display node's own pipeline (window/level, colour table, threshold) on the volume's voxels: the RGBA
    Slicer's slice views and the page draw, in (k, j, i, 4)."""
    display_node.SetInputImageDataConnection(volume_node.GetImageDataConnection())
    display_node.UpdateImageDataPipeline()
    producer = display_node.GetOutputImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    nx, ny, nz = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx, -1)


def test_heat_map_is_transparent_where_the_samples_agree(written):
    _, _, result, nodes, _ = written
    table = nodes.colormap
    lut = table.GetLookupTable()
    agree_index = round(figure.AGREEMENT_FRACTION * 255)
    assert all(lut.GetTableValue(i)[3] == 0.0 for i in range(agree_index + 1))
    assert all(lut.GetTableValue(i)[3] > 0.4 for i in range(agree_index + 1, 256))
    dd = nodes.disagreement_volume.GetDisplayNode()
    assert dd.GetColorNodeID() == table.GetID() and dd.GetApplyThreshold()
    assert 4 / N < dd.GetLowerThreshold() < 5 / N
    rgba = _display_rgba(dd, nodes.disagreement_volume)
    fraction = result.disagreement
    assert rgba.shape[:3] == fraction.shape
    counts = np.rint(fraction * N).astype(int)
    assert set(np.unique(counts)) == {0, 3, 4, 8}
    inside = result.consensus > 0
    # inside the nodule, where none, three or four of 16 samples differ: nothing drawn over the CT
    for k in (0, 3, 4):
        assert (rgba[(counts == k) & inside][:, 3] == 0).all(), k
    # where 8 of 16 differ: drawn, opaque, red to yellow
    split = rgba[counts == 8]
    assert len(split) == 4 * 4 and (split[:, 3] == 255).all() and (split[:, 0] == 255).all()


def test_figure_heat_is_transparent_where_the_samples_agree():
    import matplotlib.pyplot as plt

    volume = np.full((6, 40, 40), -850, np.int16)
    result = synthetic_result(volume)
    heat = figure.heat_rgba(result.preview.disagreement)
    counts = np.rint(result.preview.disagreement * N).astype(int)
    assert (heat[counts <= 4][:, 3] == 0).all() and (heat[counts == 8][:, 3] > 0.8).all()

    def pixels(disagreement):
        result.preview.disagreement = disagreement
        fig = figure.build_figure([result])
        fig.canvas.draw()
        out = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
        plt.close(fig)
        return out

    shown = result.preview.disagreement.copy()
    agree_only = np.where(counts <= 4, shown, 0.0).astype(np.float32)
    none = np.zeros_like(shown)
    # 3-4 of 16 differing draws exactly what no disagreement draws; 8 of 16 changes the picture
    np.testing.assert_array_equal(pixels(agree_only), pixels(none))
    assert (np.abs(pixels(shown) - pixels(none)).sum(-1) > 60).sum() > 20


def test_the_module_nodule_list_shows_the_axes(written, arseg_module):
    """ARSegLogic.noduleSummary (ARSeg.py, imported on slicer-core with its GUI-side modules stubbed)."""
    module, _ = arseg_module
    scene, node, result, _, _ = written
    info = mrml.list_nodules(scene, node)[0]
    expected = f"Nodule 1: {result.consensus_volume_mm3:.0f} mm\u00b3, 16.0 x 8.0 mm"
    assert module.ARSegLogic.noduleSummary(info) == expected
