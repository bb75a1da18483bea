"""The review page's prompts (`arseg view`, ARSegLib.web): include / exclude points on the selected nodule (a
toggle, and Shift+click for exclude), "Resample finer than this scale", the sample picker with "Use this sample",
Undo, and the refusals, driven in a real browser (Debian's headless Chromium through selenium) against a real
server and worker, as Testing/test_web.py drives the click. Every refinement goes ReviewSession -> RunService
(refine_request, started on the worker like a click). Skips, saying why, where test_web.py's browser tests skip.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_web import open_page

CONSENSUS_VOLUME = "Consensus volume"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    yield from open_page(tmp_path_factory.mktemp("web-refine"))


def _report(page) -> dict:
    """The report table on the page: {measure: "value unit"}."""
    from ARSegLib.web.browser import By

    rows = page.driver.find_elements(By.CSS_SELECTOR, "#arseg-report tr")
    out = {}
    for row in rows:
        cells = [c.get_attribute("textContent").strip() for c in row.find_elements(By.TAG_NAME, "td")]
        if len(cells) == 2:
            out[cells[0]] = cells[1]
    return out


def _prompts(page):
    from ARSegLib.web.browser import By

    return [e.get_attribute("textContent").strip()
            for e in page.driver.find_elements(By.CSS_SELECTOR, ".arseg-nodule-prompts")]


def _refused(page, message: str, before_message: str):
    """A refusal: the message on the page, no run started (the run's message and state unchanged)."""
    from ARSegLib.web.browser import By

    page.wait(lambda: page.driver.find_elements(By.ID, "arseg-error") and message in page.text("arseg-error"), 20,
              f"the refusal {message!r}")
    assert page.text("arseg-run-state") != "running"
    assert page.text("arseg-run-message") == before_message


def _click_at(page, dx: int, dy: int, shift: bool = False):
    """A click on the axial view at (dx, dy) pixels from its centre (selenium 4 offsets are from the centre)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    chain = ActionChains(page.driver)
    if shift:
        chain = chain.key_down(Keys.SHIFT)
    chain = chain.move_to_element_with_offset(page.views()[0], dx, dy).click()
    if shift:
        chain = chain.key_up(Keys.SHIFT)
    chain.perform()


def _consensus_offsets(picture: np.ndarray, half: int = 80):
    """(dx, dy) from the view's centre of the consensus-coloured pixels near it (browser.consensus_pixels's test)."""
    h, w, _ = picture.shape
    window = picture[h // 2 - half:h // 2 + half, w // 2 - half:w // 2 + half]
    r, g, b = window[..., 0], window[..., 1], window[..., 2]
    ys, xs = np.nonzero((r - b > 60) & (g - b > 30) & (r >= g) & (r - g < 90))
    return xs - half, ys - half


def _mode(page, mode: str):
    page.by_id(f"arseg-mode-{mode}").click()


def _pick_sample(page, title: str):
    from selenium.webdriver.common.action_chains import ActionChains

    from ARSegLib.web.browser import By

    # a click where the picker is drawn (its field, not the hidden input selenium's own click would aim at)
    ActionChains(page.driver).move_to_element(page.by_id("arseg-sample-pick")).click().perform()
    page.wait(lambda: [e for e in page.driver.find_elements(By.CSS_SELECTOR, ".v-overlay .v-list-item")
                       if e.text.strip() == title], 10, f"{title} in the sample picker")
    next(e for e in page.driver.find_elements(By.CSS_SELECTOR, ".v-overlay .v-list-item")
         if e.text.strip() == title).click()
    page.wait(lambda: page.by_id("arseg-sample-pick").get_attribute("value") == title, 10, f"{title} picked")


def test_refinement_without_a_nodule_is_refused(page):
    page.goto_nodule()
    _mode(page, "exclude")
    _click_at(page, 0, 0)
    _refused(page, "refines the selected nodule: click on a nodule first", "")
    assert page.nodules() == []
    _mode(page, "click")


def test_exclude_point_refines_the_same_nodule_and_undo_restores_it(page):
    from ARSegLib.web.browser import consensus_pixels

    before = page.settled_axial()
    page.click_axial_centre()
    assert page.wait_run() == "done", page.text("arseg-run-message")
    clicked = page.settled_axial(before)
    assert consensus_pixels(clicked) > 300
    nodules, volume = page.nodules(), _report(page)[CONSENSUS_VOLUME]
    assert len(nodules) == 1 and nodules[0].lower().startswith("nodule 1")
    assert _prompts(page) == []  # a plain click: no refinement yet

    # an exclude point on the consensus, near its right edge: the refined consensus must leave that voxel out
    xs, ys = _consensus_offsets(clicked)
    right = xs >= np.percentile(xs, 90)
    dx, dy = int(np.median(xs[right])) - 2, int(np.median(ys[right]))
    _mode(page, "exclude")
    _click_at(page, dx, dy)
    page.wait(lambda: page.text("arseg-run-state") == "running", 30, "the refinement to start")
    assert page.wait_run() == "done", page.text("arseg-run-message")
    message = page.text("arseg-run-message")
    assert message.startswith("Nodule 1 refined (exclude at "), message
    assert "exclude point" in message  # how many samples meet it
    excluded = page.settled_axial(clicked)
    page.save(clicked, "refine-clicked.png")
    page.save(excluded, "refine-excluded.png")
    page.save_page("refine-page-excluded.png")
    assert page.nodules()[0].lower().startswith("nodule 1") and len(page.nodules()) == 1  # the same nodule, no new one
    assert len(_prompts(page)) == 1 and _prompts(page)[0].startswith("exclude at "), _prompts(page)
    refined_volume = _report(page)[CONSENSUS_VOLUME]
    assert refined_volume != volume, "the exclude point did not change the nodule's consensus"
    assert (np.abs(excluded - clicked).sum(-1) > 30).sum() > 5, "the refined nodule looks as it did"
    prompt_rows = [k for k in _report(page) if k.startswith("Prompt ")]
    assert len(prompt_rows) == 2  # the click and the exclude point, in the report

    # Shift+click in the Nodule mode: an exclude point too, on the same nodule (mirrored to the other side of the
    # click: the refined plane may have no consensus left to aim at)
    _mode(page, "click")
    _click_at(page, -dx, dy, shift=True)
    page.wait(lambda: page.text("arseg-run-state") == "running", 30, "the Shift+click refinement to start")
    assert page.wait_run() == "done", page.text("arseg-run-message")
    assert page.text("arseg-run-message").startswith("Nodule 1 refined (exclude at "), page.text("arseg-run-message")
    assert len(page.nodules()) == 1 and _prompts(page)[0].count("exclude at ") == 2, _prompts(page)
    # the Shift+click's point is read from the slice view itself (not from the place widget): mirrored about the
    # view's centre (the nodule, where "go to" centred it) to the first exclude point, on the same axial plane
    first, second = (np.array([float(v) for v in m.split(", ")])
                     for m in re.findall(r"exclude at ([-\d.]+, [-\d.]+, [-\d.]+)", _prompts(page)[0]))
    assert np.allclose((first + second) / 2, page.nodule, atol=1.5), (first, second, page.nodule)

    # Undo: the nodule's previous result (after the first exclude point), and a refinement can start from it
    page.by_id("arseg-undo").click()
    page.wait(lambda: page.text("arseg-run-message").startswith("Undone: Nodule 1 back to its previous result"),
              20, "the undo")
    page.wait(lambda: _report(page).get(CONSENSUS_VOLUME) == refined_volume, 10, "the refined volume back")
    assert _prompts(page)[0].count("exclude at ") == 1 and len(page.nodules()) == 1


def test_lock_scales_and_use_sample(page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if not page.nodules():
        pytest.skip("needs the nodule of test_exclude_point_refines_the_same_nodule_and_undo_restores_it")
    n_scales = int(re.match(r"Scale (\d+)/(\d+)", page.text("arseg-scale-label")).group(2))
    message = page.text("arseg-run-message")
    page.by_id("arseg-lock-scales").click()  # at the finest scale there is nothing finer: refused, no run
    _refused(page, f"scale {n_scales} is the finest", message)
    page.by_id("arseg-use-sample").click()  # no sample picked: refused
    _refused(page, "choose a sample in the sample picker first", message)

    thumb = page.driver.find_element(By.CSS_SELECTOR, ".arseg-scale .v-slider-thumb")
    thumb.send_keys(Keys.HOME, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    page.wait(lambda: page.text("arseg-scale-label").startswith("Scale 3/"), 10, "scale 3")
    page.by_id("arseg-lock-scales").click()
    page.wait(lambda: page.text("arseg-run-state") == "running", 30, "the lock to start")
    assert page.wait_run() == "done", page.text("arseg-run-message")
    message = page.text("arseg-run-message")
    assert "scales 1-3 of the most typical sample kept, finer ones redrawn" in message, message
    assert "scales 1-3 of the most typical sample kept" in _prompts(page)[0]
    assert page.text("arseg-scale-label") == f"Scale {n_scales}/{n_scales}"  # the refined result, at its finest
    assert len(page.nodules()) == 1

    _pick_sample(page, "Sample 2")
    sample_2 = _report(page)["Sample 2 volume"]
    page.by_id("arseg-use-sample").click()
    page.wait(lambda: page.text("arseg-run-state") == "running" or "sample 2 used" in page.text("arseg-run-message"),
              30, "the use of sample 2")
    assert page.wait_run() == "done", page.text("arseg-run-message")
    assert "sample 2 used" in page.text("arseg-run-message"), page.text("arseg-run-message")
    report = _report(page)
    assert report["Sample 2 IoU with consensus"] == "1.0000"  # sample 2 is the consensus now
    assert report[CONSENSUS_VOLUME] == sample_2
    assert "sample 2 used" in _prompts(page)[0] and len(page.nodules()) == 1


def _downloaded_consensus(page, name: str):
    """The selected nodule's consensus as the page's Segmentation download gives it ((k, j, i) uint8 on the CT's
    grid), the RAS -> IJK matrix of that grid, and the Report download; both files moved to downloads/name."""
    from ARSegLib import mrml

    stem = mrml.volume_stem(page.volume)
    seg, report = page.downloads / f"{stem}.seg.nrrd", page.downloads / f"{stem}-report.json"
    for button, path in (("arseg-download-seg", seg), ("arseg-download-report", report)):
        element = page.by_id(button)  # below the fold of the side panel once the nodule's prompts fill it
        page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()
        page.wait(path.exists, 30, f"the download of {path.name}")
    kept = page.downloads / name
    kept.mkdir()
    seg, report = seg.rename(kept / seg.name), report.rename(kept / report.name)  # the next download's names free
    data = json.loads(report.read_text())
    scene = mrml.new_scene()
    node = mrml.load_segmentation(scene, seg)
    volume = mrml.load_volume(scene, page.volume)
    ijk_to_ras = mrml.world_ijk_to_ras(volume)
    consensus = mrml.segment_array(node, data.get("selected_nodule") or "Consensus", mrml.volume_array_shape(volume),
                                   ijk_to_ras)
    return consensus, np.linalg.inv(ijk_to_ras), data


def _voxel(ras_to_ijk: np.ndarray, ras) -> tuple:
    """The (k, j, i) index of the CT voxel nearest to a RAS point."""
    i, j, k = np.rint((ras_to_ijk @ np.array([*ras, 1.0]))[:3]).astype(int)
    return int(k), int(j), int(i)


def _distance_on_plane(mask, voxel) -> float:
    """Voxels from `voxel` to the nearest marked voxel of mask on the same axial plane (inf when none)."""
    plane = np.argwhere(mask[voxel[0]] > 0)  # mask is (k, j, i), voxel (k, j, i)
    if not len(plane):
        return float("inf")
    return float(np.sqrt(((plane - np.array(voxel[1:])) ** 2).sum(1)).min())


def test_include_point_refines_the_same_nodule_to_reach_it(page):
    from ARSegLib.web.browser import By

    if not page.nodules():
        pytest.skip("needs the nodule of test_exclude_point_refines_the_same_nodule_and_undo_restores_it")
    page.driver.find_element(By.CSS_SELECTOR, ".arseg-nodule button").click()  # select the nodule (its name)
    page.wait(lambda: "v-btn--variant-flat" in page.driver.find_element(
        By.CSS_SELECTOR, ".arseg-nodule button").get_attribute("class"), 10, "Nodule 1 selected")
    before_prompts = _prompts(page)[0]
    before, ras_to_ijk, before_report = _downloaded_consensus(page, "before-include")

    # an include point just outside the consensus, left of it on the row through its middle (the earlier exclude
    # point sits at its right edge), on the view's plane as the exclude point was placed
    shown = page.settled_axial()
    xs, ys = _consensus_offsets(shown)
    row = int(np.median(ys))
    dx, dy = int(xs[np.abs(ys - row) <= 1].min()) - 6, row
    _mode(page, "include")
    _click_at(page, dx, dy)
    page.wait(lambda: page.text("arseg-run-state") == "running", 30, "the include refinement to start")
    assert page.wait_run() == "done", page.text("arseg-run-message")
    message = page.text("arseg-run-message")
    included = page.settled_axial(shown)
    page.save(shown, "refine-before-include.png")
    page.save(included, "refine-included.png")
    page.save_page("refine-page-included.png")
    _mode(page, "click")
    assert message.startswith("Nodule 1 refined (include at "), message
    # what the page says the include point got (review.satisfaction_words): every kept sample, or how many of the
    # candidates drawn met it where the earlier exclude point on this plane leaves none that meets both
    met = re.search(r"(Every kept sample meets the include point|The include point is met by only (\d+) of \d+ "
                    r"candidates)\.", message)
    assert met and (met.group(2) is None or int(met.group(2)) > 0), message
    assert len(page.nodules()) == 1 and page.nodules()[0].lower().startswith("nodule 1"), page.nodules()  # no new one
    prompts = _prompts(page)[0]
    assert prompts.startswith(before_prompts + "; include at "), (before_prompts, prompts)
    point = [float(v) for v in re.search(r"include at ([-\d.]+, [-\d.]+, [-\d.]+)$", prompts).group(1).split(", ")]
    assert abs(point[2] - page.nodule[2]) < 1.5  # on the axial plane "go to" showed, as the exclude point was

    after, _, data = _downloaded_consensus(page, "after-include")
    refinement = data["prompts"][-1]  # the report's last refinement: this include point, to 0.001 mm
    assert [p["kind"] for p in refinement["prompts"]] == ["include"], refinement
    assert np.allclose(refinement["prompts"][0]["point_ras"], point, atol=0.051), (refinement, point)
    point = refinement["prompts"][0]["point_ras"]
    voxel = _voxel(ras_to_ijk, point)
    assert before[voxel] == 0, f"the include point {point} (voxel {voxel}) was already in the consensus"
    if met.group(2) is None:  # every kept sample marks it: so does their consensus
        assert after[voxel] == 1, f"the refined consensus leaves out the include point {point} (voxel {voxel})"
    else:  # few candidates meet it beside the exclude point: the consensus must at least have grown towards it
        assert _distance_on_plane(after, voxel) < _distance_on_plane(before, voxel), (point, voxel)
    assert data["consensus_volume_mm3"] != before_report["consensus_volume_mm3"]
