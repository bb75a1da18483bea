"""A click's planes in waves outward from the click (issue 22, SegmentSettings.first_wave_mm / wave_step_planes):
the result equals the one-batch path's exactly, on lung1 with the shipped model and on stand-in models whose
object stops short of the first wave's edge, crosses it (the consensus or only some samples), or reaches the
grid's limit; planes beyond the object are never run; a refinement of a click run in waves is the refinement of
the one-batch click."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ARSegLib import pipeline, prompts
from ARSegLib.pipeline import SegmentSettings

ONE_BATCH = dict(first_wave_mm=None)


def _same_result(a, b):
    """Every array and figure a click result carries, the token maps aside (compared on their own)."""
    for name in ("consensus", "disagreement", "scale_bits", "sample_bits", "if_present", "sample_iou",
                 "sample_volumes_mm3"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.box == b.box and a.grid == b.grid
    assert a.consensus_volume_mm3 == b.consensus_volume_mm3 and a.samples_marking == b.samples_marking
    for name in ("image", "scale_consensus", "consensus", "disagreement", "if_present", "image_hu"):
        assert np.array_equal(getattr(a.preview, name), getattr(b.preview, name)), name
    assert a.settings["grid_centres_ras_mm"] == b.settings["grid_centres_ras_mm"]


class ColumnPredictor:
    """A stand-in whose answer on a crop depends on its id (its plane) only, as the engine's does: samples
    [0, tall) mark a disc on planes lo_tall..hi_tall, the others on lo..hi (none where lo > hi); every sample also
    marks a blob in a corner of every plane, never connected to the disc (the assembly drops it). Records the
    planes it was asked for."""

    def __init__(self, config, lo, hi, tall=0, lo_tall=0, hi_tall=-1, radius_px=8):
        self.config, self.crop_size, self.n_classes = config, config.autoencoder.crop_size, 1
        self.lo, self.hi, self.tall, self.lo_tall, self.hi_tall, self.radius_px = lo, hi, tall, lo_tall, hi_tall, \
            radius_px
        self.planes = []

    def segment(self, images, sampling=None, progress=None, cancel=None, crop_ids=None, **_):
        s = sampling or self.config.sampling
        n, k, h = s.n_samples, len(self.config.autoencoder.scales), self.crop_size
        ids = [int(c) for c in crop_ids]
        self.planes += ids
        yy, xx = np.mgrid[:h, :h]
        disc = ((yy - (h - 1) / 2) ** 2 + (xx - (h - 1) / 2) ** 2 <= self.radius_px ** 2).astype(np.uint8)
        blob = ((yy < 6) & (xx < 6)).astype(np.uint8)
        samples = np.zeros((len(ids), n, h, h), np.uint8)
        for row, z in enumerate(ids):
            for i in range(n):
                lo, hi = (self.lo_tall, self.hi_tall) if i < self.tall else (self.lo, self.hi)
                samples[row, i] = blob | (disc if lo <= z <= hi else 0)
        consensus = (2 * samples.sum(1) > n).astype(np.uint8)
        scales = np.repeat(consensus[:, None], k, axis=1)
        if progress is not None:
            progress(k, k)
        return SimpleNamespace(samples_BNhw=samples, scale_consensus_BKhw=scales, consensus_Bhw=consensus,
                               disagreement_Bhw=(samples != consensus[:, None]).mean(1).astype(np.float32),
                               presence_B=np.ones(len(ids), np.float32))


@pytest.mark.parametrize("kw, planes_run", [
    (dict(lo=6, hi=10), 11),  # inside the first wave (click plane 8 +- 5): one wave
    (dict(lo=2, hi=13), 14),  # the consensus crosses the first wave's lower edge: two more waves below, one above
    (dict(lo=6, hi=10, tall=3, lo_tall=1, hi_tall=8), 14),  # only 3 samples reach below the first wave
    (dict(lo=0, hi=16), 17),  # the object reaches both ends of the grid
    (dict(lo=1, hi=0), 11),  # nothing at the click
])
def test_waves_give_the_one_batch_result_and_run_no_plane_beyond_the_object(lung1, tiny, kw, planes_run):
    predictor, card = tiny
    settings = SegmentSettings(n_samples=6, recentre_passes=0)  # 17 planes of 2.5 mm, click on plane 8
    whole_model, waves_model = ColumnPredictor(predictor.config, **kw), ColumnPredictor(predictor.config, **kw)
    steps = []
    whole = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, whole_model, card,
                                   SegmentSettings(n_samples=6, recentre_passes=0, **ONE_BATCH))
    waves = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, waves_model, card, settings,
                                   progress=lambda done, total: steps.append((done, total)))
    assert whole.grid.shape[0] == 17 and sorted(whole_model.planes) == list(range(17))
    _same_result(whole, waves)
    assert whole.consensus.any() == (kw["lo"] <= 8 <= kw["hi"])
    assert len(waves_model.planes) == len(set(waves_model.planes)) == planes_run == waves.timings_s["planes_run"]
    assert sorted(waves_model.planes) == list(range(min(waves_model.planes), max(waves_model.planes) + 1))
    assert [d for d, _ in steps] == sorted(d for d, _ in steps) and steps[-1][0] == steps[-1][1]


def test_the_first_wave_holds_every_plane_within_the_component_tolerance(lung1, tiny):
    """The component at the click may start up to component_tolerance_mm away: those planes are in the first
    wave however small first_wave_mm is, and an object there is found as by the one batch."""
    predictor, card = tiny
    kw = dict(lo=11, hi=12)  # 7.5 mm above the click plane: within a tolerance of 8 mm
    settings = dict(n_samples=4, recentre_passes=0, component_tolerance_mm=8.0)
    whole = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras,
                                   ColumnPredictor(predictor.config, **kw), card, SegmentSettings(**settings,
                                                                                                   **ONE_BATCH))
    model = ColumnPredictor(predictor.config, **kw)
    waves = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, model, card,
                                   SegmentSettings(**settings, first_wave_mm=0.0))
    assert whole.consensus.any()
    _same_result(whole, waves)
    assert min(model.planes) == 5 and max(model.planes) == 13  # +-3 planes, then 1 more above the object's top


def test_wave_settings_are_checked():
    with pytest.raises(pipeline.SettingsError, match="first_wave_mm"):
        SegmentSettings(first_wave_mm=-1.0).check()
    with pytest.raises(pipeline.SettingsError, match="wave_step_planes"):
        SegmentSettings(wave_step_planes=0).check()
    assert SegmentSettings(first_wave_mm=None).check()


# --------------------------------------------------------------------------------------------- the shipped model

@pytest.fixture(scope="module")
def clicks(lung1, shipped):
    """lung1's nodule clicked with the shipped sampling: every plane in one batch, then in waves."""
    predictor, card = shipped
    return tuple(pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                                        SegmentSettings(**kw)) for kw in (ONE_BATCH, {}))


def test_lung1_in_waves_is_the_one_batch_click_exactly(clicks):
    whole, waves = clicks
    _same_result(whole, waves)
    assert waves.consensus.any() and waves.timings_s["planes_run"] < whole.timings_s["planes_run"] == 17
    ran = waves.tokens.computed_Z
    assert whole.tokens.computed_Z is None or whole.tokens.computed_Z.all()
    assert not ran.all() and ran[8]
    for name in ("idx_ZNL", "view_ZN", "drawn_ZN"):  # the planes run hold the one batch's token maps
        assert np.array_equal(getattr(whole.tokens, name)[ran], getattr(waves.tokens, name)[ran]), name


def _refine(lung1, shipped, previous, refinement):
    predictor, card = shipped
    return pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, predictor, card,
                                  refinement=refinement, previous=previous)


def _same_tokens(a, b, planes=slice(None)):
    for name in ("idx_ZNL", "view_ZN", "drawn_ZN"):
        assert np.array_equal(getattr(a, name)[planes], getattr(b, name)[planes]), name


def test_a_lock_of_the_click_in_waves_is_the_one_batch_clicks(lung1, shipped, clicks):
    """A lock redraws the planes that have token maps; the planes the waves skipped stay skipped while the locked
    result does not reach them (as for the click: beyond them it cannot change), so the refined result is the one
    batch's lock exactly, and so are the token maps of the planes run. A lock costs no more planes than the click."""
    whole, waves = clicks
    a, b = (_refine(lung1, shipped, p, prompts.refinement(lock_scales=3)) for p in (whole, waves))
    _same_result(a, b)
    ran = b.tokens.computed_Z
    assert ran is not None and not ran.all()
    assert b.tokens.missing_planes() == waves.tokens.missing_planes()
    assert b.settings["redrawn_planes"] == [int(z) for z in np.flatnonzero(ran)]
    _same_tokens(a.tokens, b.tokens, ran)


def test_an_include_point_on_the_click_in_waves_is_the_one_batch_clicks(lung1, shipped, clicks):
    """The skipped planes stay skipped while the refined result does not reach them, with an include point and
    with a lock after it; both give the one batch's results."""
    whole, waves = clicks
    beside = tuple(np.asarray(lung1.nodule_ras) + (3.0, 0.0, 5.0))  # in the nodule, two planes above the click
    a, b = (_refine(lung1, shipped, p, prompts.refinement(include_points=[beside])) for p in (whole, waves))
    _same_result(a, b)
    ran = b.tokens.computed_Z if b.tokens.computed_Z is not None else slice(None)
    _same_tokens(a.tokens, b.tokens, ran)
    a2, b2 = (_refine(lung1, shipped, p, prompts.refinement(lock_scales=2)) for p in (a, b))
    _same_result(a2, b2)
    _same_tokens(a2.tokens, b2.tokens, b2.tokens.computed_Z if b2.tokens.computed_Z is not None else slice(None))


def test_a_refinement_reaching_a_skipped_plane_draws_the_skipped_planes(lung1, shipped, clicks):
    """A click whose token maps lack the planes right beside its result (as if its waves had stopped there): the
    refined result reaches them, so they are drawn and the refinement is run again with them: the one batch's."""
    import copy
    import dataclasses

    predictor, _ = shipped
    whole, _ = clicks
    skipped = copy.deepcopy(whole)
    t = skipped.tokens
    planes_with_result = np.flatnonzero(t.drawn_ZN.any(1))
    lo, hi = 5, 11  # keep planes 5..11 of 17: the click's result spans 3..13 on lung1
    assert planes_with_result.min() < lo and planes_with_result.max() > hi
    t.computed_Z = np.zeros(t.idx_ZNL.shape[0], dtype=bool)
    t.computed_Z[lo:hi + 1] = True
    for name in ("idx_ZNL", "view_ZN", "drawn_ZN"):
        getattr(t, name)[~t.computed_Z] = 0
    t.sampling = dataclasses.asdict(pipeline.SegmentSettings().sampling(predictor.config.sampling))
    refinement = prompts.refinement(exclude_points=[tuple(np.asarray(lung1.nodule_ras) + (30.0, 30.0, 0.0))])
    a, b = (_refine(lung1, shipped, p, refinement) for p in (whole, skipped))
    _same_result(a, b)
    _same_tokens(a.tokens, b.tokens)
    assert b.tokens.missing_planes() == []
