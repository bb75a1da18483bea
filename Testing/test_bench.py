"""arseg bench produces every field the speed issue asks for (timings themselves are not asserted), natively and
with AVX-512 off in a checked child process; its FLOP count and instruction-set checks are exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ARSegLib import bench, cpu_isa
from ARSegLib.cli import main
from ARSegLib.engine import fused
from ARSegLib.models import read_card

NEW_FIELDS = ("instruction_sets", "gemm_gflops", "click_lung1_flops", "click_lung1_model_s",
              "click_lung1_gflops_achieved", "click_lung1_gemm_gflops", "click_lung1_efficiency",
              "click_lung1_model_efficiency", "first_outline_s", "first_outline_slicer_s")


def check_figures(r):
    for key in ("device", "cpu", "torch", "threads", "crop", "split_s", "click_lung1_s", "click_lung1_slices",
                "volume_slices_per_s", "peak_rss_mb", "matmul_gflops_before", "matmul_gflops_after",
                "click_lung1_slicer_s", "click_lung1_slicer_longest_block_s", "click_lung1_page_faults",
                "heap_keeps_freed_memory") + NEW_FIELDS:
        assert key in r, key
    assert set(r["crop"]) == {"1", "4", "16"}
    for row in r["crop"].values():
        assert row["cached_s"] > 0 and row["nocache_s"] > 0
        lo, hi = row["speedup_pairs_min_max"]
        assert 0 < lo <= hi  # one run: both ends are its one pair's ratio
    assert isinstance(r["cpu_features"], dict) and all(isinstance(v, bool) for v in r["cpu_features"].values())
    phases = {"image_encoder", "transformer", "decoding", "consensus"}
    if read_card(r["model"]).config.sampling.oversample > 1:
        phases.add("selection")  # kernel herding keeps N of the candidates
    for split in ("split_s", "split_nocache_s"):
        assert set(r[split]) == phases or r["note"]
    assert r["click_lung1_slices"] == 17  # +-20 mm of 2.5 mm slices around the click
    assert r["click_lung1_page_faults"] >= 0
    # the click's planes in waves (pipeline._first_wave) against all 17 in one batch, alternating; the load
    assert 0 < r["click_lung1_planes_run"] < 17 and r["click_lung1_one_batch_s"] > 0
    assert r["click_lung1_waves_speedup"] > 0
    # the click with one speed-up turned off, alternating: the channels-last encoder always, herding at a coarse
    # scale when the card's sampling has it
    sampling = read_card(r["model"]).config.sampling
    expected = {"channels_last"} | ({"coarse_selection"} if sampling.selection_scale and sampling.oversample > 1
                                    else set())
    assert set(r["click_lung1_without_s"]) == set(r["click_lung1_speedup_of"]) == expected
    assert all(v > 0 for v in r["click_lung1_without_s"].values())
    assert len(r["load_average_start"]) == len(r["load_average_end"]) == 3
    # the module's way: the worker process polled under an emulated Slicer main thread, which never blocks long
    assert 0 < r["click_lung1_slicer_longest_block_s"] < r["click_lung1_slicer_s"]
    first = r["first_click_lung1"]  # new workers: the click at once, and after the model has loaded
    assert first["repeats"] == 1 and first["open_to_result_s"] > 0 and first["load_s"] > 0
    assert first["click_after_load_s"] > 0
    assert 0 < first["open_to_outline_s"] < first["open_to_result_s"]
    # the click's first outline comes before its result, in this process and the module's way
    assert 0 < r["first_outline_s"] < r["click_lung1_s"]
    assert 0 < r["first_outline_slicer_s"] < r["click_lung1_slicer_s"]
    # the arithmetic: every part counted, the parts add up, and the click reaches some fraction of a plain product
    f = r["click_lung1_flops"]
    assert all(v > 0 for v in f["by_part_gflop"].values())
    assert sum(f["by_part_gflop"].values()) == pytest.approx(f["gflop"], rel=1e-9)
    assert sum(f["by_op_gflop"].values()) == pytest.approx(f["gflop"], rel=1e-9)
    g = r["gemm_gflops"]
    assert g["attainable"] == max(g["mm"], g["linear"]) > 0
    assert 0 < r["click_lung1_model_s"] < r["click_lung1_s"] * 1.5
    assert r["click_lung1_gemm_gflops"] > 0
    # achieved / attainable, each click against the rate measured beside it (the model part is most of the click)
    assert 0 < r["click_lung1_efficiency"] < r["click_lung1_model_efficiency"] < 1
    # refinements of the click (issue 21): an exclude point redraws its plane, lock scales every plane
    if "refine_lung1" not in r:
        assert r["refine_lung1_click_s"] > 0 and r["refine_lung1_exclude_s"] > 0 and r["refine_lung1_lock4_s"] > 0
        assert r["refine_lung1_exclude_redrawn_planes"] == 1 and r["refine_lung1_lock4_redrawn_planes"] >= 5
        assert r["refine_lung1_exclude_satisfaction"]["kind"] == "exclude"


def test_bench_json_has_every_field(tmp_path, lung1_dir):
    out = tmp_path / "bench.json"
    assert main(["bench", "--runs", "1", "--volume-slices", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    check_figures(r)
    if not cpu_isa.has_avx512():
        assert "skipped" in r["avx2"]
        return
    native, capped = r["instruction_sets"], r["avx2"]["instruction_sets"]
    assert cpu_isa.avx512_in_use(native)  # this CPU runs AVX-512 natively...
    assert cpu_isa.avx512_in_use(capped) == [] and capped["aten"] == "AVX2"  # ...and the child did not
    check_figures(r["avx2"])  # every figure again, in the capped child
    assert r["avx2"]["environment"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    # the same click does the same arithmetic whatever the instruction set (a round-off in the presence gate could
    # draw one candidate more or less on one plane, hence not exact)
    assert r["avx2"]["click_lung1_flops"]["gflop"] == pytest.approx(r["click_lung1_flops"]["gflop"], rel=0.01)


def test_capped_child_refuses_when_the_cap_does_not_take_effect():
    """Only ATen capped: oneDNN and MKL still run AVX-512, so the child measures nothing and says which."""
    if not cpu_isa.has_avx512():
        pytest.skip("this CPU has no AVX-512: nothing to cap")
    kw = {"model": "lidc-nodule", "device": "cpu", "runs": 1, "threads": 0, "volume_slices": 2, "lung1": False}
    out = bench.run_in_child(kw, env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert "crop" not in out and "refused" in out
    assert "onednn" in out["refused"] and "mkl" in out["refused"] and "aten:" not in out["refused"]
    assert out["instruction_sets"]["aten"] == "AVX2"


def test_avx2_environment_caps_every_library():
    probe = "import json; from ARSegLib import cpu_isa; print(json.dumps(cpu_isa.instruction_sets()))"
    env = {**os.environ, **cpu_isa.avx2_environment()}
    capped = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    assert cpu_isa.avx512_in_use(capped) == [], capped
    assert capped["aten"] == "AVX2" and "avx2" in capped["onednn"]
    # MKL names the instruction set it was capped to; on an AMD CPU without AVX-512 (nothing to cap) its banner
    # says only "Intel(R) Architecture processors" (seen on a Zen 3 EPYC)
    assert "AVX2" in capped["mkl"] or (not cpu_isa.has_avx512() and "AVX-512" not in capped["mkl"]), capped["mkl"]
    if cpu_isa.has_avx512():
        assert cpu_isa.avx512_in_use(cpu_isa.instruction_sets())  # in this (uncapped) process


def test_flop_count_of_the_engine_kernels():
    """The oneDNN linear and convolution and CPU attention, which torch's counter does not know, counted exactly."""
    if not fused.usable():
        pytest.skip("the oneDNN fused path is not available here")
    g = torch.Generator().manual_seed(0)
    lin, conv = torch.nn.Linear(24, 40), torch.nn.Conv2d(8, 16, 3, padding=1)
    x, img = torch.randn(7, 24, generator=g), torch.randn(2, 8, 6, 6, generator=g)
    q, k = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    with torch.inference_mode():
        assert bench.counted_flops(lambda: fused.linear(lin, x, gelu=True))["gflop"] * 1e9 == 2 * 7 * 24 * 40
        assert bench.counted_flops(lambda: fused.conv2d(conv, img))["gflop"] * 1e9 == 2 * (2 * 16 * 6 * 6) * (8 * 9)
        attention = bench.counted_flops(lambda: F.scaled_dot_product_attention(q, k, k))
    assert attention["gflop"] * 1e9 == 2 * (2 * 5 * 8 * 9) * 2  # QK^T and AV, 2 heads
