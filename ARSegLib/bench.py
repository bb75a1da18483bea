"""`arseg bench`: where a click's time goes, with the shipped model, cached vs the no-cache reference.

Every number is a median over repeated runs after a warm-up, each run producing the full output
(consensus, disagreement, every scale decoded). Without the shipped model a tiny untrained model is
used and the output says so."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from .engine.heap import keeping_freed_memory

DATA = Path(os.environ.get("ARSEG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
LUNG1 = DATA / "ct" / "lung1"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(fn: Callable[[], Any], runs: int, warmup: int = 2, sync: bool = False) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(device: torch.device, seconds: float = 0.3) -> float:
    """The machine's speed right now (512 x 512 fp32 matrix products): shared or throttled CPUs vary by tens of
    percent from minute to minute, and this puts the other numbers in context."""
    a = torch.randn(512, 512, device=device)
    sync = device.type == "cuda"
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a
        if sync:
            torch.cuda.synchronize()
        n += 1
    return 2 * 512 ** 3 * n / (time.perf_counter() - t0) / 1e9


def minor_page_faults() -> int:
    """Pages this process has faulted in so far (fresh memory touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def bench_crop(predictor, crop_1hw: np.ndarray, sampling, runs: int) -> Dict[str, Any]:
    """Cached and no-cache runs alternate, so a machine that speeds up or slows down during the measurement
    (shared or throttled CPUs) shifts both medians alike and the ratio stays fair."""
    sync = predictor.device.type == "cuda"
    out: Dict[str, Any] = {}
    for n in (1, 4, 16):
        s = dataclasses.replace(sampling, n_samples=n)
        cached = lambda s=s: predictor.segment(crop_1hw, s, use_cache=True)  # noqa: E731
        nocache = lambda s=s: predictor.segment(crop_1hw, s, use_cache=False)  # noqa: E731
        cached(), nocache()  # warm-up
        times = {"cached_s": [], "nocache_s": []}
        for _ in range(runs):
            times["cached_s"].append(median_time(cached, 1, warmup=0, sync=sync))
            times["nocache_s"].append(median_time(nocache, 1, warmup=0, sync=sync))
        out[str(n)] = {k: statistics.median(v) for k, v in times.items()}
        out[str(n)]["speedup"] = out[str(n)]["nocache_s"] / out[str(n)]["cached_s"]
        # each alternating pair's ratio: how much the machine's drift moves the speed-up within one bench run
        pairs = sorted(b / a for a, b in zip(times["cached_s"], times["nocache_s"]))
        out[str(n)]["speedup_pairs_min_max"] = [pairs[0], pairs[-1]]
    return out


def cpu_features() -> Dict[str, bool]:
    """The instruction sets that decide which kernels run (and whether bf16 could pay): machines of one name differ."""
    probes = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return {name: bool(getattr(torch.cpu, fn)()) for name, fn in probes.items() if hasattr(torch.cpu, fn)}


def bench_split(predictor, crop_1hw, sampling, runs: int, use_cache: bool = True) -> Dict[str, float]:
    """Median seconds per phase at N = 16."""
    s = dataclasses.replace(sampling, n_samples=16)
    per_run = []
    for i in range(runs + 2):
        t: Dict[str, float] = {}
        predictor.segment(crop_1hw, s, use_cache=use_cache, timings=t)
        if i >= 2:
            per_run.append(t)
    return {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in per_run[0]}


def real_crop(crop_size: int) -> tuple:
    """The middle LIDC crop of lung1's nodule (how the model's inputs look), else noise."""
    path = LUNG1 / "lidc-slices" / "images" / "slice-4.png"
    if path.exists() and crop_size == 128:
        from PIL import Image

        return (np.asarray(Image.open(path).convert("L"), np.float32) / 255.0)[None], str(path)
    return np.random.default_rng(0).random((1, crop_size, crop_size), dtype=np.float32), "random noise"


def run_like_slicer(start: Callable[[], Any], finish: Callable[[Any], Any], poll_s: float = 0.025):
    """A run driven the way Slicer's main thread drives it: between 25 ms timer ticks the main thread sits in Qt's
    C++ event loop *holding the GIL* (emulated by a C call through ctypes.PyDLL, which keeps it), and each tick runs
    a little Python (`run.poll()`); `finish` writes the result into the scene, as the module's onPoll does.
    Returns (seconds from start to nodes written, the longest single stretch of Python on the main thread)."""
    import ctypes

    hold_gil = ctypes.PyDLL(None).usleep
    t0 = time.perf_counter()
    run = start()
    longest = time.perf_counter() - t0
    while True:
        hold_gil(int(poll_s * 1e6))
        tick = time.perf_counter()
        finished = run.poll()
        if finished:
            if run.error is not None:
                raise run.error
            finish(run.result)
        longest = max(longest, time.perf_counter() - tick)
        if finished:
            return time.perf_counter() - t0, longest


def _lung1_click_input():
    from . import mrml

    point = json.loads((LUNG1 / "nodule.json").read_text())["centroid_ras_mm"]
    scene = mrml.new_scene()
    volume = mrml.load_volume(scene, LUNG1 / "image.nrrd")
    return scene, volume, point


def bench_lung1(predictor, card, runs: int, volume_slices: int, model: str) -> Dict[str, Any]:
    """Click at lung1's nodule through the MRML adapter, end to end (array out of the node, pipeline, nodes
    written), in this process and the Slicer module's way (the worker process, polled under an emulated Slicer
    main thread); and whole-volume mode on a slab of lung1's slices around the nodule."""
    from . import mrml, pipeline
    from .worker import InferenceClient

    if not (LUNG1 / "image.nrrd").exists():
        return {"lung1": f"skipped: {LUNG1 / 'image.nrrd'} not found"}
    scene, volume, point = _lung1_click_input()  # the scene is held here: a node does not keep it alive
    settings = pipeline.SegmentSettings(n_samples=16)
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    last = {}

    def click():
        last["nodes"] = mrml.segment_node(volume, predictor, card, point, settings)

    client = InferenceClient(model, str(predictor.device))
    slicer_blocks = []

    def click_as_the_module_does():
        seconds, block = run_like_slicer(
            lambda: client.segment(array, m, point, settings, volume_key="lung1"),
            lambda result: mrml.write_result(scene, volume, result))
        slicer_blocks.append(block)
        return seconds

    try:
        if not client.start().wait(300):
            raise RuntimeError("the inference worker did not load the model")
        # both ways alternate after a warm-up of each, so the machine's drift hits both alike
        sync = predictor.device.type == "cuda"
        click(), click_as_the_module_does()
        slicer_blocks.clear()
        times: Dict[str, list] = {"main": [], "slicer": []}
        faults = []
        for _ in range(runs):
            faults0 = minor_page_faults()
            times["main"].append(median_time(click, 1, warmup=0, sync=sync))
            faults.append(minor_page_faults() - faults0)
            times["slicer"].append(click_as_the_module_does())
    finally:
        client.shutdown()
    res = last["nodes"].result
    out: Dict[str, Any] = {"click_lung1_s": statistics.median(times["main"]),
                           "click_lung1_slices": int(res.grid.shape[0]),
                           "click_lung1_timings_s": res.timings_s,
                           "click_lung1_consensus_mm3": last["nodes"].report.get("consensus_volume_mm3"),
                           "click_lung1_page_faults": statistics.median(faults),
                           "click_lung1_slicer_s": statistics.median(times["slicer"]),
                           "click_lung1_slicer_longest_block_s": max(slicer_blocks)}
    # whole-volume mode on a slab of slices (the full 133-slice volume takes minutes on a CPU); a volume needs
    # at least two slices
    volume_slices = max(2, volume_slices)
    k0 = int(json.loads((LUNG1 / "nodule.json").read_text())["centroid_ijk"][2]) - volume_slices // 2
    slab = np.ascontiguousarray(array[k0:k0 + volume_slices])
    m_slab = m.copy()
    m_slab[:3, 3] = (m @ np.array([0, 0, k0, 1.0]))[:3]
    t0 = time.perf_counter()
    pipeline.segment_volume(slab, m_slab, predictor, card, settings)
    out["volume_slices_per_s"] = volume_slices / (time.perf_counter() - t0)
    out["volume_slices_measured"] = volume_slices
    return out


def bench_first_click(model: str, device: torch.device, repeats: int) -> Dict[str, Any]:
    """The radiologist's first click after the module opens, the module's way (a new worker process, polled under
    an emulated Slicer main thread), medians over `repeats` new workers each:
    `open_to_result_s`: the click comes at once: worker start + torch import + model load + click + nodes;
    `load_s`: worker start until the model is loaded (what the module does in the background when it opens);
    `click_after_load_s`: the first click once that is done (its voxels cross to the worker too)."""
    from . import mrml, pipeline
    from .worker import InferenceClient

    scene, volume, point = _lung1_click_input()
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    settings = pipeline.SegmentSettings(n_samples=16)
    rows = []
    for _ in range(repeats):
        row = {}
        client = InferenceClient(model, str(device))
        try:
            row["open_to_result_s"], _ = run_like_slicer(
                lambda c=client: (c.start(), c.segment(array, m, point, settings, volume_key="lung1"))[1],
                lambda result: mrml.write_result(scene, volume, result))
        finally:
            client.shutdown()
        client = InferenceClient(model, str(device))
        try:
            row["load_s"], _ = run_like_slicer(client.start, lambda result: None)
            row["click_after_load_s"], _ = run_like_slicer(
                lambda c=client: c.segment(array, m, point, settings, volume_key="lung1"),
                lambda result: mrml.write_result(scene, volume, result))
        finally:
            client.shutdown()
        rows.append(row)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]} | {"repeats": repeats}


def run_bench(model: str = "lidc-nodule", device: str = "cpu", runs: int = 10, threads: int = 0,
              volume_slices: int = 4, lung1: bool = True) -> Dict[str, Any]:
    from .models import ModelError, load_model
    from .training.distributed import resolve_device

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    note = ""
    try:
        predictor, card = load_model(model, device)
    except ModelError as e:
        if model != "lidc-nodule":
            raise
        predictor, card = tiny_stand_in(device)
        note = f"shipped model unavailable ({e}); a tiny UNTRAINED model stands in: timings are not the product's"
    crop, crop_source = real_crop(predictor.crop_size)
    sampling = predictor.config.sampling
    out: Dict[str, Any] = {
        "model": card.name, "note": note, "device": str(predictor.device), "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "gpu": torch.cuda.get_device_name(0) if predictor.device.type == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs, "crop_source": crop_source,
        "n_tokens": predictor.config.autoencoder.n_tokens,
    }
    out["matmul_gflops_before"] = matmul_gflops(predictor.device)
    out["crop"] = bench_crop(predictor, crop, sampling, runs)
    out["split_s"] = bench_split(predictor, crop, sampling, runs)
    # the same phases for the no-cache reference: only the transformer should differ
    out["split_nocache_s"] = bench_split(predictor, crop, sampling, runs, use_cache=False)
    if lung1:
        out.update(bench_lung1(predictor, card, max(3, runs // 3), volume_slices, model))
        if "click_lung1_s" in out and not note:
            out["first_click_lung1"] = bench_first_click(model, predictor.device, max(1, runs // 3))
    out["matmul_gflops_after"] = matmul_gflops(predictor.device)
    out["heap_keeps_freed_memory"] = keeping_freed_memory()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def tiny_stand_in(device):
    from .engine import ARSegPredictor, build_arseg, tiny_config
    from .models import ModelCard

    cfg = tiny_config(crop_size=128)
    torch.manual_seed(0)
    ae, seg = build_arseg(cfg)
    card = ModelCard(Path("tiny-untrained.json"), {"name": "tiny-untrained", "config": cfg.to_dict(),
                                                   "pixel_spacing_mm": 0.7, "crop_size": 128,
                                                   "intensity": {"method": "minmax_per_crop"}})
    return ARSegPredictor(cfg, ae, seg, device), card


def format_table(r: Dict[str, Any]) -> str:
    lines = [f"arseg bench — model {r['model']} on {r['device']} ({r['cpu']}"
             + (f", {r['gpu']}" if r.get("gpu") else "") + f"), torch {r['torch']}, {r['threads']} threads"]
    if r.get("note"):
        lines.append(f"NOTE: {r['note']}")
    if r.get("cpu_features"):
        lines.append("CPU features: " + ", ".join(k for k, v in r["cpu_features"].items() if v))
    lines.append(f"{'samples':>8} {'cached s':>10} {'no-cache s':>11} {'speed-up':>9}  {'pairs min-max':>13}")
    for n, row in r["crop"].items():
        lo, hi = row["speedup_pairs_min_max"]
        lines.append(f"{n:>8} {row['cached_s']:>10.4f} {row['nocache_s']:>11.4f} {row['speedup']:>8.2f}x  "
                     f"{lo:>6.2f}-{hi:.2f}x")
    lines.append("N = 16 split: " + ", ".join(f"{k} {v:.4f} s" for k, v in r["split_s"].items()))
    if "split_nocache_s" in r:
        lines.append("N = 16 split, no cache: " + ", ".join(f"{k} {v:.4f} s" for k, v in r["split_nocache_s"].items()))
    if "click_lung1_s" in r:
        lines.append(f"lung1 click (N = 16, through MRML): {r['click_lung1_s']:.3f} s over "
                     f"{r['click_lung1_slices']} slices in this process ({r['click_lung1_page_faults']:.0f} page "
                     f"faults per click); {r['click_lung1_slicer_s']:.3f} s the Slicer module's way (worker process, "
                     f"emulated Slicer main thread; longest main-thread block "
                     f"{1000 * r['click_lung1_slicer_longest_block_s']:.0f} ms); "
                     f"whole volume: {r['volume_slices_per_s']:.2f} slices/s")
    elif "lung1" in r:
        lines.append(f"lung1: {r['lung1']}")
    if "first_click_lung1" in r:
        f = r["first_click_lung1"]
        lines.append(f"first lung1 click after the module opens: {f['open_to_result_s']:.2f} s when it comes at once "
                     f"(worker start, torch, model, click); the worker loads in {f['load_s']:.2f} s, and the first "
                     f"click after that takes {f['click_after_load_s']:.2f} s")
    lines.append(f"peak RSS {r['peak_rss_mb']:.0f} MB; machine speed (512x512 matmul) {r['matmul_gflops_before']:.0f} "
                 f"GFLOP/s before, {r['matmul_gflops_after']:.0f} after")
    return "\n".join(lines)


def main_bench(json_out: Optional[str], **kw) -> Dict[str, Any]:
    r = run_bench(**kw)
    print(format_table(r))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(r, indent=2) + "\n")
    return r
