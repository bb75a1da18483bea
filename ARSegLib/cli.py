"""The `arseg` command: train, eval, segment, batch, bench."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

LIDC_CARD = {
    "description": "AR-Seg lung-nodule model: 2D 128 x 128 axial crops around a nodule, 16 samples, "
                   "consensus and disagreement.",
    "crop_size": 128,
    # LIDC crops are at each scan's native in-plane spacing (about 0.55-0.9 mm); the volume pipeline
    # resamples a click's region to this nominal spacing.
    "pixel_spacing_mm": 0.7,
    "intensity": {"method": "minmax_per_crop",
                  "description": "each 128 x 128 crop's own HU range mapped linearly to [0, 1] "
                                 "(as the LIDC-IDRI-slices PNGs: 255 * (HU - min) / (max - min))"},
    "labels": {"1": "Lung nodule"},
    "training": {"data": "LIDC-IDRI-slices subset in ../shared/data/lidc (360 patients), split train "
                         "of splits.json (252 patients, 4509 crops, 4 readers each); checkpoints and "
                         "sampling settings chosen on val"},
}


def _add_common_train(p):
    p.add_argument("--data", required=True, help="LIDC tar or directory (splits.json beside it)")
    p.add_argument("--out", default="checkpoints/lidc", help="folder for checkpoints and CSV logs")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--config", default=None, help="JSON file of ARSegConfig fields (default: the LIDC model)")
    p.add_argument("--tiny", action="store_true", help="tiny configuration (tests, smoke runs)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training crops")
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=None)


def _train_config(args, **defaults):
    from .training.trainer import TrainConfig

    tc = TrainConfig(out_dir=args.out, device=args.device, threads=args.threads, **defaults)
    for name in ("steps", "minutes", "batch", "lr", "eval_every", "eval_images"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(tc, name, v)
    return tc


def _engine_config(args):
    from .engine import ARSegConfig, tiny_config

    if args.tiny:
        return tiny_config(crop_size=128)
    if args.config:
        return ARSegConfig.from_dict(json.loads(Path(args.config).read_text()))
    return ARSegConfig()


def _lidc_train_val(args):
    from .data.lidc import load_lidc
    from .training.trainer import TrainData

    train = load_lidc(args.data, "train")
    if args.limit:
        train = train.subset(range(min(args.limit, len(train))))
    try:
        val = TrainData.from_lidc(load_lidc(args.data, "val"))
    except FileNotFoundError:
        val = None
    return TrainData.from_lidc(train), val


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    import os

    return f"{cpu}, {os.cpu_count()} logical cores{gpu}, torch {torch.__version__}"


def cmd_train(args):
    from .training.trainer import AutoencoderTrainer, SegmentorTrainer

    cfg = _engine_config(args)
    train, val = _lidc_train_val(args)
    if args.stage == "autoencoder":
        tc = _train_config(args, steps=2500, batch=64, lr=2e-3, eval_every=250, save_every=250)
        AutoencoderTrainer(cfg, train, val, tc).fit()
    else:
        tc = _train_config(args, steps=4000, batch=32, lr=1e-3, eval_every=400, save_every=100)
        card = json.loads(json.dumps(LIDC_CARD))
        card["training"]["hardware"] = hardware()
        ae_ckpt = args.autoencoder or str(Path(args.out) / "autoencoder.pt")
        SegmentorTrainer(cfg, train, val, tc, ae_ckpt, export_to=args.export, card_extra=card).fit()


def cmd_eval(args):
    import dataclasses

    import numpy as np
    from tqdm import tqdm

    from .data.lidc import load_lidc
    from .evaluation import evaluate
    from .models import load_model
    from .training.distributed import resolve_device

    predictor, card = load_model(args.model, resolve_device(args.device))
    data = load_lidc(args.data, args.split)
    if args.limit:
        data = data.subset(range(min(args.limit, len(data))))
    s = predictor.config.sampling
    over = {"n_samples": args.samples, "seed": args.seed}
    if args.temperature is not None:
        over["temperature"] = args.temperature
    if args.top_k is not None:
        over["top_k"] = args.top_k
    s = dataclasses.replace(s, **over)
    images = (data.images_Nhw[:, None] / 255.0).astype(np.float32)
    with tqdm(total=len(data), desc=f"eval {card.name} on {args.split}") as bar:
        res = evaluate(predictor, images, data.masks_NRhw, s, progress=bar.update)
    res.update({"model": card.name, "split": args.split, "samples": args.samples, "seed": args.seed,
                "temperature": s.temperature, "top_k": s.top_k, "data": str(args.data)})
    print(json.dumps({k: res[k] for k in ("ged", "hm_iou", "soft_dice", "n_images")}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="arseg", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the mask autoencoder or the segmentor")
    p.add_argument("stage", choices=["autoencoder", "segmentor"])
    _add_common_train(p)
    p.add_argument("--autoencoder", default=None, help="autoencoder checkpoint (default OUT/autoencoder.pt)")
    p.add_argument("--export", default=None, help="write the best model as EXPORT.safetensors + EXPORT.json")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="GED, HM-IoU, Soft-Dice of a model on LIDC crops")
    p.add_argument("--model", default="lidc-nodule", help="model name or card path")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_eval)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
