"""Where the page's clicks are computed: ARSeg's persistent inference worker process (ARSegLib.worker), the same
one the Slicer module uses. The server's event loop only starts a run and polls it; the model never runs on the
loop's thread, nor in the server's process.

The interface (ARSegLib.worker's InferenceClient), reached through the run service (ARSegLib.runs.WorkerBackend,
which review.py's session holds): client.start(); run = service.start(request); run.poll() -> finished;
run.fraction; run.result; run.error; run.cancel(); run.wait(t); client.shutdown()
"""

from __future__ import annotations

from ..models import DEFAULT_MODEL
from ..worker import InferenceClient


def is_cancelled(run) -> bool:
    """Whether a finished run ended because it was cancelled."""
    return bool(run.cancelled)


def make_client(model: str = DEFAULT_MODEL, device: str = "auto") -> InferenceClient:
    return InferenceClient(model=model, device=device)
