"""`arseg bench`: where a click's time goes, with the shipped model, cached vs the no-cache reference.

Every number is a median over repeated runs after a warm-up, each run producing the full output
(consensus, disagreement, every scale decoded). Without the shipped model a tiny untrained model is
used and the output says so.

On a CPU with AVX-512 every figure is measured twice in one run: natively in this process, then in a child
process whose libraries are capped at AVX2 (cpu_isa.py; the child checks that the cap took effect and refuses to
measure otherwise), as on most reviewers' machines. Each run also counts the arithmetic of one lung1 click
(FLOPs) and measures the rate a plain fp32 matrix product of the model's shape reaches on that instruction set,
so achieved / attainable is a ratio that holds from machine to machine."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from .cpu_isa import avx2_environment, avx512_in_use, has_avx512, instruction_sets
from .engine.heap import keeping_freed_memory
from .models import DEFAULT_MODEL

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


# rows x inputs x outputs: the MLP's first layer at a middle scale of a lung1 click (17 planes x 32 candidates,
# 16 tokens each), the shape that carries most of the click's FLOPs
GEMM_SHAPE = (8192, 160, 640)


def _rate(fn: Callable[[], Any], flop: float, seconds: float) -> float:
    fn()  # warm-up (oneDNN builds its kernel on the first call)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return flop * n / (time.perf_counter() - t0) / 1e9


def gemm_gflops(device: torch.device, seconds: float = 0.4) -> Dict[str, float]:
    """What plain fp32 matrix products reach here, now, on this process's instruction set (GFLOP/s): torch.mm
    (MKL) at the model's shape GEMM_SHAPE, and the model's own kernel (oneDNN linear with a prepacked weight,
    engine/fused.py) at that shape. `attainable` is the faster: the rate the click's arithmetic could run at if
    it were all one large product."""
    from .engine import fused

    m, k, n = GEMM_SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g).to(device), torch.randn(k, n, generator=g).to(device)
    layer = torch.nn.Linear(k, n).to(device)
    sync = device.type == "cuda"

    def mm():
        x @ w
        if sync:
            torch.cuda.synchronize()

    def linear():
        with torch.inference_mode():
            fused.linear(layer, x)
        if sync:
            torch.cuda.synchronize()

    out = {"shape_m_k_n": [m, k, n], "mm": _rate(mm, 2.0 * m * k * n, seconds),
           "linear": _rate(linear, 2.0 * m * k * n, seconds)}
    out["attainable"] = max(out["mm"], out["linear"])
    return out


def _flop_formulas() -> Dict[Any, Callable]:
    """FLOP formulas for the kernels the engine calls that torch's FlopCounterMode does not know: oneDNN's fused
    linear and convolution (engine/fused.py) and CPU flash attention (the cached path's attention)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def linear(x, w, b, *args, out_shape=None, **kwargs):
        return 2 * int(x[-1]) * int(torch.Size(out_shape).numel())

    def conv(x, w, b, *args, out_shape=None, **kwargs):
        return 2 * int(torch.Size(out_shape).numel()) * int(torch.Size(w[1:]).numel())

    def attention(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    mkldnn, aten = torch.ops.mkldnn, torch.ops.aten
    formulas = {mkldnn._linear_pointwise: linear, mkldnn._convolution_pointwise: conv}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = attention
    return formulas


def counted_flops(fn: Callable[[], Any]) -> Dict[str, Any]:
    """The multiply-adds (as 2 FLOPs each) of fn's matrix products, convolutions and attention, by torch's
    FlopCounterMode with the engine's oneDNN kernels added; `by_part` groups them by the module they ran in."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter:
        fn()
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()

    def of(*names):
        return sum(sum(counts.get(n, {}).values()) for n in names)

    encoder, blocks = of("UNetImageEncoder"), of("AdaLNBlock", "AdaLNHead")
    by_op: Dict[str, float] = {}
    for op, v in counts.get("Global", {}).items():
        name = str(op).split(".")[-1] if "." in str(op) else str(op)
        by_op[name] = by_op.get(name, 0.0) + v / 1e9
    return {"gflop": total / 1e9,
            "by_part_gflop": {"image_encoder": encoder / 1e9, "transformer_blocks_and_head": blocks / 1e9,
                              "rest": (total - encoder - blocks) / 1e9},
            "by_op_gflop": by_op,
            "counts": "matrix products, convolutions (the mask decoder's fused oneDNN ones included), attention "
                      "(QK^T and AV, no causal discount: the cached path has no mask), 2 FLOPs per multiply-add",
            "misses": "element-wise work (layer norms, AdaLN modulation, GELU in oneDNN's epilogue, softmax, "
                      "sampling), copies and indexing, and the pipeline's numpy work (resampling, components)"}


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
    from .prompts import include
    from .runs import LocalBackend, RunService, clicks, compute
    from .worker import InferenceClient

    if not (LUNG1 / "image.nrrd").exists():
        return {"lung1": f"skipped: {LUNG1 / 'image.nrrd'} not found"}
    scene, volume, point = _lung1_click_input()  # the scene is held here: a node does not keep it alive
    settings = pipeline.SegmentSettings(n_samples=16)
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    last, model_s = {}, []

    def click():
        last["nodes"] = RunService(LocalBackend(predictor, card)).segment_node(volume, clicks([point]), settings)
        model_s.append(last["nodes"].result.timings_s["model"])

    one_batch = dataclasses.replace(settings, first_wave_mm=None)  # every plane in one batch, as before the waves

    def click_in_one_batch():
        RunService(LocalBackend(predictor, card)).segment_node(volume, clicks([point]), one_batch)

    # what each of issue 22's later speed-ups buys: the same click with one of them turned off, alternating with it
    # (the encoder in channels-last; herding at a coarse scale, when the card's sampling has it)
    without: Dict[str, Callable[[], Any]] = {"channels_last": lambda: _with_env(
        {"ARSEG_CHANNELS_LAST": "0"}, lambda: RunService(LocalBackend(predictor, card)).segment_node(
            volume, clicks([point]), settings))}
    if predictor.config.sampling.selection_scale and predictor.config.sampling.oversample > 1:
        at_last_scale = dataclasses.replace(settings, selection_scale=0)
        without["coarse_selection"] = lambda: RunService(LocalBackend(predictor, card)).segment_node(
            volume, clicks([point]), at_last_scale)

    client = InferenceClient(model, str(predictor.device))
    slicer_blocks, slicer_outlines = [], []

    def click_as_the_module_does():
        runs_ = []
        seconds, block = run_like_slicer(
            lambda: runs_.append(client.segment(array, m, include(point), settings, volume_key="lung1")) or runs_[-1],
            lambda result: mrml.write_result(scene, volume, result))
        slicer_blocks.append(block)
        slicer_outlines.append(runs_[-1].outline_seconds)  # request -> outline seen by the polling main thread
        return seconds

    def outline_only():
        """Click -> first outline in this process (the click's full sampling is not run: stopped there)."""
        seen = []

        def stop(outline):
            seen.append(outline.seconds)
            raise _OutlineSeen()

        try:
            compute(array, m, include(point), settings, predictor, card, on_outline=stop)
        except _OutlineSeen:
            pass
        return seen[0]

    try:
        if not client.start().wait(300):
            raise RuntimeError("the inference worker did not load the model")
        # both ways alternate after a warm-up of each, so the machine's drift hits both alike
        sync = predictor.device.type == "cuda"
        click(), click_as_the_module_does(), outline_only(), click_in_one_batch()
        for fn in without.values():
            fn()
        slicer_blocks.clear(), slicer_outlines.clear()
        times: Dict[str, list] = {"main": [], "slicer": [], "outline": [], "one_batch": []}
        times.update({f"without_{k}": [] for k in without})
        faults, attainable = [], []
        model_s.clear()
        for _ in range(runs):
            faults0 = minor_page_faults()
            times["main"].append(median_time(click, 1, warmup=0, sync=sync))
            faults.append(minor_page_faults() - faults0)
            # the attainable rate right after each click: a shared machine's speed moves by several times within
            # a minute, and only a rate taken beside each click makes achieved / attainable a property of the code
            attainable.append(gemm_gflops(predictor.device, seconds=0.15)["attainable"])
            times["slicer"].append(click_as_the_module_does())
            times["outline"].append(outline_only())
            times["one_batch"].append(median_time(click_in_one_batch, 1, warmup=0, sync=sync))
            for k, fn in without.items():
                times[f"without_{k}"].append(median_time(fn, 1, warmup=0, sync=sync))
    finally:
        client.shutdown()
    click_model_s = statistics.median(model_s)
    # once, untimed (the counter slows every kernel call), on this thread: FlopCounterMode counts only the thread
    # it is entered on, and the run service's in-process runs have a thread of their own
    flops = counted_flops(lambda: compute(array, m, include(point), settings, predictor, card))
    gflop = flops["gflop"]
    res = last["nodes"].result
    out: Dict[str, Any] = {"click_lung1_s": statistics.median(times["main"]),
                           "click_lung1_slices": int(res.grid.shape[0]),
                           "click_lung1_timings_s": res.timings_s,
                           "click_lung1_consensus_mm3": last["nodes"].report.get("consensus_volume_mm3"),
                           "click_lung1_page_faults": statistics.median(faults),
                           "click_lung1_slicer_s": statistics.median(times["slicer"]),
                           "click_lung1_slicer_longest_block_s": max(slicer_blocks),
                           # the same click with every plane in one batch (first_wave_mm None), alternating with
                           # click_lung1_s: what the click's waves buy; and the planes the waves ran
                           "click_lung1_one_batch_s": statistics.median(times["one_batch"]),
                           "click_lung1_waves_speedup": statistics.median(
                               b / a for a, b in zip(times["main"], times["one_batch"])),
                           # the click with one speed-up turned off (seconds), and what that speed-up buys (the
                           # median of the alternating pairs' ratios)
                           "click_lung1_without_s": {k: statistics.median(times[f"without_{k}"]) for k in without},
                           "click_lung1_speedup_of": {k: statistics.median(
                               b / a for a, b in zip(times["main"], times[f"without_{k}"])) for k in without},
                           "click_lung1_planes_run": res.timings_s.get("planes_run"),
                           # the click's first outline (pipeline.Outline): in this process, and the module's way
                           # (worker, polled main thread; that click's final result above includes the fast pass)
                           "first_outline_s": statistics.median(times["outline"]),
                           "first_outline_slicer_s": statistics.median(slicer_outlines),
                           "click_lung1_model_s": click_model_s, "click_lung1_flops": flops,
                           "click_lung1_gflops_achieved": gflop / statistics.median(times["main"]),
                           "click_lung1_gemm_gflops": statistics.median(attainable),
                           # per click against the rate measured beside it, then the median
                           "click_lung1_efficiency": statistics.median(
                               gflop / t / g for t, g in zip(times["main"], attainable)),
                           "click_lung1_model_efficiency": statistics.median(
                               gflop / t / g for t, g in zip(model_s, attainable))}
    # what the report adds to the click (measures.py: the consensus's and each sample's axial diameters, the mean
    # intensity), part of click_lung1_s too
    from .measures import result_measures

    out["click_lung1_measures_s"] = median_time(lambda: result_measures(res, array), runs)
    # whole-volume mode on a slab of slices (the full 133-slice volume takes minutes on a CPU); a volume needs
    # at least two slices
    volume_slices = max(2, volume_slices)
    k0 = int(json.loads((LUNG1 / "nodule.json").read_text())["centroid_ijk"][2]) - volume_slices // 2
    slab = np.ascontiguousarray(array[k0:k0 + volume_slices])
    m_slab = m.copy()
    m_slab[:3, 3] = (m @ np.array([0, 0, k0, 1.0]))[:3]
    t0 = time.perf_counter()
    compute(slab, m_slab, None, settings, predictor, card)  # timed as it runs, whatever the card's modes
    out["volume_slices_per_s"] = volume_slices / (time.perf_counter() - t0)
    out["volume_slices_measured"] = volume_slices
    return out


def _with_env(values: Dict[str, str], fn: Callable[[], Any]) -> Any:
    """fn() with these environment variables set (the engine reads its switches at call time), then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _OutlineSeen(Exception):
    """Raised from on_outline to stop a click once its first outline is there (bench: outline_only)."""


def bench_first_click(model: str, device: torch.device, repeats: int) -> Dict[str, Any]:
    """The radiologist's first click after the module opens, the module's way (a new worker process, polled under
    an emulated Slicer main thread), medians over `repeats` new workers each:
    `open_to_result_s`: the click comes at once: worker start + torch import + model load + click + nodes;
    `open_to_outline_s`: the same click until its first outline reaches the main thread;
    `load_s`: worker start until the model is loaded (what the module does in the background when it opens);
    `click_after_load_s`: the first click once that is done (its voxels cross to the worker too)."""
    from . import mrml, pipeline
    from .prompts import include
    from .worker import InferenceClient

    scene, volume, point = _lung1_click_input()
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    settings = pipeline.SegmentSettings(n_samples=16)
    rows = []
    for _ in range(repeats):
        row, runs_ = {}, []
        client = InferenceClient(model, str(device))
        try:
            row["open_to_result_s"], _ = run_like_slicer(
                lambda c=client, r=runs_: r.append(
                    (c.start(), c.segment(array, m, include(point), settings, volume_key="lung1"))[1]) or r[-1],
                lambda result: mrml.write_result(scene, volume, result))
            row["open_to_outline_s"] = runs_[-1].outline_seconds
        finally:
            client.shutdown()
        client = InferenceClient(model, str(device))
        try:
            row["load_s"], _ = run_like_slicer(client.start, lambda result: None)
            row["click_after_load_s"], _ = run_like_slicer(
                lambda c=client: c.segment(array, m, include(point), settings, volume_key="lung1"),
                lambda result: mrml.write_result(scene, volume, result))
        finally:
            client.shutdown()
        rows.append(row)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]} | {"repeats": repeats}


ISA_CHOICES = ("both", "native", "avx2")


def run_bench(model: str = DEFAULT_MODEL, device: str = "cpu", runs: int = 10, threads: int = 0,
              volume_slices: int = 4, lung1: bool = True, isa: str = "both") -> Dict[str, Any]:
    """isa: "native" measures in this process only; "avx2" in a child capped at AVX2 only (its result, with the
    cap's check); "both" (default) natively, then the same in the child, its figures under "avx2"."""
    if isa not in ISA_CHOICES:
        raise ValueError(f"isa must be one of {ISA_CHOICES}, got {isa!r}")
    kw = {"model": model, "device": device, "runs": runs, "threads": threads, "volume_slices": volume_slices,
          "lung1": lung1}
    capped = str(device) == "cpu" and has_avx512()
    if isa == "avx2":
        if not capped:
            raise ValueError("--isa avx2 needs a CPU run on a CPU with AVX-512 (otherwise the native figures are "
                             "already without it)")
        return run_in_child(kw)
    out = _run_here(**kw)
    if isa == "both":
        out["avx2"] = run_in_child(kw) if capped else {
            "skipped": "not a CPU run" if str(device) != "cpu" else
            "this CPU has no AVX-512: the figures above are already without it"}
    return out


def run_in_child(kw: Dict[str, Any], env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The bench in a new process with `env` (default: AVX-512 off, cpu_isa.avx2_environment()), which inherits it
    into the inference workers it starts. The child checks the cap before any measurement; a cap that did not take
    effect gives {"refused": why, "instruction_sets": what the child found} instead of figures."""
    env = dict(avx2_environment() if env is None else env)
    with tempfile.TemporaryDirectory(prefix="arseg-bench-") as tmp:
        result = Path(tmp) / "child.json"
        proc = subprocess.run([sys.executable, "-m", "ARSegLib.bench", json.dumps(kw), str(result)],
                              env={**os.environ, **env}, capture_output=True, text=True,
                              cwd=str(Path(__file__).resolve().parents[1]))
        if not result.exists():
            raise RuntimeError(f"the capped bench process failed (exit {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-2000:]}")
        out = json.loads(result.read_text())
    out["environment"] = env
    return out


def _child_main(argv) -> int:
    kw, path = json.loads(argv[0]), Path(argv[1])
    report = instruction_sets()  # first: oneDNN and MKL name their instruction set on first use only
    problems = avx512_in_use(report)
    if problems:
        out = {"refused": "AVX-512 still in use in the capped process, so no figures were measured: "
                          + "; ".join(problems), "instruction_sets": report}
    else:
        out = _run_here(**kw)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 3 if problems else 0


def bench_refinement(predictor, card, runs: int) -> Dict[str, Any]:
    """Refinements of the lung1 click (issue 21), in this process, timed alternating with the click itself so a
    shared machine's drift hits all alike: an exclude point (the consensus voxel where the samples disagree most,
    nearest the click: its plane is drawn again under the prompt) and lock scales 1..4 of the most typical sample
    (every plane drawn again from scale 5)."""
    from . import mrml, pipeline, prompts
    from .runs import compute

    if not (LUNG1 / "image.nrrd").exists():
        return {"refine_lung1": f"skipped: {LUNG1 / 'image.nrrd'} not found"}
    scene, volume, point = _lung1_click_input()
    array, m = mrml.volume_array(volume), mrml.world_ijk_to_ras(volume)
    settings = pipeline.SegmentSettings(n_samples=16)
    click = prompts.include(point)
    first = compute(array, m, click, settings, predictor, card)
    if first.tokens is None:  # a stand-in predictor without token maps
        return {"refine_lung1": "skipped: the model's results keep no token maps"}
    disagreement = first.full(first.disagreement) * (first.full(first.consensus) > 0)
    kji = np.argwhere(disagreement == disagreement.max())
    click_kji = pipeline.point_to_ijk(point, m)[::-1]
    k, j, i = kji[np.argmin(((kji - click_kji) ** 2).sum(1))]
    exclude = tuple(float(v) for v in (m @ np.array([i, j, k, 1.0]))[:3])
    ways = {"click": lambda: compute(array, m, click, settings, predictor, card),
            "exclude": lambda: compute(array, m, click, settings, predictor, card,
                                       prompts.refinement(exclude_points=[exclude]), previous=first),
            "lock": lambda: compute(array, m, click, settings, predictor, card, prompts.refinement(lock_scales=4),
                                    previous=first)}
    times: Dict[str, list] = {name: [] for name in ways}
    last = {}
    for _ in range(runs):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    del scene
    sat = last["exclude"].settings["prompt_satisfaction"][0]
    return {"refine_lung1_click_s": statistics.median(times["click"]),
            "refine_lung1_exclude_s": statistics.median(times["exclude"]),
            "refine_lung1_lock4_s": statistics.median(times["lock"]),
            "refine_lung1_exclude_point_ras": [round(v, 3) for v in exclude],
            "refine_lung1_exclude_satisfaction": sat,
            "refine_lung1_exclude_redrawn_planes": len(last["exclude"].settings["redrawn_planes"]),
            "refine_lung1_lock4_redrawn_planes": len(last["lock"].settings["redrawn_planes"])}


def _run_here(model: str, device: str, runs: int, threads: int, volume_slices: int,
              lung1: bool) -> Dict[str, Any]:
    from .models import ModelError, load_model
    from .training.distributed import resolve_device

    isa_report = instruction_sets() if str(device) == "cpu" else {}
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    note = ""
    try:
        predictor, card = load_model(model, device)
    except ModelError as e:
        if model != DEFAULT_MODEL:  # only the default model's absence has a stand-in (lung1 is its task)
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
        "n_tokens": predictor.config.autoencoder.n_tokens, "instruction_sets": isa_report,
    }
    # a shared machine's load (1, 5, 15 min) at the start and end: every time here is as loaded as this says
    out["load_average_start"] = list(os.getloadavg())
    out["matmul_gflops_before"] = matmul_gflops(predictor.device)
    out["gemm_gflops"] = gemm_gflops(predictor.device)
    out["crop"] = bench_crop(predictor, crop, sampling, runs)
    out["split_s"] = bench_split(predictor, crop, sampling, runs)
    # the same phases for the no-cache reference: only the transformer should differ
    out["split_nocache_s"] = bench_split(predictor, crop, sampling, runs, use_cache=False)
    if lung1:
        out.update(bench_lung1(predictor, card, max(3, runs // 3), volume_slices, model))
        if "click_lung1_s" in out and not note:
            out["first_click_lung1"] = bench_first_click(model, predictor.device, max(1, runs // 3))
        out.update(bench_refinement(predictor, card, max(3, runs // 3)))
    out["matmul_gflops_after"] = matmul_gflops(predictor.device)
    out["load_average_end"] = list(os.getloadavg())
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
        if "click_lung1_measures_s" in r:
            lines.append(f"  of which the report's diameters and mean intensity: "
                         f"{1000 * r['click_lung1_measures_s']:.1f} ms")
        if "click_lung1_one_batch_s" in r:
            lines.append(f"  its planes in waves ({r['click_lung1_planes_run']} planes run) against every plane in one "
                         f"batch: {r['click_lung1_s']:.3f} s / {r['click_lung1_one_batch_s']:.3f} s alternating, "
                         f"{r['click_lung1_waves_speedup']:.2f}x")
        for k, x in r.get("click_lung1_speedup_of", {}).items():
            lines.append(f"  without {k.replace('_', ' ')}: {r['click_lung1_without_s'][k]:.3f} s alternating: it buys "
                         f"{x:.2f}x")
        if "first_outline_s" in r:
            lines.append(f"lung1 click's first outline: {r['first_outline_s']:.3f} s in this process, "
                         f"{r['first_outline_slicer_s']:.3f} s the Slicer module's way")
    elif "lung1" in r:
        lines.append(f"lung1: {r['lung1']}")
    if "first_click_lung1" in r:
        f = r["first_click_lung1"]
        lines.append(f"first lung1 click after the module opens: {f['open_to_result_s']:.2f} s when it comes at once "
                     f"(worker start, torch, model, click); the worker loads in {f['load_s']:.2f} s, and the first "
                     f"click after that takes {f['click_after_load_s']:.2f} s")
    if "load_average_start" in r:
        start, end = (" / ".join(f"{v:.1f}" for v in r[k]) for k in ("load_average_start", "load_average_end"))
        lines.append(f"load average (1, 5, 15 min) at the start {start}, at the end {end}")
    lines.append(f"peak RSS {r['peak_rss_mb']:.0f} MB; machine speed (512x512 matmul) {r['matmul_gflops_before']:.0f} "
                 f"GFLOP/s before, {r['matmul_gflops_after']:.0f} after")
    if r.get("instruction_sets"):
        lines.append("instruction sets in use: " + "; ".join(f"{k} {v}" for k, v in r["instruction_sets"].items()))
    g = r.get("gemm_gflops")
    if g:
        m, k, n = g["shape_m_k_n"]
        lines.append(f"fp32 product {m}x{k} @ {k}x{n} (the model's shape): {g['mm']:.0f} GFLOP/s torch.mm, "
                     f"{g['linear']:.0f} GFLOP/s the model's oneDNN linear")
    if "click_lung1_efficiency" in r:
        f = r["click_lung1_flops"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in f["by_part_gflop"].items())
        lines.append(f"lung1 click arithmetic: {f['gflop']:.1f} GFLOP ({parts}); achieved "
                     f"{r['click_lung1_gflops_achieved']:.0f} GFLOP/s, "
                     f"{100 * r['click_lung1_efficiency']:.0f} % of the attainable (a plain product of the model's "
                     f"shape beside each click: "
                     f"{r['click_lung1_gemm_gflops']:.0f} GFLOP/s; model part alone: "
                     f"{100 * r['click_lung1_model_efficiency']:.0f} %)")
    return "\n".join(lines)


# the figures set side by side, native against AVX2: (label, path into the result, format)
_COMPARED = (("N = 16 on one crop, s", ("crop", "16", "cached_s"), "{:.3f}"),
             ("lung1 click's first outline in process, s", ("first_outline_s",), "{:.3f}"),
             ("lung1 click's first outline, the module's way, s", ("first_outline_slicer_s",), "{:.3f}"),
             ("lung1 click in process, s", ("click_lung1_s",), "{:.2f}"),
             ("lung1 click, every plane in one batch, s", ("click_lung1_one_batch_s",), "{:.2f}"),
             ("lung1 click, the Slicer module's way, s", ("click_lung1_slicer_s",), "{:.2f}"),
             ("first click after the module opens, s", ("first_click_lung1", "open_to_result_s"), "{:.2f}"),
             ("its first outline, s", ("first_click_lung1", "open_to_outline_s"), "{:.2f}"),
             ("GEMM of the model's shape beside clicks, GFLOP/s", ("click_lung1_gemm_gflops",), "{:.0f}"),
             ("lung1 click efficiency (achieved / attainable)", ("click_lung1_efficiency",), "{:.1%}"))


def _at(r: Dict[str, Any], path):
    for key in path:
        if not isinstance(r, dict) or key not in r:
            return None
        r = r[key]
    return r


def format_comparison(r: Dict[str, Any]) -> str:
    a = r.get("avx2")
    if not a:
        return ""
    if "refused" in a or "skipped" in a:
        return "AVX2 figures: " + ("NOT MEASURED: " + a["refused"] if "refused" in a else "none: " + a["skipped"])
    lines = [f"{'':48} {'native':>9} {'AVX2':>9}"]
    for label, path, fmt in _COMPARED:
        cells = [_at(r, path), _at(a, path)]
        lines.append(f"{label:48} " + " ".join(f"{fmt.format(v) if v is not None else '-':>9}" for v in cells))
    return "\n".join(lines)


def main_bench(json_out: Optional[str], **kw) -> Dict[str, Any]:
    r = run_bench(**kw)
    print(format_table(r))
    if isinstance(r.get("avx2"), dict) and "crop" in r["avx2"]:
        print("\nthe same with AVX-512 off (a child process capped at AVX2, checked):")
        print(format_table(r["avx2"]))
    comparison = format_comparison(r)
    if comparison:
        print("\n" + comparison)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(r, indent=2) + "\n")
    return r


if __name__ == "__main__":  # the capped child of run_in_child
    sys.exit(_child_main(sys.argv[1:]))
