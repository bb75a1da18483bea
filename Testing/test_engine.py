"""The engine: quantizer, autoencoder, causality, cached vs reference sampling, presence gate, consensus."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from ARSegLib.engine import ARSegPredictor, aggregate, build_arseg, tiny_config
from ARSegLib.engine.predictor import presence_gate
from ARSegLib.engine.sampler import CropStreams, sample_from_logits, sample_tokens
from ARSegLib.engine.selection import kernel_herding
from ARSegLib.engine.views import dihedral, undo_dihedral


def disks(n, size, seed=0):
    """Binary masks of random disks (some empty): a stand-in mask distribution for unit tests."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        if i % 5 == 4:
            continue
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.1, 0.3) * size
        out[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def trained_tiny_ae():
    """A tiny autoencoder trained briefly on disks with the real recipe: plain warm-up, codes
    seeded from residual vectors, then quantized training."""
    torch.manual_seed(0)
    cfg = tiny_config(crop_size=32)
    ae, _ = build_arseg(cfg)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    masks = disks(256, 32)
    g = torch.Generator().manual_seed(0)
    for step in range(400):
        batch = masks[torch.randint(0, len(masks), (32,), generator=g)]
        quantize = step >= 150
        if step == 150:
            with torch.no_grad():
                ae.quantizer.reseed(ae.quantizer.residuals(ae.encoder(ae.mask_to_input(masks[:128]))),
                                    only_dead=False, generator=g)
        logits, vq, _ = ae(batch, quantize=quantize)
        loss = ae.reconstruction_loss(logits, batch) + vq
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cfg, ae.eval(), masks


def fg_iou(a, b):
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def test_autoencoder_reconstructs_with_all_scales_and_coarse_scales_are_coarser(trained_tiny_ae):
    cfg, ae, masks = trained_tiny_ae
    test = disks(64, 32, seed=1)
    idx = ae.mask_to_idx(test)
    per_scale = ae.idx_to_masks(idx)
    ious = [fg_iou(m, test).mean().item() for m in per_scale]
    assert ious[-1] > 0.85, ious
    assert ious[-1] > ious[0] + 0.1, ious  # the finest partial sum is clearly better than the first


def test_token_indices_are_valid_and_shaped_by_scale(trained_tiny_ae):
    cfg, ae, masks = trained_tiny_ae
    idx = ae.mask_to_idx(masks[:8])
    assert [i.shape for i in idx] == [(8, s * s) for s in cfg.autoencoder.scales]
    for i in idx:
        assert i.dtype == torch.int64 and int(i.min()) >= 0 and int(i.max()) < cfg.autoencoder.vocab_size


def test_partial_sums_are_what_coarse_to_fine_decoding_and_sampling_use(trained_tiny_ae):
    cfg, ae, masks = trained_tiny_ae
    q = ae.quantizer
    with torch.no_grad():
        f = ae.encoder(ae.mask_to_input(masks[:6]))
        f_hat_st, _, idx = q(f)
        partial = q.idx_to_partial_sums(idx)
        # the quantizer's forward output is the last partial sum (value of the straight-through)
        torch.testing.assert_close(f_hat_st, partial[-1], rtol=1e-5, atol=1e-5)
        # the sampler's incremental update builds exactly the same partial sums
        f_hat = None
        for si, idx_Bl in enumerate(idx):
            f_hat, _ = q.next_scale_input(f_hat, idx_Bl, si)
            torch.testing.assert_close(f_hat, partial[si], rtol=0, atol=0)
        # coarse-to-fine masks are the decoded partial sums
        masks_k = ae.idx_to_masks(idx)
        for si in range(len(idx)):
            assert torch.equal(masks_k[si], ae.decode_masks(partial[si]))
        # teacher input of scale k+1 is partial sum k downsampled to s_{k+1}
        x = q.idx_to_teacher_input(idx)
        s2 = cfg.autoencoder.scales[1]
        torch.testing.assert_close(x[:, : s2 * s2], q.down(partial[0], s2).flatten(2).transpose(1, 2))


def _tiny_models(seed=0, **over):
    torch.manual_seed(seed)
    cfg = tiny_config(crop_size=32)
    if over:
        cfg = dataclasses.replace(cfg, segmentor=dataclasses.replace(cfg.segmentor, **over))
    ae, seg = build_arseg(cfg)
    return cfg, ae.eval(), seg.eval()


def test_block_causal_logits_of_scale_k_ignore_later_scales():
    cfg, ae, seg = _tiny_models()
    torch.manual_seed(1)
    img = torch.rand(2, 1, 32, 32)
    V, scales = cfg.autoencoder.vocab_size, cfg.autoencoder.scales
    idx = [torch.randint(0, V, (2, s * s)) for s in scales]
    with torch.no_grad():
        base, _ = seg(img, ae.quantizer.idx_to_teacher_input(idx))
        for k in range(len(scales) - 1):
            changed = [i.clone() for i in idx]
            for j in range(k + 1, len(scales)):  # every token of every later scale
                changed[j] = torch.randint(0, V, changed[j].shape)
            # tokens of scale k+1.. only feed the inputs of scales k+2..: logits up to scale k+1 stay
            out, _ = seg(img, ae.quantizer.idx_to_teacher_input(changed))
            e = seg.begin_ends[k + 1][1]
            torch.testing.assert_close(out[:, :e], base[:, :e], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out[:, e:], base[:, e:]) or k + 2 == len(scales)


def test_cached_sampler_yields_exactly_the_reference_tokens():
    cfg, ae, seg = _tiny_models(seed=3)
    torch.manual_seed(4)
    feats = seg.image_encoder(torch.rand(3, 1, 32, 32))
    rows = torch.arange(3).repeat_interleave(8)
    temps = (1.0,) * len(cfg.autoencoder.scales)
    for top_k, top_p in ((0, 0.0), (5, 0.0), (0, 0.9)):
        runs = []
        for use_cache in (True, False):
            streams = CropStreams(123, range(3), "cpu")
            idx, partial = sample_tokens(seg, ae.quantizer, feats, temps, top_k, top_p, streams, use_cache,
                                         crop_of_row=rows)
            runs.append((idx, partial))
        for a, b in zip(runs[0][0], runs[1][0]):
            assert torch.equal(a, b)
        torch.testing.assert_close(runs[0][1][-1], runs[1][1][-1])


def _always_drawing_predictor():
    """A tiny predictor whose presence gate draws every sample."""
    cfg, ae, seg = _tiny_models(seed=5)
    with torch.no_grad():
        seg.image_encoder.presence_head[-1].bias.fill_(5.0)
    return cfg, ARSegPredictor(cfg, ae, seg)


WAYS_OF_SAMPLING = [{}, {"views": 8}, {"oversample": 3}, {"views": 4, "oversample": 2},
                    {"oversample": 3, "selection_scale": 1}, {"views": 4, "oversample": 2, "selection_scale": 3}]


@pytest.mark.parametrize("way", WAYS_OF_SAMPLING)
def test_same_seed_same_result_other_seed_other_result(way):
    cfg, pred = _always_drawing_predictor()
    img = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    s = dataclasses.replace(cfg.sampling, n_samples=8, seed=11, **way)
    a, b = pred.segment(img, s), pred.segment(img, s)
    c = pred.segment(img, dataclasses.replace(s, seed=12))
    assert np.array_equal(a.samples_BNhw, b.samples_BNhw)
    assert np.array_equal(a.scale_consensus_BKhw, b.scale_consensus_BKhw)
    assert not np.array_equal(a.samples_BNhw, c.samples_BNhw)
    ref = pred.segment(img, s, use_cache=False)
    assert np.array_equal(a.samples_BNhw, ref.samples_BNhw)


@pytest.mark.parametrize("way", WAYS_OF_SAMPLING)
def test_a_crops_samples_do_not_depend_on_the_other_crops_of_the_call(way):
    cfg, pred = _always_drawing_predictor()
    img = np.random.default_rng(1).random((4, 32, 32)).astype(np.float32)
    s = dataclasses.replace(cfg.sampling, n_samples=8, seed=3, **way)
    together = pred.segment(img, s, crop_ids=[10, 11, 12, 13])
    for i in range(4):
        alone = pred.segment(img[i:i + 1], s, crop_ids=[10 + i])
        assert np.array_equal(alone.samples_BNhw[0], together.samples_BNhw[i])
    # ids, not positions, pick the streams: the same crops in another order give the same samples
    reordered = pred.segment(img[::-1].copy(), s, crop_ids=[13, 12, 11, 10])
    assert np.array_equal(reordered.samples_BNhw[::-1], together.samples_BNhw)
    with pytest.raises(ValueError, match="crop ids"):
        pred.segment(img, s, crop_ids=[1, 2])


def test_each_view_is_undone_exactly():
    x = torch.arange(2 * 5 * 5).view(2, 5, 5)
    views = [dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8  # 8 distinct symmetries
    for k, v in enumerate(views):
        assert torch.equal(undo_dihedral(v, k), x)


def test_test_time_views_map_each_candidate_back_from_its_own_view():
    """Greedy sampling (temperature 0) makes a view's sample a function of the view's image alone: candidate i of
    a crop must be the greedy sample of view i mod V, mapped back onto the crop."""
    cfg, pred = _always_drawing_predictor()
    img = np.random.default_rng(4).random((2, 32, 32)).astype(np.float32)
    s = dataclasses.replace(cfg.sampling, n_samples=8, temperature=0.0)
    got = pred.segment(img, dataclasses.replace(s, views=8)).samples_BNhw
    for k in range(8):
        seen = np.ascontiguousarray(dihedral(torch.from_numpy(img), k).numpy())
        greedy = torch.from_numpy(pred.segment(seen, dataclasses.replace(s, n_samples=1)).samples_BNhw[:, 0])
        assert np.array_equal(got[:, k], undo_dihedral(greedy, k).numpy()), k
    assert not all(np.array_equal(got[:, 0], got[:, k]) for k in range(1, 8))  # the views do differ


def test_kernel_herding_keeps_the_pools_proportions():
    yy, xx = np.mgrid[:16, :16]
    a = torch.from_numpy(((yy - 4) ** 2 + (xx - 4) ** 2 < 9).astype(np.uint8))
    b = torch.from_numpy(((yy - 11) ** 2 + (xx - 11) ** 2 < 9).astype(np.uint8))
    empty = torch.zeros(16, 16, dtype=torch.uint8)
    # pool: 6 x a (one slightly grown), 3 x b, 3 x empty; keep 4 -> 2 a, 1 b, 1 empty
    grown = a.clone()
    grown[4, 7] = 1
    pool = torch.stack([a, b, a, empty, a, a, b, empty, grown, a, b, empty])[None]
    kept = kernel_herding(pool, 4)[0].tolist()
    assert len(set(kept)) == 4
    kinds = ["a" if torch.equal(pool[0, j], a) or torch.equal(pool[0, j], grown) else
             "b" if torch.equal(pool[0, j], b) else "empty" for j in kept]
    assert sorted(kinds) == ["a", "a", "b", "empty"]
    assert kept[0] == 0  # the most typical first, ties to the lower index
    assert torch.equal(kernel_herding(pool, 12)[0].sort().values, torch.arange(12))  # keeping all keeps each once
    with pytest.raises(ValueError, match="cannot keep"):
        kernel_herding(pool, 13)


def test_oversampling_keeps_the_herded_subset_of_the_same_candidates():
    """N kept of 4N candidates are exactly kernel herding's choice among the 4N samples a plain run draws (the
    same streams), with every scale of the kept samples decoded."""
    cfg, pred = _always_drawing_predictor()
    img = np.random.default_rng(2).random((3, 32, 32)).astype(np.float32)
    s = dataclasses.replace(cfg.sampling, n_samples=4, seed=7)
    kept = pred.segment(img, dataclasses.replace(s, oversample=4))
    pool = pred.segment(img, dataclasses.replace(s, n_samples=16))
    choice = kernel_herding(torch.from_numpy(pool.samples_BNhw), 4).numpy()
    for b in range(3):
        assert np.array_equal(kept.samples_BNhw[b], pool.samples_BNhw[b][choice[b]])
    assert kept.scale_consensus_BKhw.shape == (3, len(cfg.autoencoder.scales), 32, 32)
    assert np.array_equal(kept.scale_consensus_BKhw[:, -1], kept.consensus_Bhw)


@pytest.mark.parametrize("selection_scale", [1, 2, 4, 0])
def test_coarse_selection_keeps_herdings_choice_at_that_scale_and_draws_on_from_its_tokens(selection_scale):
    """With selection_scale k the N kept samples are kernel herding's choice among the pool's masks at scale k (the
    pool: the same candidates a plain run of N x oversample draws, same streams), in herding's order, each drawn on
    its own view, and their token maps of scales 1..k are those candidates' own; k = 0 or the last scale is the
    herding over the finished candidates. Fewer sequences draw the finer scales, so it costs less."""
    cfg, pred = _always_drawing_predictor()
    img = np.random.default_rng(6).random((3, 32, 32)).astype(np.float32)
    K, V = len(cfg.autoencoder.scales), 2
    s = dataclasses.replace(cfg.sampling, n_samples=4, seed=9, views=V, oversample=4, selection_scale=selection_scale)
    kept = pred.segment(img, s, keep_tokens=True)
    pool = pred.segment(img, dataclasses.replace(s, n_samples=16, oversample=1), keep_tokens=True)
    k = selection_scale or K
    L_k = sum(n * n for n in cfg.autoencoder.scales[:k])
    q = pred.autoencoder.quantizer
    idx_BPL = torch.from_numpy(pool.tokens.idx_BNL.astype(np.int64))
    f_hat, b = None, 0
    for si, n in enumerate(cfg.autoencoder.scales[:k]):  # the pool's partial sums at scale k, from its tokens
        f_hat, _ = q.next_scale_input(f_hat, idx_BPL.flatten(0, 1)[:, b:b + n * n], si)
        b += n * n
    with torch.no_grad():
        masks = pred.autoencoder.decode_masks(f_hat).view(3, 16, 32, 32)
    for j in range(16):  # candidate j was drawn on view j mod V
        masks[:, j] = undo_dihedral(masks[:, j], j % V)
    masks[torch.from_numpy(~pool.tokens.drawn_BN)] = 0  # the presence gate left these empty (it draws ~99 %)
    choice = kernel_herding(masks, 4).numpy()
    for b in range(3):
        assert np.array_equal(kept.tokens.idx_BNL[b, :, :L_k], pool.tokens.idx_BNL[b, choice[b], :L_k]), b
        assert np.array_equal(kept.tokens.view_BN[b], choice[b] % V)
    if k == K:
        for b in range(3):
            assert np.array_equal(kept.samples_BNhw[b], pool.samples_BNhw[b][choice[b]])
    timings = {}
    pred.segment(img, s, timings=timings)
    assert set(timings) >= {"image_encoder", "transformer", "selection", "decoding"} and min(timings.values()) >= 0


def test_coarse_selection_beyond_the_models_scales_is_refused():
    cfg, pred = _always_drawing_predictor()
    K = len(cfg.autoencoder.scales)
    with pytest.raises(ValueError, match=f"the model has {K} scales"):
        pred.segment(np.zeros((1, 32, 32), np.float32),
                     dataclasses.replace(cfg.sampling, oversample=2, selection_scale=K + 1))


def test_oversampling_may_keep_only_empty_candidates():
    """A presence of 2 % draws one or two of 64 candidates; the 16 that represent the pool are then all empty
    (before: decoding an empty selection raised)."""
    cfg, pred = _always_drawing_predictor()
    with torch.no_grad():
        head = pred.segmentor.image_encoder.presence_head[-1]
        head.weight.zero_()
        head.bias.fill_(float(np.log(0.02 / 0.98)))
    img = np.random.default_rng(5).random((2, 32, 32)).astype(np.float32)
    s = dataclasses.replace(cfg.sampling, n_samples=16, oversample=4, views=2)
    pool = pred.segment(img, dataclasses.replace(s, n_samples=64, oversample=1))
    assert 1 <= pool.samples_BNhw.any((2, 3)).sum(1).min()  # some candidates were drawn
    kept = pred.segment(img, s)
    assert not kept.samples_BNhw.any() and not kept.scale_consensus_BKhw.any()
    early = pred.segment(img, dataclasses.replace(s, selection_scale=2))  # no row goes on to the finer scales
    assert not early.samples_BNhw.any() and not early.scale_consensus_BKhw.any()
    np.testing.assert_allclose(kept.presence_B, 0.02, rtol=1e-5)


@pytest.mark.parametrize("bad, message", [({"views": 9}, "views must be between 1 and 8"),
                                          ({"views": 0}, "views must be between 1 and 8"),
                                          ({"oversample": 0}, "oversample must be at least 1"),
                                          ({"selection_scale": -1}, "selection_scale must be 0")])
def test_impossible_sampling_settings_are_refused(bad, message):
    cfg, pred = _always_drawing_predictor()
    with pytest.raises(ValueError, match=message):
        pred.segment(np.zeros((1, 32, 32), np.float32), dataclasses.replace(cfg.sampling, **bad))


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 9, 17)
    u = torch.rand(4, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_from_logits(logits, 1.0, 1, 0.0, u), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, 0.0, 0, 0.0, u), logits.argmax(-1))
    # top-p keeps at least the most likely token; a tiny p is greedy as well
    assert torch.equal(sample_from_logits(logits, 1.0, 0, 1e-6, u), logits.argmax(-1))


def test_presence_gate_draws_the_predicted_fraction():
    p = torch.tensor([0.0, 0.25, 0.5, 1.0, 0.74])
    drawn = presence_gate(p, 16, torch.rand(5, generator=torch.Generator().manual_seed(0)))
    counts = drawn.sum(1).tolist()
    assert counts[:4] == [0, 4, 8, 16]
    assert counts[4] in (11, 12)


def test_consensus_disagreement_and_per_scale_story():
    s = torch.zeros(1, 4, 2, 2, dtype=torch.uint8)
    s[0, 0] = torch.tensor([[1, 1], [0, 0]])
    s[0, 1] = torch.tensor([[1, 1], [0, 0]])
    s[0, 2] = torch.tensor([[1, 0], [0, 0]])
    s[0, 3] = torch.tensor([[0, 0], [1, 0]])
    scales = torch.stack([torch.zeros_like(s), s])  # K = 2: first scale empty
    r = aggregate(scales, torch.tensor([1.0]))
    assert r.consensus_Bhw[0].tolist() == [[1, 1], [0, 0]]  # 3/4 and 2/4 (ties count as foreground)
    np.testing.assert_allclose(r.disagreement_Bhw[0], [[0.25, 0.5], [0.25, 0.0]])
    np.testing.assert_allclose(r.sample_iou_BN[0], [1.0, 1.0, 0.5, 0.0])
    assert r.scale_consensus_BKhw[0, 0].sum() == 0
    assert np.array_equal(r.scale_consensus_BKhw[0, 1], r.consensus_Bhw[0])


@pytest.mark.parametrize("n_classes", [1, 4])
def test_consensus_matches_a_numpy_reference(n_classes):
    g = np.random.default_rng(0)
    K, B, N = 3, 2, 16
    s = g.integers(0, max(2, n_classes), (K, B, N, 9, 7)).astype(np.uint8)
    r = aggregate(torch.from_numpy(s), torch.ones(B), n_classes=n_classes)
    fg = s > 0
    votes = fg[-1].sum(1)
    np.testing.assert_allclose(r.probability_Bhw, votes / N)
    if n_classes == 1:
        np.testing.assert_array_equal(r.consensus_Bhw, 2 * votes >= N)
        np.testing.assert_array_equal(r.scale_consensus_BKhw, (2 * fg.sum(2) >= N).transpose(1, 0, 2, 3))
    else:
        counts = np.stack([(s[-1] == c).sum(1) for c in range(n_classes)], 1)
        np.testing.assert_array_equal(r.consensus_Bhw, counts.argmax(1))
    np.testing.assert_array_equal(r.samples_BNhw, s[-1])
    np.testing.assert_array_equal(r.scale_consensus_BKhw[:, -1], r.consensus_Bhw)


def test_multiclass_consensus_is_the_per_pixel_mode():
    s = torch.tensor([[[[2]], [[2]], [[3]], [[0]], [[3]], [[2]]]], dtype=torch.uint8)  # B=1, N=6, 1x1
    r = aggregate(s[None], torch.tensor([1.0]), n_classes=4)
    assert r.consensus_Bhw[0, 0, 0] == 2
    np.testing.assert_allclose(r.disagreement_Bhw[0, 0, 0], 0.5)


def test_predictor_rejects_bad_crops():
    cfg, ae, seg = _tiny_models()
    pred = ARSegPredictor(cfg, ae, seg)
    with pytest.raises(ValueError, match="shape"):
        pred.segment(np.zeros((2, 16, 16), np.float32))
    bad = np.zeros((1, 32, 32), np.float32)
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pred.segment(bad)


def test_multiclass_engine_runs_end_to_end():
    torch.manual_seed(0)
    cfg = tiny_config(crop_size=32, n_classes=4, in_channels=2)
    ae, seg = build_arseg(cfg)
    labels = (torch.rand(3, 32, 32) * 4).to(torch.uint8)
    logits, vq, idx = ae(labels)
    assert logits.shape == (3, 4, 32, 32)
    with torch.no_grad():
        seg.image_encoder.presence_head[-1].bias.fill_(5.0)
    r = ARSegPredictor(cfg, ae, seg).segment(np.random.rand(2, 2, 32, 32).astype(np.float32),
                                              dataclasses.replace(cfg.sampling, n_samples=4))
    assert r.samples_BNhw.shape == (2, 4, 32, 32) and r.samples_BNhw.max() <= 3


def test_decoding_distinct_prefixes_once_equals_decoding_every_sequence():
    cfg, ae, seg = _tiny_models(seed=7)
    pred = ARSegPredictor(cfg, ae, seg)
    V, scales = cfg.autoencoder.vocab_size, cfg.autoencoder.scales
    g = torch.Generator().manual_seed(0)
    # 6 sequences: rows 0-2 agree on scales 1-2, rows 3-4 are identical everywhere
    idx = [torch.randint(0, V, (6, s * s), generator=g) for s in scales]
    for si in range(2):
        idx[si][1:3] = idx[si][0]
    for si in range(len(scales)):
        idx[si][4] = idx[si][3]
    partial = ae.quantizer.idx_to_partial_sums(idx)
    with torch.no_grad():
        fast = pred.decode_all_scales(idx, partial)
        every = torch.stack([ae.decode_masks(f) for f in partial])
    assert torch.equal(fast, every)


@pytest.mark.parametrize("mode", ["area", "bicubic"])
def test_resize_grid_is_f_interpolate_and_serves_autograd_after_inference(mode):
    """The tabulated resize is F.interpolate up to float round-off, for every grid size pair the model can use;
    a matrix first built under inference mode still carries gradients in training."""
    from ARSegLib.engine.grid import resize_grid

    g = torch.Generator().manual_seed(0)
    for src in range(1, 9):
        for dst in range(1, 9):
            if (mode == "area") != (dst <= src):
                continue  # area only shrinks, bicubic only grows in the model
            x = torch.randn(3, 5, src, src, generator=g)
            with torch.inference_mode():
                fast = resize_grid(x, dst, mode)
            torch.testing.assert_close(fast, torch.nn.functional.interpolate(x, size=(dst, dst), mode=mode),
                                       atol=2e-6, rtol=1e-5)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    resize_grid(x, 8, mode if mode == "bicubic" else "bicubic").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="square"):
        resize_grid(torch.zeros(1, 1, 2, 3), 4, mode)


@pytest.mark.parametrize("n_classes", [1, 3])
def test_decoder_labels_equal_the_decision_on_its_logits(n_classes):
    """decode_masks decides per pixel before the pixel shuffle, on channels-last activations: the same label maps
    as thresholding (argmax of) the decoder's logits, wherever the decision is not a float round-off away."""
    cfg = tiny_config(n_classes=n_classes, crop_size=64)
    torch.manual_seed(3)
    ae, _ = build_arseg(cfg)
    a = cfg.autoencoder
    f = torch.randn(40, a.code_dim, a.latent_size, a.latent_size) * 3
    with torch.inference_mode():
        logits = ae.decoder(f)
        fast = ae.decode_masks(f, chunk=16)
    assert fast.dtype == torch.uint8 and fast.shape == (40, a.crop_size, a.crop_size)
    if n_classes == 1:
        clear = logits[:, 0].abs() > 1e-4
    else:
        top2 = logits.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.float().mean() > 0.99 and len(fast.unique()) == max(n_classes, 2)
    assert torch.equal(fast[clear], ae.logits_to_mask(logits)[clear])


def test_fused_linear_matches_f_linear_and_follows_weight_changes(monkeypatch):
    """At CPU inference the oneDNN path gives F.linear's result (and F.gelu's, fused, to round-off); a weight
    changed in place (an optimizer step) is repacked; with autograd on, or the path unusable, plain F.linear runs."""
    from ARSegLib.engine import fused

    if not fused.usable():
        pytest.skip("oneDNN fused linear layers are not usable in this torch build")
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(fused.linear(layer, x), layer(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fused.linear(layer, x, gelu=True),
                                   torch.nn.functional.gelu(layer(x), approximate="tanh"), atol=2e-6, rtol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # in place, as an optimizer does
    with torch.inference_mode():
        torch.testing.assert_close(fused.linear(layer, x), layer(x), atol=1e-6, rtol=1e-6)
    y = fused.linear(layer, x.requires_grad_(), gelu=True)  # training: autograd through the plain ops
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    monkeypatch.setattr(fused, "_usable", False)
    with torch.inference_mode():
        assert torch.equal(fused.linear(layer, x), layer(x))


def test_fused_conv_matches_f_conv2d_with_and_without_silu(monkeypatch):
    """The decoder's oneDNN convolutions (SiLU fused) give F.conv2d's result to round-off on channels-last input, keep
    channels-last; with autograd on, or the path unusable, plain F.conv2d runs."""
    from ARSegLib.engine import fused

    if not fused.usable():
        pytest.skip("oneDNN fused layers are not usable in this torch build")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 12, 3, padding=1)
    x = torch.randn(5, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = fused.conv2d(conv, x, silu=True)
        torch.testing.assert_close(y, torch.nn.functional.silu(conv(x)), atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(fused.conv2d(conv, x), conv(x), atol=2e-6, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    fused.conv2d(conv, x, silu=True).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    monkeypatch.setattr(fused, "_usable", False)
    with torch.inference_mode():
        assert torch.equal(fused.conv2d(conv, x), conv(x))


def test_channels_last_encoder_gives_the_encoders_features_and_follows_weight_changes(monkeypatch):
    """At CPU inference the image encoder runs as a channels-last copy: its features equal the module's to float
    round-off, the copy is rebuilt after a weight changes (an optimizer step), never saved with the module, and not
    used with autograd on or with ARSEG_CHANNELS_LAST=0; a predictor's samples are the same either way here."""
    from ARSegLib.engine import fused

    cfg, pred = _always_drawing_predictor()
    enc = pred.segmentor.image_encoder
    x = torch.rand(6, 1, 32, 32)
    with torch.inference_mode():
        twin = fused.channels_last(enc)
        assert twin is not enc and fused.channels_last(enc) is twin  # built once
        a, b = enc(x), twin(x.contiguous(memory_format=torch.channels_last))
        for name in ("cond_BD", "feat_BDhw", "presence_logit_B"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5)
    assert not any("channels_last" in k for k in pred.segmentor.state_dict())
    with torch.no_grad():
        enc.stem[0].weight.mul_(1.5)
    with torch.inference_mode():
        again = fused.channels_last(enc)
        assert again is not twin
        torch.testing.assert_close(again(x.contiguous(memory_format=torch.channels_last)).feat_BDhw,
                                   enc(x).feat_BDhw, atol=1e-5, rtol=1e-5)
    assert fused.channels_last(enc) is enc  # autograd on: the module itself
    img = np.random.default_rng(8).random((2, 32, 32)).astype(np.float32)
    s = dataclasses.replace(cfg.sampling, n_samples=8, views=2, oversample=2)
    fast = pred.segment(img, s)
    monkeypatch.setenv("ARSEG_CHANNELS_LAST", "0")
    with torch.inference_mode():
        assert fused.channels_last(enc) is enc
    assert np.array_equal(pred.segment(img, s).samples_BNhw, fast.samples_BNhw)


def test_cached_attention_equals_masked_attention_over_the_whole_prefix():
    """The key/value cache's attention (newest scale's queries against every cached key, no mask) gives what
    block-causal attention over the whole sequence gives those queries, and the cache is freed afterwards."""
    from ARSegLib.engine.blocks import SelfAttention, block_causal_bias

    torch.manual_seed(0)
    scales = (1, 2, 3)
    attn = SelfAttention(24, 3).eval()
    x = torch.randn(4, sum(s * s for s in scales), 24)
    with torch.inference_mode():
        full = attn(x, block_causal_bias(scales))
        attn.kv_caching(x.shape[1])
        b, cached = 0, []
        for s in scales:
            cached.append(attn(x[:, b:b + s * s], None))
            b += s * s
        attn.kv_caching(0)
    torch.testing.assert_close(torch.cat(cached, 1), full, atol=1e-5, rtol=1e-5)
    assert attn.cached_kv is None


def test_sampling_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([0.1, 0.0, 0.6, 0.3]))[None, None].repeat(1, 20000, 1)
    g = torch.Generator().manual_seed(0)
    idx = sample_from_logits(logits, 1.0, 0, 0.0, torch.rand(1, 20000, generator=g))
    freq = torch.bincount(idx.flatten(), minlength=4).float() / idx.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.015, rtol=0)
    top2 = torch.bincount(sample_from_logits(logits, 1.0, 2, 0.0, torch.rand(1, 20000, generator=g)).flatten(),
                          minlength=4).float() / idx.numel()
    torch.testing.assert_close(top2, torch.tensor([0.0, 0.0, 2 / 3, 1 / 3]), atol=0.015, rtol=0)


def test_dense_levels_baseline_by_hand():
    """A soft map of exactly 0.5 gives 8 full and 8 empty samples of 16; against 2 full and 2 empty readers that
    is a perfect distribution match: GED 0, HM-IoU 1, Soft-Dice 1. Saturated maps equal the deterministic U-Net."""
    from ARSegLib.evaluation import dense_baseline_masks, evaluate_dense_levels, evaluate_deterministic

    cfg, ae, seg = _tiny_models()
    pred = ARSegPredictor(cfg, ae, seg)
    head = seg.image_encoder.dense_head
    images = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    readers = np.zeros((3, 4, 32, 32), np.uint8)
    readers[:, :2] = 1
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    r = evaluate_dense_levels(pred, images, readers, n_samples=16)
    assert r["ged"] == pytest.approx(0.0, abs=1e-9) and r["hm_iou"] == pytest.approx(1.0)
    assert r["soft_dice"] == pytest.approx(1.0) and r["n_images"] == 3
    for bias in (30.0, -30.0):
        with torch.no_grad():
            head.bias.fill_(bias)
        levels = evaluate_dense_levels(pred, images, readers, n_samples=16)
        fixed = evaluate_deterministic(dense_baseline_masks(pred, images), readers, n_samples=16)
        for key in ("ged", "hm_iou", "soft_dice"):
            assert levels[key] == pytest.approx(fixed[key]), key


def test_kept_freed_memory_spares_the_page_faults_of_large_blocks():
    """In a fresh interpreter: 48 MB blocks allocated and written six times fault in every page each time with
    glibc's defaults; once the allocator keeps freed memory, the later blocks reuse the first one's pages. After
    release, the defaults (and their faults) are back."""
    import subprocess
    import sys

    from ARSegLib.engine import heap

    if not heap._glibc():
        pytest.skip("the allocator tuning is glibc-only")
    code = """
import json, resource
import numpy as np
from ARSegLib.engine import heap
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        a = np.empty(12 << 20, np.float32); a.fill(1.0); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
out = {"default": faults(), "kept": heap.keep_freed_memory()}
out["keeping"] = faults()
heap.release_freed_memory()
out["released"] = faults()
print(json.dumps(out))
"""
    env = {**os.environ, "ARSEG_HEAP_TUNING": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # (with transparent huge pages a fault maps up to 2 MB, so count relative to the defaults' own count)
    assert out["kept"] is True and out["default"] >= 6 * 24, out
    # only the first block should fault; allow the heap's own growth (a CI machine counted 971 of 3216: under
    # two blocks' worth), while no reuse at all would count about six
    assert out["keeping"] < 0.5 * out["default"], out
    assert out["released"] > 0.8 * out["default"], out
