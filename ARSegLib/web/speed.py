"""How fast the review page is, against the plain click on the same machine:

    python -m ARSegLib.web.speed VOLUME --point=R,A,S [--clicks 3] [--json out.json]

- server start: `arseg view` launched until it says it is serving (the worker loads the model meanwhile);
- page ready: the page requested in headless Chromium until all four views have drawn;
- click-to-overlay: a click at the point (the slice views centred on it first, every nodule cleared before)
  until the consensus colour is on the axial view's image in the browser; the server's own split beside it
  (the run in the worker, the write into MRML);
- plain click: the same volume and point in this process (runs.compute), the model loaded once;
  and the same click through the inference worker's client, as the page and the Slicer module run it.

Every click after the first is warm; the first of each is reported apart. Needs what the browser test needs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median(values):
    return round(statistics.median(values), 3) if values else None


def page_timings(volume: Path, point, clicks: int, tmp: Path) -> dict:
    from .browser import Page, consensus_pixels

    page = Page(tmp, volume, point)
    out = {}
    try:
        page.start_server()
        page.start_browser()
        out["server_start_s"] = page.timings["server_start_s"]
        out["page_ready_s"] = round(page.open(), 3)
        page.goto_nodule()
        clicks_s, server = [], []
        for _ in range(clicks):
            if page.nodules():
                page.by_id("arseg-clear-nodules").click()
                page.wait(lambda: not page.nodules() and consensus_pixels(page.axial()) < 20, 30, "a clear view")
            t0 = time.perf_counter()
            page.click_axial_centre()
            page.wait(lambda: consensus_pixels(page.axial()) > 300, 300, "the overlay")
            clicks_s.append(time.perf_counter() - t0)
            page.wait(lambda: page.text("arseg-run-state") == "done", 30, "the run's state")
            server.append(json.loads(page.text("arseg-timings")))
        out["click_to_overlay_first_s"] = round(clicks_s[0], 3)
        out["click_to_overlay_warm_s"] = _median(clicks_s[1:])
        out["click_to_overlay_all_s"] = [round(c, 3) for c in clicks_s]
        out["server_split_warm_s"] = {k: _median([s[k] for s in server[1:]]) for k in server[0]} if clicks > 1 else {}
    finally:
        page.close()
    return out


def plain_timings(volume: Path, point, clicks: int) -> dict:
    from .. import mrml, pipeline, runs
    from ..models import DEFAULT_MODEL, load_model
    from ..prompts import include
    from ..worker import InferenceClient

    scene = mrml.new_scene()
    node = mrml.load_volume(scene, volume)
    array, m = mrml.volume_array(node), mrml.world_ijk_to_ras(node)
    predictor, card = load_model(DEFAULT_MODEL, "cpu")
    in_process = []
    for _ in range(clicks):
        t0 = time.perf_counter()
        runs.compute(array, m, include(point), pipeline.SegmentSettings(), predictor, card)
        in_process.append(time.perf_counter() - t0)
    client = InferenceClient(DEFAULT_MODEL, "auto")
    worker = []
    try:
        client.start().wait(120)
        for _ in range(clicks):
            t0 = time.perf_counter()
            run = client.segment(array, m, include(point), settings=pipeline.SegmentSettings(), volume_key="speed")
            run.wait(300)
            if run.error is not None:
                raise run.error
            worker.append(time.perf_counter() - t0)
    finally:
        client.shutdown()
    return {"plain_click_first_s": round(in_process[0], 3), "plain_click_warm_s": _median(in_process[1:]),
            "worker_click_first_s": round(worker[0], 3), "worker_click_warm_s": _median(worker[1:])}


def main(argv=None) -> int:
    from ..command_args import parse_point

    ap = argparse.ArgumentParser(prog="python -m ARSegLib.web.speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("volume")
    ap.add_argument("--point", required=True, metavar="R,A,S")
    ap.add_argument("--clicks", type=int, default=3, help="clicks of each kind (the first is cold)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    point = parse_point(args.point)
    with tempfile.TemporaryDirectory(prefix="arseg-speed-") as tmp:
        result = {"volume": Path(args.volume).name, "point_ras_mm": list(point), "clicks": args.clicks}
        result.update(page_timings(Path(args.volume), point, args.clicks, Path(tmp)))
    result.update(plain_timings(Path(args.volume), point, args.clicks))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
