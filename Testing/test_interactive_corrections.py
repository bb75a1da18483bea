"""The interactive-correction benchmark's pure logic (tools/interactive_corrections.py): where a simulated user
clicks next, which trials count, how the curve is summarised; and one crop-level run of a tiny model end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ARSegLib.prompts import EXCLUDE, INCLUDE

TOOL = Path(__file__).resolve().parents[1] / "tools" / "interactive_corrections.py"
spec = importlib.util.spec_from_file_location("interactive_corrections", TOOL)
ic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ic)


def test_the_next_correction_is_the_centre_of_the_largest_error_region():
    target = np.zeros((40, 40), np.uint8)
    target[5:15, 5:15] = 1
    pred = target.copy()
    pred[20:31, 20:31] = 1  # a false positive of 11 x 11: the largest error, centre (25, 25)
    pred[5:8, 5:8] = 0  # a false negative of 3 x 3
    assert ic.correction_point(pred, target) == (EXCLUDE, (25, 25))
    pred[20:31, 20:31] = 0
    assert ic.correction_point(pred, target) == (INCLUDE, (5, 5)) or \
        ic.correction_point(pred, target)[0] == INCLUDE  # the 3 x 3 corner: its centre is (6, 6)
    assert ic.correction_point(pred, target)[1] == (6, 6)
    assert ic.correction_point(target, target) is None


def test_the_centre_is_farthest_from_the_border_not_the_centroid():
    target = np.zeros((30, 30), np.uint8)
    pred = np.zeros_like(target)
    pred[2:6, 2:28] = 1  # a thin bar ...
    pred[10:21, 10:21] = 1  # ... and a square, one component through a neck
    pred[6:10, 14:16] = 1
    kind, (r, c) = ic.correction_point(pred, target)
    assert kind == EXCLUDE and (r, c) == (15, 15)


def test_3d_corrections_use_the_voxel_spacing():
    target = np.zeros((9, 40, 40), np.uint8)
    pred = target.copy()
    pred[1:8, 2:39, 2:39] = 1  # 7 planes of 2.5 mm: the middle plane is 10 mm from the border, the next 7.5 mm
    kind, index = ic.correction_point(pred, target, spacing=(2.5, 0.7, 0.7))
    d = min(index[1] - 1, 39 - index[1], index[2] - 1, 39 - index[2]) * 0.7
    assert kind == EXCLUDE and index[0] == 4 and d >= 10.0 - 1e-9


def test_trials_are_the_readers_that_marked_something_and_a_subset_is_seeded():
    masks = np.zeros((5, 4, 8, 8), np.uint8)
    masks[0, 1, 2, 2] = masks[3, 0, 1, 1] = masks[3, 3, 4, 4] = masks[4, 2, 0, 0] = 1
    assert ic.choose_pairs(masks, None, 0) == [(0, 1), (3, 0), (3, 3), (4, 2)]
    sub = ic.choose_pairs(masks, 2, 7)
    assert len(sub) == 2 and sub == ic.choose_pairs(masks, 2, 7) and set(sub) <= set(ic.choose_pairs(masks, None, 0))


def test_summary_of_the_curve():
    d = np.array([[0.5, 0.7, 0.8, 0.9], [0.3, 0.3, 0.5, 0.5]])
    s = ic.summarise(d, np.array([0.6, 0.4]))
    assert s["mean_dice_after_corrections"] == [0.4, 0.5, 0.65, 0.7]
    assert s["gain_after_last"] == 0.3 and s["best_of_unrefined_samples"] == 0.5 and s["trials"] == 2


def test_crop_trials_run_end_to_end_and_start_from_the_plain_consensus():
    from ARSegLib.engine import ARSegPredictor, build_arseg, tiny_config
    from ARSegLib.metrics import dice

    torch.manual_seed(5)
    cfg = tiny_config(crop_size=32)
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, n_samples=4))
    ae, seg = build_arseg(cfg)
    with torch.no_grad():
        seg.image_encoder.presence_head[-1].bias.fill_(5.0)
    predictor = ARSegPredictor(cfg, ae.eval(), seg.eval())
    rng = np.random.default_rng(0)
    images = rng.random((3, 32, 32), dtype=np.float32)
    targets = np.zeros((3, 32, 32), np.uint8)
    targets[:, 8:20, 8:20] = 1
    d, best, records = ic.crop_trials(predictor, images, targets, n_corrections=2, batch=2)
    plain = predictor.segment(images, cfg.sampling)
    np.testing.assert_allclose(d[:, 0], [dice(c, t) for c, t in zip(plain.consensus_Bhw, targets)])
    assert d.shape == (3, 3) and best.shape == (3,) and (best >= 0).all()
    for rec in records:
        assert len(rec["prompts"]) == len(rec["satisfied"]) <= 2
        assert all(p["kind"] in (INCLUDE, EXCLUDE) for p in rec["prompts"])
