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
    (["{cases}/lung1.nrrd", "--point=1,2"], "three numbers"),
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
              "--samples", "2", "--half-height", "2.5"])
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
           "--pattern", "[fl]*.nrrd", "--samples", "2"]
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
