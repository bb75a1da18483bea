"""The review page (`arseg view`, ARSegLib.web).

Without a browser: the catalog serves only what the command line gave, the session runs one click at a time and
cancels cleanly, the CLI's errors. In a real browser (Debian's headless Chromium driven by selenium): the server
started as `arseg view` on 127.0.0.1, the page opened, a click at the nodule of lung1 (the bundled demo slab of
it when present), the overlay awaited and the rendered pixels checked (the consensus colour near the nodule; the
disagreement toggle changes the picture; scale 1 differs from scale 8), the downloads read back, a page that
reloads mid-run. Browser tests skip, saying why, when Chromium, chromedriver, EGL, trame-slicer or the data are
absent. ARSEG_WEB_SCREENSHOTS=DIR keeps the screenshots; ARSEG_WEB_TIMINGS=FILE writes the measured times.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LUNG1, ROOT
from held_runs import HeldClient

DEMO = ROOT / "Resources" / "Demo" / "lung1-slab.nrrd"
CONSENSUS_RGB = np.array([0.95, 0.75, 0.15]) * 255  # mrml.OutputOptions().consensus_color


# ============================================================================================ no browser

def test_catalog_lists_only_what_was_given(tmp_path):
    from ARSegLib.web.catalog import CatalogError, VolumeCatalog

    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.nrrd", "sub/b.nii.gz", "c.seg.nrrd", "notes.txt"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.mha"
    single.write_bytes(b"x")
    catalog = VolumeCatalog.from_arguments([single, folder / "a.nrrd"], [folder])
    labels = [c["title"] for c in catalog.choices()]
    assert labels == ["single.mha", "a.nrrd", "scans/sub/b.nii.gz"]  # a.nrrd once; no .seg.nrrd, no .txt
    assert all(str(tmp_path) not in json.dumps(c) for c in catalog.choices())  # no server path to the browser
    assert catalog.get("v1").path == (folder / "a.nrrd").resolve()
    for forged in ("../etc/passwd", "/etc/passwd", str(folder / "a.nrrd"), "v99", None, 1, {"key": "v0"}):
        assert catalog.get(forged) is None
    with pytest.raises(CatalogError, match="not found"):
        VolumeCatalog.from_arguments([tmp_path / "missing.nrrd"], [])
    with pytest.raises(CatalogError, match="seg.nrrd"):
        VolumeCatalog.from_arguments([folder / "c.seg.nrrd"], [])
    with pytest.raises(CatalogError, match="folder not found"):
        VolumeCatalog.from_arguments([], [tmp_path / "nowhere"])
    assert len(VolumeCatalog.from_arguments([], [folder], limit=1)) == 1


def test_parse_ras_and_exposure_warning():
    pytest.importorskip("trame_slicer", reason="the web extra (trame-slicer) is not installed")
    from ARSegLib.web.app import parse_ras
    from ARSegLib.web.review import ReviewError
    from ARSegLib.web.serve import exposure_warning

    assert parse_ras("-56.4, -86.34,-115.96") == (-56.4, -86.34, -115.96)
    assert parse_ras("1 2 3") == (1.0, 2.0, 3.0)
    for bad in ("", "1,2", "a,b,c", "1,2,3,4", "1e9,0,0"):
        with pytest.raises(ReviewError, match="three numbers"):
            parse_ras(bad)
    assert "0.0.0.0" in exposure_warning("0.0.0.0") and "no login" in exposure_warning("0.0.0.0")


def test_cli_view_refuses_bad_input(tmp_path, capsys):
    from ARSegLib.cli import main

    for argv, message in ((["view"], "nothing to show"),
                          (["view", str(tmp_path / "missing.nrrd")], "volume file not found"),
                          (["view", "--data-dir", str(tmp_path)], "nothing to show")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_host_option_warns_loudly(tmp_path):
    """--host other than the loopback address: the server says, loudly, that others can reach it (127.0.0.2 is
    still this machine, so nothing is exposed by the test)."""
    missing = _browser_missing()
    if "trame_slicer" in missing or "EGL" in missing:
        pytest.skip(f"no web page here: {missing}")
    from ARSegLib.web.browser import Page

    volume, nodule = _volume_and_nodule()
    page = Page(tmp_path, volume, nodule, extra_args=["--host", "127.0.0.2"])
    try:
        page.start_server()
        log = page.log.read_text(errors="replace")
        assert "listening on 127.0.0.2" in log and "no login and no encryption" in log
        assert "http://127.0.0.2:" in log
    finally:
        page.close()
    assert page.server.returncode is not None


@pytest.fixture()
def small_volume_file(tmp_path):
    from ARSegLib import mrml

    scene = mrml.new_scene()
    rng = np.random.default_rng(0)
    node = mrml.add_scalar_volume(scene, "small", rng.normal(-500, 300, (8, 40, 40)).astype(np.int16),
                                  np.diag([0.7, 0.7, 2.5, 1.0]))
    path = tmp_path / "small.nrrd"
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    return path


def test_session_runs_one_click_at_a_time_and_cancels(small_volume_file):
    from ARSegLib import mrml
    from ARSegLib.web.catalog import VolumeCatalog
    from ARSegLib.web.review import ReviewError, ReviewSession

    scene = mrml.new_scene()
    client = HeldClient()
    session = ReviewSession(scene, VolumeCatalog.from_arguments([small_volume_file]), client)
    with pytest.raises(ReviewError, match="open a volume"):
        session.start((0.0, 0.0, 0.0))
    with pytest.raises(ReviewError, match="no such volume"):
        session.open_volume(str(small_volume_file))  # a path is not a key
    node = session.open_volume("v0")
    session.set_window("Lung")
    assert (node.GetDisplayNode().GetWindow(), node.GetDisplayNode().GetLevel()) == (1400.0, -500.0)
    session.set_window("Auto")
    assert node.GetDisplayNode().GetAutoWindowLevel()
    with pytest.raises(ReviewError, match="no window preset"):
        session.set_window("../../etc")
    n_nodes = scene.GetNumberOfNodes()
    with pytest.raises(Exception, match="outside"):
        session.start((1000.0, 0.0, 0.0))  # a click off the CT: said at once, nothing started
    assert client.runs == []
    centre = mrml.world_ijk_to_ras(node) @ np.array([20, 20, 4, 1.0])
    session.start(tuple(centre[:3]))
    assert session.status.running and len(client.runs) == 1
    assert client.runs[0].args[2].kind == "include"  # a typed prompt, not a bare point
    assert client.runs[0].args[2].point_ras == pytest.approx(tuple(centre[:3]))
    with pytest.raises(ReviewError, match="still working"):
        session.start(tuple(centre[:3]))  # refused, not queued
    with pytest.raises(ReviewError, match="in progress"):
        session.open_volume("v0")
    client.runs[0].fraction = 0.5
    assert session.poll().fraction == 0.5
    session.cancel()
    status = session.poll()
    assert status.state == "cancelled" and "nothing was changed" in status.message
    assert scene.GetNumberOfNodes() == n_nodes and session.results() is None
    with pytest.raises(ReviewError, match="model card"):
        session.start(None)  # no card: click mode only
    from ARSegLib.models import read_card
    from ARSegLib.pipeline import SettingsError, UnsupportedModeError

    session.card = read_card("lidc-nodule")
    assert session.modes == ["click"]
    with pytest.raises(UnsupportedModeError, match="not validated"):
        session.start(None)  # the shipped model's card lists clicks only
    session.settings.n_samples = 0
    with pytest.raises(SettingsError, match="n_samples"):
        session.start(tuple(centre[:3]))
    session.settings.n_samples = 16
    assert client.runs[-1].finished  # none of these started a run
    session.start(tuple(centre[:3]))  # free again
    client.runs[-1].error, client.runs[-1].finished = RuntimeError("boom"), True
    assert session.poll().state == "failed" and "boom" in session.status.message
    with pytest.raises(ReviewError, match="no result yet"):
        session.segmentation_bytes()


# ============================================================================================ in a browser

def _browser_missing() -> str:
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install chromium chromium-driver)"
    if ctypes.util.find_library("EGL") is None:
        return "no EGL library for offscreen rendering (Debian: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri)"
    for module, extra in (("selenium", "test"), ("trame_slicer", "web")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e \".[{extra}]\")"
    return ""


def _volume_and_nodule():
    if DEMO.exists():
        meta = json.loads(DEMO.with_suffix("").with_suffix(".json").read_text())
        return DEMO, tuple(meta["nodule_centroid_ras_mm"])
    if not (LUNG1 / "image.nrrd").exists():
        pytest.skip(f"neither the demo slab ({DEMO}) nor lung1 ({LUNG1}) is available")
    return LUNG1 / "image.nrrd", tuple(json.loads((LUNG1 / "nodule.json").read_text())["centroid_ras_mm"])


def open_page(folder):
    """The review page on the demo (or lung1) in a real browser, served from folder; closed when done."""
    missing = _browser_missing()
    if missing:
        pytest.skip(f"no browser test: {missing}")
    from ARSegLib.web.browser import Page

    p = Page(folder, *_volume_and_nodule())
    p.keep_dir = Path(os.environ["ARSEG_WEB_SCREENSHOTS"]) if os.environ.get("ARSEG_WEB_SCREENSHOTS") else None
    try:
        p.start_server()
        p.start_browser()
        p.timings["page_ready_s"] = round(p.open(), 2)
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    opened = open_page(tmp_path_factory.mktemp("web"))
    p = next(opened)
    try:
        yield p
    finally:
        opened.close()
        timings_file = os.environ.get("ARSEG_WEB_TIMINGS")
        if timings_file:
            Path(timings_file).write_text(json.dumps(p.timings, indent=2) + "\n")


def test_browser_click_segments_the_nodule(page):
    from ARSegLib.web.browser import By, consensus_pixels  # noqa: F401 (selenium only where a browser is)

    page.goto_nodule()
    before = page.settled_axial()
    assert consensus_pixels(before) < 20, "consensus colour on the page before any click"
    t0 = time.perf_counter()
    page.click_axial_centre()
    assert page.wait_run() == "done", page.text("arseg-run-message")
    after = page.settled_axial(before)
    page.timings["click_to_overlay_browser_s"] = round(time.perf_counter() - t0, 2)
    page.timings["server"] = json.loads(page.text("arseg-timings"))
    page.save(before, "web-before.png")
    page.save(after, "web-consensus.png")
    page.save_page("web-page.png")
    assert consensus_pixels(after) > 300, f"only {consensus_pixels(after)} consensus-coloured pixels at the nodule"
    assert "consensus" in page.text("arseg-run-message")
    rows = page.text("arseg-report")
    assert "Consensus volume" in rows and "Sample 16 IoU with consensus" in rows


def test_browser_disagreement_toggle_changes_the_picture(page):
    from ARSegLib.web.browser import By, consensus_pixels  # noqa: F401 (selenium only where a browser is)

    if page.text("arseg-run-state") != "done":
        pytest.skip("needs the click of test_browser_click_segments_the_nodule")
    plain = page.settled_axial()
    page.by_id("arseg-disagreement").click()
    heat = page.settled_axial(plain)
    page.save(heat, "web-disagreement.png")
    page.save_page("web-page-disagreement.png")
    diff = np.abs(heat - plain).sum(-1)
    assert (diff > 30).sum() > 100, "the disagreement toggle did not change the nodule's pixels"
    page.by_id("arseg-disagreement").click()
    back = page.settled_axial(heat)
    assert np.abs(back - plain).mean() < np.abs(heat - plain).mean() / 4  # off again: the plain picture


def test_browser_scale_slider_scrubs_coarse_to_fine(page):
    from selenium.webdriver.common.keys import Keys

    from ARSegLib.web.browser import By, consensus_pixels  # noqa: F401 (selenium only where a browser is)

    if page.text("arseg-run-state") != "done":
        pytest.skip("needs the click of test_browser_click_segments_the_nodule")
    thumb = page.driver.find_element(By.CSS_SELECTOR, ".arseg-scale .v-slider-thumb")
    fine = page.settled_axial()
    thumb.send_keys(Keys.HOME)
    page.wait(lambda: page.text("arseg-scale-label").startswith("Scale 1/"), 10, "scale 1")
    coarse = page.settled_axial(fine)
    page.save(coarse, "web-scale-1.png")
    assert (np.abs(coarse - fine).sum(-1) > 30).sum() > 100, "scale 1 looks like scale 8"
    thumb.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    page.wait(lambda: page.text("arseg-scale-label").startswith("Scale 3/"), 10, "scale 3")
    page.save(page.settled_axial(coarse), "web-scale-3.png")
    thumb.send_keys(Keys.END)
    page.wait(lambda: page.text("arseg-scale-label") == "Scale 8/8", 10, "scale 8")
    again = page.settled_axial(coarse)
    assert np.abs(again - fine).mean() < np.abs(coarse - fine).mean() / 4


def test_browser_downloads_are_the_results(page):
    from ARSegLib import mrml
    from ARSegLib.web.browser import By, consensus_pixels  # noqa: F401 (selenium only where a browser is)

    if page.text("arseg-run-state") != "done":
        pytest.skip("needs the click of test_browser_click_segments_the_nodule")
    stem = mrml.volume_stem(page.volume)
    seg, report = page.downloads / f"{stem}.seg.nrrd", page.downloads / f"{stem}-report.json"
    page.by_id("arseg-download-seg").click()
    page.wait(seg.exists, 30, "the segmentation's download")
    page.by_id("arseg-download-report").click()
    page.wait(report.exists, 30, "the report's download")
    data = json.loads(report.read_text())
    assert data["mode"] == "click" and data["n_samples"] == 16
    assert np.allclose(data["point_ras_mm"], page.nodule, atol=3.0)  # the click hit the nodule's centre
    assert str(page.volume.parent) not in report.read_text()  # no server path leaves the server
    scene = mrml.new_scene()
    node = mrml.load_segmentation(scene, seg)
    consensus_id = data.get("selected_nodule") or "Consensus"  # the nodule's consensus segment (one-nodule files:
    assert consensus_id in mrml.segment_ids(node)  # "Consensus")
    volume = mrml.load_volume(scene, page.volume)
    consensus = mrml.segment_array(node, consensus_id, mrml.volume_array_shape(volume), mrml.world_ijk_to_ras(volume))
    assert consensus.sum() * data["voxel_volume_mm3"] == pytest.approx(data["consensus_volume_mm3"], rel=1e-3)


def test_browser_reload_mid_run_leaves_the_server_healthy(page):
    from ARSegLib.web.browser import By, consensus_pixels  # noqa: F401 (selenium only where a browser is)

    if page.text("arseg-run-state") != "done":
        pytest.skip("needs the click of test_browser_click_segments_the_nodule")
    page.click_axial_centre()
    page.wait(lambda: page.text("arseg-run-state") == "running", 30, "the second run to start")
    page.driver.refresh()  # the page disconnects mid-run and a new one connects
    page.timings["page_reload_s"] = round(page.open(), 2)
    assert page.wait_run() == "done", page.text("arseg-run-message")
    assert consensus_pixels(page.settled_axial()) > 300
    assert page.server.poll() is None
    assert len(page.nodules()) == 1  # the click inside the nodule redid it


def test_browser_refuses_a_second_click_and_cancels(page):
    from ARSegLib.web.browser import By, consensus_pixels  # noqa: F401 (selenium only where a browser is)

    if page.text("arseg-run-state") != "done":
        pytest.skip("needs the click of test_browser_click_segments_the_nodule")
    nodules = page.nodules()
    page.click_axial_centre()
    page.wait(lambda: page.text("arseg-run-state") == "running", 30, "the run to start")
    page.click_axial_centre()  # while the first runs: refused with a message, not queued
    page.wait(lambda: page.driver.find_elements(By.ID, "arseg-error"), 10, "the refusal")
    assert "still working" in page.text("arseg-error")
    page.by_id("arseg-cancel").click()
    assert page.wait_run() == "cancelled"
    assert "nothing was changed" in page.text("arseg-run-message") and page.nodules() == nodules
    assert consensus_pixels(page.settled_axial()) > 300  # the earlier result is still on show


def test_browser_keeps_samples_on_demand_and_clears(page):
    from ARSegLib.web.browser import By, consensus_pixels  # noqa: F401 (selenium only where a browser is)

    if not page.nodules():
        pytest.skip("needs the nodule of test_browser_click_segments_the_nodule")
    page.by_id("arseg-include-samples").click()
    page.click_axial_centre()
    page.wait(lambda: page.text("arseg-run-state") == "running", 30, "the run with samples to start")
    assert page.wait_run() == "done", page.text("arseg-run-message")
    page.wait(lambda: page.driver.find_elements(By.ID, "arseg-sample"), 10, "the sample chooser")
    with_result = page.settled_axial()
    # the same nodule again: a redo, said on the page; Undo gives the nodule its previous result back
    assert "Nodule 1 redone:" in page.text("arseg-run-message"), page.text("arseg-run-message")
    page.by_id("arseg-undo").click()
    page.wait(lambda: page.text("arseg-run-message").startswith("Undone: Nodule 1 back to its previous result"),
              20, "the undo")
    page.wait(lambda: not page.driver.find_elements(By.ID, "arseg-sample"), 10, "the samples to go with the redo")
    assert len(page.nodules()) == 1
    page.by_id("arseg-clear-nodules").click()
    cleared = page.settled_axial(with_result)
    assert consensus_pixels(with_result) > 300 and consensus_pixels(cleared) < 20
    assert page.nodules() == []


class _LocalClient:
    """The worker client's interface on this process: each run is runs.compute on a thread (runs.LocalRun), with
    the model given, so that a session's clicks and refinements run the real pipeline without a worker."""

    def __init__(self, predictor, card):
        self.predictor, self.card, self.runs = predictor, card, []

    def holds(self, volume_key):
        return False

    def segment(self, volume, ijk_to_ras, click=None, settings=None, volume_key=None, refinement=None,
                previous=None):
        from ARSegLib import runs

        self.runs.append(runs.LocalRun(lambda progress, cancel, _outline: runs.compute(
            volume, ijk_to_ras, click, settings, self.predictor, self.card, refinement, previous, progress, cancel)))
        return self.runs[-1]


def _finish(session):
    for run in session.client.runs:
        run.wait(120)
    status = session.poll()
    assert status.state == "done", status.message
    return status


def test_session_refines_the_selected_nodule_and_undo_gives_back_what_it_refines_from(tmp_path, tiny, lung1):
    """ReviewSession's prompts on the real pipeline (the tiny model, through runs.compute): refusals before any run,
    an exclude point, a sample used, each on the same nodule; Undo puts back the result the next refinement starts
    from, step by step."""
    from ARSegLib import mrml
    from ARSegLib.prompts import PromptError
    from ARSegLib.web.catalog import VolumeCatalog
    from ARSegLib.web.review import ReviewError, ReviewSession

    scene = mrml.new_scene()
    node = mrml.add_scalar_volume(scene, "lung1", lung1.array, lung1.ijk_to_ras)
    path = tmp_path / "lung1.nrrd"
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)
    predictor, card = tiny
    client = _LocalClient(predictor, card)
    session = ReviewSession(mrml.new_scene(), VolumeCatalog.from_arguments([path]), client, card)
    session.settings.n_samples = 4
    session.open_volume("v0")
    with pytest.raises(ReviewError, match="refines the selected nodule: click on a nodule first"):
        session.refine_at("exclude", lung1.nodule_ras)
    session.start(lung1.nodule_ras)
    _finish(session)
    key = session._run_key()
    clicked = session.service.memory.get(key, "Nodule_1").result
    n_scales = session.n_scales()
    for refuse, words in ((lambda: session.lock_finer_than(n_scales), f"scale {n_scales} is the finest"),
                          (lambda: session.use_sample(0), "no sample 0"),
                          (lambda: session.use_sample(5), "has 4 samples"),
                          (lambda: session.refine_at("sideways", lung1.nodule_ras), "include or an exclude point")):
        with pytest.raises(ReviewError, match=words):
            refuse()
    with pytest.raises(PromptError, match="outside this nodule's grid"):  # the top plane: above the click's +-20 mm
        session.refine_at("exclude", np.add(lung1.nodule_ras, (0.0, 0.0, 28.0)))
    assert len(client.runs) == 1 and not session.status.running  # none of these started a run

    session.refine_at("exclude", np.add(lung1.nodule_ras, (1.5, 0.0, 0.0)))
    status = _finish(session)
    assert status.message.startswith("Nodule 1 refined (exclude at "), status.message
    excluded = session.service.memory.get(key, "Nodule_1").result
    assert excluded is not clicked and excluded.settings["refinement"]["prompts"][0]["kind"] == "exclude"
    assert [n.id for n in session.nodules()] == ["Nodule_1"]
    assert session.nodule_prompts()["Nodule_1"][1].startswith("exclude at ")
    session.use_sample(2)
    status = _finish(session)
    assert "sample 2 used" in status.message, status.message
    used = session.service.memory.get(key, "Nodule_1").result
    assert np.array_equal(used.consensus, excluded.sample_mask(2)) and len(session.nodule_prompts()["Nodule_1"]) == 3

    assert session.undo().startswith("Nodule 1 back to its previous result")
    assert session.service.memory.get(key, "Nodule_1").result is excluded  # what the next refinement starts from
    assert len(session.nodule_prompts()["Nodule_1"]) == 2
    session.undo()
    assert session.service.memory.get(key, "Nodule_1").result is clicked
    assert "removed" in session.undo()
    assert session.service.memory.get(key, "Nodule_1") is None and session.nodules() == []
