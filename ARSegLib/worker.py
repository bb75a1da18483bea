"""The persistent inference worker: a separate Python process that imports torch, loads the model once and
serves clicks and whole-volume runs; and its client, which the Slicer module, the console and the web page use.

Why a process and not a thread: Slicer's main thread sits in Qt's C++ event loop *holding Python's GIL*
(PythonQt's thread support is off), so a Python thread in Slicer's process runs only in the moments the main
thread itself runs Python: a lung1 click that takes 1.1 s took 36 s on a thread under those conditions. A
process has a GIL of its own. It starts once (with Slicer's own Python, `PythonSlicer`) and keeps the model
loaded, so a click costs what the model costs.

How the two sides talk (`multiprocessing.connection`: a Unix socket or a Windows named pipe, authenticated
with a random key): the client sends small pickled messages; large arrays (the volume, the result's masks)
travel as raw files in a private folder on a RAM disk where there is one (`/dev/shm`), never through the
pipe. The worker keeps the last volume it was sent, so further clicks on it send no voxels at all.

    client -> worker   ("load", id, {})                      load the model (sent when the worker starts)
                       ("segment", id, {volume, key, ...})   a click (point_ras) or the whole volume
                       ("cancel", id)                        stop that run at its next step
                       ("quit",)
    worker -> client   ("progress", id, done, total)
                       ("done", id, payload)                 the card's name, or a pipeline.VolumeResult
                       ("error", id, exception)              the original exception where it pickles

The client never blocks the caller: `WorkerRun.poll()` (the module's 25 ms timer) connects, sends and reads
what is there and returns. A worker that dies fails its runs with `WorkerCrashed` (with its exit code and
the tail of its log) and the next run starts a new one. The worker exits by itself when its client goes
away (its connection closes, or its parent process dies), so no process outlives Slicer. Inference, and with
it the allocator tuning of `engine/heap.py`, happens only in the worker.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import itertools
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

AUTHKEY_ENV = "ARSEG_WORKER_AUTHKEY"
LOG_NAME = "worker.log"
INLINE_BYTES = 1 << 16  # arrays smaller than this travel inside the message
# a worker nobody connects to within this gives up (its parent is gone); tests shorten it through the environment
CONNECT_TIMEOUT_S = float(os.environ.get("ARSEG_WORKER_CONNECT_TIMEOUT_S", "120"))


class WorkerError(RuntimeError):
    """The worker could not be started or reached, or an error from it could not be passed on as it was."""


class WorkerCrashed(WorkerError):
    """The worker process ended while a run was in flight; the next run starts a new one."""


class RunCancelled(Exception):
    """The run was cancelled. (The engine's own Cancelled would import torch where it is unpickled: in Slicer's
    process, which never imports torch.)"""


# --------------------------------------------------------------------------------------------- arrays

@dataclasses.dataclass(frozen=True)
class ArrayFile:
    """A numpy array written as raw bytes to a file of the shared folder: what crosses instead of the array."""

    path: str
    dtype: str
    shape: Tuple[int, ...]


class ArrayFolder:
    """The folders both processes exchange large arrays through: one on a RAM disk (/dev/shm) where there is one,
    and one on disk for what the RAM disk has no room for (a container's /dev/shm is often only 64 MB)."""

    HEADROOM = 64 << 20  # what is left free on the RAM disk for everything else

    def __init__(self, path: Path, spill: Optional[Path] = None):
        self.path = Path(path)
        self.spill = Path(spill) if spill is not None else self.path
        self._names = itertools.count()

    @classmethod
    def create(cls) -> ArrayFolder:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        path = Path(tempfile.mkdtemp(prefix="arseg-worker-", dir=shm))
        return cls(path, Path(tempfile.mkdtemp(prefix="arseg-worker-spill-")) if shm else path)

    def put(self, array: np.ndarray, tag: str) -> ArrayFile:
        array = np.ascontiguousarray(array)
        folder = self.path
        if self.spill != self.path and shutil.disk_usage(self.path).free < array.nbytes + self.HEADROOM:
            folder = self.spill
        try:
            return self._write(folder, array, tag)
        except OSError:
            if folder == self.spill:
                raise
            return self._write(self.spill, array, tag)  # the RAM disk filled up meanwhile

    def _write(self, folder: Path, array: np.ndarray, tag: str) -> ArrayFile:
        path = folder / f"{os.getpid()}-{next(self._names)}-{tag}.raw"
        tmp = path.with_suffix(".tmp")
        try:
            array.tofile(tmp)  # one copy, straight into the page cache
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)  # the reader never sees a half-written file
        return ArrayFile(str(path), array.dtype.str, tuple(int(s) for s in array.shape))

    @staticmethod
    def take(ref: ArrayFile) -> np.ndarray:
        """The array, in memory of its own; the file is gone afterwards."""
        try:
            return np.fromfile(ref.path, dtype=np.dtype(ref.dtype)).reshape(ref.shape)
        finally:
            try:
                os.unlink(ref.path)
            except FileNotFoundError:
                pass

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.spill, ignore_errors=True)


def _replace_leaves(obj, leaf, tag: str = "a"):
    """A copy of obj (dataclasses, dicts, lists, tuples of them) with every leaf x replaced by leaf(x, tag), tag
    the name of the field or key it sits in. Arrays and ArrayFiles (a dataclass itself) are leaves."""
    if isinstance(obj, (np.ndarray, ArrayFile)):
        return leaf(obj, tag)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)  # fields set one by one: no __init__ or __post_init__ runs on half-converted values
        for f in dataclasses.fields(obj):
            object.__setattr__(out, f.name, _replace_leaves(getattr(obj, f.name), leaf, f.name))
        return out
    if isinstance(obj, dict):
        return {k: _replace_leaves(v, leaf, str(k)) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_replace_leaves(v, leaf, tag) for v in obj)
    return leaf(obj, tag)


def externalize(obj, folder: ArrayFolder):
    """A copy of obj whose large arrays are ArrayFiles."""
    return _replace_leaves(obj, lambda x, tag: folder.put(x, tag) if isinstance(x, np.ndarray)
                           and x.nbytes >= INLINE_BYTES else x)


def internalize(obj):
    """The inverse of externalize: every ArrayFile read back (and its file removed)."""
    return _replace_leaves(obj, lambda x, tag: ArrayFolder.take(x) if isinstance(x, ArrayFile) else x)


def _portable_exception(e: BaseException) -> BaseException:
    """The exception itself where it survives pickling (VolumeError, ModelError...), RunCancelled for the
    engine's Cancelled, else a WorkerError with its type, message and traceback."""
    from .engine import Cancelled

    if isinstance(e, Cancelled):
        return RunCancelled("cancelled")
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return WorkerError(f"{type(e).__name__}: {e}\n{text}")


# --------------------------------------------------------------------------------------------- worker side

class _Server:
    """The worker process: one thread reads messages (cancel flags take effect at once), the main thread runs
    the jobs in order."""

    def __init__(self, conn: Connection, model: str, device: str):
        import queue

        self.conn, self.model_name, self.device = conn, model, device
        self.jobs: queue.Queue = queue.Queue()
        self.cancel_flags: Dict[int, threading.Event] = {}
        self.flags_lock = threading.Lock()
        self.model = None  # (predictor, card)
        self.volume_key, self.volume = None, None

    def read_messages(self):
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "cancel":
                    self.flag(message[1]).set()
                elif message[0] == "quit":
                    self.jobs.put(None)
                    return
                else:
                    self.flag(message[1])
                    self.jobs.put(message)
        except (EOFError, OSError):  # the client is gone: nothing left to serve
            os._exit(0)
        except BaseException:  # a message this worker cannot read: say why in the log, which the client shows
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(3)

    def flag(self, job_id: int) -> threading.Event:
        with self.flags_lock:
            return self.cancel_flags.setdefault(job_id, threading.Event())

    def send(self, *message):
        try:
            self.conn.send(message)
        except (EOFError, OSError):
            os._exit(0)

    def serve(self):
        threading.Thread(target=self.read_messages, name="ARSeg worker messages", daemon=True).start()
        while True:
            message = self.jobs.get()
            if message is None:
                return
            op, job_id, args = message
            cancelled = self.flag(job_id)
            try:
                if cancelled.is_set():
                    raise RunCancelled("cancelled")
                payload = getattr(self, f"op_{op}")(job_id, args, cancelled)
                self.send("done", job_id, payload)
            except BaseException as e:  # every failure goes back to the client, which shows it
                self.send("error", job_id, _portable_exception(e))
            finally:
                with self.flags_lock:
                    self.cancel_flags.pop(job_id, None)

    def loaded(self):
        if self.model is None:
            from .models import load_model
            from .training.distributed import resolve_device

            self.model = load_model(self.model_name, resolve_device(self.device))
        return self.model

    def op_load(self, job_id, args, cancelled):
        import torch

        predictor, card = self.loaded()
        warm_s = self.warm_up(predictor) if os.environ.get("ARSEG_WORKER_WARMUP", "1") != "0" else 0.0
        # (a click that arrives meanwhile stops the warm-up at its next scale: the click comes first)
        return {"model": card.name, "pid": os.getpid(), "torch": str(torch.__version__),  # a str, not TorchVersion
                "threads": torch.get_num_threads(), "warm_up_s": warm_s}

    def warm_up(self, predictor) -> float:
        """One click-sized run on synthetic crops (a bright disc in dark lung), while the user is still finding
        the nodule: the first real click then finds the weights packed for oneDNN, its kernels created and the
        heap grown to size (in a fresh worker it took 1.0 s against 0.65 s for later clicks, `arseg bench`)."""
        t0 = time.perf_counter()
        size = predictor.crop_size
        j, i = np.mgrid[:size, :size]
        radii = np.linspace(4, 14, 17)[:, None, None]
        crops = np.where((j - size / 2) ** 2 + (i - size / 2) ** 2 < radii ** 2, 0.6, 0.1).astype(np.float32)
        from .engine import Cancelled

        try:
            predictor.segment(crops + np.random.default_rng(0).normal(0, 0.02, crops.shape).astype(np.float32),
                              cancel=lambda: not self.jobs.empty())
        except Cancelled:
            pass
        return time.perf_counter() - t0

    def op_segment(self, job_id, args, cancelled):
        from . import pipeline

        predictor, card = self.loaded()
        if args["volume"] is not None:
            self.volume_key, self.volume = args["volume_key"], internalize(args["volume"])
        elif args["volume_key"] != self.volume_key or self.volume is None:
            raise WorkerError("the worker does not hold this volume any more; run again")
        last = [0.0]

        def progress(done, total):
            now = time.perf_counter()
            if now - last[0] > 0.05 or done >= total:  # at most 20 messages a second
                last[0] = now
                self.send("progress", job_id, int(done), int(total))

        if args["point_ras"] is None:
            result = pipeline.segment_volume(self.volume, args["ijk_to_ras"], predictor, card, args["settings"],
                                             progress, cancelled.is_set)
        else:
            result = pipeline.segment_click(self.volume, args["ijk_to_ras"], args["point_ras"], predictor, card,
                                            args["settings"], progress, cancelled.is_set)
        return externalize(result, ArrayFolder(Path(args["folder"]), Path(args["spill"])))


def _exit_when_orphaned(parent_pid: int, connected: threading.Event):
    """A dead parent shows as a new parent pid (POSIX); one that never connects, as time running out. (Once
    connected, a closed connection also ends the worker: see _Server.read_messages.)"""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        time.sleep(0.5)
        if hasattr(os, "getppid") and os.getppid() != parent_pid:
            os._exit(0)
        if not connected.is_set() and time.monotonic() > deadline:
            os._exit(0)


def serve_main(argv=None) -> int:
    """`python -m ARSegLib.worker ADDRESS MODEL DEVICE`, the authentication key in $ARSEG_WORKER_AUTHKEY."""
    import signal

    argv = sys.argv[1:] if argv is None else argv
    address, model, device = argv[:3]
    # Ctrl+C in the terminal that started Slicer (or `arseg view`) reaches the whole process group: the client
    # decides when the worker ends (its connection closes), so a half-finished run is never interrupted here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    family = "AF_PIPE" if sys.platform == "win32" else "AF_UNIX"
    connected = threading.Event()
    with Listener(address, family=family, authkey=authkey) as listener:
        threading.Thread(target=_exit_when_orphaned, args=(os.getppid(), connected), daemon=True).start()
        conn = listener.accept()
        connected.set()
    _Server(conn, model, device).serve()
    conn.close()
    return 0


# --------------------------------------------------------------------------------------------- client side

class WorkerRun:
    """One request to the worker, polled by its caller (never blocking): progress, cancel, result or error."""

    def __init__(self, client: InferenceClient, job_id: int, op: str):
        self._client, self.id, self.op = client, job_id, op
        self.done_steps, self.total_steps = 0, 1
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._finished = False
        self.started_at = time.perf_counter()
        self.seconds: Optional[float] = None

    def _finish(self, result=None, error=None):
        if not self._finished:
            self.result, self.error, self._finished = result, error, True
            self.seconds = time.perf_counter() - self.started_at

    def poll(self) -> bool:
        """Exchange what is waiting with the worker (never blocks); True once this run has finished."""
        if not self._finished:
            self._client.pump()
        return self._finished

    @property
    def finished(self) -> bool:
        return self.poll()

    @property
    def fraction(self) -> float:
        return min(1.0, self.done_steps / max(1, self.total_steps))

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, RunCancelled)

    def cancel(self):
        if not self._finished:
            self._client.cancel(self.id)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until finished (the console and the CLI; never the Slicer GUI)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._client.wait_for_message(0.05 if remaining is None else min(0.05, remaining))
        return True


_clients: weakref.WeakSet = weakref.WeakSet()


class InferenceClient:
    """Starts and talks to one worker process for one (model, device). Not thread-safe: use it from one thread
    (Slicer's main thread, the web server's loop, a console)."""

    def __init__(self, model: str = "lidc-nodule", device: str = "auto", python: Optional[str] = None,
                 start_timeout_s: float = 60.0):
        self.model, self.device = str(model), str(device)
        self.python = python or sys.executable
        self.start_timeout_s = start_timeout_s
        self._ids = itertools.count(1)
        self._process: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None
        self._folder: Optional[ArrayFolder] = None
        self._address = self._authkey = None
        self._started_at = 0.0
        self._outbox: list = []
        self._runs: Dict[int, WorkerRun] = {}
        self._volume_key = None  # the volume the worker holds
        self._load_run: Optional[WorkerRun] = None
        self._log = None
        self.info: Dict[str, Any] = {}  # what the worker said when its model was loaded
        _clients.add(self)

    @property
    def key(self) -> Tuple[str, str]:
        return self.model, self.device

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # --- process

    def start(self) -> WorkerRun:
        """Start the worker (if it is not running) and have it load the model; returns the load run."""
        if self.alive():
            loading = self._load_run
            if loading is not None and not (loading._finished and loading.error is not None):
                return loading  # loading, or loaded: the model and its warm-up are not done twice
            self._load_run = self._submit("load", {})  # an earlier load failed (e.g. torch was missing)
            return self._load_run
        self._reset()
        self._folder = ArrayFolder.create()
        family = "AF_PIPE" if sys.platform == "win32" else "AF_UNIX"
        self._address = (rf"\\.\pipe\arseg-{os.getpid()}-{secrets.token_hex(8)}" if family == "AF_PIPE"
                         else str(self._folder.path / "socket"))
        self._authkey = secrets.token_bytes(32)
        env = dict(os.environ)
        env[AUTHKEY_ENV] = self._authkey.hex()
        # ARSegLib's folder on the worker's path: in Slicer it is on sys.path only, not in PythonSlicer's default
        library_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library_root, env.get("PYTHONPATH", "")) if p)
        self._log = open(self._folder.path / LOG_NAME, "wb")
        kwargs = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}
        try:
            self._process = subprocess.Popen([self.python, "-m", "ARSegLib.worker", self._address, self.model,
                                              self.device], stdin=subprocess.DEVNULL, stdout=self._log,
                                             stderr=subprocess.STDOUT, env=env, **kwargs)
        except OSError as e:
            self._reset()
            raise WorkerError(f"could not start the ARSeg worker with {self.python}: {e}") from e
        self._started_at = time.monotonic()
        self._load_run = self._submit("load", {})
        return self._load_run

    def _reset(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
        if self._log is not None:
            self._log.close()
        if self._folder is not None:
            self._folder.remove()
        self._process = self._conn = self._folder = self._log = self._load_run = None
        self._outbox, self._volume_key = [], None

    def log_tail(self, n_chars: int = 2000) -> str:
        if self._folder is None:
            return ""
        try:
            return (self._folder.path / LOG_NAME).read_bytes()[-n_chars:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def shutdown(self, timeout_s: float = 3.0):
        """Stop the worker (it finishes nothing more) and remove its folder. Safe to call twice."""
        process = self._process
        if process is not None and process.poll() is None:
            if self._conn is not None:
                try:
                    self._conn.send(("quit",))
                except OSError:
                    pass
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout_s)
        self._fail_all(WorkerError("the ARSeg worker was stopped"))
        self._reset()

    # --- requests

    def holds(self, volume_key) -> bool:
        """Whether the running worker keeps the voxels of this key: then segment() needs none (volume=None)."""
        return volume_key is not None and volume_key == self._volume_key and self.alive()

    def segment(self, volume: Optional[np.ndarray], ijk_to_ras, point_ras=None, settings=None,
                volume_key=None) -> WorkerRun:
        """A click at point_ras (RAS mm) or, with point_ras None, the whole volume. volume_key: anything that
        identifies these voxels (Slicer: the node's ID and modified time): a key the worker already holds sends
        no voxels, and volume may then be None (see holds())."""
        from .pipeline import SegmentSettings

        if not self.alive():
            self.start()
        if volume is None and not self.holds(volume_key):
            raise WorkerError("no voxels given, and the worker does not hold this volume")
        args = {"volume": None, "volume_key": volume_key, "ijk_to_ras": np.asarray(ijk_to_ras, dtype=np.float64),
                "point_ras": None if point_ras is None else tuple(float(v) for v in point_ras),
                "settings": settings or SegmentSettings(), "folder": str(self._folder.path),
                "spill": str(self._folder.spill)}
        if volume_key is None or volume_key != self._volume_key:
            args["volume"] = self._folder.put(np.asarray(volume), "volume")
            args["volume_key"] = volume_key if volume_key is not None else secrets.token_hex(8)
            self._volume_key = args["volume_key"]
        return self._submit("segment", args)

    def _submit(self, op: str, args: dict) -> WorkerRun:
        run = WorkerRun(self, next(self._ids), op)
        self._runs[run.id] = run
        self._outbox.append((op, run.id, args))
        self.pump()
        return run

    def cancel(self, job_id: int):
        self._outbox.append(("cancel", job_id))
        self.pump()

    # --- the exchange (non-blocking)

    def pump(self):
        """Connect if not yet connected, send what waits, dispatch what arrived. Never blocks for long."""
        if self._process is None:
            return
        if self._conn is None and not self._try_connect():
            return
        try:
            while self._outbox:
                self._conn.send(self._outbox[0])
                self._outbox.pop(0)
            while self._conn.poll(0):
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._crashed()
            return
        if self._process.poll() is not None:
            self._crashed()

    def _try_connect(self) -> bool:
        if self._process.poll() is not None:
            self._crashed()
            return False
        ready = os.path.exists(self._address) if not self._address.startswith("\\\\") else True
        if ready:
            try:
                self._conn = Client(self._address, authkey=self._authkey)
                return True
            except (FileNotFoundError, ConnectionRefusedError):
                pass  # not listening yet
            except OSError as e:
                self._process.kill()
                self._crashed(f"could not connect to the ARSeg worker: {e}")
                return False
        if time.monotonic() - self._started_at > self.start_timeout_s:
            self._process.kill()
            self._crashed(f"the ARSeg worker did not start within {self.start_timeout_s:.0f} s")
        return False

    def wait_for_message(self, timeout: float):
        """Sleep until the worker has something to say (or timeout): for blocking callers only."""
        if self._conn is not None:
            try:
                self._conn.poll(timeout)
                return
            except (EOFError, OSError):
                pass
        time.sleep(timeout)

    def _dispatch(self, message):
        kind, job_id = message[0], message[1]
        run = self._runs.get(job_id)
        if run is None:
            return
        if kind == "progress":
            run.done_steps, run.total_steps = message[2], max(1, message[3])
            return
        del self._runs[job_id]
        if kind == "done":
            try:
                payload = internalize(message[2])
            except OSError as e:
                run._finish(error=WorkerError(f"the worker's result could not be read: {e}"))
                return
            if run.op == "load":
                self.info = payload
            run._finish(result=payload)
        else:
            error = message[2]
            if run.op == "segment" and not isinstance(error, RunCancelled):
                self._volume_key = None  # the worker may have failed before it kept the volume
            run._finish(error=error)

    def _crashed(self, why: Optional[str] = None):
        code = None
        if self._process is not None:
            try:  # a closed connection comes a moment before the process can be reaped
                code = self._process.wait(2.0)
            except subprocess.TimeoutExpired:
                self._process.kill()
                code = self._process.wait()
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                import signal

                how += f", killed by {signal.Signals(-code).name}"
            except ValueError:
                pass
        tail = self.log_tail()
        message = why or (f"the ARSeg inference process stopped unexpectedly ({how}); "
                          f"the next run starts it again")
        if tail:
            message += f"\n--- its last output ---\n{tail}"
        self._fail_all(WorkerCrashed(message))
        self._reset()

    def _fail_all(self, error: BaseException):
        runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            run._finish(error=error)


@atexit.register
def _shutdown_all():
    for client in list(_clients):
        client.shutdown(timeout_s=1.0)


_shared: Optional[InferenceClient] = None


def shared_client(model: str, device: str, python: Optional[str] = None) -> InferenceClient:
    """The process-wide client (the Slicer module and the console share one worker); a different model or device
    stops the old worker and starts one for the new choice."""
    global _shared
    if _shared is not None and (_shared.key != (str(model), str(device)) or (python and _shared.python != python)):
        _shared.shutdown()
        _shared = None
    if _shared is None:
        _shared = InferenceClient(model, device, python=python)
    return _shared


def shutdown_shared():
    """Stop the shared worker (the module's cleanup: Slicer quitting, the module reloaded)."""
    global _shared
    if _shared is not None:
        _shared.shutdown()
        _shared = None


if __name__ == "__main__":
    # run the importable module's code, not this __main__ copy: classes that cross the connection (ArrayFile,
    # RunCancelled) must be ARSegLib.worker's on both sides
    from ARSegLib.worker import serve_main as _serve_main

    sys.exit(_serve_main())
