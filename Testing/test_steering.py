"""Sampling under prompts (engine/steering.py) on a tiny random model: a locked prefix is kept token for token,
include / exclude pixels hold in every kept sample where candidates satisfy them, and the counts say when not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ARSegLib.engine import ARSegPredictor, build_arseg, tiny_config
from ARSegLib.engine.selection import kernel_herding
from ARSegLib.engine.steering import CropPrompts, LockedPrefix, SteeringConfig, sample_under_prompts


def _predictor(seed=5, presence_bias=5.0):
    torch.manual_seed(seed)
    cfg = tiny_config(crop_size=32)
    ae, seg = build_arseg(cfg)
    with torch.no_grad():
        seg.image_encoder.presence_head[-1].bias.fill_(presence_bias)
    return cfg, ARSegPredictor(cfg, ae.eval(), seg.eval())


def _images(b=3, seed=0):
    return np.random.default_rng(seed).random((b, 32, 32), dtype=np.float32)


@pytest.mark.parametrize("way", [{}, {"views": 4, "oversample": 2}])
def test_kept_tokens_do_not_change_the_result_and_decode_to_its_samples(way):
    cfg, pred = _predictor()
    s = dataclasses.replace(cfg.sampling, n_samples=6, **way)
    plain = pred.segment(_images(), s)
    kept = pred.segment(_images(), s, keep_tokens=True)
    assert plain.tokens is None
    np.testing.assert_array_equal(plain.samples_BNhw, kept.samples_BNhw)
    t = kept.tokens
    assert t.idx_BNL.shape == (3, 6, cfg.autoencoder.n_tokens) and t.drawn_BN.all()
    # the kept tokens are the samples' own: decoded on their view, they give the samples back
    for b in range(3):
        for n in range(6):
            idx, b0 = [], 0
            for pn in cfg.autoencoder.scales:
                idx.append(torch.as_tensor(t.idx_BNL[b, n, b0:b0 + pn * pn].astype(np.int64))[None])
                b0 += pn * pn
            f = pred.autoencoder.quantizer.idx_to_partial_sums(idx)[-1]
            m = pred._unviewed(pred.autoencoder.decode_masks(f), torch.tensor([int(t.view_BN[b, n])]), 8)
            np.testing.assert_array_equal(m[0].numpy(), kept.samples_BNhw[b, n])


@pytest.mark.parametrize("lock", [1, 2, 3])
def test_a_locked_prefix_is_kept_token_for_token_and_finer_scales_are_drawn_again(lock):
    cfg, pred = _predictor()
    s = dataclasses.replace(cfg.sampling, n_samples=6, views=4, oversample=2)
    source = pred.segment(_images(), s, keep_tokens=True).tokens
    prefix = LockedPrefix.from_tokens(source, sample=2, n_scales=lock, scales=cfg.autoencoder.scales)
    out = sample_under_prompts(pred, _images(), dataclasses.replace(s, seed=7), prefix=prefix)
    t = out.result.tokens
    L = sum(pn * pn for pn in cfg.autoencoder.scales[:lock])
    assert t.drawn_BN.all()
    for b in range(3):
        for n in range(6):
            np.testing.assert_array_equal(t.idx_BNL[b, n, :L], source.idx_BNL[b, 2, :L])
            assert t.view_BN[b, n] == source.view_BN[b, 2]
    assert not np.array_equal(t.idx_BNL[..., L:], np.broadcast_to(source.idx_BNL[:, 2:3, L:], t.idx_BNL[..., L:].shape))


def test_a_locked_prefix_of_an_empty_source_keeps_that_crop_empty():
    cfg, pred = _predictor()
    s = dataclasses.replace(cfg.sampling, n_samples=4)
    source = pred.segment(_images(), s, keep_tokens=True).tokens
    source.drawn_BN[1, 0] = False
    prefix = LockedPrefix.from_tokens(source, sample=0, n_scales=1, scales=cfg.autoencoder.scales)
    out = sample_under_prompts(pred, _images(), s, prefix=prefix)
    assert not out.result.samples_BNhw[1].any() and not out.result.tokens.drawn_BN[1].any()
    assert out.result.tokens.drawn_BN[[0, 2]].all()


def _pixels(samples_Nhw, value):
    """A pixel some samples mark and some do not, preferring one most samples have as `value`."""
    frac = (samples_Nhw > 0).mean(0)
    score = np.where((frac > 0) & (frac < 1), np.abs(frac - (1.0 if value else 0.0)), 9)
    r, c = np.unravel_index(np.argmin(score), score.shape)
    assert score[r, c] < 9, "no pixel the samples disagree on"
    return int(r), int(c)


def test_include_and_exclude_pixels_hold_in_every_kept_sample_and_round_zero_is_the_plain_pool():
    cfg, pred = _predictor()
    s = dataclasses.replace(cfg.sampling, n_samples=6, oversample=2)
    plain = pred.segment(_images(), s)
    inc = _pixels(plain.samples_BNhw[0], 1)
    exc = _pixels(plain.samples_BNhw[1], 0)
    prompts = [CropPrompts(include_rc=(inc,)), CropPrompts(exclude_rc=(exc,)), None]
    out = sample_under_prompts(pred, _images(), s, prompts=prompts, steering=SteeringConfig(max_rounds=6))
    r = out.result
    assert (r.samples_BNhw[0][:, inc[0], inc[1]] > 0).all() and r.consensus_Bhw[0][inc] > 0
    assert (r.samples_BNhw[1][:, exc[0], exc[1]] == 0).all() and r.consensus_Bhw[1][exc] == 0
    assert out.kept_satisfy_B.all() and out.satisfying_all_B[0] >= 1 and out.satisfying_all_B[1] >= 1
    # a crop without prompts draws one pool, the plain run's candidates, kept by the same herding
    assert out.rounds_B[2] == 1 and out.candidates_B[2] == 12
    np.testing.assert_array_equal(r.samples_BNhw[2], plain.samples_BNhw[2])
    # extra pools were drawn only where the first had fewer than N satisfying candidates
    assert all(out.rounds_B[b] == 1 or out.candidates_B[b] == 12 * out.rounds_B[b] for b in range(2))


def test_an_unsatisfiable_prompt_is_reported_not_dropped():
    cfg, pred = _predictor()
    s = dataclasses.replace(cfg.sampling, n_samples=4)
    plain = pred.segment(_images(1), s)
    never = np.argwhere((plain.samples_BNhw[0] == 0).all(0))
    never = tuple(int(v) for v in never[0]) if len(never) else None
    if never is None:
        pytest.skip("every pixel is marked by some sample")
    # exclude pixel (0, 0)'s opposite: an include where no sample of a tiny pool marks anything can fail
    out = sample_under_prompts(pred, _images(1), s, prompts=[CropPrompts(include_rc=(never,))],
                               steering=SteeringConfig(max_rounds=2))
    assert out.satisfying_B[0][0] == out.satisfying_all_B[0]
    assert out.kept_satisfy_B[0] == (out.satisfying_all_B[0] > 0)
    if out.satisfying_all_B[0] == 0:
        assert out.rounds_B[0] == 2 and out.candidates_B[0] == 8


def test_herding_with_repeats_keeps_more_samples_than_candidates():
    pool = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    pool[0, 0, :4] = 1
    pool[0, 1, :5] = 1
    pool[0, 2, 6:] = 1
    kept = kernel_herding(pool, 7, repeat=True)[0].tolist()
    assert len(kept) == 7 and set(kept) <= {0, 1, 2} and len(set(kept)) >= 2
    with pytest.raises(ValueError):
        kernel_herding(pool, 7)
