"""`arseg segment` and `arseg batch` (one process and two torchrun ranks): the files Slicer opens, the picture,
the report, and one clear line with a non-zero exit status for every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from arseg_volumes import Volume, write_nrrd

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from ARSegLib import mrml  # noqa: E402
from ARSegLib.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cases(lung1, tmp_path_factory):
    """Two small CT files (one of them a few slices only) and a broken one."""
    folder = tmp_path_factory.mktemp("cases")
    write_nrrd(lung1, folder / "lung1.nrrd")
    few = Volume(lung1.array[9:12, 20:120, 30:140].copy(), lung1.ijk_to_ras.copy())
    few.ijk_to_ras[:3, 3] = lung1.ijk_to_ras[:3, :3] @ np.array([30, 20, 9]) + lung1.ijk_to_ras[:3, 3]
    write_nrrd(few, folder / "few-slices.nrrd")
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 9 9 9\nencoding: raw\n\n\x00")
    return folder


def _point_arg(point):
    return "--point=" + ",".join(f"{v:.3f}" for v in point)


def test_segment_writes_what_slicer_opens_the_picture_and_the_report(cases, lung1, tiny_model_card, tmp_path, capsys):
    out, png, report = tmp_path / "out" / "lung1.seg.nrrd", tmp_path / "scales.png", tmp_path / "report.json"
    code = main(["segment", str(cases / "lung1.nrrd"), _point_arg(lung1.nodule_ras), "--model", str(tiny_model_card),
                 "--out", str(out), "--png", str(png), "--report", str(report), "--samples", "3",
                 "--half-height", "5", "--device", "cpu"])
    assert code == 0
    assert "consensus" in capsys.readouterr().out

    scene = slicer.vtkMRMLScene()
    volume = mrml.load_volume(scene, cases / "lung1.nrrd")
    np.testing.assert_allclose(mrml.local_ijk_to_ras(volume), lung1.ijk_to_ras, atol=1e-4)  # the file is lung1
    seg = mrml.load_segmentation(scene, out)
    rep = json.loads(report.read_text())
    k = rep["n_scales"]
    assert mrml.segment_names(seg) == ["Nodule 1", "Nodule 1 disagreement", "Nodule 1 if present"] + \
        [f"Nodule 1 scale {s}/{k}" for s in range(1, k + 1)]
    m, shape = mrml.reference_geometry_of(seg)
    np.testing.assert_allclose(m, mrml.local_ijk_to_ras(volume), atol=1e-4)
    assert shape == lung1.array.shape

    assert rep["mode"] == "click" and rep["n_samples"] == 3 and len(rep["sample_iou_with_consensus"]) == 3
    voxel = abs(np.linalg.det(m[:3, :3]))
    cons = mrml.segment_array(seg, "Nodule_1", shape, m)
    assert rep["consensus_volume_mm3"] == pytest.approx(cons.sum() * voxel, rel=1e-4)
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 200


def test_segment_without_point_runs_the_whole_volume(cases, tiny_model_card, tmp_path):
    out = tmp_path / "few.seg.nrrd"
    assert main(["segment", str(cases / "few-slices.nrrd"), "--model", str(tiny_model_card), "--out", str(out),
                 "--samples", "2", "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["mode"] == "volume"
    assert mrml.segment_names(mrml.load_segmentation(slicer.vtkMRMLScene(), out))[0] == "Whole volume"


@pytest.mark.parametrize("args, words", [
    (["{cases}/lung1.nrrd", "--point=0,0,900"], "outside the volume"),
    (["{cases}/lung1.nrrd", "--point=1,2"], "three finite numbers"),
    (["{cases}/broken.nrrd", "--point=0,0,0"], "cannot read"),
    (["{cases}/missing.nrrd"], "not found"),
    (["{cases}/lung1.nrrd", "--model", "no-such-model"], "unknown model"),
])
def test_segment_errors_are_one_line_and_non_zero(args, words, cases, tiny_model_card, tmp_path, capsys):
    argv = ["segment"] + [a.format(cases=cases) for a in args] + ["--out", str(tmp_path / "x.seg.nrrd")]
    if "--model" not in argv:
        argv += ["--model", str(tiny_model_card)]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arseg")]
    assert len(err) == 1 and err[0].startswith("arseg segment: error:") and words in err[0]
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_out_must_be_a_seg_nrrd(cases, tiny_model_card, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["segment", str(cases / "lung1.nrrd"), "--model", str(tiny_model_card), "--out", str(tmp_path / "x.nrrd")])
    assert ".seg.nrrd" in capsys.readouterr().err


def test_batch_one_process_records_failures_and_exits_non_zero(cases, lung1, tiny_model_card, tmp_path):
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"lung1.nrrd": list(lung1.nodule_ras)}))
    out = tmp_path / "batch"
    with pytest.raises(SystemExit) as info:
        main(["batch", str(cases), str(out), "--model", str(tiny_model_card), "--points", str(points),
              "--samples", "2", "--half-height", "2.5", "--whole-volume"])
    assert info.value.code == 1  # broken.nrrd failed, the others did not
    summary = json.loads((out / "batch.json").read_text())
    status = {c["case"]: c["status"] for c in summary["cases"]}
    assert status == {"broken.nrrd": "error", "few-slices.nrrd": "ok", "lung1.nrrd": "ok"}
    modes = {c["case"]: c.get("mode") for c in summary["cases"]}
    assert modes["lung1.nrrd"] == "click" and modes["few-slices.nrrd"] == "volume"
    assert (out / "lung1.seg.nrrd").is_file() and (out / "lung1.report.json").is_file()


def test_batch_shards_cases_across_two_torchrun_ranks(cases, tiny_model_card, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "ARSegLib.cli", "batch", str(cases), str(out), "--model", str(tiny_model_card),
           "--pattern", "[fl]*.nrrd", "--samples", "2", "--whole-volume"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "batch.json").read_text())
    assert summary["world_size"] == 2 and summary["n_ok"] == 2
    assert sorted(c["rank"] for c in summary["cases"]) == [0, 1]  # one case each
    for c in summary["cases"]:
        assert Path(c["segmentation"]).is_file()


def test_eval_writes_the_protocol_metrics(tiny_model_card, lung1_dir, tmp_path):
    import json

    from ARSegLib.cli import main

    out = tmp_path / "eval.json"
    # a folder without splits.json: every crop is evaluated
    assert main(["eval", "--model", str(tiny_model_card), "--data", str(lung1_dir / "lidc-slices"),
                 "--split", "test", "--samples", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 9 and res["split"] == "all" and res["samples"] == 4
    for key in ("ged", "hm_iou", "soft_dice"):
        assert 0.0 <= res[key] <= 2.0
    assert "scale8_soft_dice" in res and "scale8_iou_final" in res
    for baseline in ("unet", "unet-levels"):
        assert main(["eval", "--model", str(tiny_model_card), "--data", str(lung1_dir / "lidc-slices"),
                     "--baseline", baseline, "--json", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["n_images"] == 9 and res["baseline"].startswith(baseline + ":")
    # the sampling options reach the engine and the record; an impossible one is refused before any output
    assert main(["eval", "--model", str(tiny_model_card), "--data", str(lung1_dir / "lidc-slices"), "--samples", "4",
                 "--views", "4", "--oversample", "2", "--presence-shift=-0.5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert (res["views"], res["oversample"], res["presence_logit_shift"]) == (4, 2, -0.5)
    out.unlink()
    with pytest.raises(SystemExit, match="views must be between 1 and 8"):
        main(["eval", "--model", str(tiny_model_card), "--data", str(lung1_dir / "lidc-slices"), "--views", "9",
              "--json", str(out)])
    assert not out.exists()


# --------------------------------------------------------------------------------------------- issue 14

@pytest.fixture
def disc_model(tiny, monkeypatch):
    """The CLI with the ball-drawing stand-in model (known nodules where the points are), the tiny card."""
    from arseg_volumes import DiscPredictor

    from ARSegLib import cli

    predictor, card = tiny
    monkeypatch.setattr(cli, "_load_predictor", lambda model, device: (DiscPredictor(predictor.config), card))
    return card


def test_several_points_negative_first_coordinate_with_a_space(cases, lung1, disc_model, tmp_path, capsys):
    """--point R,A,S with a space and a negative R (argparse took it for an option), twice: two nodules in one
    .seg.nrrd, a report row each, the figure, and a progress bar counting scales."""
    r, a, s = lung1.nodule_ras
    out, png, report = tmp_path / "o" / "two.seg.nrrd", tmp_path / "o" / "two.png", tmp_path / "o" / "two.json"
    assert r < 0
    code = main(["segment", str(cases / "lung1.nrrd"), "--point", f"{r},{a},{s}",
                 "--point", f"{r + 30:.2f}", f"{a - 15:.2f}", f"{s:.2f}", "--model", str(disc_model.path),
                 "--out", str(out), "--png", str(png), "--report", str(report), "--half-height", "5"])
    assert code == 0
    captured = capsys.readouterr()
    assert "Nodule 1" in captured.out and "Nodule 2" in captured.out
    assert "scale 16/16" in captured.err and "scale/s" not in captured.err  # 2 points x 8 scales
    seg = mrml.load_segmentation(slicer.vtkMRMLScene(), out)
    names = mrml.segment_names(seg)
    assert "Nodule 1" in names and "Nodule 2" in names and "Nodule 2 scale 8/8" in names
    rep = json.loads(report.read_text())
    assert [n["name"] for n in rep["nodules"]] == ["Nodule 1", "Nodule 2"]
    assert rep["nodules"][0]["point_ras_mm"] == pytest.approx([r, a, s], abs=1e-3)
    assert all(n["consensus_volume_mm3"] > 300 for n in rep["nodules"])
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[1] > 500  # a row per nodule
    assert sorted(p.name for p in out.parent.iterdir()) == ["two.json", "two.png", "two.seg.nrrd"]  # no temp files


def test_whole_volume_is_refused_for_the_click_only_shipped_model(cases, tmp_path, capsys):
    out = tmp_path / "o" / "x.seg.nrrd"
    with pytest.raises(SystemExit) as info:
        main(["segment", str(cases / "lung1.nrrd"), "--out", str(out)])  # the shipped lidc-nodule, no --point
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not validated for whole volume" in err[0] and "--point" in err[0]
    assert not out.parent.exists()
    from ARSegLib.models import read_card

    assert read_card("lidc-nodule").data["modes"] == ["click"]


@pytest.mark.parametrize("option, words", [
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "100"], "at most 5"),
    (["--temperature", "-1"], "above 0"),
    (["--temperature", "0"], "above 0"),
    (["--half-height", "-5"], "--half-height must be"),
    (["--samples", "0"], "--samples must be a whole number between 1 and 64"),
    (["--samples", "65"], "--samples"),
    (["--seed", "-1"], "--seed"),
    (["--views", "9"], "--views must be a whole number between 1 and 8"),
    (["--oversample", "0"], "--oversample must be a whole number between 1 and 8"),
    (["--presence-shift", "nan"], "--presence-shift must be a finite number"),
    (["--device", "gpu"], "choose one of auto, cpu, cuda"),
    (["--point=nan,1,2"], "three finite numbers"),
    (["--png", "{tmp}/a-file.txt/x.png"], "cannot write into"),
    (["--png", "{tmp}/x.jpg"], "--png must end in .png"),
    (["--report", "{tmp}"], "is a folder"),
    (["--out", "{cases}/lung1.nrrd"], "must end in .seg.nrrd"),
])
def test_bad_options_are_refused_before_any_work(option, words, cases, lung1, tiny_model_card, tmp_path, monkeypatch,
                                                 capsys):
    from ARSegLib import cli

    def no_model(*args):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_predictor", no_model)
    (tmp_path / "a-file.txt").write_text("not a folder")
    option = [o.format(tmp=tmp_path, cases=cases) for o in option]
    argv = ["segment", str(cases / "lung1.nrrd"), "--model", str(tiny_model_card), _point_arg(lung1.nodule_ras)]
    argv += ([] if "--out" in option else ["--out", str(tmp_path / "new" / "x.seg.nrrd")]) + option
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arseg segment: error:") and words in err[0], err
    assert not (tmp_path / "new").exists()


def test_a_failed_write_leaves_none_of_the_outputs(cases, lung1, disc_model, tmp_path, monkeypatch, capsys):
    from ARSegLib import figure

    def broken_figure(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(figure, "write_figure", broken_figure)
    folder = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["segment", str(cases / "lung1.nrrd"), _point_arg(lung1.nodule_ras), "--model", str(disc_model.path),
              "--out", str(folder / "x.seg.nrrd"), "--png", str(folder / "x.png"), "--report", str(folder / "x.json"),
              "--half-height", "2.5"])
    assert info.value.code == 2 and "disk full" in capsys.readouterr().err
    assert not folder.exists()  # neither the files, nor their temporary names, nor the folder made for them


def _sitk_write(array, path, vector=False):
    import SimpleITK as sitk

    if array.ndim == 4 and not vector:
        image = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])
    else:
        image = sitk.GetImageFromArray(array, isVector=vector)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("kind, words", [("2d.png", "is a 2D image"), ("4d.nrrd", "is a 4D image"),
                                         ("rgb.nrrd", "3 components per voxel"), ("one-slice.nrrd", "2D image")])
def test_2d_4d_and_multicomponent_inputs_are_named(kind, words, tiny_model_card, tmp_path, capsys):
    path = tmp_path / kind
    if kind == "2d.png":
        from PIL import Image

        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(path)
    elif kind == "4d.nrrd":
        _sitk_write(np.zeros((3, 4, 5, 6), np.int16), path)
    elif kind == "rgb.nrrd":
        _sitk_write(np.zeros((4, 5, 6, 3), np.uint8), path, vector=True)
    else:
        _sitk_write(np.zeros((1, 5, 6), np.int16), path)
    with pytest.raises(SystemExit):
        main(["segment", str(path), "--point=0,0,0", "--model", str(tiny_model_card),
              "--out", str(tmp_path / "x.seg.nrrd")])
    err = capsys.readouterr().err
    assert words in err and "corrupt" not in err, err


def test_version_and_help_for_every_option(capsys):
    from ARSegLib.cli import build_parser, join_point_arguments

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("arseg 0.")
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [f"{name} {action.dest}" for name, p in sub.choices.items() for action in p._actions
               if action.dest != "help" and not (action.help or "").strip()]
    assert not missing, missing
    assert join_point_arguments(["segment", "v.nrrd", "--point", "-1", "-2.5e1", "3", "--out", "o.seg.nrrd"]) == \
        ["segment", "v.nrrd", "--point=-1,-2.5e1,3", "--out", "o.seg.nrrd"]


def test_batch_takes_points_from_a_csv_and_markups_and_reports_cases_without(cases, lung1, disc_model, tmp_path):
    """CSV rows case,R,A,S (two for one case), a Slicer markups file (LPS) beside another; a case with neither is
    reported, not segmented."""
    import shutil

    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("lung1.nrrd", "few-slices.nrrd"):
        shutil.copy(cases / name, folder / name)
    shutil.copy(cases / "lung1.nrrd", folder / "third.nrrd")
    r, a, s = lung1.nodule_ras
    (tmp_path / "points.csv").write_text(f"case,R,A,S\nlung1.nrrd,{r},{a},{s}\nlung1,{r + 30},{a - 15},{s}\n")
    markup = {"markups": [{"type": "Fiducial", "coordinateSystem": "LPS",
                           "controlPoints": [{"id": "1", "position": [-r, -a, s]}]}]}
    (folder / "third.mrk.json").write_text(json.dumps(markup))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["batch", str(folder), str(out), "--model", str(disc_model.path), "--points", str(tmp_path / "points.csv"),
              "--half-height", "2.5", "--png"])
    assert info.value.code == 1  # one case had no points
    summary = json.loads((out / "batch.json").read_text())
    by_case = {c["case"]: c for c in summary["cases"]}
    assert by_case["lung1.nrrd"]["status"] == "ok" and by_case["lung1.nrrd"]["n_nodules"] == 2
    assert by_case["third.nrrd"]["status"] == "ok" and by_case["third.nrrd"]["points_ras_mm"][0] == pytest.approx(
        [r, a, s])
    assert by_case["few-slices.nrrd"]["status"] == "no-points" and not (out / "few-slices.seg.nrrd").exists()
    assert summary["n_ok"] == 2 and summary["n_without_points"] == 1
    assert (out / "lung1.png").is_file() and len(json.loads((out / "lung1.report.json").read_text())["nodules"]) == 2

    (tmp_path / "bad.csv").write_text("case,R,A,S\nnowhere.nrrd,1,2,3\n")
    with pytest.raises(SystemExit) as info:
        main(["batch", str(folder), str(tmp_path / "out2"), "--model", str(disc_model.path),
              "--points", str(tmp_path / "bad.csv")])
    assert info.value.code == 2 and not (tmp_path / "out2").exists()


def test_batch_whole_volume_is_refused_for_the_click_only_shipped_model(cases, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["batch", str(cases), str(tmp_path / "out"), "--whole-volume"])
    assert info.value.code == 2 and "not validated for whole volume" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
