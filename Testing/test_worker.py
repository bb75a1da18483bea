"""The persistent inference worker process and its client (ARSegLib.worker): the same results as in-process
inference, voxels sent once per volume, cancel, a crash reported and recovered from, errors that keep their type,
no process outliving its client, and no torch in the client's process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from launcher_standin import decoy_library, write_launcher

from ARSegLib import pipeline, worker
from ARSegLib.models import ModelError
from ARSegLib.prompts import include

ROOT = Path(__file__).resolve().parents[1]


def _blob_volume():
    """A small CT-like volume (HU) with a bright ball in air, 0.7 mm pixels, 2 mm slices."""
    k, j, i = np.mgrid[:12, :100, :100]
    ball = ((k - 6) * 2.0) ** 2 + ((j - 50) * 0.7) ** 2 + ((i - 50) * 0.7) ** 2 < 8.0 ** 2
    volume = np.where(ball, 40, -850).astype(np.int16)
    volume += np.random.default_rng(0).integers(-20, 20, volume.shape, dtype=np.int16)
    ijk_to_ras = np.diag([-0.7, -0.7, 2.0, 1.0])
    centre = ijk_to_ras @ np.array([50, 50, 6, 1.0])
    return volume, ijk_to_ras, tuple(centre[:3])


@pytest.fixture
def client(tiny_model_card):
    c = worker.InferenceClient(str(tiny_model_card), "cpu")
    yield c
    c.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def test_worker_click_equals_the_in_process_click(client, tiny):
    predictor, card = tiny
    volume, m, point = _blob_volume()
    settings = pipeline.SegmentSettings(n_samples=4, seed=3, half_height_mm=4)
    load = client.start()
    assert load.wait(120) and load.error is None, load.error
    assert load.result["model"] == "tiny-test" and load.result["pid"] == client.pid != os.getpid()
    assert client.start() is load  # the module's every enter() asks again: the model is not loaded twice

    run = client.segment(volume, m, include(point), settings, volume_key="blob")
    assert run.wait(120) and run.error is None, run.error
    here = pipeline.segment_click(volume, m, point, predictor, card, settings)
    there = run.result
    assert isinstance(there, pipeline.VolumeResult) and there.box == here.box
    for name in ("consensus", "disagreement", "scale_bits", "sample_bits", "sample_volumes_mm3", "sample_iou"):
        np.testing.assert_array_equal(getattr(there, name), getattr(here, name), err_msg=name)
    np.testing.assert_array_equal(there.preview.scale_consensus, here.preview.scale_consensus)
    assert there.grid == here.grid and there.point_ras == here.point_ras
    assert run.fraction == 1.0 and run.seconds > 0


def test_a_volume_is_sent_once_then_only_its_key(client, monkeypatch):
    volume, m, point = _blob_volume()
    sent = []
    real_put = worker.ArrayFolder.put

    def counting_put(self, array, tag):
        sent.append(tag)
        return real_put(self, array, tag)

    monkeypatch.setattr(worker.ArrayFolder, "put", counting_put)
    settings = pipeline.SegmentSettings(n_samples=2, half_height_mm=0)
    first = client.segment(volume, m, include(point), settings, volume_key=("blob", 1))
    assert first.wait(120) and first.error is None, first.error
    second = client.segment(volume, m, include(point), settings, volume_key=("blob", 1))
    assert second.wait(120) and second.error is None
    np.testing.assert_array_equal(first.result.consensus, second.result.consensus)
    assert sent == ["volume"]
    # modified voxels: a new key
    changed = client.segment(volume + 1, m, include(point), settings, volume_key=("blob", 2))
    assert changed.wait(120) and changed.error is None
    assert sent == ["volume", "volume"]
    leftovers = [p.name for p in client._folder.path.iterdir() if p.suffix in (".raw", ".tmp")]
    assert leftovers == []  # every array file was taken by its reader


def test_cancel_stops_a_run_and_the_worker_serves_the_next(client):
    volume, m, point = _blob_volume()
    big = np.tile(volume, (6, 3, 3))  # a whole volume of 72 x 300 x 300: many chunks of crops
    run = client.segment(big, m, None, pipeline.SegmentSettings(n_samples=8, batch_size=2), volume_key="big")
    while run.done_steps == 0 and not run.poll():
        time.sleep(0.02)
    run.cancel()
    assert run.wait(60)
    assert run.cancelled and isinstance(run.error, worker.RunCancelled)
    after = client.segment(volume, m, include(point), pipeline.SegmentSettings(n_samples=2, half_height_mm=0))
    assert after.wait(120) and after.error is None


def test_a_killed_worker_fails_its_run_clearly_and_the_next_run_restarts_it(client):
    volume, m, point = _blob_volume()
    assert client.start().wait(120)
    first_pid = client.pid
    run = client.segment(np.tile(volume, (6, 3, 3)), m, None, pipeline.SegmentSettings(n_samples=8, batch_size=2))
    while run.done_steps == 0 and not run.poll():
        time.sleep(0.02)
    os.kill(first_pid, signal.SIGKILL)
    assert run.wait(30)
    assert isinstance(run.error, worker.WorkerCrashed)
    assert "stopped unexpectedly" in str(run.error) and str(-signal.SIGKILL) in str(run.error)
    assert not client.alive()
    again = client.segment(volume, m, include(point), pipeline.SegmentSettings(n_samples=2, half_height_mm=0))
    assert again.wait(120) and again.error is None, again.error
    assert client.pid != first_pid


def test_errors_keep_their_type(tiny_model_card):
    bad = worker.InferenceClient("no-such-model", "cpu")
    try:
        load = bad.start()
        assert load.wait(120)
        assert isinstance(load.error, ModelError) and "no-such-model" in str(load.error)
    finally:
        bad.shutdown()
    good = worker.InferenceClient(str(tiny_model_card), "cpu")
    try:
        volume, m, _ = _blob_volume()
        run = good.segment(volume, m, include((500.0, 0.0, 0.0)))  # outside the volume: the pipeline's own error
        assert run.wait(120)
        assert isinstance(run.error, pipeline.PointOutsideVolumeError)
    finally:
        good.shutdown()


def test_shutdown_leaves_no_process_and_no_files(client):
    assert client.start().wait(120)
    pid, folder = client.pid, client._folder.path
    client.shutdown()
    assert not _alive(pid) and not folder.exists()
    client.shutdown()  # twice is fine


def _run_script(code: str, timeout: float = 180, cwd: Path = ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def test_the_worker_exits_when_its_client_process_dies(tiny_model_card):
    """Slicer killed (or crashing) must not leave the worker behind holding a GB of memory."""
    out = _run_script(f"""
        import os, sys
        from ARSegLib.worker import InferenceClient
        c = InferenceClient({str(tiny_model_card)!r}, "cpu")
        assert c.start().wait(120)
        print(c.pid, flush=True)
        os._exit(0)  # no clean-up at all, as a crash
    """)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the worker outlived its client"


def test_the_client_process_never_imports_torch(tiny_model_card):
    """Slicer's process stays free of torch, its threads and the allocator tuning (engine/heap.py): all of that
    lives in the worker."""
    out = _run_script(f"""
        import sys
        import numpy as np
        from ARSegLib import pipeline, worker
        from ARSegLib.prompts import include
        k, j, i = np.mgrid[:8, :80, :80]
        volume = np.where((j - 40) ** 2 + (i - 40) ** 2 < 100, 40, -850).astype(np.int16)
        c = worker.InferenceClient({str(tiny_model_card)!r}, "cpu")
        run = c.segment(volume, np.diag([-0.7, -0.7, 2.0, 1.0]), include((-28.0, -28.0, 8.0)),
                        pipeline.SegmentSettings(n_samples=2, half_height_mm=0))
        assert run.wait(120) and run.error is None, run.error
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m == "ARSegLib.engine.heap"))
        c.shutdown()
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_shared_client_restarts_for_another_model_or_device(tiny_model_card):
    try:
        a = worker.shared_client(str(tiny_model_card), "cpu")
        assert a.start().wait(120)
        pid = a.pid
        assert worker.shared_client(str(tiny_model_card), "cpu") is a
        b = worker.shared_client(str(tiny_model_card), "auto")
        assert b is not a and not a.alive() and not _alive(pid)
    finally:
        worker.shutdown_shared()


def test_arrays_spill_to_disk_when_the_ram_disk_is_full(tmp_path, monkeypatch):
    """A container's /dev/shm is often 64 MB: a CT that does not fit goes through a folder on disk instead."""
    import shutil as shutil_module

    folder = worker.ArrayFolder(tmp_path / "shm", tmp_path / "disk")
    (tmp_path / "shm").mkdir()
    (tmp_path / "disk").mkdir()
    volume = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    assert Path(folder.put(volume, "small").path).parent == tmp_path / "shm"
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(worker.shutil, "disk_usage", lambda p: usage._replace(free=worker.ArrayFolder.HEADROOM))
    ref = folder.put(volume, "big")
    assert Path(ref.path).parent == tmp_path / "disk"
    np.testing.assert_array_equal(worker.ArrayFolder.take(ref), volume)
    assert not Path(ref.path).exists()
    folder.remove()
    assert not (tmp_path / "shm").exists() and not (tmp_path / "disk").exists()


@pytest.mark.parametrize("torch_importable", [False, True])
def test_a_torch_error_reaches_the_client_as_a_worker_error_without_torch(tmp_path, tiny_model_card,
                                                                          torch_importable):
    """CUDA out of memory or torch.AcceleratorError in the worker: the client (Slicer's process) must neither
    import torch to unpickle it nor, where torch cannot be imported, lose the run (it stayed at "Segmenting...")."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "Testing" / "torch_error_worker.py"}" "$@"\n')
    python.chmod(0o755)
    block = "" if torch_importable else """
        class NoTorch:  # a Slicer whose Python cannot import torch
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch cannot be imported in this process")
        sys.meta_path.insert(0, NoTorch())
    """
    out = _run_script(f"""
        import sys
        {textwrap.indent(textwrap.dedent(block), " " * 8).strip()}
        from ARSegLib import worker
        c = worker.InferenceClient({str(tiny_model_card)!r}, "cpu", python={str(python)!r})
        load = c.start()
        assert load.wait(120), "the run never finished"
        print(type(load.error).__name__)
        print(load.error)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        c.shutdown()
    """)
    assert out.returncode == 0, out.stderr
    kind, message, torch_modules = out.stdout.strip().split("\n")
    assert kind == "WorkerError" and message.startswith("torch._C._LinAlgError: linalg.inv"), out.stdout
    assert torch_modules == "[]"


def test_errors_pass_through_only_where_the_client_can_unpickle_them_without_torch():
    import torch

    from ARSegLib.models import ModelError

    def passes(e):
        blob, summary, _ = worker.portable_error(e)
        return blob is not None

    assert passes(ModelError("no such model")) and passes(ValueError("bad")) and passes(MemoryError())
    assert passes(pipeline.PointOutsideVolumeError("outside"))
    assert not passes(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not passes(RuntimeError("shape", torch.Size([2, 3])))  # a plain class, but torch inside its args
    try:
        torch.linalg.inv(torch.zeros(2, 2))
    except Exception as e:
        blob, summary, text = worker.portable_error(e)
    assert blob is None and summary.startswith("torch._C._LinAlgError: ") and "Traceback" in text
    error = worker.error_from_worker(blob, summary, text)
    assert isinstance(error, worker.WorkerError) and str(error) == summary and error.details == text


def test_the_modules_errors_may_come_from_import_without_torch():
    names = sorted(worker.CLIENT_SAFE_MODULES)
    out = _run_script(f"""
        import importlib, sys
        for name in {names!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_worker_imports_this_arseglib_not_another_on_the_launchers_path_or_in_the_working_directory(
        tmp_path, tiny_model_card):
    """Slicer's launcher puts every installed extension's qt-scripted-modules on PYTHONPATH before ours, and
    `python -m` puts the working directory first: the worker must still run the extension's own copy."""
    launcher = write_launcher(tmp_path / "bin", [decoy_library(tmp_path / "other-extension")])
    cwd = decoy_library(tmp_path / "cwd")
    model = os.path.relpath(tiny_model_card, cwd)  # a model path relative to the client's working directory
    out = _run_script(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})  # as Slicer puts the extension's folder on its sys.path
        from ARSegLib import worker
        c = worker.InferenceClient({model!r}, "cpu", python={str(launcher)!r})
        load = c.start()
        assert load.wait(120), "no answer"
        print(load.error)
        print(c.info.get("model"), c.worker_pid != c.pid)
        c.shutdown()
    """, cwd=cwd)
    assert out.returncode == 0, out.stderr
    error, loaded = out.stdout.strip().split("\n")[-2:]
    assert error == "None" and loaded == "tiny-test True", out.stdout


@pytest.mark.parametrize("kill", ["SIGKILL", "SIGTERM", "launcher"])
def test_a_crash_through_a_launcher_says_what_became_of_the_worker_process(tmp_path, tiny_model_card, kill):
    """The client holds the launcher (PythonSlicer), whose exit code is 1 whatever happened to its child: the
    message must say what became of the worker itself."""
    client = worker.InferenceClient(str(tiny_model_card), "cpu", python=str(write_launcher(tmp_path, [])))
    try:
        assert client.start().wait(120)
        worker_pid, launcher_pid = client.worker_pid, client.pid
        assert worker_pid is not None and worker_pid != launcher_pid
        volume, m, _ = _blob_volume()
        run = client.segment(np.tile(volume, (6, 3, 3)), m, None,
                             pipeline.SegmentSettings(n_samples=8, batch_size=2))
        while run.done_steps == 0 and not run.poll():
            time.sleep(0.02)
        if kill == "launcher":
            os.kill(launcher_pid, signal.SIGKILL)
        else:
            os.kill(worker_pid, getattr(signal, kill))
        assert run.wait(30)
        message = str(run.error)
        assert isinstance(run.error, worker.WorkerCrashed) and f"pid {worker_pid}" in message, message
        if kill == "launcher":
            # the worker either outlived its launcher and was stopped by the client, or ended first on its own
            # (it watches its parent): a race whose both outcomes say what became of the worker and leave none
            assert "has been stopped" in message or ("ended" in message and "its launcher" in message), message
            deadline = time.monotonic() + 5
            while _alive(worker_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(worker_pid)
        else:
            assert f"killed by {kill}" in message, message
    finally:
        client.shutdown()


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGHUP"])
def test_a_killed_client_leaves_no_folders(tiny_model_card, sig):
    """/dev/shm/arseg-worker-* and the spill folder outlived a client killed with SIGKILL, SIGTERM or SIGHUP."""
    # the signal's default disposition, as a terminal gives it: under nohup (SIGHUP) or in a shell's background job
    # (SIGINT) the test runner itself may ignore it, and an ignored signal is rightly left alone by the client
    script = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.{sig}, signal.SIG_DFL) if {sig!r} != "SIGKILL" else None
        from ARSegLib.worker import InferenceClient
        c = InferenceClient({str(tiny_model_card)!r}, "cpu")
        assert c.start().wait(120)
        print(c.pid, c._folder.path, c._folder.spill, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        pid, *folders = script.stdout.readline().split()
        assert folders and all(Path(f).is_dir() for f in folders)
        script.send_signal(getattr(signal, sig))
        assert script.wait(30) == -getattr(signal, sig)  # it still dies of that signal
        deadline = time.monotonic() + 15
        while (any(Path(f).exists() for f in folders) or _alive(int(pid))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f).exists() for f in folders), folders
        assert not _alive(int(pid))
    finally:
        script.kill()
        script.wait()


def test_stale_folders_of_dead_processes_are_removed_at_the_next_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f"arseg-worker-{dead.pid}-ab12_x", tmp_path / f"arseg-worker-spill-{dead.pid}-q9"]
        kept = [tmp_path / f"arseg-worker-{live.pid}-zz", tmp_path / f"arseg-worker-spill-{live.pid}-yy",
                tmp_path / "arseg-worker-old_style", tmp_path / f"something-{dead.pid}-else"]
        for folder in stale + kept:
            folder.mkdir()
            (folder / "worker.log").write_text("x")
        assert sorted(worker.remove_stale_folders([tmp_path])) == sorted(stale)
        assert all(f.exists() for f in kept) and not any(f.exists() for f in stale)
    finally:
        live.kill()
        live.wait()
    # and the client does it when it starts
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(worker.tempfile.gettempdir())
    leftover = shm / f"arseg-worker-{dead.pid}-testleft"
    leftover.mkdir()
    folder = worker.ArrayFolder.create()
    try:
        assert not leftover.exists() and folder.path.name.startswith(f"arseg-worker-{os.getpid()}-")
    finally:
        folder.remove()
        shutil.rmtree(leftover, ignore_errors=True)


def test_array_files_held_by_another_program_do_not_fail_the_click(client, monkeypatch):
    """Windows: an antivirus or indexer holding a file refuses its rename and its removal for a moment; the
    click must still work, and the folder must go at shutdown once the file is let go."""
    held = {}
    real_unlink = os.unlink

    def refuse_a_while(path, *args, **kwargs):  # refused twice per file, then allowed
        name = os.fspath(path)
        if name.endswith(".raw") and held.get(name, 0) < 2:
            held[name] = held.get(name, 0) + 1
            raise PermissionError(13, "The process cannot access the file because it is being used", name)
        return real_unlink(path, *args, **kwargs)

    def refuse(src, dst, *args, **kwargs):
        raise PermissionError(13, "Access is denied", os.fspath(src))

    volume, m, point = _blob_volume()
    assert client.start().wait(120)
    folder = client._folder.path
    monkeypatch.setattr(os, "unlink", refuse_a_while)
    monkeypatch.setattr(os, "replace", refuse)
    run = client.segment(volume, m, include(point), pipeline.SegmentSettings(n_samples=2, half_height_mm=0))
    assert run.wait(120) and run.error is None, run.error
    assert held  # the client's own removals were refused
    client.shutdown()
    assert not folder.exists()


def test_cuda_arch_supported_follows_cudas_compatibility_rules():
    from ARSegLib.training.distributed import cuda_arch_supported

    cu126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    assert cuda_arch_supported((8, 6), cu126) and cuda_arch_supported((8, 9), cu126)  # sm_86 code runs on 8.9
    assert cuda_arch_supported((9, 0), cu126)
    assert not cuda_arch_supported((12, 0), cu126)  # an RTX 50xx (Blackwell) with a CUDA 12.6 build
    assert not cuda_arch_supported((3, 7), cu126)  # a K80: too old
    assert not cuda_arch_supported((10, 0), ["sm_90a"]) and cuda_arch_supported((9, 0), ["sm_90a"])
    assert cuda_arch_supported((12, 1), ["sm_120f"]) and not cuda_arch_supported((11, 0), ["sm_120f"])
    assert cuda_arch_supported((12, 0), cu126 + ["compute_90"])  # PTX: compiled for the newer GPU at load
    assert not cuda_arch_supported((8, 0), ["compute_90"])
    assert cuda_arch_supported((10, 0), ["sm_100", "sm_120"]) and not cuda_arch_supported((11, 0), ["sm_100"])
    assert cuda_arch_supported((9, 0), []) and cuda_arch_supported((9, 0), ["gfx90a"])  # nothing to judge by


def test_auto_falls_back_to_the_cpu_when_the_torch_build_cannot_run_on_the_gpu(monkeypatch, capsys):
    import torch

    from ARSegLib.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA GeForce RTX 5090")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_50", "sm_80", "sm_86", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (12, 0))
    device, note = distributed.resolve_device_noting("auto")
    assert device == "cpu" and "RTX 5090" in note and "12.0" in note and "sm_90" in note
    assert distributed.resolve_device("auto") == "cpu"
    assert "running on the CPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 9))
    assert distributed.resolve_device_noting("auto") == ("cuda", None)
