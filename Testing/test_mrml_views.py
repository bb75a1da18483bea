"""write_result's nodes as Slicer's own slice view draws them (offscreen, trame-slicer's views; skipped without
them): a nodule written while a Sequences logic watches the scene is drawn, also the first one after Clear all
(the web page's "Clear all" once showed this, in the browser).

It once was not: the browser got its sequence inside the scene's batch-processing state, so the watching logic
made the scale proxy inside the batch, and the slice view then drew none of the new segmentation."""

from __future__ import annotations

import ctypes.util
import os

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("trame_slicer", reason="trame-slicer (the web extra) is not installed: no offscreen views")
if ctypes.util.find_library("EGL") is None:
    pytest.skip("no EGL library for offscreen rendering", allow_module_level=True)


def test_every_write_is_drawn_in_the_slice_view_also_after_clear_all(tiny):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import slicer
    import vtk
    from arseg_volumes import DiscPredictor
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
    from vtk.util.numpy_support import vtk_to_numpy

    from ARSegLib import mrml, pipeline
    from ARSegLib.demo import demo_point_ras, demo_volume_path
    from ARSegLib.web.browser import consensus_pixels  # the browser test's own measure of the amber overlay

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    view.render_window().SetSize(400, 400)
    volume = mrml.load_volume(app.scene, demo_volume_path())
    nodule = demo_point_ras()
    view.set_background_volume_id(volume.GetID())
    view.fit_view_to_content()
    slicer.vtkMRMLSliceNode.JumpAllSlices(app.scene, *nodule, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    predictor, card = tiny
    result = pipeline.segment_click(mrml.volume_array(volume), mrml.world_ijk_to_ras(volume), nodule,
                                    DiscPredictor(predictor.config, radius_mm=8.0), card,
                                    pipeline.SegmentSettings(n_samples=4, half_height_mm=5))

    def amber():
        view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        picture = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3].astype(np.int16)
        return consensus_pixels(picture)

    assert amber() < 20
    mrml.write_result(app.scene, volume, result)
    first = amber()
    assert first > 300
    mrml.clear_nodules(app.scene, volume)
    assert amber() < 20
    mrml.write_result(app.scene, volume, result)  # the scene's Sequences logic watches it now
    assert amber() > 0.8 * first
