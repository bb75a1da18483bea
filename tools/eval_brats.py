"""Per-region Dice of a BraTS model on whole held-out volumes: the AR-Seg consensus, the samples' spread, and the
U-Net baseline (the model's own image encoder's dense head, trained with it on the same split, argmax per pixel).

    python tools/eval_brats.py --model brats-glioma --cases brats_2013_pat0004_1 brats_2013_pat0005_1 \
        --json Resources/Benchmarks/brats-glioma-eval.json

Every case runs through volume_regions.segment_volume_regions (the path `arseg segment --input` takes) on its
own 1 mm grid; Dice is taken there against the expert labels (BraTS regions: whole tumour 1+2+4, tumour core 1+4,
enhancing tumour 4). The U-Net sees the same crops (same grid, same preparation) and is mapped back the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ARSegLib.data.brats import BRATS_LABELS, read_volume_ras  # noqa: E402
from ARSegLib.metrics import dice  # noqa: E402


def unet_labels(predictor, card, stack, m):
    """The dense head's argmax on every plane of the whole-volume grid, mapped to the volume (uint8 labels)."""
    import torch

    from ARSegLib.pipeline import grid_box_in_volume, map_grid_to_volume, resample_to_grid, whole_volume_grid
    from ARSegLib.volume_regions import prepare_input_crops

    task = card.task
    crop = predictor.crop_size
    grid = whole_volume_grid(stack.shape[1:], m, crop, task.pixel_spacing_mm)
    assert grid.shape[1:] == (crop, crop), "one tile per plane"
    planes = np.stack([resample_to_grid(a, m, grid, task.fill_value or 0.0) for a in stack], 1)
    prepared, signal = prepare_input_crops(planes, task)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    encoder = predictor.segmentor.image_encoder
    with torch.inference_mode():
        rows = np.flatnonzero(signal)
        for i in range(0, len(rows), 32):
            chunk = rows[i:i + 32]
            logits = encoder(torch.from_numpy(prepared[chunk])).dense_logits_BChw
            labels[chunk] = logits.argmax(1).numpy().astype(np.uint8)
    box = grid_box_in_volume(grid, stack.shape[1:], m)
    out = np.zeros(stack.shape[1:], dtype=np.uint8)
    out[tuple(slice(a, b) for a, b in box)] = map_grid_to_volume({"l": labels}, grid, m, box)["l"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="brats-glioma")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "brats"))
    ap.add_argument("--cases", nargs="+", required=True)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from ARSegLib.command_args import hardware
    from ARSegLib.models import load_model
    from ARSegLib.pipeline import SegmentSettings
    from ARSegLib.volume_regions import segment_volume_regions

    torch.set_num_threads(args.threads)
    predictor, card = load_model(args.model)
    task = card.task
    lut = np.zeros(256, np.uint8)
    for src, dst in BRATS_LABELS.items():
        lut[src] = dst
    rows = []
    for cid in args.cases:
        case = Path(args.data) / cid
        volumes = {name: read_volume_ras(case / f"{cid}_{name}.nii.gz") for name in task.input_names}
        seg, _ = read_volume_ras(case / f"{cid}_seg.nii.gz")
        truth = task.region_masks(lut[seg])
        t0 = time.perf_counter()
        result = segment_volume_regions(volumes, predictor, card, SegmentSettings(n_samples=args.samples))
        seconds = time.perf_counter() - t0
        stack = np.stack([volumes[n][0].astype(np.float32) for n in task.input_names])
        unet = task.region_masks(unet_labels(predictor, card, stack, volumes[task.input_names[0]][1]))
        report = result.report(cid)
        row = {"case": cid, "seconds": round(seconds, 1), "n_lesions": result.n_lesions, "regions": {}}
        for entry in report["regions"]:
            name = entry["name"]
            cons = result.region_consensus(name) > 0
            row["regions"][name] = {
                "dice_consensus": round(dice(cons, truth[name]), 4),
                "dice_unet": round(dice(unet[name], truth[name]), 4),
                "true_volume_ml": round(float(truth[name].sum()) * result.voxel_volume_mm3 / 1000, 2),
                "consensus_volume_ml": round(entry["consensus_volume_ml"], 2),
                "sample_volume_ml": {k: round(v, 2) for k, v in entry["sample_volume_ml"].items()},
                "unet_volume_ml": round(float(unet[name].sum()) * result.voxel_volume_mm3 / 1000, 2),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(task.region_names)
    mean = {n: {k: round(float(np.mean([r["regions"][n][k] for r in rows])), 4)
                for k in ("dice_consensus", "dice_unet")} for n in names}
    out = {"model": card.name, "sha256": card.data["sha256"], "samples": args.samples, "cases": rows,
           "mean": mean, "machine": hardware(), "threads": args.threads,
           "command": "python tools/eval_brats.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps({"mean": mean}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
