"""What a caller sees of a run, wherever it runs (this process's thread, or the worker process): its progress, its
result or error, a click's first outline, and whether it was cancelled. Imports nothing heavy: Slicer's process
holds these, and RunCancelled crosses from the worker by pickle."""

from __future__ import annotations

import time
from typing import Any, Optional


class RunCancelled(Exception):
    """The run was cancelled. (The engine's own Cancelled would import torch where it is unpickled: in Slicer's
    process, which never imports torch.)"""


class RunState:
    """The observable part of a run, shared by runs.LocalRun and worker.WorkerRun. A subclass says when it has
    finished (`_has_finished`) and how it is polled, cancelled and waited for."""

    def __init__(self):
        self.done_steps, self.total_steps = 0, 1
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.outline: Any = None  # a click's first outline (pipeline.Outline) once it has come
        self.outline_seconds: Optional[float] = None  # from the request until the outline came
        self._outline_taken = False
        self.started_at = time.perf_counter()
        self.seconds: Optional[float] = None

    def _has_finished(self) -> bool:
        raise NotImplementedError

    def poll(self) -> bool:
        return self._has_finished()

    def take_outline(self):
        """The first outline, once, when it has come and the run is still going (None otherwise): a front end
        shows it until the result replaces it (a finished run's result is all there is to show)."""
        if self.outline is None or self._outline_taken or self._has_finished():
            return None
        self._outline_taken = True
        return self.outline

    @property
    def finished(self) -> bool:
        return self.poll()

    @property
    def fraction(self) -> float:
        return min(1.0, self.done_steps / max(1, self.total_steps))

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, RunCancelled)
