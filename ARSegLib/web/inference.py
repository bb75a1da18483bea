"""Where the page's clicks are computed: the persistent inference worker when ARSegLib.worker is there, else a
stand-in with the same interface that runs pipeline.segment_click on ARSeg's inference thread in this process.

Either way the server's event loop only starts a run and polls it; the model never runs on the loop's thread.

The interface (ARSegLib.worker's InferenceClient):
    client.start(); run = client.segment(volume_kji, ijk_to_ras, point_ras=(R, A, S) or None, settings=...,
    volume_key=...); run.poll() -> finished; run.fraction; run.result; run.error; run.cancel(); run.wait(t);
    client.shutdown()
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from .. import pipeline


class LocalRun:
    """One run on the in-process inference thread, seen through the worker's run interface."""

    def __init__(self, background: pipeline.BackgroundRun):
        self._background = background

    def poll(self) -> bool:
        return self._background.finished

    @property
    def fraction(self) -> float:
        return self._background.fraction

    @property
    def result(self):
        return self._background.result

    @property
    def error(self) -> Optional[BaseException]:
        return self._background.error

    @property
    def cancelled(self) -> bool:
        return self._background.cancelled

    def cancel(self) -> None:
        self._background.cancel()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._background.wait(timeout)


class LocalInferenceClient:
    """The worker client's interface over pipeline.BackgroundRun: the model is loaded once, on the inference
    thread (torch's import and the weights, about 2 s, stay off the event loop), and kept."""

    def __init__(self, model: str = "lidc-nodule", device: str = "auto"):
        self.model_name = model
        self.device = device
        self._lock = threading.Lock()
        self._loaded: Optional[tuple] = None
        self._preload: Optional[pipeline.BackgroundRun] = None

    def _predictor(self):
        with self._lock:
            if self._loaded is None:
                from ..models import load_model
                from ..training.distributed import resolve_device

                self._loaded = load_model(self.model_name, resolve_device(self.device))
            return self._loaded

    def start(self) -> LocalInferenceClient:
        """Load the model in the background now, so that the first click does not wait for it."""
        if self._preload is None:
            self._preload = pipeline.BackgroundRun(lambda _progress, _cancel: self._predictor()).start()
        return self

    def segment(self, volume, ijk_to_ras, point_ras=None, settings: Optional[pipeline.SegmentSettings] = None,
                volume_key: Any = None) -> LocalRun:
        def job(progress, cancel):
            predictor, card = self._predictor()
            if point_ras is None:
                return pipeline.segment_volume(volume, ijk_to_ras, predictor, card, settings, progress=progress,
                                               cancel=cancel)
            return pipeline.segment_click(volume, ijk_to_ras, point_ras, predictor, card, settings,
                                          progress=progress, cancel=cancel)

        return LocalRun(pipeline.BackgroundRun(job).start())

    def shutdown(self) -> None:
        self._loaded = None


def is_cancelled(run) -> bool:
    """Whether a finished run ended because it was cancelled (the worker and the stand-in both say so)."""
    cancelled = getattr(run, "cancelled", None)
    if cancelled is not None:
        return bool(cancelled)
    error = getattr(run, "error", None)
    return error is not None and type(error).__name__ == "Cancelled"


def make_client(model: str = "lidc-nodule", device: str = "auto"):
    """The persistent worker's client when ARSegLib.worker exists, else the in-process stand-in."""
    try:
        from ..worker import InferenceClient
    except ImportError:
        return LocalInferenceClient(model=model, device=device)
    return InferenceClient(model=model, device=device)
