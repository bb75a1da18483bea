"""DICOM in: a folder holding a DICOM series is read wherever a volume path is accepted, with the geometry Slicer
gives it (origin, spacing, direction; LPS -> RAS), the same voxels and IJK->RAS as the same image saved as NRRD;
a folder with several series, or none, is refused before any work, naming what it holds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
sitk = pytest.importorskip("SimpleITK")

from ARSegLib import mrml  # noqa: E402


def oblique_image(seed=0, shape_kji=(5, 12, 10)):
    """A small int16 CT-like image in LPS with anisotropic spacing, an off-axis direction and an origin."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1500, size=shape_kji).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-120.5, 33.25, -410.0))
    t = np.radians(20.0)
    rot_z = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    u = np.radians(10.0)
    rot_x = np.array([[1, 0, 0], [0, np.cos(u), -np.sin(u)], [0, np.sin(u), np.cos(u)]])
    image.SetDirection(tuple((rot_z @ rot_x).reshape(-1)))
    return image, array


def write_dicom_series(image, folder: Path, series_uid: str, description: str, start_number: int = 1):
    """SimpleITK's "write a DICOM series" recipe: one file per slice with the tags the series reader needs."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    now_date, now_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    common = [("0008|0031", now_time), ("0008|0021", now_date), ("0008|0008", "DERIVED\\SECONDARY"),
              ("0020|000e", series_uid), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.99"),
              ("0008|0060", "CT"), ("0008|103e", description), ("0010|0010", "ARSEG^TEST"),
              ("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
              ("0018|0050", str(image.GetSpacing()[2]))]
    for z in range(image.GetDepth()):
        plane = image[:, :, z]
        for tag, value in common:
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        plane.SetMetaData("0020|0013", str(start_number + z))
        plane.SetMetaData("0008|0018", f"{series_uid}.{z + 1}")  # SOP instance UID
        writer.SetFileName(str(folder / f"slice{start_number + z:03d}.dcm"))
        writer.Execute(plane)
    return folder


@pytest.fixture()
def series_and_nrrd(tmp_path):
    image, array = oblique_image()
    folder = write_dicom_series(image, tmp_path / "CT series", "1.2.826.0.1.3680043.2.1125.1.1", "Chest 2.5 mm")
    nrrd = tmp_path / "same.nrrd"
    sitk.WriteImage(image, str(nrrd))
    return folder, nrrd, array


def test_a_dicom_folder_loads_like_the_same_image_as_nrrd(series_and_nrrd):
    folder, nrrd, array = series_and_nrrd
    scene = mrml.new_scene()
    from_dicom = mrml.load_volume(scene, folder)
    from_nrrd = mrml.load_volume(scene, nrrd)
    assert from_dicom.GetName() == "CT series" and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2
    np.testing.assert_array_equal(mrml.volume_array(from_dicom), array)
    np.testing.assert_array_equal(mrml.volume_array(from_dicom), mrml.volume_array(from_nrrd))
    m_dicom, m_nrrd = mrml.local_ijk_to_ras(from_dicom), mrml.local_ijk_to_ras(from_nrrd)
    np.testing.assert_allclose(m_dicom, m_nrrd, atol=1e-4)
    # and by hand: RAS = diag(-1, -1, 1) x LPS, the first voxel at the origin, spacing along the columns
    np.testing.assert_allclose(m_dicom[:3, 3], (120.5, -33.25, -410.0), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(m_dicom[:3, :3], axis=0), (0.7, 0.8, 2.5), atol=1e-4)
    assert mrml.describe_image_file(folder) == {"dimension": 3, "size": (10, 12, 5), "components": 1}
    mrml.check_image_file(folder)  # a volume: no error


def test_a_folder_with_two_series_or_none_is_refused_before_any_work(series_and_nrrd, tmp_path):
    folder, _, _ = series_and_nrrd
    other, _ = oblique_image(seed=1)
    write_dicom_series(other, folder, "1.2.826.0.1.3680043.2.1125.1.2", "Lung window", start_number=101)
    scene = mrml.new_scene()
    before = scene.GetNumberOfNodes()
    for call in (lambda: mrml.check_image_file(folder), lambda: mrml.load_volume(scene, folder)):
        with pytest.raises(mrml.ResultError) as e:
            call()
        text = str(e.value)
        assert "holds 2 DICOM series" in text
        assert "1.2.826.0.1.3680043.2.1125.1.1 ('Chest 2.5 mm'), 5 file(s)" in text
        assert "1.2.826.0.1.3680043.2.1125.1.2 ('Lung window'), 5 file(s)" in text
        assert "folder holding only the one" in text and "series_uid" in text
    assert scene.GetNumberOfNodes() == before
    # the one asked for by its UID is read
    node = mrml.load_volume(scene, folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2")
    np.testing.assert_array_equal(mrml.volume_array(node), sitk.GetArrayFromImage(other))
    empty = tmp_path / "no dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(mrml.ResultError, match="without a DICOM series"):
        mrml.load_volume(scene, empty)


def test_a_single_slice_series_is_a_2d_image(tmp_path):
    image, _ = oblique_image(shape_kji=(1, 12, 10))
    folder = write_dicom_series(image, tmp_path / "one", "1.2.826.0.1.3680043.2.1125.1.3", "Scout")
    with pytest.raises(mrml.ResultError, match="2D image"):
        mrml.check_image_file(folder)


def _ras_volume_as_image(array, ijk_to_ras):
    """A (k, j, i) array with its IJK->RAS as a SimpleITK (LPS) image."""
    m = mrml.LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)  # RAS -> LPS (the flip is its own inverse)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple((m[:3, :3] / spacing).reshape(-1)))
    image.SetOrigin(tuple(float(v) for v in m[:3, 3]))
    return image


@pytest.fixture
def ball_model(tiny, monkeypatch):
    """The CLI with the ball-drawing stand-in model (a 6 mm ball at the click), the tiny card."""
    from arseg_volumes import DiscPredictor

    from ARSegLib import cli

    predictor, card = tiny
    monkeypatch.setattr(cli, "_load_predictor", lambda model, device: (DiscPredictor(predictor.config), card))
    return card


def test_arseg_segment_reads_a_dicom_folder_as_it_reads_the_nrrd(lung1, ball_model, tmp_path, capsys):
    import json

    from ARSegLib.cli import main

    region = lung1.array[6:18, 30:120, 40:130].copy()
    m = lung1.ijk_to_ras.copy()
    m[:3, 3] = lung1.ijk_to_ras[:3, :3] @ np.array([40, 30, 6]) + lung1.ijk_to_ras[:3, 3]
    image = _ras_volume_as_image(region, m)
    folder = write_dicom_series(image, tmp_path / "lung1 dicom", "1.2.826.0.1.3680043.2.1125.1.7", "Lung1 slab")
    sitk.WriteImage(image, str(tmp_path / "lung1.nrrd"))
    point = "--point=" + ",".join(f"{v:.3f}" for v in lung1.nodule_ras)
    reports = {}
    for name, source in (("dicom", folder), ("nrrd", tmp_path / "lung1.nrrd")):
        out, report = tmp_path / f"{name}.seg.nrrd", tmp_path / f"{name}.json"
        assert main(["segment", str(source), point, "--model", str(ball_model.path), "--out", str(out),
                     "--report", str(report), "--half-height", "5"]) == 0
        assert out.is_file()
        reports[name] = json.loads(report.read_text())["nodules"][0]
    printed = capsys.readouterr().out
    assert "axial " in printed and " x " in printed
    for key in ("consensus_volume_mm3", "diameters_mm", "mean_intensity"):
        assert reports["dicom"][key] == reports["nrrd"][key], key
    # the ball of 6 mm radius: about 12 mm across on the CT's 0.7 mm voxels, on the click's slice
    d = reports["dicom"]["diameters_mm"]
    assert abs(d["long"] - 12.0) < 1.5 and abs(d["short"] - 12.0) < 1.5

    # a second series in the folder: one line naming both, non-zero, nothing written
    write_dicom_series(image, folder, "1.2.826.0.1.3680043.2.1125.1.8", "Lung1 again", start_number=101)
    out = tmp_path / "two.seg.nrrd"
    with pytest.raises(SystemExit) as e:
        main(["segment", str(folder), point, "--model", str(ball_model.path), "--out", str(out)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds 2 DICOM series" in err[0] and "'Lung1 again'" in err[0], err
    assert not out.exists()


class _PastTheChecks(Exception):
    """Raised in place of loading the model: every check before any work has passed."""


def test_arseg_segment_takes_a_dicom_folder_as_one_of_several_inputs(series_and_nrrd, tmp_path, monkeypatch,
                                                                     capsys):
    """--input NAME=FOLDER (a DICOM series) is taken as VOLUME is: past every check to the model's loading; a folder
    with two series, or none, is refused before any work in one line naming the input."""
    from ARSegLib import cli

    folder, nrrd, _ = series_and_nrrd
    if not (Path(cli.__file__).resolve().parents[1] / "Resources" / "Models" / "brats-glioma.json").is_file():
        pytest.skip("the brats-glioma card is not shipped in this checkout")

    def loading(model, device):
        raise _PastTheChecks(model)

    monkeypatch.setattr(cli, "_load_predictor", loading)
    out = tmp_path / "case.seg.nrrd"

    def segment(flair):
        return cli.main(["segment", "--model", "brats-glioma", "--input", f"flair={flair}", "--input",
                         f"t1ce={nrrd}", "--out", str(out), "--device", "cpu"])

    with pytest.raises(_PastTheChecks):
        segment(folder)
    # a second series in the folder, then a folder with none: one line naming the input, nothing loaded or written
    other, _ = oblique_image(seed=1)
    write_dicom_series(other, folder, "1.2.826.0.1.3680043.2.1125.1.2", "Lung window", start_number=101)
    empty = tmp_path / "no dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    capsys.readouterr()
    for flair, words in ((folder, "holds 2 DICOM series"), (empty, "without a DICOM series")):
        with pytest.raises(SystemExit) as e:
            segment(flair)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("arseg segment: error: --input flair: ") and words in err[0], err
        assert not out.exists()


def test_batch_finds_dicom_folders_and_the_page_lists_one(series_and_nrrd, tmp_path):
    from ARSegLib.cli import find_cases
    from ARSegLib.web.catalog import VolumeCatalog

    folder, nrrd, _ = series_and_nrrd
    (folder.parent / "not a scan").mkdir()
    assert find_cases(folder.parent, "*") == [folder, nrrd]
    catalog = VolumeCatalog.from_arguments(files=[folder])
    assert [e.label for e in catalog] == ["CT series"] and next(iter(catalog)).path == folder.resolve()
