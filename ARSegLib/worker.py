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
                       ("segment", id, {volume, key, ...})   a click (a prompts.Prompt as a dict) or the whole
                                                             volume; a refinement (a prompts.Refinement as a dict)
                                                             with the nodule's previous VolumeResult; several
                                                             inputs (input_names): volume is their stack
                       ("cancel", id)                        stop that run at its next step
                       ("quit",)
    worker -> client   ("progress", id, done, total)
                       ("outline", id, payload)              a click's first outline (pipeline.Outline), before "done"
                       ("done", id, payload)                 the card's name, or a pipeline.VolumeResult
                       ("error", id, pickled, summary, tb)   the exception pickled where its classes import
                                                             without torch (else None), "module.Class: message"

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
import io
import itertools
import os
import pickle
import re
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
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .models import DEFAULT_MODEL
from .run_state import RunCancelled, RunState

AUTHKEY_ENV = "ARSEG_WORKER_AUTHKEY"
FOLDERS_ENV = "ARSEG_WORKER_FOLDERS"  # the client's folders for this worker, which it removes when the client dies
FOLDER_PREFIX = "arseg-worker-"
LIBRARY_ROOT = Path(__file__).resolve().parent.parent  # the folder holding this copy of ARSegLib
LOG_NAME = "worker.log"
INLINE_BYTES = 1 << 16  # arrays smaller than this travel inside the message
# a worker nobody connects to within this gives up (its parent is gone); tests shorten it through the environment
CONNECT_TIMEOUT_S = float(os.environ.get("ARSEG_WORKER_CONNECT_TIMEOUT_S", "120"))


class WorkerError(RuntimeError):
    """The worker could not be started or reached, or an error from it could not be passed on as it was."""


class WorkerCrashed(WorkerError):
    """The worker process ended while a run was in flight; the next run starts a new one."""


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

    REMOVE_TRIES = 5  # removing the folders at shutdown: Windows' antivirus or indexer may hold a file a moment

    @classmethod
    def create(cls) -> ArrayFolder:
        """New folders, named after this process (arseg-worker-PID-..., arseg-worker-spill-PID-...), after removing
        those that processes now dead left behind."""
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        remove_stale_folders([p for p in (shm, tempfile.gettempdir()) if p])
        pid = os.getpid()
        path = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{pid}-", dir=shm))
        return cls(path, Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}spill-{pid}-")) if shm else path)

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
        # written under its final name: the reader learns of the file only from the message sent once it is
        # complete (no rename, which Windows refuses while an antivirus or indexer holds the file)
        path = folder / f"{os.getpid()}-{next(self._names)}-{tag}.raw"
        try:
            array.tofile(path)  # one copy, straight into the page cache
        except OSError:
            _unlink_quietly(path)
            raise
        return ArrayFile(str(path), array.dtype.str, tuple(int(s) for s in array.shape))

    @staticmethod
    def take(ref: ArrayFile) -> np.ndarray:
        """The array, in memory of its own; the file is removed afterwards (or, where something holds it, with
        the folder at shutdown)."""
        try:
            return np.fromfile(ref.path, dtype=np.dtype(ref.dtype)).reshape(ref.shape)
        finally:
            _unlink_quietly(ref.path)

    def remove(self):
        for attempt in range(self.REMOVE_TRIES):
            for folder in {self.path, self.spill}:
                shutil.rmtree(folder, ignore_errors=True)
            if not (self.path.exists() or self.spill.exists()):
                return
            time.sleep(0.05 * 2 ** attempt)  # 1.5 s in all, only where a file is held


def _unlink_quietly(path):
    """Remove a file that may be gone already or held by another program (Windows: an antivirus, an indexer);
    what stays is removed with its folder."""
    try:
        os.unlink(path)
    except OSError:
        pass


_FOLDER_NAME = re.compile(re.escape(FOLDER_PREFIX) + r"(?:spill-)?(\d+)-[a-z0-9_]+")


def remove_stale_folders(places) -> List[Path]:
    """Remove the array folders (arseg-worker-PID-...) in places whose owning process PID is dead, that this user
    owns: a client killed outright leaves its folders behind (its worker removes them when it notices, unless it
    died too). A live process's folder is never touched. Returns what was removed."""
    removed = []
    for place in places:
        try:
            entries = list(os.scandir(place))
        except OSError:
            continue
        for entry in entries:
            match = _FOLDER_NAME.fullmatch(entry.name)
            try:
                if not match or not entry.is_dir(follow_symlinks=False):
                    continue
                pid = int(match.group(1))
                if pid == os.getpid() or pid_alive(pid):
                    continue
                if hasattr(os, "getuid") and entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
            except OSError:
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


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


# Where the client may unpickle an error's classes from: modules that import without torch (Slicer's process never
# imports torch, and may not even be able to) and that every client has. Testing/test_worker.py imports each in a
# fresh process and checks that torch stays out.
CLIENT_SAFE_MODULES = frozenset({"ARSegLib.worker", "ARSegLib.pipeline", "ARSegLib.models", "ARSegLib.demo",
                                 "ARSegLib.prompts", "ARSegLib.run_state"})
CLIENT_SAFE_PACKAGES = ("numpy",)  # the client imports numpy itself


def _stdlib_module(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.builtin_module_names:
        return True
    names = getattr(sys, "stdlib_module_names", None)  # Python 3.10+
    if names is not None:
        return top in names
    import sysconfig  # Python 3.9: where the (already imported) module's file lies

    path = getattr(sys.modules.get(top), "__file__", None)
    if not path:
        return False
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    path = os.path.realpath(path)
    return path.startswith(stdlib + os.sep) and "site-packages" not in Path(path).parts


def client_safe_module(module: str) -> bool:
    """Whether the client can import this module without torch (and surely has it)."""
    if module.split(".")[0] == "torch":
        return False
    return (module in CLIENT_SAFE_MODULES or _stdlib_module(module)
            or any(module == p or module.startswith(p + ".") for p in CLIENT_SAFE_PACKAGES))


class _ModulesOf(pickle.Unpickler):
    """Unpickles (here, where every module is loaded already) to record which modules the pickle refers to."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.modules = set()

    def find_class(self, module, name):
        self.modules.add(module)
        return super().find_class(module, name)


def error_summary(e: BaseException) -> str:
    """"module.Class: message" (builtins' classes by their name alone)."""
    cls = type(e)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    return f"{name}: {e}"


def portable_error(e: BaseException) -> Tuple[Optional[bytes], str, str]:
    """What the worker sends for an exception: (the pickled exception, or None where unpickling it would import
    torch or anything else the client may lack; its "module.Class: message"; its traceback). The engine's
    Cancelled becomes RunCancelled. A torch error (CUDA out of memory, torch.AcceleratorError) thus reaches the
    client as a WorkerError naming it, and Slicer's process never imports torch to show it."""
    from .engine import Cancelled

    if isinstance(e, Cancelled):
        e = RunCancelled("cancelled")
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = pickle.dumps(e)
        recorder = _ModulesOf(blob)
        recorder.load()
        if not all(client_safe_module(m) for m in recorder.modules):
            blob = None
    except Exception:  # it does not survive pickling
        blob = None
    return blob, error_summary(e), text


def error_from_worker(blob: Optional[bytes], summary: str, text: str = "") -> BaseException:
    """The client's side of portable_error: the exception itself, or a WorkerError with its summary (and its
    traceback as .details) where it cannot be unpickled here."""
    if blob is not None:
        try:
            return pickle.loads(blob)
        except Exception:  # e.g. a module the client does not have
            pass
    error = WorkerError(summary)
    error.details = text
    return error


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
        self.device_note: Optional[str] = None
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
            _client_gone()
        except BaseException:  # a message this worker cannot read: say why in the log, which the client shows
            traceback.print_exc()
            _last_words("exit code 3 (a message it could not read)")
            os._exit(3)

    def flag(self, job_id: int) -> threading.Event:
        with self.flags_lock:
            return self.cancel_flags.setdefault(job_id, threading.Event())

    def send(self, *message):
        try:
            self.conn.send(message)
        except (EOFError, OSError):
            _client_gone()

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
                blob, summary, text = portable_error(e)
                if blob is None:  # its traceback stays in the log, which a crash report shows
                    sys.stderr.write(text)
                    sys.stderr.flush()
                self.send("error", job_id, blob, summary, text)
            finally:
                with self.flags_lock:
                    self.cancel_flags.pop(job_id, None)

    def loaded(self):
        if self.model is None:
            from .models import load_model
            from .training.distributed import resolve_device_noting

            device, self.device_note = resolve_device_noting(self.device)
            if self.device_note:
                print(f"ARSeg: {self.device_note}", file=sys.stderr, flush=True)
            self.model = load_model(self.model_name, device)
        return self.model

    def op_load(self, job_id, args, cancelled):
        import torch

        predictor, card = self.loaded()
        warm_s = self.warm_up(predictor) if os.environ.get("ARSEG_WORKER_WARMUP", "1") != "0" else 0.0
        # (a click that arrives meanwhile stops the warm-up at its next scale: the click comes first)
        return {"model": card.name, "pid": os.getpid(), "torch": str(torch.__version__),  # a str, not TorchVersion
                "threads": torch.get_num_threads(), "warm_up_s": warm_s, "device": str(predictor.device),
                "device_note": self.device_note}  # why "auto" did not take the GPU, for the user to see

    def warm_up(self, predictor) -> float:
        """One click-sized run on synthetic crops (a bright disc in dark lung), while the user is still finding
        the nodule: the first real click then finds the weights packed for oneDNN, its kernels created and the
        heap grown to size (in a fresh worker it took 1.0 s against 0.65 s for later clicks, `arseg bench`)."""
        t0 = time.perf_counter()
        # the click's own imports first (the run service, the pipeline and scipy.ndimage: 0.9 s on a 2-core EPYC),
        # which the first click would otherwise pay
        from . import runs  # noqa: F401

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
        from .prompts import Prompt, Refinement
        from .runs import compute

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

        click = None if args["click"] is None else Prompt.from_dict(args["click"])
        refinement = None if args.get("refinement") is None else Refinement.from_dict(args["refinement"])
        previous = None if args.get("previous") is None else internalize(args["previous"])

        def on_outline(outline):  # small (one plane): it travels inside the message
            self.send("outline", job_id, outline)

        result = compute(self.volume, args["ijk_to_ras"], click, args["settings"], predictor, card, refinement,
                         previous, progress, cancelled.is_set,
                         on_outline=on_outline if args.get("outline", True) else None,
                         input_names=tuple(args.get("input_names") or ()))
        return externalize(result, ArrayFolder(Path(args["folder"]), Path(args["spill"])))


LAST_WORDS = "ARSeg worker: "  # how the worker's own account of its end starts, in its log


def _last_words(what: str):
    """Say in the log how this process ends: through a launcher (PythonSlicer), the client cannot see it."""
    try:
        sys.stderr.write(f"\n{LAST_WORDS}{what}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _client_gone():
    """The client is gone (its connection closed, its process died, or it never connected): remove the folders it
    made for this worker, which a client killed outright (SIGKILL) could not, and end."""
    for folder in os.environ.get(FOLDERS_ENV, "").split(os.pathsep):
        if folder and Path(folder).name.startswith(FOLDER_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def _report_signal(signum, frame):
    """SIGTERM or SIGHUP: say so in the log, then end as that signal would have."""
    import signal

    _last_words(f"killed by {signal.Signals(signum).name}")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _exit_when_orphaned(parent_pid: int, connected: threading.Event):
    """A dead parent shows as a new parent pid (POSIX); one that never connects, as time running out. (Once
    connected, a closed connection also ends the worker: see _Server.read_messages.)"""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        time.sleep(0.5)
        if hasattr(os, "getppid") and os.getppid() != parent_pid:
            _client_gone()
        if not connected.is_set() and time.monotonic() > deadline:
            _client_gone()


def serve_main(argv=None) -> int:
    """`python -m ARSegLib.worker ADDRESS MODEL DEVICE`, the authentication key in $ARSEG_WORKER_AUTHKEY."""
    import signal

    argv = sys.argv[1:] if argv is None else argv
    address, model, device = argv[:3]
    # Ctrl+C in the terminal that started Slicer (or `arseg view`) reaches the whole process group: the client
    # decides when the worker ends (its connection closes), so a half-finished run is never interrupted here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # this process is ours: its handlers say in the log how it ended (a crash in native code, SIGTERM, SIGHUP),
    # which the client reads when a launcher stands between them
    import faulthandler

    faulthandler.enable()
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and sys.platform != "win32":
            signal.signal(getattr(signal, name), _report_signal)
    authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    family = "AF_PIPE" if sys.platform == "win32" else "AF_UNIX"
    connected = threading.Event()
    with Listener(address, family=family, authkey=authkey) as listener:
        threading.Thread(target=_exit_when_orphaned, args=(os.getppid(), connected), daemon=True).start()
        conn = listener.accept()
        connected.set()
    server = _Server(conn, model, device)
    # who is serving: the client holds the launcher's process (PythonSlicer), not this one, and checks that this
    # is its own copy of ARSegLib
    server.send("started", 0, {"pid": os.getpid(), "library": str(LIBRARY_ROOT)})
    try:
        server.serve()
    except BaseException:
        traceback.print_exc()
        _last_words("exit code 1 (an error outside any run)")
        raise
    conn.close()
    return 0


# --------------------------------------------------------------------------------------------- client side

def pid_alive(pid: int) -> bool:
    """Whether a process runs under this pid (a zombie counts as gone). On Windows without os.kill, which would
    terminate it."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class WorkerRun(RunState):
    """One request to the worker, polled by its caller (never blocking): progress, cancel, result or error."""

    def __init__(self, client: InferenceClient, job_id: int, op: str):
        super().__init__()
        self._client, self.id, self.op = client, job_id, op
        self._finished = False

    def _has_finished(self) -> bool:
        return self._finished

    def _finish(self, result=None, error=None):
        if not self._finished:
            self.result, self.error, self._finished = result, error, True
            self.seconds = time.perf_counter() - self.started_at

    def poll(self) -> bool:
        """Exchange what is waiting with the worker (never blocks); True once this run has finished."""
        if not self._finished:
            self._client.pump()
        return self._finished

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

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", python: Optional[str] = None,
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
        self.worker_pid: Optional[int] = None  # the worker's own pid, which it reports (pid may be a launcher's)
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
        _clean_up_on_termination()
        self._folder = ArrayFolder.create()
        family = "AF_PIPE" if sys.platform == "win32" else "AF_UNIX"
        self._address = (rf"\\.\pipe\arseg-{os.getpid()}-{secrets.token_hex(8)}" if family == "AF_PIPE"
                         else str(self._folder.path / "socket"))
        self._authkey = secrets.token_bytes(32)
        env = dict(os.environ)
        env[AUTHKEY_ENV] = self._authkey.hex()
        env[FOLDERS_ENV] = os.pathsep.join(str(p) for p in {self._folder.path, self._folder.spill})
        # This copy of ARSegLib, not another: `python -m` puts the working directory first on sys.path, so the
        # worker starts in the folder that holds this ARSegLib. (PYTHONPATH alone is not enough: Slicer's
        # launcher puts its own entries, every installed extension's qt-scripted-modules, before ours.)
        library_root = str(LIBRARY_ROOT)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (library_root, env.get("PYTHONPATH", "")) if p)
        env.pop("PYTHONSAFEPATH", None)  # it would leave the working directory off sys.path
        # a model given as a path relative to this process's working directory, seen from the worker's
        model = os.path.abspath(self.model) if os.path.exists(self.model) else self.model
        self._log = open(self._folder.path / LOG_NAME, "wb")
        kwargs = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}
        try:
            self._process = subprocess.Popen([self.python, "-m", "ARSegLib.worker", self._address, model,
                                              self.device], stdin=subprocess.DEVNULL, stdout=self._log,
                                             stderr=subprocess.STDOUT, env=env, cwd=library_root, **kwargs)
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
        self._process = self._conn = self._folder = self._log = self._load_run = self.worker_pid = None
        self._outbox, self._volume_key = [], None

    def _abandon(self):
        """This process is being terminated: stop the worker and remove the folders, waiting for nothing."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self._reset()

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

    def segment(self, volume: Optional[np.ndarray], ijk_to_ras, click=None, settings=None, volume_key=None,
                refinement=None, previous=None, outline: bool = True, input_names=()) -> WorkerRun:
        """A click (a prompts.Prompt, include((R, A, S))) or, with click None, the whole volume; with a refinement
        (a prompts.Refinement), that click's nodule refined from previous, its current VolumeResult. volume_key:
        anything that identifies these voxels (Slicer: the node's ID and modified time): a key the worker already
        holds sends no voxels, and volume may then be None (see holds()). Checking is the caller's (runs.py).
        outline: a plain click sends its first outline (run.take_outline()) before the result. input_names: volume
        is the stack (C, k, j, i) of a task's several inputs, in this order (runs.RunRequest.input_names)."""
        from .pipeline import SegmentSettings
        from .prompts import Prompt, Refinement

        if click is not None and not isinstance(click, Prompt):
            raise TypeError(f"click must be a prompts.Prompt (prompts.include((R, A, S))), got {click!r}")
        if refinement is not None and (not isinstance(refinement, Refinement) or previous is None):
            raise TypeError("a refinement is a prompts.Refinement and comes with the nodule's previous result")
        if not self.alive():
            self.start()
        if volume is None and not self.holds(volume_key):
            raise WorkerError("no voxels given, and the worker does not hold this volume")
        # prompts travel as plain dicts, unrounded (a click rounded to 1 um would cut a different grid)
        args = {"volume": None, "volume_key": volume_key, "ijk_to_ras": np.asarray(ijk_to_ras, dtype=np.float64),
                "click": None if click is None else click.to_dict(digits=None),
                "refinement": None if refinement is None else refinement.to_dict(digits=None),
                "previous": None if refinement is None else externalize(previous, self._folder),
                "settings": settings or SegmentSettings(), "folder": str(self._folder.path),
                "spill": str(self._folder.spill), "outline": bool(outline),
                "input_names": tuple(str(n) for n in input_names)}
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
            while self._conn is not None and self._conn.poll(0):  # (a dispatch may end the worker)
                self._dispatch(self._conn.recv())
        except (EOFError, OSError):
            self._crashed()
            return
        except Exception as e:  # a message this side cannot unpickle: its run is lost, so no run may wait forever
            self._process.kill()
            self._crashed(f"a message from the ARSeg worker could not be read here ({error_summary(e)}); "
                          f"the next run starts it again")
            return
        if self._process is not None and self._process.poll() is not None:
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
        if kind == "started":
            self.worker_pid = int(message[2]["pid"])
            if Path(message[2]["library"]) != LIBRARY_ROOT:
                self._process.kill()
                self._crashed(f"the ARSeg worker imported another copy of ARSegLib ({message[2]['library']}) than "
                              f"this one ({LIBRARY_ROOT}): remove the other copy from {self.python}'s path")
            return
        run = self._runs.get(job_id)
        if run is None:
            return
        if kind == "progress":
            run.done_steps, run.total_steps = message[2], max(1, message[3])
            return
        if kind == "outline":
            run.outline, run.outline_seconds = message[2], time.perf_counter() - run.started_at
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
            error = error_from_worker(*message[2:])
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
        how = self._how_it_ended(code)
        tail = self.log_tail()
        message = why or (f"the ARSeg inference process stopped unexpectedly ({how}); "
                          f"the next run starts it again")
        if tail:
            message += f"\n--- its last output ---\n{tail}"
        self._fail_all(WorkerCrashed(message))
        self._reset()

    def _how_it_ended(self, code: Optional[int]) -> str:
        """The exit code of the process this client holds and, where that is a launcher (PythonSlicer, which
        says "exit code 1" whatever became of its child), what became of the worker process itself."""
        held = f"exit code {code}"
        if code is not None and code < 0:
            try:
                import signal

                held += f", killed by {signal.Signals(-code).name}"
            except ValueError:
                pass
        pid = self.worker_pid
        if pid is None or self._process is None or pid == self._process.pid:
            return held if pid is None else f"pid {pid}, {held}"
        if pid_alive(pid):  # the launcher ended first: the worker would end by itself within a second
            try:
                import signal

                os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            except OSError:
                pass
            return f"its launcher ended ({held}) while the worker process (pid {pid}) ran: it has been stopped"
        lines = self.log_tail(4000).splitlines()
        said = [line[len(LAST_WORDS):] for line in lines if line.startswith(LAST_WORDS)]
        fatal = [line for line in lines if line.startswith("Fatal Python error")]  # faulthandler's report
        if said:
            fate = said[-1]
        elif fatal:
            fate = f"crashed ({fatal[-1]})"
        else:  # the worker reports SIGTERM, SIGHUP and fatal errors itself: only SIGKILL leaves it no word
            fate = "killed by SIGKILL (by hand, or by the system when memory ran out)"
        return f"the worker process (pid {pid}) ended: {fate}; its launcher: {held}"

    def _fail_all(self, error: BaseException):
        runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            run._finish(error=error)


_TERMINATION_SIGNALS = ("SIGTERM", "SIGHUP")
_handled_signals: set = set()


def _terminated(signum, frame):
    """SIGTERM or SIGHUP in a process whose handler was the default: remove every client's folders and stop its
    worker (atexit does not run on a signal), then die of that signal as the default handler would."""
    import signal

    for client in list(_clients):
        try:
            client._abandon()
        except Exception:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _clean_up_on_termination():
    """Install _terminated for SIGTERM and SIGHUP where that changes nothing else: on POSIX, from the main thread,
    only where Python's handler is the default one (a handler of the application's own, a trame server's or an
    asyncio loop's, ends the process through Python, and atexit then shuts the workers down), and never in
    Slicer's application, whose process is not ours (its worker removes the folders when Slicer dies)."""
    import signal

    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        return
    if getattr(sys.modules.get("slicer"), "app", None) is not None:
        return
    for name in _TERMINATION_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None or signum in _handled_signals:
            continue
        try:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _terminated)
                _handled_signals.add(signum)
        except (ValueError, OSError):
            pass


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
