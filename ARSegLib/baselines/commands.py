"""`arseg train prob-unet` and `arseg eval --baseline prob-unet` (wired in ARSegLib/cli.py, which calls here)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path


def prob_unet_config(args):
    from ..command_args import config_from_args
    from .prob_unet import ProbUNetConfig, tiny_prob_unet_config

    return config_from_args(args, ProbUNetConfig, tiny_prob_unet_config)


def train_prob_unet(args, train, val):
    """Defaults sized for ~45 minutes on one 2.8 GHz core (about 0.9 s per step of 32 crops)."""
    from ..command_args import hardware, train_config
    from .prob_unet import count_parameters
    from .prob_unet_trainer import ProbUNetTrainer

    cfg = prob_unet_config(args)
    tc = train_config(args, steps=2800, batch=32, lr=1e-3, warmup_steps=100, eval_every=250, save_every=100,
                       eval_images=128, eval_samples=16)
    extra = {"hardware": hardware(), "threads": args.threads, "data": " ".join(map(str, args.data)),
             "train_crops": len(train), "batch": tc.batch}
    trainer = ProbUNetTrainer(cfg, train, val, tc, extra)
    print(f"[prob_unet] {count_parameters(trainer.model) / 1e6:.2f} M parameters, {len(train)} training crops",
          flush=True)
    best = trainer.fit()
    print(json.dumps({"step": trainer.step, "minutes": round(trainer.elapsed / 60, 2), "best": best}, indent=2))


def eval_prob_unet(args):
    """The protocol's metrics of N prior samples per crop, as `arseg eval` writes them for the other models."""
    import numpy as np
    from tqdm import tqdm

    from ..command_args import eval_data
    from ..training.distributed import resolve_device
    from .prob_unet import evaluate_prob_unet, load_prob_unet

    if not args.checkpoint:
        print("arseg eval: --baseline prob-unet needs --checkpoint (e.g. checkpoints/prob-unet/prob_unet_best.pt)",
              file=sys.stderr)
        sys.exit(2)
    device = resolve_device(args.device)
    model, st = load_prob_unet(args.checkpoint, str(device))
    if args.temperature is not None:
        model.cfg = dataclasses.replace(model.cfg, temperature=args.temperature)
    split, data = eval_data(args)
    images = (data.images_Nhw[:, None] / 255.0).astype(np.float32)
    t0 = time.time()
    with tqdm(total=len(data), desc=f"eval prob-unet on {split}") as bar:
        res = evaluate_prob_unet(model, images, data.masks_NRhw, args.samples, args.seed, device=str(device),
                                 progress=bar.update)
    training = dict(st.get("extra", {}))
    if "step" in st:  # a training checkpoint rather than the best weights
        training.update(step=st["step"], minutes=round(st["elapsed"] / 60, 2))
    res.update({"model": "prob-unet", "checkpoint": str(args.checkpoint), "split": split, "samples": args.samples,
                "seed": args.seed, "temperature": model.cfg.temperature, "threshold": model.cfg.threshold,
                "data": " ".join(args.data), "eval_seconds": round(time.time() - t0, 1),
                "baseline": "prob-unet: Probabilistic U-Net (Kohl et al. 2018) trained here, N samples from the prior",
                "config": model.cfg.to_dict(), "training": training})
    keys = [k for k in ("ged", "hm_iou", "soft_dice", "soft_dice_strict", "n_images") if k in res]
    print(json.dumps({k: res[k] for k in keys}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
