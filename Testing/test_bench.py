"""arseg bench produces every field the speed issue asks for (timings themselves are not asserted)."""

from __future__ import annotations

import json

from ARSegLib.cli import main
from ARSegLib.models import read_card


def test_bench_json_has_every_field(tmp_path, lung1_dir):
    out = tmp_path / "bench.json"
    assert main(["bench", "--runs", "1", "--volume-slices", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("device", "cpu", "torch", "threads", "crop", "split_s", "click_lung1_s", "click_lung1_slices",
                "volume_slices_per_s", "peak_rss_mb", "matmul_gflops_before", "matmul_gflops_after",
                "click_lung1_slicer_s", "click_lung1_slicer_longest_block_s", "click_lung1_page_faults",
                "heap_keeps_freed_memory"):
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
    # the module's way: the worker process polled under an emulated Slicer main thread, which never blocks long
    assert 0 < r["click_lung1_slicer_longest_block_s"] < r["click_lung1_slicer_s"]
    first = r["first_click_lung1"]  # new workers: the click at once, and after the model has loaded
    assert first["repeats"] == 1 and first["open_to_result_s"] > 0 and first["load_s"] > 0
    assert first["click_after_load_s"] > 0
