"""How the click's answer depends on where inside the nodule the click falls (BENCHMARKS.md, "Off-centre clicks").

For a CT with a nodule label: clicks from the label's centroid outward along 8 in-plane directions and 2 along S,
at fractions of the label's radius in that direction (the distance from the centroid to the label's edge along
the ray, so every click up to 100 % lies inside or on the label); each click segmented with the shipped model,
with and without re-centring (SegmentSettings.recentre_passes). Reports, per fraction, the mean and minimum Dice
of the consensus with the label and with the centroid click's consensus, and the passes taken.

    python tools/click_offsets.py Resources/Demo/lung1-slab.nrrd Resources/Demo/lung1-slab-label.nrrd \\
        --json runs/click-offsets-demo.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ARSegLib import mrml, pipeline
from ARSegLib.models import load_model

DIRECTIONS_RAS = [(np.cos(t), np.sin(t), 0.0) for t in np.arange(8) * np.pi / 4] + [(0, 0, 1.0), (0, 0, -1.0)]


def read(path: Path):
    scene = mrml.new_scene()
    node = mrml.load_volume(scene, path)
    return mrml.volume_array(node), mrml.world_ijk_to_ras(node)


def edge_distance_mm(label: np.ndarray, m: np.ndarray, centre_ras: np.ndarray, direction, step_mm: float = 0.25):
    """Distance from the centroid along a ray to the last point inside the label (nearest voxel)."""
    inv = np.linalg.inv(m)
    d, last_inside = 0.0, 0.0
    while d < 100.0:
        p = centre_ras + d * np.asarray(direction, dtype=float)
        i, j, k = np.rint((inv @ np.append(p, 1.0))[:3]).astype(int)
        if not (0 <= k < label.shape[0] and 0 <= j < label.shape[1] and 0 <= i < label.shape[2]):
            break
        if label[k, j, i]:
            last_inside = d
        elif d - last_inside > 2.0:  # past the edge (small holes of the label are crossed)
            break
        d += step_mm
    return last_inside


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("volume", type=Path)
    ap.add_argument("label", type=Path)
    ap.add_argument("--fractions", default="0,0.2,0.4,0.55,0.7,0.85,1.0")
    ap.add_argument("--passes", default="0,2", help="recentre_passes values to compare (0: the click as given)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    predictor, card = load_model("lidc-nodule")
    array, m = read(args.volume)
    label, _ = read(args.label)
    label = label > 0
    voxel_mm3 = abs(np.linalg.det(m[:3, :3]))
    kji = np.array(np.nonzero(label), dtype=float).mean(1)
    centre = (m @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]
    radii = [edge_distance_mm(label, m, centre, d) for d in DIRECTIONS_RAS]
    fractions = [float(f) for f in args.fractions.split(",")]
    passes = [int(p) for p in args.passes.split(",")]

    def consensus_of(point, n_passes):
        settings = pipeline.SegmentSettings(recentre_passes=n_passes)
        t0 = time.perf_counter()
        r = pipeline.segment_click(array, m, point, predictor, card, settings)
        return r.full(r.consensus) > 0, r.timings_s.get("passes", 1), time.perf_counter() - t0

    rows = []
    for n_passes in passes:
        reference, _, _ = consensus_of(centre, n_passes)
        for f in fractions:
            for d, radius in zip(DIRECTIONS_RAS[: 1 if f == 0 else None], radii):
                point = centre + f * radius * np.asarray(d)
                cons, used, seconds = consensus_of(point, n_passes)
                row = {"recentre_passes": n_passes, "fraction": f, "direction_ras": [round(v, 3) for v in d],
                       "offset_mm": round(f * radius, 2), "passes": used, "seconds": round(seconds, 2),
                       "dice_label": round(pipeline.dice(cons, label), 4),
                       "dice_centroid_click": round(pipeline.dice(cons, reference), 4),
                       "consensus_mm3": round(float(cons.sum()) * voxel_mm3, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    summary = []
    print(f"\n{args.volume.name}: label centroid R,A,S {np.round(centre, 2).tolist()}, radius along the rays "
          f"{min(radii):.1f}-{max(radii):.1f} mm")
    print("| recentre passes | offset (% of radius) | Dice with label, mean (min) | Dice with centroid click, "
          "mean (min) | passes run | s per click |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n_passes in passes:
        for f in fractions:
            rs = [r for r in rows if r["recentre_passes"] == n_passes and r["fraction"] == f]
            entry = {"recentre_passes": n_passes, "fraction": f, "n": len(rs),
                     "dice_label_mean": float(np.mean([r["dice_label"] for r in rs])),
                     "dice_label_min": float(np.min([r["dice_label"] for r in rs])),
                     "dice_centroid_mean": float(np.mean([r["dice_centroid_click"] for r in rs])),
                     "dice_centroid_min": float(np.min([r["dice_centroid_click"] for r in rs])),
                     "passes_mean": float(np.mean([r["passes"] for r in rs])),
                     "seconds_mean": float(np.mean([r["seconds"] for r in rs]))}
            summary.append(entry)
            print(f"| {n_passes} | {100 * f:.0f} | {entry['dice_label_mean']:.3f} ({entry['dice_label_min']:.3f}) | "
                  f"{entry['dice_centroid_mean']:.3f} ({entry['dice_centroid_min']:.3f}) | "
                  f"{entry['passes_mean']:.1f} | {entry['seconds_mean']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"volume": str(args.volume), "label": str(args.label),
                                         "centroid_ras_mm": centre.round(3).tolist(),
                                         "radii_mm": [round(r, 2) for r in radii], "rows": rows,
                                         "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
