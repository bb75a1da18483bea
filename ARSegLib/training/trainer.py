"""Training of the mask autoencoder and of the next-scale segmentor: time- or step-bounded, resumable,
CSV-logged, single process or several under torchrun (DDP; gloo on CPU)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..data.augment import AugmentConfig, augment_batch
from ..engine import ARSegConfig, ARSegPredictor, build_arseg
from ..evaluation import evaluate
from .checkpoint import CSVLog, load_checkpoint, save_checkpoint
from .distributed import barrier, init_distributed, is_main, resolve_device


@dataclass
class TrainData:
    """Images in [0, 1] (N, C, h, w) float32 and every reader's label map (N, R, h, w) uint8."""

    images_NChw: np.ndarray
    masks_NRhw: np.ndarray

    @classmethod
    def from_lidc(cls, slices) -> TrainData:
        return cls((slices.images_Nhw[:, None] / 255.0).astype(np.float32), slices.masks_NRhw)

    @classmethod
    def from_brats(cls, root, split: str) -> TrainData:
        """The brain planes of data/brats.SPLIT[split] (FLAIR + T1ce, z-scored) and their label maps (one reader)."""
        from ..data import brats

        planes = brats.load_planes(root, brats.SPLIT[split], brats.MODALITIES, brats.CROP_SIZE,
                                   brats.PIXEL_SPACING_MM)
        return cls(np.clip(planes.images_NChw, -5.0, 10.0).astype(np.float32), planes.labels_Nhw[:, None])

    def __len__(self):
        return len(self.images_NChw)


@dataclass
class TrainConfig:
    out_dir: str = "checkpoints/run"
    device: str = "auto"
    minutes: float = 0.0  # stop after this much training time in total (0: no limit)
    steps: int = 1000  # stop after this many steps in total
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    log_every: int = 25
    eval_every: int = 500
    save_every: int = 200
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # autoencoder
    ae_plain_steps: int = 300  # steps without quantization before the codebook is seeded from data
    ae_reseed_every: int = 200  # re-seed codes unused since the last re-seed
    # segmentor
    unet_pretrain_steps: int = 500  # dense + presence loss only, before the transformer joins
    dense_weight: float = 1.0
    presence_weight: float = 0.5
    eval_images: int = 128
    eval_samples: int = 16


class Trainer:
    """Shared machinery: device, process group, optimizer schedule, checkpoint, log, progress bar."""

    kind = "base"

    def __init__(self, config: ARSegConfig, train: TrainData, val: Optional[TrainData], tc: TrainConfig):
        self.config, self.train_data, self.val_data, self.tc = config, train, val, tc
        self.rank, self.world = init_distributed(tc.device if tc.device != "auto" else
                                                 ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = resolve_device(tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        # tiny gradients late in training turn into denormal floats, which run many times slower on a CPU
        torch.set_flush_denormal(True)
        self.out = Path(tc.out_dir)
        self.ckpt_path = self.out / f"{self.kind}.pt"
        self.log = CSVLog(self.out / f"{self.kind}.csv") if is_main() else None
        self.g = torch.Generator().manual_seed(tc.seed * 1000 + self.rank)
        self.step, self.elapsed, self.best = 0, 0.0, None

    # subclass API
    def modules(self) -> dict:
        raise NotImplementedError

    def train_step(self, batch_idx: np.ndarray) -> dict:
        raise NotImplementedError

    def validate(self) -> dict:
        return {}

    def better(self, metrics: dict) -> bool:
        return False

    def on_best(self, metrics: dict):
        pass

    # machinery
    def make_optimizer(self, params):
        self.opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=self.tc.lr,
                                     weight_decay=self.tc.weight_decay, betas=(0.9, 0.98))

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(self.tc.warmup_steps, 1))
        frac = min(1.0, step / max(self.tc.steps, 1))
        return self.tc.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def state(self) -> dict:
        return {"kind": self.kind, "step": self.step, "elapsed": self.elapsed, "best": self.best,
                "config": self.config.to_dict(), "train_config": asdict(self.tc),
                "models": {k: m.state_dict() for k, m in self.modules().items()},
                "optimizer": self.opt.state_dict(), "rng": self.g.get_state()}

    def resume(self) -> bool:
        st = load_checkpoint(self.ckpt_path)
        if st is None:
            return False
        for k, m in self.modules().items():
            m.load_state_dict(st["models"][k])
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.elapsed, self.best = st["step"], st["elapsed"], st["best"]
        self.g.set_state(st["rng"])
        return True

    def save(self):
        if is_main():
            save_checkpoint(self.ckpt_path, self.state())
        barrier()

    def sample_batch(self) -> np.ndarray:
        return torch.randint(0, len(self.train_data), (self.tc.batch,), generator=self.g).numpy()

    def done(self) -> bool:
        if self.step >= self.tc.steps:
            return True
        return bool(self.tc.minutes) and self.elapsed >= self.tc.minutes * 60

    def all_reduce_done(self) -> bool:
        flag = torch.tensor([float(self.done())])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self):
        resumed = self.resume()
        if is_main():
            print(f"[{self.kind}] {'resumed at step ' + str(self.step) if resumed else 'new run'} on "
                  f"{self.device}, {self.world} process(es), out: {self.out}", flush=True)
        bar = tqdm(total=self.tc.steps, initial=self.step, desc=self.kind, disable=not is_main(),
                   dynamic_ncols=True)
        acc, n_acc = {}, 0
        while not self.all_reduce_done():
            t0 = time.time()
            for gr in self.opt.param_groups:
                gr["lr"] = self.lr_at(self.step) * gr.get("lr_scale", 1.0)
            row = self.train_step(self.sample_batch())
            self.step += 1
            self.elapsed += time.time() - t0
            for k, v in row.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            bar.update(1)
            if self.step % self.tc.log_every == 0 or self.done():
                means = {k: v / n_acc for k, v in acc.items()}
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(means.items())[:4]})
                metrics = {}
                if self.step % self.tc.eval_every == 0 or self.done():
                    metrics = self.validate()
                    if metrics and self.better(metrics):
                        self.best = metrics
                        if is_main():
                            self.on_best(metrics)
                if self.log is not None:
                    self.log.write({"step": self.step, "minutes": self.elapsed / 60,
                                    "lr": self.opt.param_groups[0]["lr"], **means, **metrics})
                acc, n_acc = {}, 0
            if self.step % self.tc.save_every == 0 or self.done():
                self.save()
        bar.close()
        self.save()
        return self.best


def _unwrap(m):
    return m.module if isinstance(m, DDP) else m


def _wrap(m, world, find_unused=False):
    return DDP(m, find_unused_parameters=find_unused) if world > 1 else m


class AutoencoderTrainer(Trainer):
    kind = "autoencoder"

    def __init__(self, config, train, val, tc):
        super().__init__(config, train, val, tc)
        torch.manual_seed(tc.seed)  # equal initial weights on every rank (DDP also broadcasts them)
        self.ae, _ = build_arseg(config)
        self.ae.to(self.device)
        # the codebook and phi sit idle during the plain warm-up steps
        self.model = _wrap(self.ae, self.world, find_unused=True)
        self.make_optimizer(self.ae.parameters())
        self.seeded = False
        # every reader's mask is a training example, empty ones included
        R = train.masks_NRhw.shape[1]
        self.n_masks = len(train) * R

    def modules(self):
        return {"autoencoder": self.ae}

    def state(self):
        return {**super().state(), "seeded": self.seeded}

    def resume(self):
        ok = super().resume()
        if ok:
            self.seeded = load_checkpoint(self.ckpt_path).get("seeded", self.step >= self.tc.ae_plain_steps)
        return ok

    def masks_for(self, batch_idx):
        R = self.train_data.masks_NRhw.shape[1]
        pick = torch.randint(0, self.n_masks, (len(batch_idx),), generator=self.g).numpy()
        m = torch.from_numpy(self.train_data.masks_NRhw[pick // R, pick % R][:, None].copy())
        img = torch.zeros(len(pick), 1, *m.shape[-2:])
        _, m = augment_batch(img, m, AugmentConfig(intensity_prob=0.0), self.g)
        return m[:, 0].to(self.device)

    def train_step(self, batch_idx):
        self.ae.train()
        masks = self.masks_for(batch_idx)
        quantize = self.step >= self.tc.ae_plain_steps
        if quantize and not self.seeded:
            self.seed_codebook(only_dead=False)
            self.seeded = True
        logits, vq_loss, _ = self.model(masks, quantize=quantize)
        rec = self.ae.reconstruction_loss(logits, masks)
        loss = rec + vq_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if quantize and self.step % self.tc.ae_reseed_every == 0 and self.step > self.tc.ae_plain_steps:
            self.seed_codebook(only_dead=True)
        return {"loss": loss.item(), "rec": rec.item(), "vq": vq_loss.item()}

    @torch.no_grad()
    def seed_codebook(self, only_dead: bool):
        """Codes from real residual vectors, the same on every rank (rank 0's choice is broadcast)."""
        masks = torch.cat([self.masks_for(np.zeros(self.tc.batch)) for _ in range(8)])
        nonempty = masks.flatten(1).amax(1) > 0
        masks = torch.cat([masks[nonempty], masks[~nonempty][:4]])
        vecs = self.ae.quantizer.residuals(self.ae.encoder(self.ae.mask_to_input(masks))).cpu()
        self.ae.quantizer.reseed(vecs, only_dead=only_dead, generator=self.g)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(self.ae.quantizer.codebook.weight.data, 0)

    @torch.no_grad()
    def validate(self):
        if self.val_data is None or not self.seeded:
            return {}
        self.ae.eval()
        m = torch.from_numpy(self.val_data.masks_NRhw.reshape(-1, *self.val_data.masks_NRhw.shape[-2:]))
        m = m[: 2048].to(self.device)
        idx = self.ae.mask_to_idx(m)
        rec = self.ae.idx_to_masks(idx)[-1]
        a, b = rec.flatten(1) > 0, m.flatten(1) > 0
        inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        nonempty = b.any(1)
        used = torch.unique(torch.cat([i.flatten() for i in idx])).numel()
        return {"val_iou": iou.mean().item(), "val_iou_nonempty": iou[nonempty].mean().item(),
                "codes_used": float(used)}

    def better(self, m):
        return self.best is None or m["val_iou_nonempty"] > self.best["val_iou_nonempty"]


class DecoderTrainer(AutoencoderTrainer):
    """A new mask decoder (e.g. a lighter one, for speed) behind a trained encoder and quantizer, both frozen.

    The segmentor only ever sees the quantizer's codes and partial sums, so a model's decoder can be replaced
    without retraining its segmentor."""

    kind = "decoder"

    def __init__(self, config, train, val, tc, autoencoder_ckpt):
        super().__init__(config, train, val, tc)
        st = load_checkpoint(autoencoder_ckpt)
        if st is None:
            raise FileNotFoundError(f"autoencoder checkpoint not found: {autoencoder_ckpt}")
        old = {k: v for k, v in st["models"]["autoencoder"].items() if not k.startswith("decoder.")}
        missing, unexpected = self.ae.load_state_dict(old, strict=False)
        assert not unexpected and all(k.startswith("decoder.") for k in missing), (missing, unexpected)
        self.ae.encoder.requires_grad_(False)
        self.ae.quantizer.requires_grad_(False)
        self.seeded = True
        self.make_optimizer(self.ae.decoder.parameters())

    def train_step(self, batch_idx):
        self.ae.decoder.train()
        masks = self.masks_for(batch_idx)
        with torch.no_grad():
            f_hat = self.ae.quantizer.idx_to_partial_sums(self.ae.mask_to_idx(masks))[-1]
        rec = self.ae.reconstruction_loss(self.ae.decoder(f_hat), masks)
        self.opt.zero_grad(set_to_none=True)
        rec.backward()
        self.opt.step()
        return {"loss": rec.item(), "rec": rec.item()}


class SegmentorTrainer(Trainer):
    kind = "segmentor"

    def __init__(self, config, train, val, tc, autoencoder_ckpt, export_to: Optional[str] = None,
                 card_extra: Optional[dict] = None, init_segmentor: Optional[dict] = None):
        super().__init__(config, train, val, tc)
        torch.manual_seed(tc.seed)
        self.ae, self.seg = build_arseg(config)
        st = load_checkpoint(autoencoder_ckpt)
        if st is None:
            raise FileNotFoundError(f"autoencoder checkpoint not found: {autoencoder_ckpt}")
        self.ae.load_state_dict(st["models"]["autoencoder"])
        self.ae.to(self.device).eval().requires_grad_(False)
        if init_segmentor is not None:  # fine-tuning; resume() replaces it when a checkpoint exists
            self.seg.load_state_dict(init_segmentor)
        self.seg.to(self.device)
        self.model = _wrap(self.seg, self.world)
        self.make_optimizer(self.seg.parameters())
        self.export_to, self.card_extra = export_to, card_extra or {}
        self.binary = config.autoencoder.n_classes <= 1

    def modules(self):
        return {"segmentor": self.seg}

    def dense_loss(self, logits, masks_BRhw):
        if self.binary:
            soft = (masks_BRhw > 0).float().mean(1, keepdim=True)
            prob = torch.sigmoid(logits)
            inter = (prob * soft).sum((1, 2, 3))
            dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + soft.sum((1, 2, 3)) + 1)
            return F.binary_cross_entropy_with_logits(logits, soft) + dice.mean()
        C = self.config.autoencoder.n_classes
        soft = F.one_hot(masks_BRhw.long(), C).float().mean(1).permute(0, 3, 1, 2)
        return -(soft * F.log_softmax(logits, 1)).sum(1).mean()

    def train_step(self, batch_idx):
        self.seg.train()
        img = torch.from_numpy(self.train_data.images_NChw[batch_idx].copy())
        masks = torch.from_numpy(self.train_data.masks_NRhw[batch_idx].copy())
        img, masks = augment_batch(img, masks, self.tc.augment, self.g)
        img, masks = img.to(self.device), masks.to(self.device)
        B, R = masks.shape[:2]
        marked_BR = masks.flatten(2).amax(2) > 0
        presence = marked_BR.float().mean(1)
        # the reader whose tokens are the target: at random, among those who marked the crop when the
        # presence gate decides emptiness, else among all
        weights = marked_BR.float() + 1e-6 if self.config.segmentor.presence_gate else torch.ones(B, R)
        reader = torch.multinomial(weights.cpu(), 1, generator=self.g)[:, 0].to(self.device)
        target_mask = masks[torch.arange(B, device=self.device), reader]
        with torch.no_grad():
            idx_list = self.ae.mask_to_idx(target_mask)
            x_BLC = self.ae.quantizer.idx_to_teacher_input(idx_list)
        logits_BLV, feats = self.model(img, x_BLC)
        dense = self.dense_loss(feats.dense_logits_BChw, masks)
        pres = F.binary_cross_entropy_with_logits(feats.presence_logit_B, presence)
        loss = self.tc.dense_weight * dense + self.tc.presence_weight * pres
        row = {"dense": dense.item(), "presence": pres.item()}
        use_rows = marked_BR.any(1) if self.config.segmentor.presence_gate else torch.ones(B, dtype=torch.bool)
        if self.step >= self.tc.unet_pretrain_steps and use_rows.any():
            target_BL = torch.cat(idx_list, 1)
            ce = F.cross_entropy(logits_BLV[use_rows].flatten(0, 1), target_BL[use_rows].flatten())
            loss = loss + ce
            row["ce"] = ce.item()
        else:
            loss = loss + 0.0 * logits_BLV.sum()  # every parameter takes part (DDP)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.seg.parameters(), 2.0)
        self.opt.step()
        row["loss"] = loss.item()
        return row

    def predictor(self) -> ARSegPredictor:
        return ARSegPredictor(self.config, self.ae, self.seg, self.device)

    @torch.no_grad()
    def validate(self):
        if self.val_data is None or self.step < self.tc.unet_pretrain_steps or not is_main():
            return {}
        n = min(self.tc.eval_images, len(self.val_data))
        pick = np.random.default_rng(0).choice(len(self.val_data), n, replace=False)  # the same images each time
        s = replace(self.config.sampling, n_samples=self.tc.eval_samples)
        res = evaluate(self.predictor(), self.val_data.images_NChw[pick], self.val_data.masks_NRhw[pick], s)
        self.seg.train()
        keep = ("ged", "hm_iou", "soft_dice", "soft_dice_strict", "presence_abs_err")
        return {f"val_{k}": res[k] for k in keep}

    def better(self, m):
        return self.best is None or m["val_ged"] < self.best["val_ged"]

    def on_best(self, metrics):
        if self.export_to:
            from ..models import export_model

            extra = dict(self.card_extra)
            extra.setdefault("training", {})
            extra["training"] = {**extra["training"], "segmentor_step": self.step,
                                 "segmentor_minutes": round(self.elapsed / 60, 1), "val_during_training": metrics}
            export_model(self.export_to, self.config, self.ae, self.seg, extra)
