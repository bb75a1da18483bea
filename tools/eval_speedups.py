"""Accuracy of the output-changing speed-ups of issue 22 (BENCHMARKS.md): the shipped model's sampling with one
change each, on every crop of a split (N = 16, seed 0, the protocol of `arseg eval`), one JSON per variant.

    nice -n 10 python tools/eval_speedups.py --split val --variants shipped views1 oversample1 --out runs/speedups

Each variant is the card's SamplingConfig with the fields below replaced; `shipped` is the card's own, the
reference the others are held against (within 0.003 on GED, HM-IoU and strict Soft-Dice, the issue's bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ARSegLib.command_args import eval_data
from ARSegLib.evaluation import evaluate
from ARSegLib.models import load_model

VARIANTS = {
    "shipped": {},
    "oversample1": {"oversample": 1},  # 16 candidates, no herding
    "views1": {"views": 1},
    "views2": {"views": 2},
    # herding compares the candidates at scale k; only the 16 kept draw the finer scales
    "select4": {"selection_scale": 4},
    "select5": {"selection_scale": 5},
    "select6": {"selection_scale": 6},
    "select7": {"selection_scale": 7},
}
KEYS = ("ged", "hm_iou", "soft_dice_strict", "soft_dice", "presence_abs_err", "n_images")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lidc-nodule")
    ap.add_argument("--data", nargs="+", default=["../shared/data/lidc/lidc-idri-slices.tar"])
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["shipped", "views1", "oversample1"], choices=sorted(VARIANTS))
    ap.add_argument("--out", default="runs/speedups")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor, card = load_model(args.model)
    split, data = eval_data(args)
    images = (data.images_Nhw[:, None] / 255.0).astype(np.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        s = dataclasses.replace(predictor.config.sampling, n_samples=args.samples, seed=args.seed, **VARIANTS[name])
        t0 = time.perf_counter()
        res = evaluate(predictor, images, data.masks_NRhw, s)
        row = {k: res[k] for k in KEYS} | {"variant": name, "split": split, "sampling": dataclasses.asdict(s),
                                           "seconds": time.perf_counter() - t0, "model": card.name}
        (out / f"{split}-{name}.json").write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
