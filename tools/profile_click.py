"""Where a lung1 click's time goes, by default with AVX-512 off (issue 22): image encoder per view, transformer
per scale, herding, decoding, consensus; which planes carry anything; and the candidate speed-ups measured A/B,
alternating in one process so that a shared machine's drift hits each variant alike.

    python tools/profile_click.py [--isa avx2|native] [--runs 3] [--json out.json]

With --isa avx2 (default) the script re-runs itself in a child capped at AVX2 (ARSegLib.cpu_isa) and refuses when
the cap did not take effect. It feeds the engine exactly the crops `pipeline.segment_click` builds for lung1's
nodule (17 planes of +-20 mm), with the model card's sampling, and only measures: nothing here changes outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np


def click_crops(predictor, card):
    """The prepared crops of lung1's click, their plane indices (crop ids) and the click plane, as the pipeline
    makes them."""
    from ARSegLib import bench, mrml, pipeline

    _, volume, point = bench._lung1_click_input()
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    grid, click_plane = pipeline.click_grid(point, array.shape, m, predictor.crop_size, card.pixel_spacing_mm, 20.0)
    prepared, has_signal = pipeline.prepare_crops(pipeline.resample_to_grid(array, m, grid, float(array.min())),
                                                  card.intensity)
    return prepared, np.flatnonzero(has_signal), click_plane


class Timeline:
    """Wall-clock marks inside one predictor.segment call: the image encoder's end (a forward hook), each scale's
    end (the progress callback), and the time spent decoding masks (herding decodes every candidate's last scale
    first, then the kept ones are decoded at every scale)."""

    def __init__(self, predictor):
        self.predictor, self.marks, self.decodes = predictor, [], []
        predictor.segmentor.image_encoder.register_forward_hook(lambda *a: self.marks.append(("encoder",
                                                                                             time.perf_counter())))
        original = predictor.autoencoder.decode_masks

        def timed_decode(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.decodes.append(time.perf_counter() - t0)

        predictor.autoencoder.decode_masks = timed_decode  # this process's instance only; a tool, not the engine

    def run(self, crops, ids, sampling) -> Dict[str, Any]:
        self.marks, self.decodes, timings = [], [], {}
        t0 = time.perf_counter()
        res = self.predictor.segment(crops, sampling, timings=timings, crop_ids=ids,
                                     progress=lambda done, total: self.marks.append((f"scale {done}",
                                                                                     time.perf_counter())))
        total = time.perf_counter() - t0
        enc_end = dict(self.marks)["encoder"]
        scales, last = {}, enc_end
        for name, t in self.marks:
            if name.startswith("scale"):
                scales[name], last = t - last, t
        # with oversampling the first decode is herding's (every candidate's last scale), the rest the kept samples'
        herding = self.decodes[0] if "selection" in timings else 0.0
        return {"total": total, "timings": timings, "scales": scales, "herding_decode_s": herding,
                "kept_decode_s": sum(self.decodes) - herding, "result": res}


def median_of(rows: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def alternate(variants: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, float]:
    """Median seconds of each variant, the variants run in turn round after round (after one warm-up each)."""
    for fn in variants.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def outward_waves(nonempty: np.ndarray, click: int, step: int) -> List[List[int]]:
    """Planes visited outward from the click in waves of `step` planes per side, a side stopping after a plane on
    which every sample and every scale's consensus is empty (nothing on it, so nothing beyond it can join the 3D
    component through it)."""
    n = len(nonempty)
    waves, lo, hi = [list(range(max(0, click - step), min(n, click + step + 1)))], max(0, click - step), \
        min(n - 1, click + step)
    go_down = lo > 0 and nonempty[lo:click + 1].all()
    go_up = hi < n - 1 and nonempty[click:hi + 1].all()
    while go_down or go_up:
        wave = []
        if go_down:
            new = list(range(max(0, lo - step), lo))
            wave += new
            lo = new[0]
            go_down = lo > 0 and nonempty[new].all()
        if go_up:
            new = list(range(hi + 1, min(n, hi + step + 1)))
            wave += new
            hi = new[-1]
            go_up = hi < n - 1 and nonempty[new].all()
        waves.append(sorted(wave))
    return waves


def op_profile(fn: Callable[[], Any]) -> Dict[str, float]:
    """Self CPU milliseconds by kernel family over one call, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    families = {"linear (oneDNN)": ("_linear_pointwise", "linear", "addmm", "mm"),
                "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"),
                "convolution": ("convolution", "conv2d", "_convolution_pointwise", "mkldnn_convolution"),
                "norms": ("layer_norm", "group_norm", "native_layer_norm", "native_group_norm"),
                "element-wise": ("addcmul", "add", "mul", "silu", "sigmoid", "gelu", "div", "sub", "softmax",
                                 "cumsum", "lt", "sum", "exp", "clamp", "where", "masked_fill"),
                "copies and indexing": ("copy_", "index", "cat", "stack", "clone", "contiguous", "to", "flip",
                                        "rot90", "unique", "scatter", "gather", "nonzero", "fill_", "zero_",
                                        "empty", "resize_", "as_strided", "permute", "view", "reshape")}
    out: Dict[str, float] = {k: 0.0 for k in families}
    out["other"] = 0.0
    for evt in prof.key_averages():
        name = evt.key.split("::")[-1]
        fam = next((f for f, names in families.items() if name in names or name.lstrip("_") in names), "other")
        out[fam] += evt.self_cpu_time_total / 1000.0
    return out


def measure(runs: int) -> Dict[str, Any]:
    import torch

    from ARSegLib.cpu_isa import instruction_sets
    from ARSegLib.models import load_model

    isa = instruction_sets()
    predictor, card = load_model("lidc-nodule", "cpu")
    crops, ids, click = click_crops(predictor, card)
    shipped = predictor.config.sampling
    timeline = Timeline(predictor)
    planes = crops[ids]

    # 1. the phase split of the shipped click (one batch of the click's planes, as segment_click sends it)
    rows = []
    for i in range(runs + 1):
        r = timeline.run(planes, ids, shipped)
        if i:
            t = r["timings"]
            rows.append({"total": r["total"], **t, "selection_decode": r["herding_decode_s"],
                         "kept_decode": r["kept_decode_s"],
                         **{k: v for k, v in r["scales"].items()}})
    split = median_of(rows)
    res = r["result"]
    nonempty = np.zeros(len(crops), bool)
    nonempty[ids] = (res.samples_BNhw.reshape(len(ids), -1).any(1)
                     | res.scale_consensus_BKhw.reshape(len(ids), -1).any(1))
    marking = np.zeros(len(crops), int)
    marking[ids] = (res.samples_BNhw.reshape(len(ids), res.samples_BNhw.shape[1], -1) > 0).any(2).sum(1)

    # 2. the image encoder per view: one view's planes against the four views' (what sharing could save at most)
    enc = predictor.segmentor.image_encoder
    x1 = torch.as_tensor(planes[:, None])
    from ARSegLib.engine.views import dihedral

    x4 = torch.cat([dihedral(x1, k) for k in range(int(shipped.views))])
    with torch.inference_mode():
        encoder = alternate({"1 view": lambda: enc(x1), f"{int(shipped.views)} views": lambda: enc(x4)}, runs)

    # 3. which kernels: torch's profiler over one shipped click's model part
    ops = op_profile(lambda: predictor.segment(planes, shipped, crop_ids=ids))

    # 4. candidate speed-ups, alternating: plain sampling, the click plane alone (a first outline), planes visited
    # outward from the click and stopped at an empty one (one batch: a lower bound; in waves of 2 planes per side)
    fast = dataclasses.replace(shipped, views=1, oversample=1)
    visited = [p for p in range(len(crops)) if p in set(ids)]
    waves = [[p for p in w if p in set(ids)] for w in outward_waves(nonempty, click, 2)]
    subset = sorted({p for w in waves for p in w})
    variants = {
        "shipped, 17 planes": lambda: predictor.segment(crops[visited], shipped, crop_ids=visited),
        "views 1, oversample 1, 17 planes": lambda: predictor.segment(crops[visited], fast, crop_ids=visited),
        "shipped, click plane only": lambda: predictor.segment(crops[[click]], shipped, crop_ids=[click]),
        "views 1, oversample 1, click plane only": lambda: predictor.segment(crops[[click]], fast, crop_ids=[click]),
        f"shipped, the {len(subset)} planes visited outward, one batch":
            lambda: predictor.segment(crops[subset], shipped, crop_ids=subset),
        f"shipped, the same in {len(waves)} waves":
            lambda: [predictor.segment(crops[w], shipped, crop_ids=w) for w in waves if w],
    }
    ab = alternate(variants, runs)
    # the visited planes' samples are the full run's (a crop's samples depend on its image, id and seed only)
    part = predictor.segment(crops[subset], shipped, crop_ids=subset)
    same = all(np.array_equal(part.samples_BNhw[i], res.samples_BNhw[list(ids).index(p)])
               for i, p in enumerate(subset))
    return {"instruction_sets": isa, "threads": torch.get_num_threads(), "runs": runs,
            "planes": int(len(crops)), "click_plane": int(click), "split_s": split,
            "samples_marking_per_plane": marking.tolist(), "plane_has_anything": nonempty.tolist(),
            "outward_waves": waves, "outward_samples_identical": bool(same),
            "encoder_s": encoder, "ops_ms": ops, "ab_s": ab}


def report(r: Dict[str, Any]) -> str:
    s = r["split_s"]
    lines = [f"lung1 click, model part, {r['planes']} planes in one batch; instruction sets: "
             + "; ".join(f"{k} {v}" for k, v in r["instruction_sets"].items()),
             f"{'phase':44} {'s':>7} {'share':>6}"]
    total = s["total"]
    parts = [("image encoder (4 views x 17 planes)", s["image_encoder"])]
    parts += [(f"transformer {k} (sampling included)", v) for k, v in s.items() if k.startswith("scale")]
    parts += [("herding: decode every candidate's last scale", s["selection_decode"]),
              ("herding: the selection itself", s["selection"] - s["selection_decode"]),
              ("decoding the kept samples' 8 scales: decoder", s["kept_decode"]),
              ("decoding: prefixes, mapping back, copies", s["decoding"] - s["kept_decode"]),
              ("consensus", s["consensus"])]
    for name, v in parts:
        lines.append(f"{name:44} {v:7.3f} {100 * v / total:5.1f}%")
    lines.append(f"{'total':44} {total:7.3f}")
    lines.append("image encoder, alternating: " + ", ".join(f"{k} {v:.3f} s" for k, v in r["encoder_s"].items()))
    lines.append("self CPU by kernel family (ms, one click): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["ops_ms"].items(), key=lambda kv: -kv[1])))
    lines.append("samples marking anything, per plane: " + " ".join(map(str, r["samples_marking_per_plane"]))
                 + f" (click plane {r['click_plane']})")
    lines.append(f"outward waves: {r['outward_waves']}; their samples identical to the full run's: "
                 f"{r['outward_samples_identical']}")
    lines.append("A/B, alternating in this process (median s):")
    lines += [f"  {k:52} {v:.3f}" for k, v in r["ab_s"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", choices=["avx2", "native"], default="avx2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from ARSegLib.cpu_isa import avx2_environment, avx512_in_use, has_avx512, instruction_sets

    if args.isa == "avx2" and os.environ.get("ARSEG_PROFILE_CAPPED") != "1" and has_avx512():
        env = {**os.environ, **avx2_environment(), "ARSEG_PROFILE_CAPPED": "1"}
        return subprocess.call([sys.executable, __file__] + (argv if argv is not None else sys.argv[1:]), env=env)
    if os.environ.get("ARSEG_PROFILE_CAPPED") == "1":
        problems = avx512_in_use(instruction_sets())
        if problems:
            print("refused: AVX-512 still in use in the capped process: " + "; ".join(problems), file=sys.stderr)
            return 3
    r = measure(args.runs)
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
