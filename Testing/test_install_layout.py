"""The installed extension works from its install layout alone: what `cmake --install` puts in
<ext>/lib/Slicer-X.Y/qt-scripted-modules (Testing/install_layout.py, from ARSeg/CMakeLists.txt's lists and the
rules of the two macros) loads the shipped model in the worker and segments the bundled demo, through a stand-in
for Slicer's launcher that puts another extension's ARSegLib first on PYTHONPATH, started from a folder holding
yet another. A file the CMakeLists forgets is missing from the layout and fails it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from install_layout import install_plan, lay_out
from launcher_standin import decoy_library, write_launcher

ROOT = Path(__file__).resolve().parents[1]


def _segment_demo_from(layout: Path, tmp_path: Path) -> dict:
    """In a fresh process that sees only the layout (as Slicer puts qt-scripted-modules on sys.path): click the
    demo's nodule through the worker, started by the launcher stand-in; returns what it printed (JSON)."""
    launcher = write_launcher(tmp_path / "bin", [decoy_library(tmp_path / "other-extension")])
    cwd = decoy_library(tmp_path / "cwd")
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(layout)!r})
        import numpy as np
        import SimpleITK as sitk
        from ARSegLib import demo, worker
        from ARSegLib.prompts import include

        def read(path):  # (k, j, i) array and IJK->RAS of an LPS NRRD, as Slicer reads it
            image = sitk.ReadImage(str(path))
            m = np.eye(4)
            flip = np.diag([-1.0, -1.0, 1.0])
            m[:3, :3] = flip @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
            m[:3, 3] = flip @ np.array(image.GetOrigin())
            return sitk.GetArrayFromImage(image), m

        volume, m = read(demo.demo_volume_path())
        label, _ = read(demo.demo_label_path())
        client = worker.InferenceClient("lidc-nodule", "cpu", python={str(launcher)!r})
        load = client.start()
        assert load.wait(300), "the model did not load"
        out = {{"load_error": None if load.error is None else str(load.error)}}
        if load.error is None:
            run = client.segment(volume, m, include(demo.demo_point_ras()))
            assert run.wait(300), "the click did not finish"
            out["run_error"] = None if run.error is None else str(run.error)
            if run.error is None:
                r = run.result
                (k0, k1), (j0, j1), (i0, i1) = r.box
                mine, truth = r.consensus.astype(bool), label[k0:k1, j0:j1, i0:i1] > 0
                out.update(model=r.model_name, volume_mm3=r.consensus_volume_mm3,
                           dice=2 * (mine & truth).sum() / max(1, mine.sum() + truth.sum()),
                           label_outside_box=int((label > 0).sum() - truth.sum()))
        out.update(info=client.info, worker_pid=client.worker_pid, launcher_pid=client.pid,
                   client_library=worker.__file__,
                   torch_here=sorted(k for k in sys.modules if k.split(".")[0] == "torch"))
        client.shutdown()
        print(json.dumps(out, default=str))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ARSEG_MODEL_PATH")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                         cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return lay_out(tmp_path_factory.mktemp("ext") / "lib" / "Slicer-5.8" / "qt-scripted-modules")


def test_the_layout_holds_the_module_library_model_and_demo(layout):
    rels = {rel for _, rel in install_plan()}
    assert {"ARSeg.py", "Resources/UI/ARSeg.ui", "ARSegLib/worker.py", "ARSegLib/engine/predictor.py",
            "Resources/Models/lidc-nodule.safetensors", "Resources/Demo/lung1-slab.nrrd"} <= rels
    files = {p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file()}
    assert files == rels  # exactly what is listed, nothing else


def test_the_installed_layout_loads_the_model_in_the_worker_and_segments_the_demo(layout, tmp_path):
    out = _segment_demo_from(layout, tmp_path)
    assert out["load_error"] is None and out["run_error"] is None, out
    assert out["client_library"].startswith(str(layout))  # the client ran the layout's ARSegLib...
    assert out["info"]["model"] == "lidc-nodule" and out["worker_pid"] != out["launcher_pid"]  # ...and the worker
    assert out["torch_here"] == []
    assert out["model"] == "lidc-nodule" and out["label_outside_box"] == 0
    assert out["dice"] > 0.8 and out["volume_mm3"] > 1000, out


def test_a_file_the_cmakelists_forgets_fails_the_layout(tmp_path):
    layout = lay_out(tmp_path / "qt-scripted-modules", omit={"ARSegLib/engine/heap.py"})
    out = _segment_demo_from(layout, tmp_path)
    assert out["load_error"] is not None and "heap" in out["load_error"], out
