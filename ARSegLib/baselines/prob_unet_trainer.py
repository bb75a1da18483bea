"""Training of the Probabilistic U-Net baseline on the shared Trainer machinery (resumable checkpoint with
optimizer and RNG state, CSV log, progress bar, time/step bounds) and the repository's augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.augment import augment_batch
from ..training.distributed import is_main
from ..training.trainer import TrainConfig, TrainData, Trainer
from .prob_unet import ProbUNetConfig, build_prob_unet, evaluate_prob_unet, save_prob_unet

BEST_NAME = "prob_unet_best.pt"


class ProbUNetTrainer(Trainer):
    """Each step: a batch of augmented crops, one reader's mask per crop drawn uniformly among the four
    (empty masks included, as in the paper), loss = BCE + beta * KL. Validation: GED / HM-IoU / Soft-Dice of
    N prior samples on a fixed subset of val crops; the best (lowest GED) weights go to OUT/prob_unet_best.pt."""

    kind = "prob_unet"

    def __init__(self, config: ProbUNetConfig, train: TrainData, val: Optional[TrainData], tc: TrainConfig,
                 extra: Optional[dict] = None):
        super().__init__(config, train, val, tc)
        torch.manual_seed(tc.seed)
        self.model = build_prob_unet(config).to(self.device)
        self.make_optimizer(self.model.parameters())
        self.extra = extra or {}
        self.best_path = Path(tc.out_dir) / BEST_NAME

    def modules(self):
        return {"prob_unet": self.model}

    def train_step(self, batch_idx: np.ndarray) -> dict:
        self.model.train()
        img_BChw = torch.from_numpy(self.train_data.images_NChw[batch_idx].copy())
        masks_BRhw = torch.from_numpy(self.train_data.masks_NRhw[batch_idx].copy())
        img_BChw, masks_BRhw = augment_batch(img_BChw, masks_BRhw, self.tc.augment, self.g)
        B, R = masks_BRhw.shape[:2]
        reader_B = torch.randint(0, R, (B,), generator=self.g)
        mask_B1hw = masks_BRhw[torch.arange(B), reader_B][:, None].float().clamp(max=1)
        out = self.model.training_loss(img_BChw.to(self.device), mask_B1hw.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.opt.step()
        return {**{k: v.item() for k, v in out.items()}, "grad_norm": grad_norm.item()}

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_data is None or not is_main():
            return {}
        n = min(self.tc.eval_images, len(self.val_data))
        pick = np.sort(np.random.default_rng(0).choice(len(self.val_data), n, replace=False))  # the same each time
        res = evaluate_prob_unet(self.model, self.val_data.images_NChw[pick], self.val_data.masks_NRhw[pick],
                                 self.tc.eval_samples, seed=0, device=str(self.device))
        self.model.train()
        return {f"val_{k}": res[k] for k in ("ged", "hm_iou", "soft_dice", "soft_dice_strict")}

    def better(self, metrics: dict) -> bool:
        return self.best is None or metrics["val_ged"] < self.best["val_ged"]

    def on_best(self, metrics: dict):
        extra = {**self.extra, "step": self.step, "minutes": round(self.elapsed / 60, 2),
                 "val_during_training": metrics}
        save_prob_unet(self.best_path, self.model, extra)
