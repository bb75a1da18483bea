"""Interactive-correction benchmark (issue 21, section 5): how much do include / exclude points help?

The standard protocol of interactive segmentation. On LIDC crops: the target is one reader's mask (each reader in
turn, every crop where that reader marked something); the start is the plain click's result on the crop (the
shipped model's sampling, its consensus); each simulated correction is placed at the centre of the largest error
region (the pixel of the largest connected component of consensus XOR target farthest from the component's border:
the maximum of its distance transform), an exclude point inside a false positive, an include point inside a false
negative; the corrections accumulate (each run sees every point so far). Reported: mean Dice of the consensus with
the target after 0..n corrections, beside the best of the 16 unrefined samples (what picking a sample alone gets).
Sampling under the points is engine/steering.py's, the same the pipeline's refinement uses. The same in 3D on a
CT with a nodule label (lung1, the demo): the click at the label's centroid, corrections at the centre of the
largest 3D error component, each through `pipeline.segment_click(..., refinement, previous)`.

    python tools/interactive_corrections.py --split test --pairs 300 --json runs/corrections-test.json
    python tools/interactive_corrections.py --ct Resources/Demo/lung1-slab.nrrd Resources/Demo/lung1-slab-label.nrrd
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ARSegLib.metrics import dice
from ARSegLib.prompts import EXCLUDE, INCLUDE

ROOT = Path(__file__).resolve().parents[1]
LIDC = ROOT.parent / "shared" / "data" / "lidc"


# ------------------------------------------------------------------------------------------ pure logic

def correction_point(prediction: np.ndarray, target: np.ndarray, spacing: Optional[Sequence[float]] = None
                     ) -> Optional[Tuple[str, Tuple[int, ...]]]:
    """(kind, index) of the next simulated correction, or None when the prediction equals the target.

    The largest connected component of the error (prediction XOR target; 8-connected in 2D, 26 in 3D) and in it
    the pixel farthest from the component's border (Euclidean distance transform, in `spacing` units); inside a
    false positive an exclude point, inside a false negative an include point."""
    pred, tgt = prediction > 0, target > 0
    error = pred ^ tgt
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=ndimage.generate_binary_structure(error.ndim, error.ndim))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    # padded so that the array's edge counts as the component's border too
    dist = ndimage.distance_transform_edt(np.pad(largest, 1), sampling=spacing)[(slice(1, -1),) * error.ndim]
    index = tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape))
    return (EXCLUDE if pred[index] else INCLUDE), index


def summarise(dice_TS: np.ndarray, best_T: np.ndarray) -> Dict[str, object]:
    """Mean Dice after 0..n corrections (rows: trials, columns: corrections made) and of the best sample."""
    means = dice_TS.mean(0)
    return {"trials": int(dice_TS.shape[0]), "mean_dice_after_corrections": [round(float(v), 4) for v in means],
            "gain_after_last": round(float(means[-1] - means[0]), 4),
            "best_of_unrefined_samples": round(float(best_T.mean()), 4)}


def choose_pairs(masks_NRhw: np.ndarray, n_pairs: Optional[int], seed: int) -> List[Tuple[int, int]]:
    """Every (crop, reader) whose reader marked something, or a seeded random subset of n_pairs of them."""
    marked = masks_NRhw.reshape(masks_NRhw.shape[0], masks_NRhw.shape[1], -1).any(2)
    pairs = [tuple(int(v) for v in p) for p in np.argwhere(marked)]
    if n_pairs is not None and n_pairs < len(pairs):
        pick = np.random.default_rng(seed).choice(len(pairs), size=n_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(pick)]
    return pairs


# ------------------------------------------------------------------------------------------ crops

def crop_trials(predictor, images_Nhw: np.ndarray, targets_Nhw: np.ndarray, n_corrections: int = 3,
                steering=None, batch: int = 16, log=None) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Dice (trials, n_corrections + 1) of the consensus after each correction, best-of-samples Dice (trials,),
    and per trial the prompts placed and how many candidates satisfied them. images: prepared crops in [0, 1]."""
    from ARSegLib.engine.steering import CropPrompts, sample_under_prompts

    T = len(images_Nhw)
    sampling = predictor.config.sampling
    dice_TS = np.zeros((T, n_corrections + 1))
    best_T = np.zeros(T)
    records: List[Dict] = [{"prompts": [], "satisfied": []} for _ in range(T)]
    prompts = [CropPrompts() for _ in range(T)]
    current = [None] * T
    for b0 in range(0, T, batch):
        sl = slice(b0, min(T, b0 + batch))
        res = predictor.segment(images_Nhw[sl], sampling, crop_ids=list(range(b0, sl.stop)))
        for t in range(b0, sl.stop):
            current[t] = res.consensus_Bhw[t - b0]
            dice_TS[t, 0] = dice(current[t], targets_Nhw[t])
            best_T[t] = max(dice(s, targets_Nhw[t]) for s in res.samples_BNhw[t - b0])
    for step in range(1, n_corrections + 1):
        active = []
        for t in range(T):
            nxt = correction_point(current[t], targets_Nhw[t])
            if nxt is None:
                dice_TS[t, step] = dice_TS[t, step - 1]
                continue
            kind, rc = nxt
            p = prompts[t]
            prompts[t] = CropPrompts(include_rc=p.include_rc + ((rc,) if kind == INCLUDE else ()),
                                     exclude_rc=p.exclude_rc + ((rc,) if kind == EXCLUDE else ()))
            records[t]["prompts"].append({"kind": kind, "rc": list(rc)})
            active.append(t)
        for a0 in range(0, len(active), batch):
            chunk = active[a0:a0 + batch]
            out = sample_under_prompts(predictor, images_Nhw[chunk], sampling, prompts=[prompts[t] for t in chunk],
                                       steering=steering, crop_ids=chunk)
            for b, t in enumerate(chunk):
                current[t] = out.result.consensus_Bhw[b]
                dice_TS[t, step] = dice(current[t], targets_Nhw[t])
                records[t]["satisfied"].append({"candidates": int(out.candidates_B[b]),
                                                "satisfying_all": int(out.satisfying_all_B[b]),
                                                "kept_satisfy": bool(out.kept_satisfy_B[b])})
        if log:
            log(f"correction {step}: {len(active)} trials refined, mean Dice {dice_TS[:, step].mean():.4f}")
    return dice_TS, best_T, records


def lidc_benchmark(split: str, n_pairs: Optional[int], seed: int, n_corrections: int, steering, log) -> Dict:
    from ARSegLib.data.lidc import load_lidc
    from ARSegLib.models import load_model

    predictor, card = load_model("lidc-nodule")
    data = load_lidc(LIDC, split=split)
    pairs = choose_pairs(data.masks_NRhw, n_pairs, seed)
    images = data.images_Nhw.astype(np.float32) / 255.0
    t0 = time.perf_counter()
    d, best, records = crop_trials(predictor, images[[c for c, _ in pairs]],
                                   data.masks_NRhw[[c for c, _ in pairs], [r for _, r in pairs]],
                                   n_corrections, steering, log=log)
    out = summarise(d, best)
    kept = [s["kept_satisfy"] for r in records for s in r["satisfied"]]
    out.update({"split": split, "crops": len(data), "pairs_available": len(choose_pairs(data.masks_NRhw, None, 0)),
                "subset_seed": seed if n_pairs is not None else None, "seconds": round(time.perf_counter() - t0, 1),
                "refinements": len(kept), "refinements_every_kept_sample_satisfies": int(sum(kept)),
                "include_points": sum(p["kind"] == INCLUDE for r in records for p in r["prompts"]),
                "exclude_points": sum(p["kind"] == EXCLUDE for r in records for p in r["prompts"]),
                "per_trial": [{"crop": list(data.keys[c]), "reader": r, "dice": [round(float(v), 4) for v in row],
                               **rec} for (c, r), row, rec in zip(pairs, d, records)]})
    return out


# ------------------------------------------------------------------------------------------ CT in 3D

def ct_benchmark(volume_path: Path, label_path: Path, n_corrections: int, log) -> Dict:
    from ARSegLib import mrml, pipeline, prompts
    from ARSegLib.models import load_model

    def read(path):
        node = mrml.load_volume(mrml.new_scene(), path)
        return mrml.volume_array(node), mrml.world_ijk_to_ras(node)

    predictor, card = load_model("lidc-nodule")
    array, m = read(volume_path)
    label = read(label_path)[0] > 0
    kji = np.array(np.nonzero(label), dtype=float).mean(1)
    click = (m @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]
    spacing_kji = np.linalg.norm(m[:3, :3], axis=0)[::-1]
    t = time.perf_counter()
    result = pipeline.segment_click(array, m, click, predictor, card)
    times = [time.perf_counter() - t]
    dices = [dice(result.full(result.consensus), label)]
    best = max(dice(result.full(result.sample_mask(i + 1)), label) for i in range(result.n_samples))
    steps = []
    for _ in range(n_corrections):
        nxt = correction_point(result.full(result.consensus), label, spacing_kji)
        if nxt is None:
            break
        kind, (k, j, i) = nxt
        point = tuple(float(v) for v in (m @ np.array([i, j, k, 1.0]))[:3])
        refinement = prompts.Refinement(prompts=(prompts.Prompt(kind, point),))
        t = time.perf_counter()
        result = pipeline.segment_click(array, m, click, predictor, card, refinement=refinement, previous=result)
        times.append(time.perf_counter() - t)
        dices.append(dice(result.full(result.consensus), label))
        steps.append({"kind": kind, "point_ras": [round(v, 3) for v in point],
                      "satisfaction": result.settings.get("prompt_satisfaction")})
        if log:
            log(f"{volume_path.name}: {kind} at {np.round(point, 1).tolist()}: Dice {dices[-1]:.4f}")
    return {"volume": str(volume_path), "dice_after_corrections": [round(float(v), 4) for v in dices],
            "best_of_unrefined_samples": round(float(best), 4), "seconds": [round(v, 2) for v in times],
            "corrections": steps}


def main(argv=None) -> int:
    from ARSegLib.engine.steering import SteeringConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--pairs", type=int, default=None, help="a seeded random subset of the (crop, reader) trials")
    ap.add_argument("--seed", type=int, default=0, help="the subset's seed")
    ap.add_argument("--corrections", type=int, default=3)
    ap.add_argument("--max-rounds", type=int, default=SteeringConfig.max_rounds)
    ap.add_argument("--keep-empty", action="store_true", help="empty candidates satisfy an exclude point as any "
                    "other (SteeringConfig.prefer_drawn off)")
    ap.add_argument("--ct", nargs=2, type=Path, action="append", default=[], metavar=("VOLUME", "LABEL"),
                    help="also (or only, with --pairs 0) a CT and its nodule label, in 3D")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    steering = SteeringConfig(max_rounds=args.max_rounds, prefer_drawn=not args.keep_empty)
    out: Dict[str, object] = {"command": "python tools/interactive_corrections.py " + " ".join(argv or []),
                              "machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
                              "steering": {"max_rounds": steering.max_rounds, "prefer_drawn": steering.prefer_drawn}}
    if args.pairs != 0:
        out["lidc"] = lidc_benchmark(args.split, args.pairs, args.seed, args.corrections, steering, log)
        s = out["lidc"]
        log(f"{args.split}: {s['trials']} trials, mean Dice after 0..{args.corrections} corrections "
            f"{s['mean_dice_after_corrections']}, best of 16 samples {s['best_of_unrefined_samples']}")
    out["ct"] = [ct_benchmark(v, lbl, args.corrections, log) for v, lbl in args.ct]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
