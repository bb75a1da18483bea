"""Pictures and tables for BENCHMARKS.md: training curves from the CSV logs, and a grid of test crops with
the four readers, the samples, the consensus and the disagreement.

    python tools/benchmark_figures.py curves checkpoints/lidc Resources/Benchmarks/training-curves.png
    python tools/benchmark_figures.py crops --model lidc-nodule --data ../shared/data/lidc/lidc-idri-slices.tar \
        --out Resources/Benchmarks/test-crops.png
    python tools/benchmark_figures.py table Resources/Benchmarks/test-arseg.json Resources/Benchmarks/test-unet.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_csv(path: Path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    cols = {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]) for k in rows[0]}
    return cols


def curves(log_dir: Path, out: Path):
    ae, seg = read_csv(log_dir / "autoencoder.csv"), read_csv(log_dir / "segmentor.csv")
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(ae["minutes"], ae["rec"], label="reconstruction loss")
    ax[0].plot(ae["minutes"], ae["vq"], label="VQ loss")
    ok = ~np.isnan(ae.get("val_iou_nonempty", np.full_like(ae["step"], np.nan)))
    if ok.any():
        a2 = ax[0].twinx()
        a2.plot(ae["minutes"][ok], ae["val_iou_nonempty"][ok], "o-", color="k", label="val IoU (non-empty)")
        a2.set_ylabel("val IoU, non-empty masks")
        a2.legend(loc="center right")
    ax[0].set(title="mask autoencoder", xlabel="training minutes (2-core CPU)")
    ax[0].legend(loc="upper right")
    for key, label in (("dense", "dense loss (U-Net)"), ("presence", "presence BCE"), ("ce", "token cross-entropy")):
        if key in seg:
            ax[1].plot(seg["minutes"], seg[key], label=label)
    ax[1].set(title="segmentor: training losses", xlabel="training minutes (2-core CPU)")
    ax[1].legend()
    ok = ~np.isnan(seg.get("val_ged", np.full_like(seg["step"], np.nan)))
    for key, label in (("val_ged", "GED (lower is better)"), ("val_hm_iou", "HM-IoU"), ("val_soft_dice", "Soft-Dice")):
        if key in seg and ok.any():
            ax[2].plot(seg["minutes"][ok], seg[key][ok], "o-", label=label)
    ax[2].set(title="segmentor: val (fixed 128 images, N = 16)", xlabel="training minutes (2-core CPU)")
    ax[2].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def crops(model: str, data: str, out: Path, n_crops: int = 4, seed: int = 0):
    from ARSegLib.data.lidc import load_lidc
    from ARSegLib.models import load_model

    predictor, card = load_model(model, "cpu")
    test = load_lidc(data, "test")
    counts = test.masks_NRhw.reshape(len(test), 4, -1).max(2).sum(1)
    rng = np.random.default_rng(seed)
    # show the interesting cases: readers that all agree, and readers that disagree on presence
    pick = [int(rng.choice(np.flatnonzero(counts == c))) for c in (4, 4, 3, 2, 1)[:n_crops + 1]]
    images = (test.images_Nhw[pick][:, None] / 255.0).astype(np.float32)
    res = predictor.segment(images)
    n_show = 8
    cols = 1 + 4 + n_show + 2
    fig, axes = plt.subplots(len(pick), cols, figsize=(cols * 1.3, len(pick) * 1.4))
    for r, i in enumerate(pick):
        panels = [("image", test.images_Nhw[i], "gray")]
        panels += [(f"reader {j + 1}", test.masks_NRhw[i, j], "gray") for j in range(4)]
        panels += [(f"sample {j + 1}", res.samples_BNhw[r, j], "gray") for j in range(n_show)]
        panels += [("consensus", res.consensus_Bhw[r], "gray"), ("disagreement", res.disagreement_Bhw[r], "hot")]
        for c, (title, img, cmap) in enumerate(panels):
            a = axes[r, c]
            a.imshow(img, cmap=cmap, vmin=0, vmax=img.max() if title == "image" else 1)
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(f"{counts[i]}/4 readers\npresence {res.presence_B[r]:.2f}", fontsize=7)
    fig.suptitle(f"{card.name}: LIDC test crops (first {n_show} of 16 samples)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def table(paths):
    rows = [json.loads(Path(p).read_text()) for p in paths]
    print("| model | GED ↓ | HM-IoU ↑ | Soft-Dice ↑ | images |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        name = r.get("baseline", r.get("model", "?")).split(":")[0]
        print(f"| {name} | {r['ged']:.3f} | {r['hm_iou']:.3f} | {r['soft_dice']:.3f} | {r['n_images']} |")
    first = rows[0]
    k = 1
    if f"scale{k}_soft_dice" in first:
        print("\n| scale k | side | Soft-Dice of consensus after k | IoU with final consensus |")
        print("| ---: | ---: | ---: | ---: |")
        while f"scale{k}_soft_dice" in first:
            print(f"| {k} | {k} × {k} | {first[f'scale{k}_soft_dice']:.3f} | {first[f'scale{k}_iou_final']:.3f} |")
            k += 1


def card_metrics(card_path: Path, arseg_json: Path, unet_json: Path, cost: dict, levels_json: Path = None):
    """Record the measured test metrics, the commands that reproduce them and the training cost in the card.
    The card's sha256 covers the weights only, so the weights stay valid."""
    card = json.loads(card_path.read_text())
    a, u = json.loads(arseg_json.read_text()), json.loads(unet_json.read_text())
    v = json.loads(levels_json.read_text()) if levels_json and levels_json.exists() else None
    keys = ("ged", "hm_iou", "soft_dice", "n_images")
    card["metrics"] = {
        "test": {k: a[k] for k in keys} | {"samples": a["samples"], "seed": a["seed"],
                                           "temperature": a["temperature"]},
        "test_per_scale": {k: v for k, v in a.items() if k.startswith("scale")},
        "test_unet_baseline": {k: u[k] for k in keys},
        **({"test_unet_levels_baseline": {k: v[k] for k in keys}} if levels_json and levels_json.exists() else {}),
        "protocol": "../shared/data/README.md: per image against the 4 readers, mean over every test image",
        "command": "arseg eval --model lidc-nodule --data ../shared/data/lidc/lidc-idri-slices.tar "
                   "--split test --samples 16 --seed 0 --json test.json",
    }
    card.setdefault("training", {})["cost"] = cost
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("curves")
    p.add_argument("log_dir", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("crops")
    p.add_argument("--model", default="lidc-nodule")
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("card")
    p.add_argument("card", type=Path)
    p.add_argument("arseg_json", type=Path)
    p.add_argument("unet_json", type=Path)
    p.add_argument("--cost", required=True, help="JSON of the training cost")
    p.add_argument("--levels-json", type=Path, default=None, help="the unet-levels baseline's eval JSON")
    p = sub.add_parser("table")
    p.add_argument("jsons", nargs="+")
    a = ap.parse_args()
    if a.cmd == "curves":
        curves(a.log_dir, a.out)
    elif a.cmd == "card":
        card_metrics(a.card, a.arseg_json, a.unet_json, json.loads(a.cost), a.levels_json)
    elif a.cmd == "crops":
        crops(a.model, a.data, a.out)
    else:
        table(a.jsons)


if __name__ == "__main__":
    main()
