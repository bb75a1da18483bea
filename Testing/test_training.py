"""Training on real data: a tiny autoencoder + segmentor overfit a handful of LIDC crops; checkpoints
resume; a two-process torchrun step leaves the ranks with equal weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ARSegLib.data.augment import AugmentConfig
from ARSegLib.engine import tiny_config
from ARSegLib.metrics import iou
from ARSegLib.training.checkpoint import load_checkpoint
from ARSegLib.training.trainer import AutoencoderTrainer, SegmentorTrainer, TrainConfig, TrainData

NO_AUG = AugmentConfig(dihedral=False, rotate_deg=0.0, intensity_prob=0.0)


@pytest.fixture(scope="module")
def handful(lidc_tar, tmp_path_factory):
    """8 real val crops that all four readers marked (the cache lives in a temp folder)."""
    os.environ["ARSEG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from ARSegLib.data.lidc import load_lidc

    val = load_lidc(lidc_tar, "val")
    marked = val.masks_NRhw.reshape(len(val), 4, -1).max(2).min(1) > 0
    big = val.masks_NRhw.reshape(len(val), 4, -1).sum(2).min(1) > 150
    idx = np.flatnonzero(marked & big)[::7][:8]
    return TrainData.from_lidc(val.subset(idx))


def test_tiny_models_overfit_real_lidc_crops(handful, tmp_path):
    cfg = tiny_config(crop_size=128)
    tc = TrainConfig(out_dir=str(tmp_path), device="cpu", steps=300, batch=16, lr=3e-3, warmup_steps=20,
                     ae_plain_steps=100, ae_reseed_every=100, eval_every=10 ** 9, save_every=10 ** 9,
                     log_every=100, augment=NO_AUG)
    AutoencoderTrainer(cfg, handful, None, tc).fit()
    tc.steps, tc.unet_pretrain_steps, tc.lr = 200, 60, 3e-3
    seg = SegmentorTrainer(cfg, handful, None, tc, str(tmp_path / "autoencoder.pt"))
    seg.fit()
    pred = seg.predictor()
    s = cfg.sampling.__class__(n_samples=4, temperature=0.0)  # greedy: the model's best guess
    res = pred.segment(handful.images_NChw, s)
    majority = (handful.masks_NRhw.mean(1) >= 0.5).astype(np.uint8)
    ious = [iou(res.consensus_Bhw[i], majority[i]) for i in range(len(majority))]
    assert np.mean(ious) > 0.5, ious
    assert (res.presence_B > 0.5).all()  # every reader marked these crops
    # the log has every logged step, and the checkpoint resumes where it stopped
    log = (tmp_path / "segmentor.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) == 1 + 2
    assert load_checkpoint(tmp_path / "segmentor.pt")["step"] == 200
    again = SegmentorTrainer(cfg, handful, None, tc, str(tmp_path / "autoencoder.pt"))
    assert again.resume() and again.step == 200
    for a, b in zip(again.seg.state_dict().values(), seg.seg.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())


WORKER = Path(__file__).with_name("ddp_worker.py")


def test_two_process_torchrun_step_keeps_ranks_equal(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(WORKER), str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    for kind in ("autoencoder", "segmentor"):
        w0 = torch.load(tmp_path / f"{kind}-rank0.pt", weights_only=True)
        w1 = torch.load(tmp_path / f"{kind}-rank1.pt", weights_only=True)
        start = torch.load(tmp_path / f"{kind}-start.pt", weights_only=True)
        assert w0.keys() == w1.keys()
        for k in w0:
            torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=1e-6)
        assert any(not torch.equal(w0[k], start[k]) for k in w0)  # the step did change the weights


def test_csv_log_keeps_validation_columns_that_appear_later(tmp_path):
    from ARSegLib.training.checkpoint import CSVLog

    log = CSVLog(tmp_path / "log.csv")
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 2, "loss": 0.4, "val_ged": 0.3})
    log.write({"step": 3, "loss": 0.3})
    again = CSVLog(tmp_path / "log.csv")  # a resumed run appends with the wide header
    again.write({"step": 4, "loss": 0.2, "val_ged": 0.25})
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines == ["step,loss,val_ged", "1,0.5,", "2,0.4,0.3", "3,0.3,", "4,0.2,0.25"]


def test_presence_calibration_learns_which_crops_readers_mark():
    from ARSegLib.engine import build_arseg
    from ARSegLib.training.presence import fit_presence_head

    torch.manual_seed(0)
    _, seg = build_arseg(tiny_config(crop_size=32))
    rng = np.random.default_rng(0)

    def data(n):
        # bright blobs are marked by all readers, faint ones by one, none by no one
        images = rng.random((n, 1, 32, 32)).astype(np.float32) * 0.2
        masks = np.zeros((n, 4, 32, 32), np.uint8)
        for i in range(n):
            kind = i % 3
            if kind:
                images[i, 0, 10:20, 10:20] += 0.8 if kind == 2 else 0.3
                masks[i, : 4 if kind == 2 else 1, 12:18, 12:18] = 1
        return TrainData(images, masks)

    scores = fit_presence_head(seg.image_encoder, data(96), data(48), epochs=150, lr=1e-2)
    assert scores["val_bce_after"] < scores["val_bce_before"] - 0.05, scores
    assert scores["val_abs_err_after"] < 0.2, scores


def _noise_with_a_box(n: int, box) -> TrainData:
    """n noise images of 32 x 32 whose four readers all mark the same box."""
    masks = np.zeros((n, 4, 32, 32), np.uint8)
    masks[(slice(None), slice(None)) + tuple(box)] = 1
    return TrainData(np.random.default_rng(0).random((n, 1, 32, 32)).astype(np.float32), masks)


def test_decoder_stage_replaces_only_the_decoder(tmp_path):
    import dataclasses

    from ARSegLib.training.trainer import DecoderTrainer

    data = _noise_with_a_box(16, (slice(8, 20), slice(10, 24)))
    cfg = tiny_config(crop_size=32)
    tc = TrainConfig(out_dir=str(tmp_path), device="cpu", steps=4, batch=4, ae_plain_steps=2,
                     eval_every=10 ** 9, save_every=10 ** 9, log_every=2)
    ae = AutoencoderTrainer(cfg, data, None, tc)
    ae.fit()
    light = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder, decoder_channels=8))
    tc.ae_plain_steps = 0
    dec = DecoderTrainer(light, data, None, tc, str(tmp_path / "autoencoder.pt"))
    dec.fit()
    old, new = ae.ae.state_dict(), dec.ae.state_dict()
    for k in new:
        if k.startswith("decoder."):
            continue
        assert torch.equal(old[k], new[k]), k  # encoder and quantizer untouched
    assert new["decoder.net.0.weight"].shape[0] == 8
    assert (tmp_path / "decoder.csv").exists() and (tmp_path / "decoder.pt").exists()


def test_segmentor_validation_reports_the_protocol_metrics(tmp_path):
    data = _noise_with_a_box(8, (slice(8, 20), slice(8, 20)))
    cfg = tiny_config(crop_size=32)
    tc = TrainConfig(out_dir=str(tmp_path), device="cpu", steps=2, batch=4, ae_plain_steps=1,
                     unet_pretrain_steps=0, eval_images=4, eval_samples=4)
    AutoencoderTrainer(cfg, data, None, tc).fit()
    val = SegmentorTrainer(cfg, data, data, tc, str(tmp_path / "autoencoder.pt")).validate()
    assert set(val) == {"val_ged", "val_hm_iou", "val_soft_dice", "val_soft_dice_strict", "val_presence_abs_err"}
    assert 0 <= val["val_hm_iou"] <= 1 and 0 <= val["val_soft_dice"] <= 1 and 0 <= val["val_soft_dice_strict"] <= 1


def test_fine_tuning_with_a_wider_image_encoder_keeps_every_weight_that_fits(tmp_path):
    from ARSegLib.cli import _init_from_model
    from ARSegLib.models import load_model

    shipped = load_model("lidc-nodule", "cpu")[0].segmentor.state_dict()
    card = {"training": {}}
    cfg, ae_ckpt, state, fresh = _init_from_model("lidc-nodule", tmp_path, card)
    assert fresh == [] and all(torch.equal(state[k], shipped[k]) for k in shipped)
    assert Path(ae_ckpt).exists() and card["training"]["initialised_from"]["model"] == "lidc-nodule"

    wide, _, state, fresh = _init_from_model("lidc-nodule", tmp_path, {"training": {}},
                                             {"segmentor": {"unet_channels": [32, 48, 64, 80]}})
    assert wide.segmentor.unet_channels == (32, 48, 64, 80)
    assert wide.autoencoder == cfg.autoencoder and wide.segmentor.embed_dim == cfg.segmentor.embed_dim
    assert fresh and all(k.startswith("image_encoder.") for k in fresh)
    assert state["image_encoder.stem.0.weight"].shape[0] == 32
    for k, v in state.items():  # the transformer, its head and embeddings come over unchanged
        if not k.startswith("image_encoder."):
            assert torch.equal(v, shipped[k]), k
    with pytest.raises(SystemExit, match="unknown segmentor fields"):
        _init_from_model("lidc-nodule", tmp_path, {"training": {}}, {"segmentor": {"unet_width": 3}})
    with pytest.raises(SystemExit, match="only \"segmentor\" fields"):  # the autoencoder is the model's own
        _init_from_model("lidc-nodule", tmp_path, {"training": {}}, {"autoencoder": {"vocab_size": 512}})


def test_a_deeper_transformer_starts_as_the_model_it_grows_from(tmp_path):
    from ARSegLib.cli import _init_from_model
    from ARSegLib.engine import build_arseg
    from ARSegLib.models import load_model

    shipped = load_model("lidc-nodule", "cpu")[0]
    deeper, _, state, fresh = _init_from_model("lidc-nodule", tmp_path, {"training": {}},
                                               {"segmentor": {"depth": shipped.config.segmentor.depth + 2}})
    assert fresh and all(k.startswith("blocks.") for k in fresh)
    seg = build_arseg(deeper)[1]
    seg.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, 128, 128, generator=g)
    x = torch.randn(2, deeper.autoencoder.n_tokens - 1, deeper.autoencoder.code_dim, generator=g)
    with torch.no_grad():
        want, _ = shipped.segmentor.eval()(img, x)
        got, _ = seg.eval()(img, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
