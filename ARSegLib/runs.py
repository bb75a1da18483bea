"""One run service: how every front end segments (the Slicer module and its console, `arseg segment/batch`, the
page, the bench). A typed request is checked once, on the caller's side, before any work; one of two backends runs
it behind one interface (in this process, or in ARSeg's worker process); its result goes into the scene through
mrml, and the notices come back to the caller.

    service = RunService(LocalBackend(predictor, card))       # CLI, tests, bench; WorkerBackend(client, card):
    request = service.request_for_node(volume_node, click=include((R, A, S)))   # Slicer, console, page
    run = service.start(request)          # VolumeError / PromptError here, before anything runs
    run.poll(); run.fraction; run.cancel(); run.wait(t); run.result; run.error; run.cancelled
    nodes = service.apply(volume_node, run.result)     # mrml.write_result; nodes.notices for the user

A refinement (request.refinement of request.nodule) is computed from that nodule's current result, which the
service keeps in memory per (volume, nodule) as results are applied; it crosses to the worker like any result.
`compute` is the one place where a request meets pipeline.segment_click / segment_volume (the worker calls it too).

No torch here, and no MRML at import: mrml (slicer) is imported by the functions that write nodes or files."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import pipeline
from .prompts import INCLUDE, Prompt, PromptError, Refinement
from .run_state import RunCancelled, RunState

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


# --------------------------------------------------------------------------------------------- the request

@dataclass(frozen=True)
class RunRequest:
    """One run: a click (an include point) or the whole volume, or a refinement of a nodule already segmented."""

    ijk_to_ras: np.ndarray  # 4 x 4
    volume: Optional[np.ndarray] = None  # (k, j, i) voxels; None: the backend holds volume_key's voxels
    volume_key: Any = None  # what identifies these voxels (the worker sends none for a key it holds)
    volume_shape: Optional[Tuple[int, int, int]] = None  # (k, j, i), needed only when volume is None
    click: Optional[Prompt] = None  # the click (INCLUDE); None: the whole volume
    nodule: Optional[str] = None  # the nodule this run redoes or refines; None: the click decides (mrml)
    refinement: Optional[Refinement] = None  # how it steers that nodule's samples (needs `nodule`)
    settings: pipeline.SegmentSettings = field(default_factory=pipeline.SegmentSettings)
    model: Optional[str] = None  # the model asked for (name or card path); None: the backend's
    replace_with_empty: bool = False  # a redo that finds nothing replaces the nodule anyway
    # several inputs (a card whose task names several): volume is their stack (C, k, j, i) on one grid, in the
    # task's order (RunService.request_for_inputs aligns them); the result is a volume_regions.RegionsResult
    input_names: Tuple[str, ...] = ()
    input_notes: Tuple[str, ...] = ()  # what aligning them did ("t1ce: resampled onto flair's grid ..."), for the user

    @property
    def mode(self) -> str:
        return pipeline.MODE_VOLUME if self.click is None else pipeline.MODE_CLICK

    @property
    def refines(self) -> bool:
        return self.refinement is not None and not self.refinement.empty

    @property
    def several_inputs(self) -> bool:
        return bool(self.input_names)

    @property
    def shape(self) -> Tuple[int, int, int]:
        if self.volume is None:
            return tuple(self.volume_shape or ())
        return tuple(np.shape(self.volume))[1:] if self.several_inputs else tuple(np.shape(self.volume))


@dataclass(frozen=True)
class NoduleSteps:
    """What to do for one nodule in a blocking call (the console, the CLI): its click, then each refinement."""

    click: Prompt
    refinements: Tuple[Refinement, ...] = ()


def card_scales(card) -> Optional[int]:
    """How many scales the card's model has (its config's token map sides), without loading it; None if unsaid."""
    data = getattr(card, "data", None) or {}
    scales = ((data.get("config") or {}).get("autoencoder") or {}).get("scales") if isinstance(data, dict) else None
    return len(scales) if scales else None


# --------------------------------------------------------------------------------------------- the model call

def compute(volume, ijk_to_ras, click: Optional[Prompt], settings, predictor, card,
            refinement: Optional[Refinement] = None, previous=None, progress: ProgressFn = None,
            cancel: CancelFn = None, on_outline=None, input_names: Sequence[str] = ()):
    """The request on the model: the whole volume, a click, or a click's refinement from its previous result.
    Both backends run this (the worker in its process), so a request means the same wherever it runs. on_outline
    receives a plain click's first outline (pipeline.first_outline) before its full sampling. input_names: volume
    is the stack (C, k, j, i) of the task's inputs on one grid, run whole (a volume_regions.RegionsResult)."""
    if input_names:
        from .volume_regions import segment_volume_regions

        if click is not None or refinement is not None:  # RunService.check refuses these; the worker says so too
            raise pipeline.UnsupportedModeError("several inputs are segmented whole-volume only")
        volumes = {name: (volume[c], ijk_to_ras) for c, name in enumerate(input_names)}
        return segment_volume_regions(volumes, predictor, card, settings, progress, cancel)
    if click is None:
        return pipeline.segment_volume(volume, ijk_to_ras, predictor, card, settings, progress, cancel)
    if refinement is not None and not refinement.empty:
        return pipeline.segment_click(volume, ijk_to_ras, click.point_ras, predictor, card, settings, progress,
                                      cancel, refinement=refinement, previous=previous)
    return pipeline.segment_click(volume, ijk_to_ras, click.point_ras, predictor, card, settings, progress, cancel,
                                  on_outline=on_outline)


# --------------------------------------------------------------------------------------------- backends

class LocalRun(RunState):
    """A run in this process, on a thread of its own, with the worker run's interface: poll() never blocks,
    progress in done_steps / total_steps, cancel() stops it at its next scale, wait(timeout) blocks."""

    def __init__(self, work: Callable[..., Any]):
        super().__init__()
        self._cancel, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._work, args=(work,), name="ARSeg run", daemon=True)
        self._thread.start()

    def _has_finished(self) -> bool:
        return self._done.is_set()

    def _progress(self, done, total):
        self.done_steps, self.total_steps = int(done), max(1, int(total))

    def _work(self, work):
        try:
            self.result = work(self._progress, self._cancel.is_set, self._on_outline)
        except BaseException as e:  # every failure goes to the caller, as the worker's do
            from .engine import Cancelled

            self.error = RunCancelled("cancelled") if isinstance(e, Cancelled) else e
        finally:
            self.seconds = time.perf_counter() - self.started_at
            self._done.set()

    def _on_outline(self, outline):
        self.outline, self.outline_seconds = outline, time.perf_counter() - self.started_at

    def cancel(self):
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)


class LocalBackend:
    """Runs requests in this process on a loaded model (the CLI, tests, the bench)."""

    def __init__(self, predictor, card, outline: bool = False):
        # outline: a click's first outline first (an interactive caller shows it; a blocking one has no use for it)
        self.predictor, self.card, self.outline = predictor, card, outline

    @property
    def model_name(self) -> str:
        return self.card.name

    def holds(self, volume_key) -> bool:
        return False  # every request brings its voxels

    def start(self, request: RunRequest, previous=None) -> LocalRun:
        refinement = request.refinement if request.refines else None
        return LocalRun(lambda progress, cancel, on_outline: compute(
            request.volume, request.ijk_to_ras, request.click, request.settings, self.predictor, self.card,
            refinement, previous, progress, cancel, on_outline=on_outline if self.outline else None,
            input_names=request.input_names))


class WorkerBackend:
    """Runs requests in ARSeg's worker process (worker.InferenceClient): the Slicer module, its console, the page.
    The card is read here without torch (models.read_card) to check requests; None is a card that says nothing
    (click mode only)."""

    def __init__(self, client, card=None):
        self.client, self.card = client, card

    @property
    def model_name(self) -> str:
        return getattr(self.card, "name", None) or str(getattr(self.client, "model", ""))

    def holds(self, volume_key) -> bool:
        return bool(self.client.holds(volume_key))

    def start(self, request: RunRequest, previous=None):
        refinement = request.refinement if request.refines else None
        several = {"input_names": request.input_names} if request.several_inputs else {}  # a one-input client's
        return self.client.segment(request.volume, request.ijk_to_ras, request.click, request.settings,
                                   volume_key=request.volume_key, refinement=refinement,
                                   previous=previous if refinement is not None else None, **several)


def finish(run, progress: ProgressFn = None, cancel: CancelFn = None):
    """Wait for a run (blocking callers: the console, the CLI): its result, or its error raised (RunCancelled when
    it was cancelled). progress(done, total) is called as it goes; cancel() returning True cancels it. An
    interrupt (Ctrl-C) cancels the run before it propagates."""
    try:
        while not run.wait(0.1):
            if progress is not None:
                progress(run.done_steps, run.total_steps)
            if cancel is not None and cancel():
                run.cancel()
    except BaseException:
        run.cancel()
        raise
    if progress is not None:
        progress(run.done_steps, run.total_steps)
    if run.cancelled:
        raise RunCancelled("cancelled") from run.error
    if run.error is not None:
        raise run.error
    return run.result


# --------------------------------------------------------------------------------------------- memory

@dataclass
class Remembered:
    """A nodule's current result and the settings that made it (a refinement runs with the same ones)."""

    result: pipeline.VolumeResult
    settings: pipeline.SegmentSettings


class NoduleMemory:
    """Each nodule's current result, per (volume key, nodule id): what a refinement starts from. Bounded: the
    oldest go first (a refinement of a forgotten nodule says so)."""

    MAX_NODULES = 32
    MAX_REPLACED = 20  # results a nodule's later ones replaced, kept for restore (mrml's undo steps are as many)

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._replaced: Dict[Any, List[Remembered]] = {}  # per key, oldest first

    def get(self, volume_key, nodule: Optional[str]) -> Optional[Remembered]:
        return self._entries.get((volume_key, nodule)) if nodule is not None else None

    def put(self, volume_key, nodule: str, result, settings) -> None:
        key = (volume_key, nodule)
        if key in self._entries:
            self._replaced.setdefault(key, []).append(self._entries[key])
            del self._replaced[key][:-self.MAX_REPLACED]
        self._entries[key] = Remembered(result, settings)
        self._entries.move_to_end(key)
        while len(self._entries) > self.MAX_NODULES:
            oldest, _ = self._entries.popitem(last=False)
            self._replaced.pop(oldest, None)

    def restore(self, volume_key, nodule: str) -> Optional[Remembered]:
        """The nodule's result before its current one becomes current again (an undo of its last run), or, when
        none is known, the nodule is forgotten; returns what is current now."""
        key = (volume_key, nodule)
        replaced = self._replaced.get(key)
        if not replaced:
            self.forget(volume_key, nodule)
            return None
        self._entries[key] = replaced.pop()
        return self._entries[key]

    def forget(self, volume_key=None, nodule: Optional[str] = None) -> None:
        """A nodule (deleted, undone), a volume's nodules (cleared), or everything."""
        for key in list(self._entries) + list(self._replaced):
            if (volume_key is None or key[0] == volume_key) and (nodule is None or key[1] == nodule):
                self._entries.pop(key, None)
                self._replaced.pop(key, None)


_shared_memory = NoduleMemory()


def shared_memory() -> NoduleMemory:
    """The process-wide memory: the Slicer module and its console share it, as they share one worker."""
    return _shared_memory


def volume_key_of(volume_node) -> Tuple[int, str, int]:
    """What identifies a volume node's voxels: its scene, its ID and its image's modified time (modified voxels
    are another volume, which the worker is sent again and whose nodules have no result to refine)."""
    image = volume_node.GetImageData()
    return (id(volume_node.GetScene()), volume_node.GetID(), image.GetMTime() if image is not None else 0)


def apply_result(volume_node, result, options=None, nodule: Optional[str] = None, replace_with_empty: bool = False,
                 memory: Optional[NoduleMemory] = None, volume_key=None, settings=None, card=None):
    """A finished run's result into the scene as a nodule of volume_node (mrml.write_result: a new one, or the
    nodule it redoes or refines), remembered for a later refinement. Returns mrml's ResultNodes (its notices:
    what the user should know, e.g. a nodule redone, or kept because the run found nothing). card: the model's,
    whose task names the masks' terminology and colour (mrml.OutputOptions.for_task); None: the lung card's."""
    from . import mrml

    if getattr(result, "parts", None) is not None:  # a volume_regions.RegionsResult (several inputs)
        return apply_region_result(volume_node, result)
    if card is not None:
        options = (options or mrml.OutputOptions()).for_task(card.task)
    nodes = mrml.write_result(volume_node.GetScene(), volume_node, result, options, nodule=nodule,
                              replace_with_empty=replace_with_empty)
    if memory is not None and nodes.result is result and nodes.nodule:  # written (not kept as it was)
        memory.put(volume_key if volume_key is not None else volume_key_of(volume_node), nodes.nodule, result,
                   settings if settings is not None else _settings_of(result))
    return nodes


def apply_region_result(volume_node, result, input_notes: Sequence[str] = ()):
    """A several-input run's RegionsResult into the scene as the segmentation of volume_node, its first input
    (mrml.write_region_results: a segment per region per lesion); the report's settings say how the inputs were
    aligned (input_notes: which were resampled). Returns mrml.RegionNodes (its notices: those notes)."""
    from . import mrml

    notes = list(input_notes) or list(result.settings.get("inputs_aligned", []))
    if notes:
        result.settings["inputs_aligned"] = notes
    report = result.report(volume_node.GetName())
    segmentation = mrml.write_region_results(volume_node.GetScene(), volume_node, result, report)
    return mrml.RegionNodes(segmentation, result, report, notices=notes)


def task_input_nodes(volume_nodes, task) -> Dict[str, Any]:
    """{name: node} keyed by the task's input names: a key may be the name or the title in any case ("FLAIR")."""
    from .volume_regions import InputsError

    if not hasattr(volume_nodes, "items"):
        raise InputsError(f"several inputs are given as {{name: volume node}} (the task's inputs: "
                          f"{', '.join(task.input_names)}), got {type(volume_nodes).__name__}")
    words = {}
    for entry in task.inputs:
        words[entry.name.lower()] = words[entry.title.lower()] = entry.name
    out: Dict[str, Any] = {}
    for key, node in volume_nodes.items():
        name = words.get(str(key).strip().lower(), str(key))
        if name in out:
            raise InputsError(f"input {name} is given twice")
        out[name] = node
    return out


def _settings_of(result) -> pipeline.SegmentSettings:
    """The user's settings of a result (its record holds them beside what the model card resolved)."""
    names = {f.name for f in dataclasses.fields(pipeline.SegmentSettings)}
    given = {k: v for k, v in (result.settings or {}).items() if k in names}
    for name in ("temperature", "top_k", "top_p", "views", "oversample", "presence_logit_shift"):
        given.pop(name, None)  # resolved from the card in the record: None keeps the card's (and its schedule)
    return pipeline.SegmentSettings(**given)


# --------------------------------------------------------------------------------------------- the service

class RunService:
    """Checks requests, starts them on its backend, applies their results; keeps each nodule's current result."""

    def __init__(self, backend, memory: Optional[NoduleMemory] = None):
        self.backend = backend
        self.memory = memory if memory is not None else NoduleMemory()

    @property
    def card(self):
        return self.backend.card

    # --- building and checking

    def request_for_node(self, volume_node, click: Optional[Prompt] = None, nodule: Optional[str] = None,
                         refinement: Optional[Refinement] = None, settings=None, volume_key=None,
                         copy: bool = False, **more) -> RunRequest:
        """A request on a volume node: its voxels read (a view unless copy; none when the backend holds them) and
        its world IJK->RAS."""
        from . import mrml

        key = volume_key if volume_key is not None else volume_key_of(volume_node)
        m = mrml.world_ijk_to_ras(volume_node)
        if self.backend.holds(key):  # checked when it was sent: a further click reads no voxels
            voxels, shape = None, mrml.volume_array_shape(volume_node)
        else:
            voxels = mrml.volume_array(volume_node, copy=copy)
            shape = voxels.shape
        return RunRequest(ijk_to_ras=m, volume=voxels, volume_key=key, volume_shape=tuple(shape), click=click,
                          nodule=nodule, refinement=refinement,
                          settings=settings if settings is not None else pipeline.SegmentSettings(), **more)

    def request_for_inputs(self, volume_nodes, click: Optional[Prompt] = None, settings=None,
                           resample: bool = True, **more) -> RunRequest:
        """A request on several volume nodes, {task input name: node} (a key may be the input's title, in any
        case): the names checked against the card's task and the volumes aligned onto the first input's grid
        (volume_regions.align_inputs: another grid is resampled, which request.input_notes say, or refused when
        it does not overlap), all before any work. A card that takes one volume refuses a dict."""
        from . import mrml
        from .volume_regions import InputsError, align_inputs, uses_regions_path

        card = self.card
        if card is None:
            raise pipeline.UnsupportedModelError("several inputs need a model card that names them")
        task = card.task
        if not uses_regions_path(card):
            raise InputsError(f"model {card.name!r} takes one volume ({task.inputs[0].title}), not several: give the "
                              f"volume node itself, not {{name: node}}")
        settings = settings if settings is not None else pipeline.SegmentSettings()
        # the cheap checks of check() first, so that a click or bad settings cost no resampling of the inputs
        settings.check()
        pipeline.check_mode(card, pipeline.MODE_VOLUME if click is None else pipeline.MODE_CLICK)
        nodes = task_input_nodes(volume_nodes, task)
        for name, node in nodes.items():
            if node is None or not hasattr(node, "GetImageData") or node.GetImageData() is None:
                raise InputsError(f"input {name}: {node!r} is not a volume node with an image")
        aligned = align_inputs({name: (mrml.volume_array(node, copy=False), mrml.world_ijk_to_ras(node))
                                for name, node in nodes.items()}, task, resample=resample)
        key = tuple(volume_key_of(nodes[name]) for name in aligned.names)
        return RunRequest(ijk_to_ras=aligned.ijk_to_ras, volume=aligned.stack, volume_key=key,
                          volume_shape=tuple(aligned.stack.shape[1:]), click=click, settings=settings,
                          input_names=aligned.names, input_notes=tuple(aligned.notices), **more)

    def previous(self, request: RunRequest) -> Optional[Remembered]:
        return self.memory.get(request.volume_key, request.nodule)

    def check(self, request: RunRequest, planned: Optional[Tuple[int, int]] = None) -> RunRequest:
        """Everything about the request that can be known before any work, or the error that says what is wrong:
        the model, the settings (SettingsError), the mode the card allows, the volume, the points inside it, and
        a refinement against the result it refines (PromptError). planned = (scales, samples) of a result still
        to be made in the same call (the CLI's --point followed by --exclude)."""
        card = self.backend.card
        if request.model is not None and card is not None and request.model not in (card.name, str(card.path)):
            raise pipeline.UnsupportedModelError(f"this run service serves model {card.name!r}, not "
                                                 f"{request.model!r}")
        request.settings.check()
        pipeline.check_mode(card, request.mode)
        if request.several_inputs or (card is not None and _takes_several_inputs(card)):
            self._check_inputs_request(request, card)
            return request
        if request.volume is not None:
            array, m = pipeline.check_volume(request.volume, request.ijk_to_ras)
            shape = array.shape
        elif self.backend.holds(request.volume_key):
            shape, m = request.shape, request.ijk_to_ras
        else:
            raise pipeline.VolumeError("no voxels given, and the worker does not hold this volume")
        if request.click is not None:
            if request.click.kind != INCLUDE:
                raise PromptError("a click is an include point; an exclude point refines a nodule (a refinement)")
            pipeline.check_point(request.click.point_ras, shape, m)
        if request.refinement is not None:
            self._check_refinement(request, shape, m, card, planned)
        return request

    def _check_inputs_request(self, request: RunRequest, card) -> None:
        """A request of a card whose task names several inputs (or of several inputs): the task's names, their
        stack on one grid, and whole volume only (a click on such a model is not implemented: refused)."""
        from .volume_regions import InputsError

        task = card.task if card is not None else None
        if not request.several_inputs:
            names = ", ".join(f"{i.name} ({i.title})" for i in task.inputs)
            raise InputsError(f"model {card.name!r} takes the inputs {names}: give them as {{name: volume node}} "
                              f"(the console) or --input NAME=PATH each (the command line), not one volume")
        if task is not None and tuple(request.input_names) != task.input_names:
            raise InputsError(f"model {card.name!r} takes the inputs {', '.join(task.input_names)} in that order; "
                              f"the request has {', '.join(request.input_names)}")
        if request.click is not None:  # a card that lists click mode for several inputs: not implemented
            raise pipeline.UnsupportedModeError(f"a click on model {card.name if card else ''!r} (several inputs) is "
                                                f"not supported: segment the whole volume")
        if request.refinement is not None:
            raise PromptError("a refinement steers a clicked nodule's samples; a several-input run has none")
        if request.volume is not None:
            stack = np.asarray(request.volume)
            if stack.ndim != 4 or len(stack) != len(request.input_names):
                raise InputsError(f"several inputs travel as their stack (C, k, j, i) with C = "
                                  f"{len(request.input_names)}, got shape {stack.shape}")
            for name, channel in zip(request.input_names, stack):
                try:
                    pipeline.check_volume(channel, request.ijk_to_ras)
                except pipeline.VolumeError as e:
                    raise type(e)(f"input {name}: {e}") from None
        elif not self.backend.holds(request.volume_key):
            raise pipeline.VolumeError("no voxels given, and the worker does not hold these volumes")

    def _check_refinement(self, request: RunRequest, shape, m, card, planned) -> None:
        if request.click is None:
            raise PromptError("a refinement steers the samples of a clicked nodule; a whole-volume run has none")
        if request.nodule is None:
            raise PromptError("a refinement needs the nodule it refines")
        if planned is not None:
            n_scales, n_samples = planned
        else:
            known = self.previous(request)
            if known is None:
                raise PromptError(f"no result of {request.nodule} to refine in this session: segment it (click on it) "
                                  f"first")
            if card is not None and known.result.model_name != card.name:
                raise PromptError(f"{request.nodule} was segmented with model {known.result.model_name!r}; refine "
                                  f"it with that model, not {card.name!r}")
            n_scales, n_samples = known.result.n_scales, known.result.n_samples
        request.refinement.check_against(n_scales, n_samples)
        for prompt in request.refinement.prompts:
            pipeline.check_point(prompt.point_ras, shape, m)
        if planned is None and getattr(known.result, "grid", None) is not None:  # a point off the nodule's grid
            pipeline.refinement_grid_indices(request.refinement, known.result, m)

    # --- running

    def start(self, request: RunRequest, checked: bool = False, previous=None):
        """The run of a request, checked first (unless it was, with check()); poll it, or finish() it. A
        refinement starts from its nodule's remembered result, or from previous (a result of the same call)."""
        if not checked:
            self.check(request)
        if request.volume is not None and self.backend.holds(request.volume_key):
            request = dataclasses.replace(request, volume=None)  # sent before: no voxels again
        if request.refines and previous is None:
            previous = self.previous(request).result
        run = self.backend.start(request, previous if request.refines else None)
        run.request = request  # what apply() needs to know of it
        return run

    def apply(self, volume_node, result, options=None, nodule: Optional[str] = None, request=None):
        """The result into the scene (apply_result), remembered under this service's memory."""
        if request is not None:
            nodule = nodule if nodule is not None else request.nodule
        if request is not None and request.several_inputs:
            return apply_region_result(volume_node, result, request.input_notes)
        return apply_result(volume_node, result, options, nodule=nodule,
                            replace_with_empty=bool(request is not None and request.replace_with_empty),
                            memory=self.memory, volume_key=None if request is None else request.volume_key,
                            settings=None if request is None else request.settings, card=self.card)

    def run(self, request: RunRequest, progress: ProgressFn = None, cancel: CancelFn = None, checked: bool = False):
        """start + finish: the result, blocking."""
        return finish(self.start(request, checked=checked), progress, cancel)

    # --- blocking calls on nodes and files (the console, the CLI)

    def segment_node(self, volume_node, nodules: Sequence[NoduleSteps] = (), settings=None, options=None,
                     progress: ProgressFn = None, cancel: CancelFn = None, nodule: Optional[str] = None,
                     replace_with_empty: bool = False):
        """Segment a volume node in its scene: each nodule's click and refinements in turn, or, with none, the whole
        volume (models whose card lists that mode). Everything is checked first (settings, mode, every point,
        every refinement), then everything is inferred, then the nodules are written: a bad second point costs no
        inference and changes nothing. nodule: the nodule a single click redoes. Returns the ResultNodes, whose
        results hold every run's result and notices every run's notices."""
        settings = settings if settings is not None else pipeline.SegmentSettings()
        base = self.request_for_node(volume_node, settings=settings)  # a view: this call waits for its runs
        base = dataclasses.replace(base, replace_with_empty=replace_with_empty)
        if not nodules:
            self.check(base)
            result = self.run(base, progress, cancel, checked=True)
            return self.apply(volume_node, result, options, request=base)
        planned = (card_scales(self.card) or 1 << 30, settings.n_samples)  # unknown scales: checked in the worker
        plan: List[Tuple[int, RunRequest]] = []  # (which nodule of the call, request)
        for index, steps in enumerate(nodules):
            click = dataclasses.replace(base, click=steps.click, nodule=nodule if len(nodules) == 1 else None)
            plan.append((index, self.check(click)))
            for refinement in steps.refinements:  # of the nodule this click makes (its id is known once written)
                refine = dataclasses.replace(click, nodule=f"#{index}", refinement=refinement, replace_with_empty=True)
                plan.append((index, self.check(refine, planned=planned)))

        results: List[pipeline.VolumeResult] = []
        latest: Dict[int, pipeline.VolumeResult] = {}
        for step, (index, request) in enumerate(plan):
            def one(done, total, step=step):  # one bar over every run of the call
                if progress is not None:
                    progress(step * total + done, len(plan) * total)

            run = self.start(request, checked=True, previous=latest.get(index) if request.refines else None)
            latest[index] = finish(run, one, cancel)
            results.append(latest[index])

        nodes, notices, written = None, [], {}
        for (index, request), result in zip(plan, results):
            if request.refines:
                target = written[index]
                if target is None:  # its click found nothing and wrote no nodule: there is nothing to refine
                    notices.append(f"the refinement of the point {_words(request.click.point_ras)} was not applied: "
                                   f"its click found nothing")
                    continue
            else:
                target = request.nodule
            nodes = self.apply(volume_node, result, options, nodule=target,
                               request=dataclasses.replace(request, nodule=target))
            if not request.refines:
                written[index] = nodes.nodule if nodes.result is result else None
            notices += nodes.notices
        nodes.results, nodes.notices = results, notices
        return nodes

    def segment_inputs(self, volume_nodes, settings=None, progress: ProgressFn = None, cancel: CancelFn = None,
                       click: Optional[Prompt] = None):
        """Segment several volume nodes ({task input name: node}, e.g. {"flair": a, "t1ce": b}) whole and wait: checked
        and aligned first (request_for_inputs, check), then run, then written as one segmentation of the first
        input with a segment per region per lesion. Returns mrml.RegionNodes (notices: inputs resampled)."""
        request = self.check(self.request_for_inputs(volume_nodes, click=click, settings=settings))
        result = self.run(request, progress, cancel, checked=True)
        first = task_input_nodes(volume_nodes, self.card.task)[request.input_names[0]]
        return apply_region_result(first, result, request.input_notes)

    def segment_input_files(self, input_paths, out_path, settings=None, report_path=None, png_path=None,
                            progress: ProgressFn = None, cancel: CancelFn = None, scene=None):
        """Several image files ({task input name: path}) -> OUT.seg.nrrd (a segment per region per lesion), the
        report JSON and the figure, through a scene of their own unless one is given; written together at the end
        (a failure leaves none). Returns mrml.RegionNodes."""
        from . import mrml

        scene = scene if scene is not None else mrml.new_scene()
        paths = task_input_nodes(input_paths, self.card.task)
        nodes = {name: mrml.load_volume(scene, path, name=mrml.volume_stem(Path(path))) for name, path in paths.items()}
        written = self.segment_inputs(nodes, settings, progress, cancel)
        first = self.card.task.input_names[0]
        mrml.write_region_outputs(written, mrml.volume_array(nodes[first]), paths, out_path, report_path, png_path)
        return written

    def refine(self, volume_node, nodule: str, refinement: Refinement, settings=None, options=None,
               progress: ProgressFn = None, cancel: CancelFn = None):
        """Refine a nodule of volume_node from its current result (the console's refine); the nodule keeps its
        identity. settings: None runs with the settings that made it."""
        request = self.refine_request(volume_node, nodule, refinement, settings)
        result = self.run(request, progress, cancel)
        return self.apply(volume_node, result, options, request=request)

    def refine_request(self, volume_node, nodule: str, refinement: Refinement, settings=None,
                       volume_key=None) -> RunRequest:
        """The request that refines a nodule of volume_node from its remembered result (refine's, and the Slicer
        module's and the page's, which start it and poll): its click, its settings unless others are given, the same
        nodule. volume_key: the key its results were remembered under (the page's own); None: the node's."""
        key = volume_key if volume_key is not None else volume_key_of(volume_node)
        known = self.memory.get(key, nodule)
        if known is None:
            raise PromptError(f"no result of {nodule} to refine in this session: segment it (click on it) first")
        return self.request_for_node(volume_node, click=Prompt(INCLUDE, known.result.point_ras), nodule=nodule,
                                     refinement=refinement,
                                     settings=settings if settings is not None else known.settings,
                                     volume_key=key, replace_with_empty=True)

    def segment_file(self, volume_path, out_path, nodules: Sequence[NoduleSteps] = (), settings=None, options=None,
                     report_path=None, png_path=None, progress: ProgressFn = None, cancel: CancelFn = None,
                     scene=None):
        """One image file -> its .seg.nrrd (every nodule), report JSON and figure, through a scene of its own unless
        one is given; all outputs written under temporary names and moved into place at the end (a failure leaves
        none). Returns the ResultNodes (nodes.results: every run's result)."""
        from . import mrml

        scene = scene if scene is not None else mrml.new_scene()
        volume_node = mrml.load_volume(scene, volume_path)
        nodes = self.segment_node(volume_node, nodules, settings, options, progress, cancel)
        mrml.write_outputs(nodes, volume_path, out_path, report_path, png_path)
        return nodes


def _takes_several_inputs(card) -> bool:
    from .volume_regions import uses_regions_path

    return uses_regions_path(card)


def _words(point) -> str:
    return "R {:.1f}, A {:.1f}, S {:.1f}".format(*point)


def clicks(points: Sequence) -> List[NoduleSteps]:
    """(R, A, S) points as one plain click each."""
    return [NoduleSteps(Prompt(INCLUDE, tuple(p))) for p in points]
