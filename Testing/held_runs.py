"""A stand-in worker client whose runs finish when the test says so: front ends (the page's ReviewSession, the
module's outline) are driven through their real polling with the worker's run interface, no model run."""

from __future__ import annotations


class HeldRun:
    """A run in flight (the worker's run interface): result, error, cancel or first outline when the test sets them."""

    def __init__(self):
        self.fraction, self.result, self.error, self.finished, self.cancelled = 0.0, None, None, False, False
        self.outline, self.outline_seconds, self.taken = None, None, False
        self.args = None

    def poll(self):
        return self.finished

    def take_outline(self):
        if self.outline is None or self.taken or self.finished:
            return None
        self.taken = True
        return self.outline

    def cancel(self):
        from ARSegLib.engine import Cancelled

        self.error, self.cancelled, self.finished = Cancelled(), True, True

    def wait(self, timeout=None):
        return self.finished


class HeldClient:
    """Starts a HeldRun per request and keeps them (runs[-1].args: what the request carried)."""

    def __init__(self):
        self.runs = []

    def holds(self, volume_key):
        return False

    def segment(self, volume, ijk_to_ras, click=None, settings=None, volume_key=None, refinement=None,
                previous=None):
        self.runs.append(HeldRun())
        self.runs[-1].args = (volume, ijk_to_ras, click, settings, volume_key)
        return self.runs[-1]
