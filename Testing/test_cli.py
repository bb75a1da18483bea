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
    # the throughput: cases segmented per minute of the batch's wall time, which holds every case's own time
    assert summary["seconds"] + 0.01 >= sum(c["seconds"] for c in summary["cases"]) > 0
    assert summary["cases_per_minute"] == pytest.approx(60 * 2 / summary["seconds"], rel=1e-3)


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


def test_eval_writes_the_protocol_metrics(tiny_model_card, lung1_dir, tmp_path, capsys):
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
    with pytest.raises(SystemExit) as info:  # SegmentSettings' limits, as for arseg segment
        main(["eval", "--model", str(tiny_model_card), "--data", str(lung1_dir / "lidc-slices"), "--views", "9",
              "--json", str(out)])
    assert info.value.code == 2 and "--views must be a whole number between 1 and 8" in capsys.readouterr().err
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


def test_segment_batch_and_view_help_name_no_nodule_nor_ct():
    """The commands that serve every model say "object" and "the image", not the lung model's words; a count
    printed at run time names what the card's one region is (the lung model: "nodule")."""
    import re

    from ARSegLib.cli import build_parser
    from ARSegLib.models import DEFAULT_MODEL, read_card

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    summary = {a.dest: a.help for a in sub._choices_actions}
    for name in ("segment", "batch", "view"):
        p = sub.choices[name]
        texts = [summary[name], p.description] + [a.help for a in p._actions] + [str(a.metavar) for a in p._actions]
        words = [t for t in texts if t and re.search(r"nodule|\bCT\b", t.replace(DEFAULT_MODEL, ""), re.I)]
        assert not words, (name, words)
    from ARSegLib.cli import object_word

    assert object_word(read_card(DEFAULT_MODEL)) == "nodule"
    assert object_word(read_card("brats-glioma")) == "object"  # three regions: no one word


@pytest.mark.parametrize("option", [
    ["--include", "1,2,3"], ["--exclude", "1,2,3"], ["--lock-scales", "2"], ["--from-sample", "1"],
    ["--use-sample", "1"], ["--half-height", "20"], ["--include-samples"],
])
def test_click_only_options_with_several_inputs_are_refused_before_any_work(option, tmp_path, monkeypatch, capsys):
    """`--input` segments the whole volume: a click's refinements, its slab and its samples as segments would be
    silently ignored, so they are refused in one line naming the option; without them the run reaches the model."""
    from ARSegLib import cli

    loaded = []

    def loading(*args):  # past every check: stop there (main: "interrupted", 130)
        loaded.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_predictor", loading)
    m = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = []
    for i, name in enumerate(("flair", "t1ce")):
        paths.append(tmp_path / f"case_{name}.nrrd")
        write_nrrd(Volume(np.random.default_rng(i).normal(size=(4, 16, 16)).astype(np.float32), m), paths[-1])
    out = tmp_path / "new" / "case.seg.nrrd"
    argv = ["segment", "--model", "brats-glioma", "--input", f"flair={paths[0]}", "--input", f"t1ce={paths[1]}",
            "--out", str(out), "--device", "cpu"]
    with pytest.raises(SystemExit) as info:
        main(argv + option)
    assert info.value.code == 2 and not loaded and not out.parent.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"arseg segment: error: {option[0]} with --input: ") and \
        "drop it" in err[0], err
    assert main(argv) == 130 and len(loaded) == 1  # the same without the option gets past the checks


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


# --------------------------------------------------------------------------------------------- issue 26

@pytest.fixture
def disc(tiny, monkeypatch):
    """The ball-drawing stand-in model, one instance (its `calls` count the forward passes), with the tiny card."""
    from arseg_volumes import DiscPredictor

    from ARSegLib import cli

    predictor, card = tiny
    disc = DiscPredictor(predictor.config)
    monkeypatch.setattr(cli, "_load_predictor", lambda model, device: (disc, card))
    return disc, card


def test_batch_refuses_scans_that_would_write_the_same_output(cases, lung1, disc, tmp_path, capsys):
    """a.nrrd, a.nii.gz and a.mha made one a.seg.nrrd ("3 of 3 cases segmented", two results overwritten)."""
    import SimpleITK as sitk

    folder = tmp_path / "scans"
    folder.mkdir()
    image = sitk.ReadImage(str(cases / "lung1.nrrd"))
    for name in ("a.nrrd", "a.nii.gz", "a.mha", "b.nrrd"):
        sitk.WriteImage(image, str(folder / name))
    points = tmp_path / "points.json"
    points.write_text(json.dumps({name: list(lung1.nodule_ras) for name in ("a.nrrd", "a.nii.gz", "a.mha", "b")}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--pattern", "*", "--points", str(points),
              "--half-height", "2.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert "a.mha and a.nii.gz and a.nrrd would all be written to a.seg.nrrd" in err[0], err
    assert not out.exists() and disc[0].calls == 0  # refused before any work

    # one of them chosen: batch.json says which file made which output
    points.write_text(json.dumps({"a.nrrd": list(lung1.nodule_ras), "b.nrrd": list(lung1.nodule_ras)}))
    assert main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--pattern", "*.nrrd",
                 "--points", str(points), "--half-height", "2.5", "--png"]) == 0
    summary = json.loads((out / "batch.json").read_text())
    assert summary["card_sha256"] == disc[1].data["card_sha256"] and summary["model_card"] == str(disc[1].path)
    for record in summary["cases"]:
        assert record["source"] == str(folder / record["case"]) and record["status"] == "ok"
        stem = record["case"].split(".")[0]
        assert [record[k] for k in ("segmentation", "report", "png")] == \
            [str(out / f"{stem}{suffix}") for suffix in (".seg.nrrd", ".report.json", ".png")]
        assert json.loads(Path(record["report"]).read_text())["source"] == record["source"]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_an_interrupted_batch_writes_what_finished(signal_name, cases, lung1, disc, tmp_path, monkeypatch):
    """Ctrl-C (or a SIGTERM) during the second of three cases: the first case's files and a batch.json that says
    it finished, the second left no file, the third did not start; exit status 130."""
    import shutil
    import signal

    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("c1.nrrd", "c2.nrrd", "c3.nrrd"):
        shutil.copy(cases / "lung1.nrrd", folder / name)
    from ARSegLib import runs

    real, calls = runs.RunService.segment_file, []

    def stopped_during_the_second(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            os.kill(os.getpid(), getattr(signal, signal_name))  # a real signal, delivered during the real work
        return real(self, *args, **kwargs)

    monkeypatch.setattr(runs.RunService, "segment_file", stopped_during_the_second)
    if signal_name == "SIGINT":  # Ctrl-C as a terminal delivers it: a shell's background job has SIGINT ignored
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    else:
        previous_int = None
    points = tmp_path / "points.csv"
    points.write_text("".join(f"{c},{','.join(map(str, lung1.nodule_ras))}\n" for c in ("c1", "c2", "c3")))
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--points", str(points),
                     "--half-height", "2.5"])
    finally:
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
    assert code == 130
    assert signal.getsignal(signal.SIGTERM) == before
    summary = json.loads((out / "batch.json").read_text())
    status = {c["case"]: c["status"] for c in summary["cases"]}
    assert status == {"c1.nrrd": "ok", "c2.nrrd": "interrupted", "c3.nrrd": "not-started"}
    assert summary["interrupted"] is True and summary["n_ok"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["batch.json", "c1.report.json", "c1.seg.nrrd"]


def test_a_repeated_point_is_segmented_once_with_a_note(cases, lung1, disc, tmp_path, capsys):
    out, report = tmp_path / "x.seg.nrrd", tmp_path / "x.json"
    point = _point_arg(lung1.nodule_ras)
    assert main(["segment", str(cases / "lung1.nrrd"), point, point, "--model", str(disc[1].path), "--out", str(out),
                 "--report", str(report), "--half-height", "2.5"]) == 0
    assert disc[0].calls == 1  # one forward pass (the click's planes are one batch), not two
    err = capsys.readouterr().err
    assert "given 2 times: segmented once" in err
    assert len(json.loads(report.read_text())["nodules"]) == 1


def test_a_volume_smaller_than_the_crop_is_segmented_with_a_warning(lung1, disc, tmp_path, capsys):
    """A 10 x 10 x 3 noise volume was called a 330.8 mm3 nodule without a word."""
    rng = np.random.default_rng(0)
    small = Volume(rng.integers(-1000, 400, (3, 10, 10)).astype(np.int16), np.diag([0.7, 0.7, 2.5, 1.0]))
    write_nrrd(small, tmp_path / "small.nrrd")
    centre = small.ijk_to_ras @ np.array([4.5, 4.5, 1, 1])
    assert main(["segment", str(tmp_path / "small.nrrd"), _point_arg(centre[:3]), "--model", str(disc[1].path),
                 "--out", str(tmp_path / "s.seg.nrrd"), "--half-height", "2.5"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "small.nrrd: the volume covers 7.0 x 7.0 mm in-plane, less than the model's crop of " \
                               "89.6 x 89.6 mm" in err[0] and "99 % of each crop lies outside" in err[0], err
    # a CT region wider than the crop: no warning
    assert main(["segment", str(write_nrrd(lung1, tmp_path / "lung1.nrrd")), _point_arg(lung1.nodule_ras),
                 "--model", str(disc[1].path), "--out", str(tmp_path / "l.seg.nrrd"), "--half-height", "2.5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_view_without_trame_is_the_one_line_hint(tmp_path):
    """Without the web extra (trame's modules missing), `arseg view` printed a traceback from inside the server."""
    code = ("import sys\n"
            "class NoTrame:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0].startswith('trame'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoTrame())\n"
            "from ARSegLib.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "view", str(ROOT / "Resources" / "Demo" / "lung1-slab.nrrd"),
                           "--port", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("arseg view: error: the review page needs trame-slicer: pip install") and \
        "No module named 'trame" in err[0]


def _small_disk(tmp_path, free_kib: int):
    """A real file system of 64 KiB with free_kib left (tmpfs; needs the right to mount, else the test skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    try:
        (mount / "filler").write_bytes(b"\0" * ((64 - free_kib) << 10))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    yield from _small_disk(tmp_path, 2)


@pytest.fixture
def nearly_full_disk(tmp_path):
    """Room for part of a .seg.nrrd (about 10 KiB here): VTK's writer left a truncated file and reported success."""
    yield from _small_disk(tmp_path, 8)


def test_a_segmentation_cut_short_by_a_full_disk_is_not_taken_as_written(cases, lung1, disc, nearly_full_disk,
                                                                        capsys):
    out = nearly_full_disk / "x.seg.nrrd"
    with pytest.raises(SystemExit) as info:
        main(["segment", str(cases / "lung1.nrrd"), _point_arg(lung1.nodule_ras), "--model", str(disc[1].path),
              "--out", str(out), "--half-height", "2.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err.startswith("arseg segment: error: the disk is full"), err
    assert sorted(p.name for p in nearly_full_disk.iterdir()) == ["filler"]


def test_a_full_disk_is_said_not_a_temporary_file(cases, lung1, disc, full_disk, tmp_path, capsys):
    out = full_disk / "o" / "x.seg.nrrd"
    with pytest.raises(SystemExit) as info:
        main(["segment", str(cases / "lung1.nrrd"), _point_arg(lung1.nodule_ras), "--model", str(disc[1].path),
              "--out", str(out), "--half-height", "2.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err.startswith("arseg segment: error: the disk is full"), err
    assert str(full_disk / "o") in err and ".arseg-tmp" not in err, err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_no_space_from_the_system_is_said_as_a_full_disk(cases, lung1, disc, tmp_path, capsys):
    """The report's write fails with ENOSPC (its temporary name points at /dev/full, which refuses every write)."""
    folder = tmp_path / "o"
    folder.mkdir()
    (folder / f".arseg-tmp-{os.getpid()}-x.json").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as info:
        main(["segment", str(cases / "lung1.nrrd"), _point_arg(lung1.nodule_ras), "--model", str(disc[1].path),
              "--out", str(folder / "x.seg.nrrd"), "--report", str(folder / "x.json"), "--half-height", "2.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err.startswith(f"arseg segment: error: the disk is full: no space left in "
                                                   f"{folder}"), err
    assert list(folder.iterdir()) == []  # neither output, nor the temporary name


def _edited_shipped_card(folder: Path, **sampling) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    models = ROOT / "Resources" / "Models"
    data = json.loads((models / "lidc-nodule.json").read_text())
    data["config"]["sampling"].update(sampling)
    (folder / "lidc-nodule.json").write_text(json.dumps(data, indent=2))
    (folder / "lidc-nodule.safetensors").symlink_to(models / "lidc-nodule.safetensors")
    return folder / "lidc-nodule.json"


def test_a_card_with_a_nan_temperature_is_refused_in_one_line(cases, lung1, tmp_path, capsys):
    """Issue 26: an edited card with temperature NaN gave a 175,534 mm3 "nodule" with exit status 0."""
    card = _edited_shipped_card(tmp_path / "models", temperature=float("nan"))
    out = tmp_path / "o" / "x.seg.nrrd"
    with pytest.raises(SystemExit) as info:
        main(["segment", str(cases / "lung1.nrrd"), _point_arg(lung1.nodule_ras), "--model", str(card),
              "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert "config.sampling.temperature must be a finite number above 0" in err[0] and "nan" in err[0]
    assert not out.parent.exists()


def test_a_shadowed_shipped_model_is_said(cases, lung1, disc, tmp_path, monkeypatch, capsys):
    """A card named lidc-nodule on ARSEG_MODEL_PATH silently took the shipped one's place."""
    mine = _edited_shipped_card(tmp_path / "mine", temperature=0.9)
    monkeypatch.setenv("ARSEG_MODEL_PATH", str(mine.parent))
    assert main(["segment", str(cases / "lung1.nrrd"), _point_arg(lung1.nodule_ras), "--out",
                 str(tmp_path / "x.seg.nrrd"), "--half-height", "2.5"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert len(err) == 1 and str(ROOT / "Resources" / "Models" / "lidc-nodule.json") in err[0] and \
        str(mine) in err[0] and "(shipped)" in err[0], err


def test_eval_checks_the_temperature_before_any_work(tiny_model_card, lung1_dir, tmp_path, monkeypatch, capsys):
    from ARSegLib import cli

    monkeypatch.setattr(cli, "eval_data", lambda args: (_ for _ in ()).throw(AssertionError("data loaded")))
    for option, value, words in (("--temperature", "nan", "must be a finite number"), ("--temperature", "0", "above 0"),
                                 ("--temperature", "9", "at most 5"), ("--views", "9", "between 1 and 8"),
                                 ("--oversample", "0", "between 1 and 8"), ("--presence-shift", "6", "at most 5")):
        with pytest.raises(SystemExit) as info:  # the same limits as arseg segment's (SegmentSettings.check)
            main(["eval", "--model", str(tiny_model_card), "--data", str(lung1_dir / "lidc-slices"),
                  option, value, "--json", str(tmp_path / "e.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith(f"arseg eval: error: {option}") \
            and words in err[0], err
    assert not (tmp_path / "e.json").exists()


@pytest.fixture()
def refinements_recorded(monkeypatch):
    """pipeline.segment_click recording what a refinement brings, answering with the plain click (the refinement's
    effect is pipeline.py's)."""
    from ARSegLib import pipeline

    real, calls = pipeline.segment_click, []

    def recording(*args, refinement=None, previous=None, **kwargs):
        calls.append({"refinement": refinement, "previous": previous})
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "segment_click", recording)
    return calls


def test_refinement_options_refine_the_nodule_of_the_point_before_them(cases, lung1, disc, tmp_path,
                                                                      refinements_recorded):
    from ARSegLib.prompts import EXCLUDE, INCLUDE

    r, a, s = lung1.nodule_ras
    out, report = tmp_path / "x.seg.nrrd", tmp_path / "x.json"
    assert main(["segment", str(cases / "lung1.nrrd"), "--point", f"{r},{a},{s}", "--exclude", f"{r - 20}", f"{a}",
                 f"{s}", "--include", f"{r + 1},{a},{s}", "--lock-scales", "2", "--from-sample", "3",
                 "--point", f"{r + 30},{a - 15},{s}", "--model", str(disc[1].path), "--out", str(out),
                 "--report", str(report), "--samples", "4", "--half-height", "2.5"]) == 0
    first, refined, second = refinements_recorded
    assert first["refinement"] is None and second["refinement"] is None
    kinds = [(p.kind, p.point_ras) for p in refined["refinement"].prompts]
    assert kinds == [(EXCLUDE, (r - 20, a, s)), (INCLUDE, (r + 1, a, s))]  # a negative R after a space, too
    assert (refined["refinement"].lock_scales, refined["refinement"].from_sample) == (2, 3)
    assert refined["previous"] is not None and refined["previous"].point_ras == pytest.approx((r, a, s))
    assert len(json.loads(report.read_text())["nodules"]) == 2  # refined in place: no third nodule


@pytest.mark.parametrize("extra, words", [
    (["--exclude", "1,2,3", "--point", "P"], "--exclude refines the object of the --point before it"),
    (["--point", "P", "--lock-scales", "99"], "--lock-scales keeps scales"),
    (["--point", "P", "--use-sample", "5"], "--use-sample 5 does not exist"),
    (["--point", "P", "--from-sample", "2"], "give --lock-scales too"),
    (["--point", "P", "--use-sample", "1", "--exclude", "1,2,3"], "does not combine"),
    (["--point", "P", "--exclude", "1,2"], "--exclude takes three finite numbers"),
    (["--point", "P", "--exclude", "0,0,900"], "outside the volume"),
])
def test_a_refinement_that_cannot_be_is_refused_before_any_work(extra, words, cases, lung1, disc, tmp_path,
                                                                capsys):
    point = ",".join(f"{v:.3f}" for v in lung1.nodule_ras)
    out = tmp_path / "x.seg.nrrd"
    with pytest.raises(SystemExit) as info:
        main(["segment", str(cases / "lung1.nrrd"), *[point if w == "P" else w for w in extra], "--model",
              str(disc[1].path), "--out", str(out), "--samples", "4"])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arseg")]
    assert len(err) == 1 and words in err[0], err
    assert disc[0].calls == 0 and not out.exists()


def test_batch_csv_kind_column_refines_a_case_nodule(cases, lung1, disc, tmp_path, capsys, refinements_recorded):
    import shutil

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(cases / "lung1.nrrd", folder / "c1.nrrd")
    r, a, s = lung1.nodule_ras
    points = tmp_path / "points.csv"
    out = tmp_path / "out"
    points.write_text(f"case,R,A,S,kind\nc1,{r},{a},{s},exclude\n")
    with pytest.raises(SystemExit):  # a refinement row before any point row of its case
        main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--points", str(points)])
    assert "refines the object of a point row" in capsys.readouterr().err and disc[0].calls == 0
    points.write_text(f"c1,{r},{a},{s},sideways\n")
    with pytest.raises(SystemExit):
        main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--points", str(points)])
    assert "the kind is one of point, include, exclude" in capsys.readouterr().err and not out.exists()

    points.write_text(f"case,R,A,S,kind\nc1,{r},{a},{s},point\nc1,{r - 20},{a},{s},exclude\nc1,{r + 30},{a},{s}\n")
    assert main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--points", str(points),
                 "--half-height", "2.5", "--samples", "4"]) == 0
    assert [c["refinement"] is not None for c in refinements_recorded] == [False, True, False]
    assert refinements_recorded[1]["refinement"].points("exclude") == ((r - 20, a, s),)
    record = json.loads((out / "batch.json").read_text())["cases"][0]
    assert record["n_nodules"] == 2 and record["refinements"][0][0]["prompts"][0]["kind"] == "exclude"


def test_batch_csv_lock_scales_and_use_sample_rows_refine_the_nodule_before_them(cases, lung1, disc, tmp_path,
                                                                                 refinements_recorded):
    import shutil

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(cases / "lung1.nrrd", folder / "c1.nrrd")
    r, a, s = lung1.nodule_ras
    points, out = tmp_path / "points.csv", tmp_path / "out"
    points.write_text(f"case,R,A,S,kind\nc1,{r},{a},{s},point\nc1,,,,lock-scales:2\nc1,,,,From-Sample:3\n"
                      f"c1,{r + 30},{a - 15},{s}\nc1,,,,use-sample:2\n")
    assert main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--points", str(points),
                 "--half-height", "2.5", "--samples", "4"]) == 0
    refinements = [c["refinement"] for c in refinements_recorded]
    assert refinements[0] is None and refinements[2] is None
    assert (refinements[1].lock_scales, refinements[1].from_sample, refinements[1].use_sample) == (2, 3, None)
    assert (refinements[3].lock_scales, refinements[3].use_sample, refinements[3].prompts) == (0, 2, ())
    assert refinements_recorded[3]["previous"].point_ras == pytest.approx((r + 30, a - 15, s))  # its own nodule
    record = json.loads((out / "batch.json").read_text())["cases"][0]
    assert record["n_nodules"] == 2
    assert record["refinements"][0] == [{"prompts": [], "lock_scales": 2, "from_sample": 3}]
    assert record["refinements"][1] == [{"prompts": [], "use_sample": 2}]


@pytest.mark.parametrize("rows, words", [
    (["c1,,,,lock-scales:2", "P"], "line 2: a lock-scales:2 row refines the object of a point row of case 'c1'"),
    (["P", "c1,,,,lock-scales:two"], "line 3: lock-scales:N takes a whole number from 1"),
    (["P", "c1,,,,use-sample:0"], "line 3: use-sample:N takes a whole number from 1"),
    (["P", "c1,1,2,3,lock-scales:2"], "line 3: a lock-scales row refines the object of the point row before it and "
                                      "takes no point: leave R, A, S empty"),
    (["P", "c1,-70,-86,-116,exclude", "c1,,,,use-sample:2"], "line 4: use-sample takes one sample as it is"),
    (["P", "c1,,,,lock-scales:2", "c1,,,,lock-scales:3"], "line 4: lock-scales given twice"),
    (["P", "c1,,,,from-sample:2"], "from-sample:I names the sample whose coarse scales are kept; give a "
                                   "lock-scales:K row too"),
    (["P", "c1,,,,sideways:2"], "line 3: the kind is one of point, include, exclude, lock-scales:K, from-sample:I, "
                                "use-sample:I"),
    (["P", "c1,,,,lock-scales:99"], "--lock-scales keeps scales 1..k"),  # the model's scales: checked before work
    (["P", "c1,,,,use-sample:9"], "--use-sample 9 does not exist: the result has 4 samples"),
])
def test_batch_csv_refinement_rows_are_checked_before_any_work(rows, words, cases, lung1, disc, tmp_path, capsys):
    import shutil

    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(cases / "lung1.nrrd", folder / "c1.nrrd")
    point = "c1," + ",".join(f"{v:.3f}" for v in lung1.nodule_ras)
    points, out = tmp_path / "points.csv", tmp_path / "out"
    points.write_text("case,R,A,S,kind\n" + "\n".join(point if row == "P" else row for row in rows) + "\n")
    with pytest.raises(SystemExit) as info:
        main(["batch", str(folder), str(out), "--model", str(disc[1].path), "--points", str(points), "--samples",
              "4"])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arseg")]
    assert len(err) == 1 and words in err[0], err
    assert disc[0].calls == 0 and not out.exists()
