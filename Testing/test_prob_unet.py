"""The Probabilistic U-Net baseline (ARSegLib/baselines): shapes, the KL, sampling, a few training steps, the
resumable trainer, and `arseg train prob-unet` / `arseg eval --baseline prob-unet` on a synthetic LIDC folder.
No real data: seconds on a CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ARSegLib.baselines.prob_unet import (
    ProbUNet,
    ProbUNetConfig,
    evaluate_prob_unet,
    load_prob_unet,
    sample_masks,
    save_prob_unet,
    tiny_prob_unet_config,
)
from ARSegLib.baselines.prob_unet_trainer import BEST_NAME, ProbUNetTrainer
from ARSegLib.data.augment import AugmentConfig
from ARSegLib.training.trainer import TrainConfig, TrainData

NO_AUG = AugmentConfig(dihedral=False, rotate_deg=0.0, intensity_prob=0.0)
PROTOCOL_KEYS = {"ged", "hm_iou", "soft_dice", "soft_dice_strict", "n_images"}


def discs(n: int, size: int = 32, seed: int = 0):
    """Bright discs on noise; four readers with slightly different radii, some readers marking nothing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, 1, size, size), np.float32)
    masks = np.zeros((n, 4, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        r = rng.uniform(size * 0.1, size * 0.25)
        d = np.hypot(yy - cy, xx - cx)
        images[i, 0] = np.clip(0.2 + 0.6 * (d < r) + 0.05 * rng.standard_normal((size, size)), 0, 1)
        for k in range(4):
            if rng.random() < 0.8:
                masks[i, k] = d < r * rng.uniform(0.85, 1.15)
    return images, masks


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast, and far faster than two when the machine is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ProbUNet(tiny_prob_unet_config()).eval()


@pytest.mark.parametrize("stem_stride", [1, 2])
def test_shapes(stem_stride):
    torch.manual_seed(0)
    m = ProbUNet(ProbUNetConfig(crop_size=32, channels=(4, 8, 8, 16), prior_channels=(4, 8, 8, 8),
                                fcomb_channels=8, stem_stride=stem_stride))
    x_BChw = torch.rand(3, 1, 32, 32)
    out = m.training_loss(x_BChw, (torch.rand(3, 1, 32, 32) > 0.5).float())
    assert set(out) == {"loss", "rec", "kl"} and all(v.shape == () for v in out.values())
    assert out["kl"] >= 0 and torch.isfinite(out["loss"])
    assert m.sample_logits(x_BChw, 5).shape == (3, 5, 32, 32)
    s = m.sample(x_BChw, 4)
    assert s.shape == (3, 4, 32, 32) and s.dtype == torch.uint8 and set(s.unique().tolist()) <= {0, 1}


def test_config_round_trip_and_unknown_fields():
    cfg = ProbUNetConfig(latent_dim=4, channels=(8, 16, 32, 64))
    assert ProbUNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ProbUNetConfig.from_dict({"latent_dims": 4})


def test_kl_is_zero_when_posterior_equals_prior(model):
    x, m = torch.rand(4, 1, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()
    bias = torch.randn(2 * model.cfg.latent_dim)
    with torch.no_grad():
        for net in (model.prior, model.posterior):  # both give N(mu, sigma) from the same bias, whatever the input
            net.head.weight.zero_()
            net.head.bias.copy_(bias)
    assert model.training_loss(x, m)["kl"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.posterior.head.bias.add_(0.5)
    assert model.training_loss(x, m)["kl"].item() > 0.1


def test_samples_differ_across_draws_and_repeat_for_a_seed(model):
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # a prior of unit spread whose latent moves the logits, centred on the threshold
        model.prior.head.bias.zero_()
        model.fcomb[0].weight[:, -model.cfg.latent_dim:].mul_(20)
        logits = model.sample_logits(x, 16, torch.Generator().manual_seed(0))
        model.fcomb[-1].bias.sub_(logits.median())
    a = model.sample(x, 16, torch.Generator().manual_seed(0))
    b = model.sample(x, 16, torch.Generator().manual_seed(0))
    c = model.sample(x, 16, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({s.numpy().tobytes() for s in a[0]}) > 1  # the 16 samples of one image are not all one mask
    images = x.numpy()
    first = np.concatenate([s for _, s in sample_masks(model, images, 8, seed=3, batch=1)])
    again = np.concatenate([s for _, s in sample_masks(model, images, 8, seed=3, batch=1)])
    assert np.array_equal(first, again)


def test_a_few_training_steps_lower_the_loss(tmp_path):
    images, masks = discs(16)
    tc = TrainConfig(out_dir=str(tmp_path), steps=60, batch=8, lr=3e-3, warmup_steps=1, augment=NO_AUG,
                     eval_every=1000, log_every=1000, save_every=1000)
    torch.manual_seed(0)
    trainer = ProbUNetTrainer(tiny_prob_unet_config(), TrainData(images, masks), None, tc)
    losses = [trainer.train_step(trainer.sample_batch())["rec"] for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_trainer_resumes_validates_and_keeps_the_best(tmp_path):
    images, masks = discs(12)
    data = TrainData(images, masks)

    def trainer(steps):
        tc = TrainConfig(out_dir=str(tmp_path), steps=steps, batch=4, lr=1e-3, warmup_steps=1, augment=NO_AUG,
                         log_every=2, eval_every=2, save_every=2, eval_images=4, eval_samples=4)
        return ProbUNetTrainer(tiny_prob_unet_config(), data, data, tc)

    best = trainer(2).fit()
    assert set(best) == {"val_ged", "val_hm_iou", "val_soft_dice", "val_soft_dice_strict"}
    t = trainer(4)
    assert t.resume() and t.step == 2
    t.fit()
    assert t.step == 4
    m, st = load_prob_unet(tmp_path / BEST_NAME)
    assert st["extra"]["step"] in (2, 4) and isinstance(m, ProbUNet)
    m2, st2 = load_prob_unet(tmp_path / "prob_unet.pt")  # the training checkpoint loads too
    assert st2["step"] == 4
    assert (tmp_path / "prob_unet.csv").read_text().count("\n") == 3  # header + steps 2 and 4


def test_eval_returns_the_protocol_keys(model, tmp_path):
    images, masks = discs(5)
    res = evaluate_prob_unet(model, images, masks, n_samples=8, seed=0, batch=2)
    assert set(res) == PROTOCOL_KEYS and res["n_images"] == 5
    assert 0 <= res["hm_iou"] <= 1 and 0 <= res["soft_dice"] <= 1 and res["ged"] >= -1e-9
    # the same numbers from the weights saved and read back
    save_prob_unet(tmp_path / "w.pt", model)
    again = evaluate_prob_unet(load_prob_unet(tmp_path / "w.pt")[0], images, masks, n_samples=8, seed=0, batch=2)
    assert again == res


def write_lidc_folder(root, n: int = 6):
    """A synthetic LIDC layout of 128 x 128 crops (two patients), splits.json beside them."""
    images, masks = discs(n, size=128)
    for i in range(n):
        base = root / f"LIDC-IDRI-{i % 2 + 1:04d}" / "nodule-0"
        for sub, arr in [("images", (images[i, 0] * 255).astype(np.uint8))] + \
                        [(f"mask-{k}", masks[i, k] * 255) for k in range(4)]:
            (base / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(base / sub / f"slice-{i}.png")
    (root / "splits.json").write_text(json.dumps({"train": ["LIDC-IDRI-0001"], "val": ["LIDC-IDRI-0002"],
                                                  "test": ["LIDC-IDRI-0002"]}))
    return root


def test_arseg_train_and_eval_prob_unet(tmp_path, monkeypatch, capsys):
    from ARSegLib.cli import main

    monkeypatch.setenv("ARSEG_CACHE", str(tmp_path / "cache"))
    data = write_lidc_folder(tmp_path / "lidc")
    out = tmp_path / "run"
    assert main(["train", "prob-unet", "--data", str(data), "--out", str(out), "--tiny", "--steps", "2",
                 "--batch", "2", "--eval-every", "2", "--eval-images", "2", "--threads", "1"]) == 0
    assert (out / "prob_unet.pt").exists() and (out / BEST_NAME).exists()
    js = tmp_path / "test.json"
    assert main(["eval", "--baseline", "prob-unet", "--checkpoint", str(out / BEST_NAME), "--data", str(data),
                 "--split", "test", "--samples", "4", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert PROTOCOL_KEYS <= set(res) and res["n_images"] == 3 and res["split"] == "test"
    assert res["model"] == "prob-unet" and res["training"]["step"] == 2 and "hardware" in res["training"]
    with pytest.raises(SystemExit):
        main(["eval", "--baseline", "prob-unet", "--data", str(data)])
    assert "--checkpoint" in capsys.readouterr().err
