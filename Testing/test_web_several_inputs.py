"""The review page with a model of several inputs (brats-glioma: FLAIR + T1ce): the catalog groups a case's files by
the card's inputs, and a ReviewSession opens such a case (every input loaded, the first on show), refuses a case
that lacks an input before reading anything, and segments the whole case through the run service
(request_for_inputs), its regions listed per region and per lesion with the report in mL. Without a browser, as
test_web.py's session tests; the BraTS part skips, saying why, when ../shared/data/brats or the model is absent.
`arseg view --input NAME=PATH`: the one case it builds (ViewOptions.cases), its refusals, the real server on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REGIONS = ["Whole tumour", "Tumour core", "Enhancing tumour"]


def _brats_task():
    from ARSegLib.data.brats import brats_task
    from ARSegLib.task import task_from_card

    return task_from_card({"task": brats_task(), "pixel_spacing_mm": 2.0}, ("volume",), 128)


def test_catalog_groups_a_cases_files_by_the_cards_inputs(tmp_path):
    from ARSegLib.web.catalog import CatalogError, VolumeCatalog

    task = _brats_task()
    data = tmp_path / "brats"
    for name in ("pat1/FLAIR.nii.gz", "pat1/t1ce.nii.gz", "pat1/pat1_seg.nii.gz",  # exact names, any case
                 "pat2/pat2_flair.nrrd", "pat2/pat2_T1CE.nrrd", "pat2/pat2_brainmask.nrrd",  # a word of the name
                 "pat3/pat3_flair.nii.gz",  # no T1ce: listed, refused when opened
                 "pat4/a_flair.nii.gz", "pat4/b_flair.nii.gz", "pat4/t1ce.nii.gz",  # two FLAIRs: ambiguous
                 "other/ct.nrrd", "pat1/pat1_flair.seg.nrrd"):  # no input's name: not a case; a result: not a volume
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"x")
    catalog = VolumeCatalog.from_arguments([], [data], task=task)
    labels = [c["title"] for c in catalog.choices()]
    assert labels == ["brats/pat1 (FLAIR + T1ce)", "brats/pat2 (FLAIR + T1ce)", "brats/pat3 (incomplete)",
                      "brats/pat4 (incomplete)"]
    assert all(str(tmp_path) not in json.dumps(c) for c in catalog.choices())  # no server path to the browser
    pat1, pat2, pat3, pat4 = catalog
    assert pat1.input_paths() == {"flair": (data / "pat1/FLAIR.nii.gz").resolve(),
                                  "t1ce": (data / "pat1/t1ce.nii.gz").resolve()} and not pat1.problem
    assert [n for n, _ in pat2.inputs] == ["flair", "t1ce"] and pat2.path.name == "pat2_flair.nrrd"
    assert "no T1ce (t1ce) volume" in pat3.problem and "brats/pat3" in pat3.problem
    assert "2 files could be its FLAIR (a_flair.nii.gz, b_flair.nii.gz)" in pat4.problem
    assert str(tmp_path) not in pat3.problem + pat4.problem

    # files given on the command line: grouped by their folder, a case even when one lacks an input
    catalog = VolumeCatalog.from_arguments([data / "pat2/pat2_T1CE.nrrd", data / "pat2/pat2_flair.nrrd",
                                            data / "other/ct.nrrd"], [], task=task)
    assert [c["title"] for c in catalog.choices()] == ["pat2 (FLAIR + T1ce)", "other (incomplete)"]
    # a case's folder given as a file: its volume files, not its sub-folders'
    assert [e.input_paths() for e in VolumeCatalog.from_arguments([data / "pat1"], [], task=task)] == \
        [pat1.input_paths()]
    # a case given input by input (a key may be the input's title, in any case); the same files once
    case = {"FLAIR": data / "pat1/FLAIR.nii.gz", "t1ce": data / "pat1/t1ce.nii.gz"}
    catalog = VolumeCatalog.from_arguments([], [data / "pat1"], task=task, cases=[case])
    assert [c["title"] for c in catalog.choices()] == ["pat1 (FLAIR + T1ce)"]
    with pytest.raises(CatalogError, match="no t1ce given"):
        VolumeCatalog.from_arguments(task=task, cases=[{"flair": data / "pat1/FLAIR.nii.gz"}])
    with pytest.raises(CatalogError, match="'t2' is not one of the model's: flair, t1ce"):
        VolumeCatalog.from_arguments(task=task, cases=[{"flair": data / "pat1/FLAIR.nii.gz", "t2": data / "x"}])
    with pytest.raises(CatalogError, match="one volume"):  # a one-input card (task None or one input): no cases
        VolumeCatalog.from_arguments([], [data], cases=[{"flair": data / "pat1/FLAIR.nii.gz"}])
    # a one-input model lists files as before
    assert len(VolumeCatalog.from_arguments([], [data])) == 11


class _LocalClient:
    """The worker client's interface in this process (test_web._LocalClient's, with several inputs): each run is
    runs.compute on a thread."""

    def __init__(self, predictor, card):
        self.predictor, self.card, self.runs = predictor, card, []

    def holds(self, volume_key):
        return False

    def segment(self, volume, ijk_to_ras, click=None, settings=None, volume_key=None, refinement=None,
                previous=None, input_names=()):
        from ARSegLib import runs

        self.runs.append(runs.LocalRun(lambda progress, cancel, _outline: runs.compute(
            volume, ijk_to_ras, click, settings, self.predictor, self.card, refinement, previous, progress, cancel,
            input_names=input_names)))
        return self.runs[-1]


def _write(array, m, path):
    """A (k, j, i) array on IJK->RAS m as a NIfTI file (SimpleITK's LPS)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def test_session_opens_a_two_input_case_segments_it_whole_and_lists_its_regions(tmp_path):
    """A BraTS slab (12 slices of the test patient) as a case folder, T1ce on a grid of its own (cropped by 4 voxels
    in-plane: resampled onto FLAIR's, which the page says); an incomplete case beside it is refused before anything
    is read; a click is refused (the card: whole volume only) before any run; the whole case runs through the run
    service and its regions are listed, shown or hidden, reported in mL and downloadable."""
    from test_brats_task import _brats_model, brats_test_slab

    from ARSegLib import mrml
    from ARSegLib.pipeline import SettingsError, UnsupportedModeError
    from ARSegLib.web.catalog import VolumeCatalog
    from ARSegLib.web.review import ReviewError, ReviewSession

    flair, t1ce, _, m = brats_test_slab()  # skips without ../shared/data/brats
    predictor, card = _brats_model()  # skips without the model
    m_crop = m.copy()
    m_crop[:3, 3] = (m @ np.array([4.0, 4.0, 0.0, 1.0]))[:3]
    data = tmp_path / "cases"
    _write(flair, m, data / "slab" / "slab_flair.nii.gz")
    _write(t1ce[:, 4:-4, 4:-4], m_crop, data / "slab" / "slab_t1ce.nii.gz")
    _write(flair, m, data / "lonely" / "lonely_flair.nii.gz")
    catalog = VolumeCatalog.from_arguments([], [data], task=card.task)
    assert [c["title"] for c in catalog.choices()] == ["cases/lonely (incomplete)", "cases/slab (FLAIR + T1ce)"]

    scene = mrml.new_scene()
    client = _LocalClient(predictor, card)
    session = ReviewSession(scene, catalog, client, card)
    session.settings.n_samples = 4
    assert session.several_inputs and session.modes == ["volume"]
    with pytest.raises(ReviewError, match="no T1ce \\(t1ce\\) volume"):
        session.open_volume("v0")
    assert not mrml._nodes_of_class(scene, "vtkMRMLScalarVolumeNode")  # nothing was read
    node = session.open_volume("v1")
    assert node is session.volume_node and node.GetName() == "slab_flair"
    assert {k: n.GetName() for k, n in session.input_nodes.items()} == {"flair": "slab_flair", "t1ce": "slab_t1ce"}
    assert session.input_choices() == [{"title": "FLAIR", "value": "flair"}, {"title": "T1ce", "value": "t1ce"}]
    assert session.input_node("t1ce") is session.input_nodes["t1ce"]
    with pytest.raises(ReviewError, match="no input"):
        session.input_node("../t2")
    assert session.open_volume("v1") is node  # opened once, kept

    centre = mrml.world_ijk_to_ras(node) @ np.array([120, 120, 6, 1.0])
    with pytest.raises(UnsupportedModeError, match="not validated for click"):
        session.start(tuple(centre[:3]))
    session.settings.n_samples = 0
    with pytest.raises(SettingsError, match="n_samples"):
        session.start(None)
    session.settings.n_samples = 4
    assert client.runs == [] and not session.status.running

    session.start(None)
    assert session.status.running and len(client.runs) == 1
    with pytest.raises(ReviewError, match="still working"):
        session.start(None)
    client.runs[0].wait(300)
    status = session.poll()
    assert status.state == "done", status.message
    assert "Whole tumour" in status.message and " mL (samples " in status.message
    assert "t1ce: resampled onto flair's grid" in status.message

    nodes = session.results()
    assert nodes is not None and nodes.segmentation.GetName() == "slab_flair ARSeg"
    report = session.report()
    assert [r["name"] for r in report["regions"]] == REGIONS and report["inputs"] == ["flair", "t1ce"]
    regions = session.regions()
    n_lesions = report["n_lesions"]
    assert n_lesions >= 1 and len(regions) == 3 * n_lesions
    first = [r["name"] for r in regions if r["lesion"] == 1]
    assert first == (REGIONS if n_lesions == 1 else [f"{r} 1" for r in REGIONS])
    names = set(mrml.segment_names(nodes.segmentation))
    assert {r["name"] for r in regions} <= names
    for r in report["regions"]:
        v = r["sample_volume_ml"]
        assert v["min"] <= v["mean"] <= v["max"]
    rows = {row["measure"]: (row["value"], row["unit"]) for row in session.report_rows()}
    wt = report["regions"][0]
    assert rows["Whole tumour"] == (f"{wt['consensus_volume_ml']:.2f}", "mL")
    assert rows["Whole tumour, samples"] == (
        f"{wt['sample_volume_ml']['min']:.2f}-{wt['sample_volume_ml']['max']:.2f}", "mL")
    assert rows["Inputs"] == ("flair, t1ce", "") and "resampled" in rows["Inputs aligned"][0]

    # the region segments on show or hidden; the heat map is each region's disagreement segment
    sid = regions[0]["id"]
    assert session.region_shown(sid)
    session.show_region(sid, False)
    assert not session.region_shown(sid)
    with pytest.raises(ReviewError, match="no region segment"):
        session.show_region("Nodule_1", True)
    disagreement = f"{sid}_Disagreement"
    display = nodes.segmentation.GetDisplayNode()
    assert not display.GetSegmentVisibility(disagreement)
    session.show_disagreement(True, 0.4)
    assert display.GetSegmentVisibility(disagreement)
    session.show_disagreement(False)
    assert not display.GetSegmentVisibility(disagreement)

    # no nodule to refine; no scales or samples to scrub
    with pytest.raises(ReviewError, match="several inputs"):
        session.refine_at("exclude", tuple(centre[:3]))
    assert session.nodules() == [] and session.n_scales() == 0 and session.samples_kept() == 0

    # downloads: the segmentation, and the report with each input's file name (no server path)
    seg = tmp_path / "download.seg.nrrd"
    seg.write_bytes(session.segmentation_bytes())
    assert {r["name"] for r in regions} <= set(mrml.segment_names(mrml.load_segmentation(mrml.new_scene(), seg)))
    downloaded = json.loads(session.report_bytes())
    assert downloaded["sources"] == {"flair": "slab_flair.nii.gz", "t1ce": "slab_t1ce.nii.gz"}
    assert str(tmp_path) not in json.dumps(downloaded) and session.file_stem() == "slab_flair"


def test_browser_segments_a_two_input_case_and_lists_its_regions(tmp_path):
    """`arseg view --model brats-glioma CASE_FOLDER` in Chromium: the case is open with FLAIR on show, the Show
    toggle switches to T1ce, "Segment whole volume" segments the case and the regions are listed with their mL."""
    from test_brats_task import _brats_model, brats_test_slab
    from test_web import _browser_missing

    missing = _browser_missing()
    if missing:
        pytest.skip(f"no browser test: {missing}")
    flair, t1ce, _, m = brats_test_slab()
    _brats_model()
    case = tmp_path / "slab"
    _write(flair, m, case / "slab_flair.nii.gz")
    _write(t1ce, m, case / "slab_t1ce.nii.gz")
    from ARSegLib.web.browser import By, Page

    page = Page(tmp_path, case, (0.0, 0.0, 0.0), extra_args=["--model", "brats-glioma", "--samples", "4",
                                                               "--device", "cpu"])
    page.keep_dir = Path(os.environ["ARSEG_WEB_SCREENSHOTS"]) if os.environ.get("ARSEG_WEB_SCREENSHOTS") else None
    try:
        page.start_server()
        page.start_browser()
        page.open()
        page.wait(lambda: page.driver.find_elements(By.ID, "arseg-whole-volume"), 30, "the whole-volume button")
        assert "slab (FLAIR + T1ce)" in page.driver.find_element(By.TAG_NAME, "body").text
        assert not page.driver.find_elements(By.ID, "arseg-prompt-mode") or \
            not page.by_id("arseg-prompt-mode").is_displayed()  # no clicks: whole volume only
        toggle = page.by_id("arseg-input-shown")
        assert [b.text for b in toggle.find_elements(By.TAG_NAME, "button")] == ["FLAIR", "T1CE"] or \
            [b.text.lower() for b in toggle.find_elements(By.TAG_NAME, "button")] == ["flair", "t1ce"]
        shown_flair = page.settled_axial()
        toggle.find_elements(By.TAG_NAME, "button")[1].click()
        shown_t1ce = page.settled_axial(shown_flair)
        assert np.abs(shown_t1ce - shown_flair).mean() > 1  # the other modality on show
        toggle.find_elements(By.TAG_NAME, "button")[0].click()
        before = page.settled_axial(shown_t1ce)
        page.by_id("arseg-whole-volume").click()
        assert page.wait_run(300) == "done", page.text("arseg-run-message")
        assert "Whole tumour" in page.text("arseg-run-message")
        page.wait(lambda: page.driver.find_elements(By.CSS_SELECTOR, ".arseg-region"), 30, "the regions list")
        regions = [e.text for e in page.driver.find_elements(By.CSS_SELECTOR, ".arseg-region")]
        assert any(r.startswith("Whole tumour") and "mL" in r for r in regions), regions
        assert any(r.startswith("Enhancing tumour") for r in regions), regions
        assert "Whole tumour" in page.text("arseg-report")
        after = page.settled_axial(before)
        page.save(after, "brats-case-regions.png")
        page.save_page("brats-case-page.png")
        assert np.abs(after - before).mean() > 0.05  # the regions drawn over the FLAIR
    finally:
        page.close()


def _view_case_files(tmp_path):
    """A small two-input case (FLAIR, T1ce: noise on a 2 mm grid) written as NIfTI files in tmp_path/case."""
    m = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    return {name: _write(rng.normal(100, 20, (8, 24, 24)).astype(np.float32), m,
                         tmp_path / "case" / f"case_{name}.nii.gz") for name in ("flair", "t1ce")}


def _capture_serve(monkeypatch):
    """cmd_view's serve() replaced by one that keeps the options it was given: nothing is started."""
    pytest.importorskip("trame_slicer", reason="the web extra (trame-slicer) is not installed")
    from ARSegLib.web import serve

    served = []
    monkeypatch.setattr(serve, "serve", lambda options: served.append(options) or 0)
    return served


def test_arseg_view_input_makes_one_case_of_the_cards_inputs(tmp_path, monkeypatch):
    """`arseg view --input flair=... --input t1ce=...`: one case {name: path} in the card's order, passed to the page
    as ViewOptions.cases (its catalog lists that case); --data-dir may add cases; a DICOM series folder is an input
    as a file is."""
    from test_dicom import oblique_image, write_dicom_series

    from ARSegLib.cli import main
    from ARSegLib.models import read_card
    from ARSegLib.web.serve import build_catalog

    served = _capture_serve(monkeypatch)
    files = _view_case_files(tmp_path)
    argv = ["view", "--model", "brats-glioma", "--input", f"T1CE={files['t1ce']}", "--input",
            f"flair={files['flair']}", "--port", "0", "--device", "cpu"]
    assert main(argv) == 0 and len(served) == 1
    options = served[0]
    assert options.cases == [{"flair": str(files["flair"]), "t1ce": str(files["t1ce"])}]
    assert list(options.cases[0]) == ["flair", "t1ce"] and options.volumes == [] and options.data_dirs == []
    assert (options.model, options.device, options.port) == ("brats-glioma", "cpu", 0)
    card = read_card("brats-glioma")
    catalog = build_catalog(options, card)
    (entry,) = catalog
    assert entry.label == "case (FLAIR + T1ce)" and not entry.problem
    assert entry.input_paths() == {n: p.resolve() for n, p in files.items()}

    # with --data-dir: the --input case first, then the folder's cases (the same files listed once)
    other = tmp_path / "more" / "pat2"
    for name in ("flair", "t1ce"):
        _write(np.zeros((4, 8, 8), np.float32), np.eye(4), other / f"{name}.nii.gz")
    assert main(argv + ["--data-dir", str(tmp_path / "more"), "--data-dir", str(tmp_path / "case")]) == 0
    assert served[-1].cases == options.cases
    assert [c["title"] for c in build_catalog(served[-1], card).choices()] == \
        ["case (FLAIR + T1ce)", "more/pat2 (FLAIR + T1ce)"]

    # FLAIR as a DICOM series folder
    image, _ = oblique_image()
    folder = write_dicom_series(image, tmp_path / "flair series", "1.2.826.0.1.3680043.2.1125.1.7", "FLAIR")
    assert main(["view", "--model", "brats-glioma", "--input", f"flair={folder}", "--input",
                 f"t1ce={files['t1ce']}"]) == 0
    assert served[-1].cases == [{"flair": str(folder), "t1ce": str(files["t1ce"])}]
    (entry,) = build_catalog(served[-1], card)
    assert entry.input_paths()["flair"] == folder.resolve() and not entry.problem


def test_arseg_view_input_refusals_are_one_line_before_the_page_starts(tmp_path, monkeypatch, capsys):
    """Each wrong --input is refused in one line naming what is wrong, and nothing is served: a name not the card's,
    one missing, one twice, no NAME=, a file missing or not a 3D volume, a folder without a DICOM series, --input
    with VOLUME arguments, --input with a one-input model."""
    from test_cli import _sitk_write

    from ARSegLib.cli import main

    served = _capture_serve(monkeypatch)
    files = _view_case_files(tmp_path)
    flair, t1ce = f"flair={files['flair']}", f"t1ce={files['t1ce']}"
    picture = _sitk_write(np.zeros((16, 16), np.uint8), tmp_path / "slice.nrrd")
    empty = tmp_path / "no dicom"
    empty.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    brats = ["view", "--model", "brats-glioma", "--port", "0"]
    for argv, words in (
            (brats + ["--input", flair], "model 'brats-glioma' takes --input flair=PATH --input t1ce=PATH: no t1ce "
                                         "given"),
            (brats + ["--input", flair, "--input", t1ce, "--input", f"t2={files['t1ce']}"],
             "t2 is not one of its inputs"),
            (brats + ["--input", flair, "--input", f"FLAIR={files['t1ce']}"], "--input flair is given twice"),
            (brats + ["--input", str(files["flair"]), "--input", t1ce], "--input takes NAME=PATH"),
            (brats + ["--input", flair, "--input", f"t1ce={tmp_path / 'missing.nii.gz'}"],
             "--input t1ce: file not found"),
            (brats + ["--input", flair, "--input", f"t1ce={picture}"], "--input t1ce: slice.nrrd is a 2D image"),
            (brats + ["--input", flair, "--input", f"t1ce={notes}"], "--input t1ce: " + str(notes) + " is not a "
                                                                      "volume file the page reads"),
            (brats + ["--input", f"flair={empty}", "--input", t1ce], "--input flair: " + str(empty) + " is a folder "
                                                                     "without a DICOM series"),
            (brats + [str(files["flair"]), "--input", flair, "--input", t1ce],
             "give a case either as VOLUME (its folder or files) or as --input NAME=PATH, not both"),
            (["view", "--model", "lidc-nodule", "--input", flair],
             "--input is for a model of several inputs; model 'lidc-nodule' takes one volume: give it as VOLUME"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1, (argv, err)
        assert err[0].startswith("arseg view: error: ") and words in err[0], (words, err)
    assert served == []


def test_arseg_view_input_serves_the_case(tmp_path):
    """The real server from `arseg view --model brats-glioma --input flair=... --input t1ce=...` (no VOLUME): it says
    it serves one case of several inputs and, with a browser, the page lists and opens it."""
    from test_web import _browser_missing

    missing = _browser_missing()
    if "trame_slicer" in missing or "EGL" in missing:
        pytest.skip(f"no web page here: {missing}")
    from ARSegLib.web.browser import By, Page

    files = _view_case_files(tmp_path)
    page = Page(tmp_path, None, (0.0, 0.0, 0.0), extra_args=[
        "--model", "brats-glioma", "--input", f"flair={files['flair']}", "--input", f"t1ce={files['t1ce']}",
        "--device", "cpu", "--samples", "4"])
    try:
        page.start_server()
        assert "serving 1 case(s) of several inputs" in page.log.read_text(errors="replace")
        if missing:
            return
        page.start_browser()
        page.open()
        page.wait(lambda: page.driver.find_elements(By.ID, "arseg-input-shown"), 30, "the Show toggle")
        assert "case (FLAIR + T1ce)" in page.driver.find_element(By.TAG_NAME, "body").text
        assert str(tmp_path) not in page.driver.page_source  # no server path to the browser
    finally:
        page.close()
