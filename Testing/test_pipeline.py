"""Volume <-> crops: geometry in any orientation, the LIDC crop preparation, click and whole-volume runs,
the 3D component through the click, bad input. No MRML here."""

from __future__ import annotations

import numpy as np
import pytest
from arseg_volumes import ras_of_index, reorient, rotation
from PIL import Image

from ARSegLib import pipeline
from ARSegLib.engine import Cancelled
from ARSegLib.pipeline import SegmentSettings


def _oblique_matrix(spacing=(0.8, 0.9, 2.0), origin=(12.0, -30.0, 40.0)):
    m = np.eye(4)
    m[:3, :3] = rotation("z", 25) @ rotation("x", 10) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def test_resampling_reproduces_a_linear_field_in_an_oblique_volume():
    """Trilinear interpolation is exact for a linear function of RAS: any IJK->RAS error would show."""
    m = _oblique_matrix()
    k, j, i = np.meshgrid(np.arange(30), np.arange(70), np.arange(80), indexing="ij")
    ras = (m[:3, :3] @ np.stack([i, j, k]).reshape(3, -1)).T + m[:3, 3]
    coef = np.array([0.5, -1.25, 2.0])
    volume = (ras @ coef + 7.0).reshape(k.shape).astype(np.float64)
    grid, plane = pipeline.click_grid(ras_of_index(m, (15, 35, 40)), volume.shape, m, 32, 0.6, 6.0)
    values = pipeline.resample_to_grid(volume, m, grid, fill_value=np.nan)
    z, r, c = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    grid_ras = (grid.index_to_ras[:3, :3] @ np.stack([z, r, c]).reshape(3, -1)).T + grid.index_to_ras[:3, 3]
    expected = (grid_ras @ coef + 7.0).reshape(grid.shape)
    inside = np.isfinite(values)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(values[inside], expected[inside], rtol=0, atol=1e-3)
    # the click is the centre of its plane: rows run anterior -> posterior, columns right -> left
    centre = grid.index_to_ras @ np.array([plane, 15.5, 15.5, 1.0])
    np.testing.assert_allclose(centre[:2], ras_of_index(m, (15, 35, 40))[:2], atol=1e-9)
    assert grid.index_to_ras[1, 1] < 0 and grid.index_to_ras[0, 2] < 0


def test_grid_to_volume_lookup_is_nearest_neighbour_in_an_oblique_volume():
    m = _oblique_matrix()
    shape = (20, 60, 60)
    grid, _ = pipeline.click_grid(ras_of_index(m, (10, 30, 30)), shape, m, 32, 0.7, 5.0)
    z, r, c = np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij")
    ras_of = (grid.index_to_ras[:3, :3] @ np.stack([z, r, c]).reshape(3, -1)).T + grid.index_to_ras[:3, 3]
    field = (ras_of @ np.array([1.0, 2.0, 3.0])).reshape(grid.shape).astype(np.float32)
    box = pipeline.grid_box_in_volume(grid, shape, m)
    mapped = pipeline.map_grid_to_volume({"f": field, "one": np.ones(grid.shape, np.uint8)}, grid, m, box)
    kk, jj, ii = np.meshgrid(*[np.arange(a, b) for a, b in box], indexing="ij")
    vox_ras = (m[:3, :3] @ np.stack([ii, jj, kk]).reshape(3, -1)).T + m[:3, 3]
    exact = (vox_ras @ np.array([1.0, 2.0, 3.0])).reshape(kk.shape)
    hit = mapped["one"] == 1
    assert hit.sum() > 1000
    # nearest grid point is at most half a grid step away in each grid axis
    step = 0.5 * (1 * 0.7 + 2 * 0.7 + 3 * grid.spacing[0])
    assert np.abs(mapped["f"][hit] - exact[hit]).max() <= step + 1e-3
    assert np.all(mapped["f"][~hit] == 0)


def test_click_crop_matches_the_lidc_crop_of_the_same_nodule(lung1_dir, tiny):
    """ct/SOURCE.md: LIDC crop slice-4 is axial k = 90, rows j 302..429, columns i 252..379, min-max scaled."""
    from arseg_volumes import read_nrrd_ras

    array, m = read_nrrd_ras(lung1_dir / "image.nrrd")
    predictor, card = tiny
    centre = ras_of_index(m, (90, 365.5, 315.5))
    grid, plane = pipeline.click_grid(centre, array.shape, m, 128, 0.703125, 0.0)
    raw = pipeline.resample_to_grid(array, m, grid, fill_value=-1024)
    prepared, has_signal = pipeline.prepare_crops(raw, card.intensity)
    reference = np.asarray(Image.open(lung1_dir / "lidc-slices" / "images" / "slice-4.png"), np.float32) / 255
    assert has_signal.all() and prepared.shape == (1, 128, 128)
    assert np.abs(prepared[plane] - reference).max() < 2.5 / 255  # PNG rounding only


def test_click_on_lung1_keeps_one_component_through_the_click(lung1, tiny):
    predictor, card = tiny
    steps = []
    r = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                               SegmentSettings(n_samples=6, half_height_mm=10),
                               progress=lambda d, t: steps.append((d, t)))
    # progress ends at its total: the scales of every forward pass (a click re-centred on the object runs again)
    assert steps[-1][0] == steps[-1][1] and steps[-1][0] % r.n_scales == 0 and r.mode == "click"
    assert r.consensus.shape == r.box_shape == r.disagreement.shape
    full = r.full(r.consensus)
    assert full.shape == lung1.array.shape
    # one 3D component, through the click (within the tolerance) when not empty
    from scipy import ndimage

    labels, n = ndimage.label(full, structure=np.ones((3, 3, 3)))
    assert n <= 1
    if n:
        click_kji = np.round(pipeline.point_to_ijk(lung1.nodule_ras, lung1.ijk_to_ras)[::-1]).astype(int)
        fg = np.argwhere(full > 0)
        spacing = np.array([2.5, 0.703125, 0.703125])
        assert np.min(np.linalg.norm((fg - click_kji) * spacing, axis=1)) <= 5.0 + 2.0
    # numbers consistent with the masks
    assert r.consensus_volume_mm3 == pytest.approx(full.sum() * r.voxel_volume_mm3)
    for i in range(1, r.n_samples + 1):
        s = r.sample_mask(i).astype(bool)
        c = r.consensus.astype(bool)
        union = (s | c).sum()
        assert r.sample_volumes_mm3[i - 1] == pytest.approx(s.sum() * r.voxel_volume_mm3)
        assert r.sample_iou[i - 1] == pytest.approx(1.0 if union == 0 else (s & c).sum() / union, abs=1e-6)
    fraction = np.mean([r.sample_mask(i) != r.consensus for i in range(1, r.n_samples + 1)], axis=0)
    np.testing.assert_allclose(r.disagreement, fraction, atol=1e-6)
    assert r.preview.scale_consensus.shape == (r.n_scales, 128, 128)
    report = r.report("lung1")
    assert report["sample_volume_mm3"]["max"] == pytest.approx(r.sample_volumes_mm3.max(), abs=1e-3)


def test_same_click_in_another_ijk_orientation_gives_the_same_ras_result(lung1, tiny):
    predictor, card = tiny
    settings = SegmentSettings(n_samples=4, half_height_mm=5)
    other = reorient(lung1)
    # the helper is right: same voxel value at the same RAS point
    for kji in [(3, 10, 20), (20, 140, 150), (11, 75, 77)]:
        a_ras = ras_of_index(lung1.ijk_to_ras, kji)
        b_kji = np.round(pipeline.point_to_ijk(a_ras, other.ijk_to_ras)[::-1]).astype(int)
        assert other.array[tuple(b_kji)] == lung1.array[kji]
    r_a = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card, settings)
    r_b = pipeline.segment_click(other.array, other.ijk_to_ras, other.nodule_ras, predictor, card, settings)
    back = reorient_back(other, r_b)
    assert r_a.consensus.sum() > 0
    for name in ("consensus", "disagreement"):
        a_full = r_a.full(getattr(r_a, name))
        np.testing.assert_allclose(back[name], a_full, atol=1e-6)
    assert r_b.consensus_volume_mm3 == pytest.approx(r_a.consensus_volume_mm3)
    np.testing.assert_allclose(r_b.sample_iou, r_a.sample_iou, atol=1e-6)


def reorient_back(other, result):
    """Result arrays on the reoriented grid, put back on the original grid (inverse of reorient's defaults)."""
    out = {}
    for name in ("consensus", "disagreement"):
        full = result.full(getattr(result, name))
        unflipped = np.flip(full, axis=(0, 2))
        out[name] = np.transpose(unflipped, np.argsort((2, 0, 1)))
    return out


def test_whole_volume_tiles_every_plane_and_reports_progress(lung1, tiny):
    predictor, card = tiny
    small = lung1.array[8:11, 20:120, 30:140]
    offset = np.eye(4)
    offset[:3, 3] = (30, 20, 8)
    m = lung1.ijk_to_ras @ offset
    progress = []
    r = pipeline.segment_volume(small, m, predictor, card, SegmentSettings(n_samples=3, batch_size=2),
                                progress=lambda d, t: progress.append((d, t)))
    assert r.mode == "volume" and r.box == ((0, 3), (0, 100), (0, 110))
    # 3 planes x 1 x 1 tiles of 128 x 0.7 mm over a 77 mm field: 3 crops in 2 chunks
    assert r.grid.shape == (3, 128, 128)
    assert progress[-1] == (2 * r.n_scales, 2 * r.n_scales)
    assert r.consensus.shape == small.shape and r.consensus.dtype == np.uint8
    assert r.consensus_volume_mm3 == pytest.approx(r.consensus.sum() * r.voxel_volume_mm3)
    fraction = np.mean([r.sample_mask(i) != r.consensus for i in range(1, r.n_samples + 1)], axis=0)
    np.testing.assert_allclose(r.disagreement, fraction, atol=1e-6)
    one_chunk = pipeline.segment_volume(small, m, predictor, card, SegmentSettings(n_samples=3, batch_size=8))
    assert np.array_equal(one_chunk.sample_bits, r.sample_bits)
    one_chunk = pipeline.segment_volume(small, m, predictor, card, SegmentSettings(n_samples=3, batch_size=8))
    assert np.array_equal(one_chunk.sample_bits, r.sample_bits)


def test_a_click_in_a_thin_slice_scan_goes_in_chunks(lung1, tiny):
    """More planes than batch_size: several forward passes, progress over all of them, same kind of result."""
    predictor, card = tiny
    steps = []
    r = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                               SegmentSettings(n_samples=2, half_height_mm=10, batch_size=3),
                               progress=lambda d, t: steps.append((d, t)))
    # 9 planes in forward passes of 3 (and again for each re-centred pass)
    assert r.grid.shape[0] == 9 and steps[-1][0] == steps[-1][1] and steps[-1][0] % (3 * r.n_scales) == 0
    assert r.consensus.shape == r.box_shape
    # the chunking does not change the samples: each plane has its own random stream
    whole = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                                   SegmentSettings(n_samples=2, half_height_mm=10, batch_size=32))
    assert np.array_equal(whole.sample_bits, r.sample_bits) and np.array_equal(whole.consensus, r.consensus)


def test_cancel_stops_a_run(lung1, tiny):
    predictor, card = tiny
    with pytest.raises(Cancelled):
        pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                               SegmentSettings(n_samples=2, half_height_mm=0), cancel=lambda: True)


def test_same_seed_gives_the_same_samples(lung1, tiny):
    predictor, card = tiny
    kw = dict(predictor=predictor, card=card)
    a = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras,
                               settings=SegmentSettings(n_samples=4, half_height_mm=0, seed=1), **kw)
    b = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras,
                               settings=SegmentSettings(n_samples=4, half_height_mm=0, seed=1), **kw)
    assert np.array_equal(a.sample_bits, b.sample_bits)


@pytest.mark.parametrize("array, error, words", [
    (np.zeros((64, 64), np.float32), pipeline.NotAVolumeError, "3D"),
    (np.zeros((2, 8, 64, 64), np.float32), pipeline.NotAVolumeError, "4 dimensions"),
    (np.full((4, 64, 64), 7.0, np.float32), pipeline.ConstantVolumeError, "constant"),
    (np.where(np.arange(4 * 64 * 64).reshape(4, 64, 64) == 5, np.nan, 1.0), pipeline.NonFiniteVolumeError, "NaN"),
    (np.zeros((1, 64, 64), np.float32) + np.arange(64), pipeline.NotAVolumeError, "single slice"),
])
def test_bad_volumes_get_clear_errors(array, error, words, tiny):
    predictor, card = tiny
    with pytest.raises(error, match=words) as info:
        pipeline.segment_click(array, np.eye(4), (1, 1, 1), predictor, card)
    assert isinstance(info.value, ValueError)


def test_click_outside_the_volume_is_refused(lung1, tiny):
    predictor, card = tiny
    with pytest.raises(pipeline.PointOutsideVolumeError, match="outside the volume"):
        pipeline.segment_click(lung1.array, lung1.ijk_to_ras, (0.0, 0.0, 500.0), predictor, card)
    with pytest.raises(pipeline.VolumeError, match="three finite"):
        pipeline.segment_click(lung1.array, lung1.ijk_to_ras, (0.0, np.nan, 1.0), predictor, card)


def test_bits_round_trip():
    rng = np.random.default_rng(0)
    for n in (1, 8, 9, 16, 33, 64):
        masks = rng.random((n, 3, 4, 5)) > 0.5
        packed = pipeline.pack_masks(masks)
        assert all(np.array_equal(pipeline.unpack_mask(packed, i), masks[i]) for i in range(n))


def test_click_reports_progress_and_can_be_cancelled(lung1, tiny):
    """What the worker process relays: every scale's progress, and a cancel taking effect at the next scale."""
    from ARSegLib.engine import Cancelled

    predictor, card = tiny
    settings = SegmentSettings(n_samples=2, half_height_mm=0)
    steps = []
    result = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card, settings,
                                    progress=lambda done, total: steps.append((done, total)))
    assert isinstance(result, pipeline.VolumeResult)
    k = len(predictor.config.autoencoder.scales)
    assert steps[-1] == (k, k) and [d for d, _ in steps] == sorted(d for d, _ in steps)
    with pytest.raises(Cancelled):
        pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card, settings,
                               cancel=lambda: True)


def test_components_are_labelled_inside_the_bounding_box_exactly_as_on_the_whole_array():
    from scipy import ndimage

    from ARSegLib.pipeline import CONNECTIVITY, _component_near_point, _components_touching

    g = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((9, 40, 40), bool)
        mask[2:7, 5:30, 8:35] = g.random((5, 25, 27)) > 0.6  # several components, off the array's edges
        region = np.zeros_like(mask)
        region[4, 10:20, 10:20] = True
        labels, _ = ndimage.label(mask, structure=CONNECTIVITY)
        keep = np.unique(labels[region & (labels > 0)])
        np.testing.assert_array_equal(_components_touching(mask, region), np.isin(labels, keep[keep > 0]))
        point = (4, 15.5, 20.5)
        near = _component_near_point(mask, point, (2.5, 0.7, 0.7), 5.0)
        fg = np.argwhere(labels > 0)
        d = np.sqrt((((fg - np.asarray(point)) * (2.5, 0.7, 0.7)) ** 2).sum(1))
        expected = labels == labels[tuple(fg[np.argmin(d)])] if d.min() <= 5.0 else np.zeros_like(mask)
        np.testing.assert_array_equal(near, expected)
    assert not _components_touching(np.zeros((3, 4, 4), bool), np.ones((3, 4, 4), bool)).any()
    assert not _component_near_point(np.zeros((3, 4, 4), bool), (1, 1, 1), (1, 1, 1), 5.0).any()


# --------------------------------------------------------------------------------------------- issue 14

@pytest.mark.parametrize("field, value, words", [
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("temperature", float("inf"), "temperature"),
    ("temperature", 100.0, "at most 5"),
    ("temperature", -1.0, "above 0"),
    ("half_height_mm", -5.0, "half_height_mm"),
    ("half_height_mm", float("nan"), "half_height_mm"),
    ("n_samples", 0, "n_samples"),
    ("n_samples", 2.5, "whole number"),
    ("seed", -1, "seed"),
    ("top_p", 1.5, "top_p"),
    ("batch_size", 0, "batch_size"),
    ("views", 9, "views must be a whole number between 1 and 8"),
    ("oversample", 0, "oversample"),
    ("presence_logit_shift", float("nan"), "presence_logit_shift must be a finite number"),
    ("presence_logit_shift", 6.0, "presence_logit_shift"),
])
def test_settings_out_of_range_are_refused_before_any_work(field, value, words, lung1, tiny):
    predictor, card = tiny
    settings = SegmentSettings(n_samples=2, **{field: value}) if field != "n_samples" else SegmentSettings(
        n_samples=value)
    with pytest.raises(pipeline.SettingsError, match=words):
        pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card, settings)
    assert SegmentSettings(temperature=0.5, half_height_mm=0.0, seed=2 ** 40).check()  # in range: accepted


def test_crops_per_pass_shrink_when_a_crop_draws_many_candidates():
    from ARSegLib.engine import SamplingConfig

    settings = SegmentSettings().check()
    assert settings.crops_per_pass(SamplingConfig(n_samples=16, oversample=2)) == 32  # the shipped card: as before
    assert settings.crops_per_pass(SamplingConfig(n_samples=64, oversample=8)) == 2
    assert SegmentSettings(batch_size=1).crops_per_pass(SamplingConfig(n_samples=64, oversample=8)) == 1


def test_sampling_settings_override_the_cards_and_none_keeps_them():
    from ARSegLib.engine import SamplingConfig

    card_sampling = SamplingConfig(temperature=0.5, views=4, oversample=2, presence_logit_shift=-0.4)
    kept = SegmentSettings().check().sampling(card_sampling)
    assert (kept.temperature, kept.views, kept.oversample, kept.presence_logit_shift) == (0.5, 4, 2, -0.4)
    fast = SegmentSettings(views=1, oversample=1, presence_logit_shift=0.0).check().sampling(card_sampling)
    assert (fast.views, fast.oversample, fast.presence_logit_shift) == (1, 1, 0.0)


def test_presence_consensus_of_the_samples_that_mark_an_object():
    samples = np.zeros((16, 3, 8, 8), np.uint8)
    samples[:7, 1, 2:6, 2:6] = 1  # 7 of 16 mark a square; 4 of them a bigger one
    samples[:4, 1, 1:7, 1:7] = 1
    marking, mask = pipeline.presence_consensus(samples)
    assert marking == 7
    expected = np.zeros((3, 8, 8), np.uint8)
    expected[1, 2:6, 2:6] = 1
    expected[1, 1:7, 1:7] = 1  # 4 of 7 >= half
    np.testing.assert_array_equal(mask, expected)
    assert pipeline.presence_consensus(np.zeros((4, 2, 2), np.uint8))[0] == 0


def test_a_split_click_reports_the_fraction_marking_and_the_consensus_if_present(lung1, tiny):
    from arseg_volumes import DiscPredictor

    predictor, card = tiny
    fake = DiscPredictor(predictor.config, marking=7)
    r = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, fake, card,
                               SegmentSettings(n_samples=16, half_height_mm=7.5))
    assert r.consensus.sum() == 0 and r.consensus_volume_mm3 == 0  # the readers' majority: nothing
    assert r.samples_marking == 7 and r.presence_fraction == pytest.approx(7 / 16)
    ball = 4 / 3 * np.pi * 6.0 ** 3
    assert 0.6 * ball < r.if_present_volume_mm3 < 1.4 * ball
    assert r.report()["samples_marking"] == 7 and r.report()["if_present_volume_mm3"] == pytest.approx(
        r.if_present_volume_mm3, abs=1e-3)
    assert r.preview.if_present.any() and r.preview.image_hu is not None and r.preview.slice_index >= 0


def test_modes_come_from_the_card_and_click_only_is_the_default(tiny):
    from ARSegLib.models import read_card

    predictor, card = tiny
    assert pipeline.card_modes(card) == ("click", "volume")
    shipped = read_card("lidc-nodule")
    assert shipped.modes == ("click",) and not shipped.supports("volume")
    with pytest.raises(pipeline.UnsupportedModeError, match="not validated for whole volume"):
        pipeline.check_mode(shipped, "volume")
    assert pipeline.card_modes({}) == ("click",)
