"""What one review page does to the scene, without any web code: open a catalog volume, start a run at a
point, poll it, write its result as ARSeg's MRML nodes, scrub scales, show the disagreement, hand out files;
refine the selected nodule (include / exclude points, locked coarse scales, a sample used: RunService.refine_request,
started and polled like a click) and undo, with the run service's memory of the nodule restored along with it.
A model whose card names several inputs (brats-glioma: FLAIR + T1ce) opens cases (catalog.py): every input of the
case loaded, the first shown, and its whole-volume run is RunService.request_for_inputs({name: node}), written as
one segmentation of the first input with a segment per region per lesion, reported per region in mL.

The trame app (app.py) calls these from the server's event loop; tests call them directly. MRML is touched
only here and only from the caller's thread (MRML is not thread-safe); the model runs in the inference client.
One run at a time: a click while a run is in flight is refused with a message, never queued behind it
(a queue of stale clicks would run long after the user moved on).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .. import mrml, pipeline, runs
from ..prompts import EXCLUDE, INCLUDE, Prompt, PromptError, Refinement, include
from .catalog import VolumeCatalog
from .inference import is_cancelled

# CT window presets (width, level in HU) as Slicer's Volumes module offers them; None: the volume's automatic one
WINDOW_PRESETS = {"Auto": None, "Lung": (1400.0, -500.0), "Mediastinum": (350.0, 40.0), "Bone": (1000.0, 400.0)}


class ReviewError(ValueError):
    """Something the user asked for that cannot be done now; the message is shown on the page as is."""


@dataclass
class ReviewSettings:
    """The page's choices for the next run."""

    n_samples: int = 16
    seed: int = 0
    include_samples: bool = False  # `Sample i` segments (hidden), shown on demand

    def segment_settings(self) -> pipeline.SegmentSettings:
        return pipeline.SegmentSettings(n_samples=int(self.n_samples), seed=int(self.seed))

    def output_options(self) -> mrml.OutputOptions:
        return mrml.OutputOptions(include_samples=bool(self.include_samples))


@dataclass
class RunStatus:
    """What the page shows about the current or last run."""

    state: str = "idle"  # idle, running, done, cancelled, failed
    fraction: float = 0.0
    message: str = ""
    seconds: Dict[str, float] = field(default_factory=dict)  # model (in the client), overlay (write to MRML)

    @property
    def running(self) -> bool:
        return self.state == "running"


def user_message(error: BaseException) -> str:
    """One line for the page, as the CLI prints for bad input; anything unexpected is named as such."""
    from ..models import ModelError

    if isinstance(error, (pipeline.VolumeError, mrml.ResultError, ModelError, ReviewError, PromptError)):
        return str(error)
    return f"ARSeg failed: {type(error).__name__}: {error}"


def satisfaction_words(result, refinement: Refinement) -> str:
    """What the refinement's points got, in words: e.g. " Every kept sample meets the exclude point." or how many
    of the candidates met it where the budget did not reach every sample (pipeline's prompt_satisfaction, which
    also lists the nodule's earlier points: only this refinement's are said)."""
    rows = (getattr(result, "settings", None) or {}).get("prompt_satisfaction") or []
    asked = [(p.kind, [round(v, 3) for v in p.point_ras]) for p in refinement.prompts]
    words = []
    for row in rows:
        if (row.get("kind"), [round(v, 3) for v in row.get("point_ras", [])]) not in asked:
            continue
        if row.get("every_kept_sample_satisfies"):
            words.append(f"every kept sample meets the {row['kind']} point")
        else:
            words.append(f"the {row['kind']} point is met by only {row.get('satisfying', 0)} of "
                         f"{row.get('candidates', 0)} candidates")
    return (" " + "; ".join(words).capitalize() + ".") if words else ""


def region_report_rows(report: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(measure, value, unit) rows of a several-input run's report (volume_regions.RegionsResult.report): per region
    its consensus volume and the samples' range in mL, then per lesion where there are several."""
    def span(v):
        return f"{v['min']:.2f}-{v['max']:.2f}"

    rows = [("Model", str(report.get("model", "")), ""), ("Mode", str(report.get("mode", "")), ""),
            ("Inputs", ", ".join(report.get("inputs", [])), ""), ("Lesions", str(report.get("n_lesions", 0)), "")]
    for region in report.get("regions", []):
        rows.append((region["name"], f"{region['consensus_volume_ml']:.2f}", "mL"))
        rows.append((f"{region['name']}, samples", span(region["sample_volume_ml"]), "mL"))
    if int(report.get("n_lesions", 0) or 0) > 1:
        for region in report.get("regions", []):
            for lesion in region.get("lesions", []):
                value = f"{lesion['consensus_volume_ml']:.2f} (samples {span(lesion['sample_volume_ml'])})"
                rows.append((lesion["segment"], value, "mL"))
    for note in (report.get("settings") or {}).get("inputs_aligned", []):
        rows.append(("Inputs aligned", str(note), ""))
    settings = report.get("settings", {})
    for key in ("n_samples", "seed", "pixel_spacing_mm"):
        if key in settings:
            rows.append((f"Setting {key}", str(settings[key]), ""))
    return rows


def region_words(report: Dict[str, Any]) -> str:
    """A several-input run's result in one line: per region its consensus volume and the samples' range in mL."""
    return "; ".join(f"{r['name']} {r['consensus_volume_ml']:.2f} mL (samples {r['sample_volume_ml']['min']:.2f}-"
                     f"{r['sample_volume_ml']['max']:.2f})" for r in report.get("regions", []))


class ReviewSession:
    """One scene, one catalog, one inference client (a run service on it); the volume on show and its run."""

    def __init__(self, scene, catalog: VolumeCatalog, client, card=None, settings: Optional[ReviewSettings] = None):
        self.scene = scene
        self.catalog = catalog
        self.client = client
        self.service = runs.RunService(runs.WorkerBackend(client, card))
        self.settings = settings or ReviewSettings()
        self.volume_node = None  # the volume on show; for a case of several inputs, its first input's
        self.volume_key: Optional[str] = None
        self.input_nodes: Dict[str, Any] = {}  # a case of several inputs: {input name: volume node}; {} otherwise
        self._loaded: Dict[str, Any] = {}  # catalog key -> volume node, or a case's {input: node} (opened once, kept)
        self._run = None
        self._run_started = 0.0
        self.status = RunStatus()
        # per undo step (run key, mrml's step index): the service's memory of that step's nodule before it, so
        # that Undo gives a refinement back the result it refines from, not only the picture
        self._memory_before: Dict[Tuple[Any, str], Optional[runs.Remembered]] = {}

    @property
    def card(self):
        """The model card: which modes the page offers and what a run is checked against."""
        return self.service.backend.card

    @card.setter
    def card(self, card) -> None:
        self.service.backend.card = card

    # ------------------------------------------------------------------------------------------ volumes

    @property
    def modes(self) -> List[str]:
        """Run modes the model card allows (pipeline.card_modes: click only unless the card lists more)."""
        return list(pipeline.card_modes(self.card)) if self.card is not None else [pipeline.MODE_CLICK]

    @property
    def several_inputs(self) -> bool:
        """Whether the model takes several inputs (the catalog lists cases, a run is the whole case)."""
        task = getattr(self.card, "task", None)
        return task is not None and len(task.inputs) > 1

    def open_volume(self, key):
        """The catalog entry under key, loaded once into the scene; unknown keys are refused. A case of several
        inputs: each input loaded (input_nodes), the first returned (the one on show); a case that lacks an input
        is refused before anything is read."""
        entry = self.catalog.get(key)
        if entry is None:
            raise ReviewError("no such volume on this page: choose one from the list")
        if self.status.running:
            raise ReviewError("a run is in progress: cancel it or wait before opening another volume")
        if entry.several_inputs:
            return self._open_case(entry)
        node = self._loaded.get(entry.key)
        if node is None or node.GetScene() is not self.scene:
            try:
                node = mrml.load_volume(self.scene, entry.path, name=Path(entry.label).name.split(".")[0])
            except Exception as e:  # the file's own message (unreadable, not an image) without the server path
                raise ReviewError(f"could not open {entry.label}: {e}".replace(str(entry.path), entry.label)) from e
            self._loaded[entry.key] = node
        self.volume_node, self.volume_key = node, entry.key
        self.input_nodes = {}
        self.status = RunStatus()
        return node

    def _open_case(self, entry):
        if entry.problem:
            raise ReviewError(entry.problem)
        task = getattr(self.card, "task", None)
        if task is None or tuple(name for name, _ in entry.inputs) != task.input_names:
            names = ", ".join(task.input_names) if task is not None else "one volume"
            raise ReviewError(f"{entry.label} is a case of {', '.join(n for n, _ in entry.inputs)}; this page's "
                              f"model takes {names}")
        nodes = self._loaded.get(entry.key)
        if not nodes or any(n.GetScene() is not self.scene for n in nodes.values()):
            nodes = {}
            for name, path in entry.inputs:
                shown = f"{entry.label.split(' (')[0]}/{path.name}"
                try:
                    nodes[name] = mrml.load_volume(self.scene, path, name=mrml.volume_stem(path))
                except Exception as e:  # the file's own message without the server path; none of the case kept
                    for node in nodes.values():
                        self.scene.RemoveNode(node)
                    raise ReviewError(f"could not open {shown} ({name}): {e}".replace(str(path), shown)) from e
            self._loaded[entry.key] = nodes
        self.input_nodes = dict(nodes)
        self.volume_node, self.volume_key = nodes[task.input_names[0]], entry.key
        self.status = RunStatus()
        return self.volume_node

    def input_choices(self) -> List[Dict[str, str]]:
        """The open case's inputs the page can show ({title, value: input name}); [] for one volume."""
        task = getattr(self.card, "task", None)
        if not self.input_nodes or task is None:
            return []
        return [{"title": i.title, "value": i.name} for i in task.inputs if i.name in self.input_nodes]

    def input_node(self, name: str):
        """The open case's volume of input name (what the page shows when that input is chosen)."""
        node = self.input_nodes.get(name) if isinstance(name, str) else None
        if node is None:
            raise ReviewError(f"no input {name!r:.60} in this case"
                              + (f" (its inputs: {', '.join(self.input_nodes)})" if self.input_nodes else ""))
        return node

    def set_window(self, preset: str) -> None:
        """Window/level of the CT on show: a preset of WINDOW_PRESETS (unknown names are refused)."""
        if preset not in WINDOW_PRESETS:
            raise ReviewError(f"no window preset {preset!r} (presets: {', '.join(WINDOW_PRESETS)})")
        if self.volume_node is None:
            raise ReviewError("open a volume first")
        if self.volume_node.GetDisplayNode() is None:
            self.volume_node.CreateDefaultDisplayNodes()
        display = self.volume_node.GetDisplayNode()
        if WINDOW_PRESETS[preset] is None:
            display.AutoWindowLevelOn()
        else:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*WINDOW_PRESETS[preset])

    # ------------------------------------------------------------------------------------------ runs

    def start(self, point_ras=None) -> None:
        """Start a run at point_ras (click mode) or, with None, over the whole volume where the card allows it."""
        if self.volume_node is None:
            raise ReviewError("open a volume first")
        if self.status.running:
            raise ReviewError("ARSeg is still working on the previous click: wait for it or cancel it")
        if point_ras is None and self.card is None:
            raise ReviewError("whole-volume runs need a model card that allows them")
        # checked by the service before any work: the mode (the card's own words), the settings, a click off the CT
        click = None if point_ras is None else include(point_ras)
        if self.input_nodes:  # a case of several inputs: {name: node}, aligned onto the first input's grid
            request = self.service.request_for_inputs(self.input_nodes, click=click,
                                                      settings=self.settings.segment_settings())
        else:
            request = self.service.request_for_node(self.volume_node, click=click,
                                                    settings=self.settings.segment_settings(),
                                                    volume_key=self._run_key())
        self._run = self.service.start(request)
        self._run_started = time.perf_counter()
        where = "the whole volume" if point_ras is None else "R {:.1f}, A {:.1f}, S {:.1f}".format(*point_ras)
        self.status = RunStatus("running", 0.0, f"segmenting at {where}")

    def cancel(self) -> None:
        if self._run is not None and self.status.running:
            self._run.cancel()
            self.status.message = "cancelling"

    def poll(self) -> RunStatus:
        """Progress of the run; when it has finished, its result written to the scene (on the caller's thread)."""
        run = self._run
        if run is None or not self.status.running:
            return self.status
        if not run.poll():
            self.status.fraction = float(run.fraction)
            self._show_outline(run)
            return self.status
        self._run = None
        try:
            return self._finished(run)
        finally:  # the result has replaced the outline (write_result removes it); a run that wrote nothing too
            if self.volume_node is not None:
                mrml.remove_outline(self.scene, self.volume_node)

    def _finished(self, run) -> RunStatus:
        model_s = time.perf_counter() - self._run_started
        if run.error is not None:
            if is_cancelled(run):
                self.status = RunStatus("cancelled", 0.0, "cancelled: nothing was changed")
            else:
                self.status = RunStatus("failed", 0.0, user_message(run.error))
            return self.status
        t0 = time.perf_counter()
        request, key = run.request, self._run_key()
        if request.several_inputs:
            return self._finished_regions(run, model_s, t0)
        before = {n.id: self.service.memory.get(key, n.id) for n in self.nodules()}  # each nodule's, for Undo
        step_before = mrml.last_undo_step(self.scene, self.volume_node)
        try:
            nodes = self.service.apply(self.volume_node, run.result, self.settings.output_options(),
                                       request=request)
        except Exception as e:  # a result that does not fit the scene: the scene is left as it was
            self.status = RunStatus("failed", 0.0, user_message(e))
            return self.status
        step = mrml.last_undo_step(self.scene, self.volume_node)
        if step is not None and step != step_before:  # this run wrote a nodule: its undo step is the last one
            self._memory_before[(key, step[0])] = before.get(step[1])
        r = nodes.report
        vols = r["sample_volume_mm3"]
        # a redo says what it replaced (Undo brings it back); an empty redo that kept the nodule says why
        head = f"consensus {r['consensus_volume_mm3']:.0f} mm\u00b3, {r['n_samples']} samples " \
               f"{vols['min']:.0f}-{vols['max']:.0f} mm\u00b3."
        if request.refines:
            head = f"{mrml.nodule_name(request.nodule)} refined ({mrml.prompt_words(request.refinement.to_dict())}" \
                   f"): {head}{satisfaction_words(run.result, request.refinement)}"
            notices = [n for n in nodes.notices if " redone: " not in n]  # said above, in a refinement's words
        else:
            notices = list(nodes.notices)
        message = " ".join([head] + notices)
        seconds = {"model": round(model_s, 3), "overlay": round(time.perf_counter() - t0, 3)}
        if getattr(run, "outline_seconds", None) is not None:
            seconds["first_outline"] = round(run.outline_seconds, 3)
        self.status = RunStatus("done", 1.0, message, seconds)
        return self.status

    def _finished_regions(self, run, model_s: float, t0: float) -> RunStatus:
        """A several-input run's RegionsResult into the scene: one segmentation of the first input (a segment per
        region per lesion), replacing the case's earlier one."""
        try:
            nodes = self.service.apply(self.volume_node, run.result, request=run.request)
        except Exception as e:  # a result that does not fit the scene: the scene is left as it was
            self.status = RunStatus("failed", 0.0, user_message(e))
            return self.status
        r = nodes.report
        head = f"{r.get('n_lesions', 0)} lesion(s), {r.get('n_samples', 0)} samples: {region_words(r)}."
        message = " ".join([head] + [f"Note: {n}." for n in nodes.notices])
        seconds = {"model": round(model_s, 3), "overlay": round(time.perf_counter() - t0, 3)}
        self.status = RunStatus("done", 1.0, message, seconds)
        return self.status

    # ------------------------------------------------------------------------------------------ refinements

    def selected_nodule(self, what: str) -> str:
        """The nodule a refinement acts on (the selected one), or the ReviewError that says why there is none."""
        if self.volume_node is None:
            raise ReviewError("open a volume first")
        nodes = self.results()
        if self.input_nodes and nodes is not None and "regions" in nodes.report:
            raise ReviewError(f"{what} refines a clicked nodule; a whole-volume result of several inputs has none")
        if nodes is None or not nodes.nodule:
            raise ReviewError(f"{what} refines the selected nodule: click on a nodule first")
        if nodes.nodule == mrml.WHOLE_VOLUME_ID:
            raise ReviewError(f"{what} refines a clicked nodule; a whole-volume result has no click to refine")
        return nodes.nodule

    def refine(self, refinement: Refinement) -> None:
        """Refine the selected nodule (run service: refine_request, started on the worker like a click, polled):
        it stays the same nodule. Everything the service can check is checked here, before any run (a point
        off the nodule's grid, a scale or sample that does not exist)."""
        what = mrml.prompt_words(refinement.to_dict()) or "a refinement"
        nid = self.selected_nodule(what)
        if self.status.running:
            raise ReviewError("ARSeg is still working on the previous click: wait for it or cancel it")
        try:
            request = self.service.refine_request(self.volume_node, nid, refinement, volume_key=self._run_key())
        except PromptError:
            raise ReviewError(f"{mrml.nodule_name(nid)} has no result of this page's session to refine from: "
                              f"click on it again, then refine it") from None
        self._run = self.service.start(request)
        self._run_started = time.perf_counter()
        self.status = RunStatus("running", 0.0, f"refining {mrml.nodule_name(nid)}: {what}")

    def refine_at(self, kind: str, point_ras) -> None:
        """An include or exclude point placed on the selected nodule."""
        if kind not in (INCLUDE, EXCLUDE):
            raise ReviewError(f"a point on a nodule is an {INCLUDE} or an {EXCLUDE} point, got {kind!r}")
        self.refine(Refinement(prompts=(Prompt(kind, tuple(point_ras)),)))

    def lock_finer_than(self, scale: int, from_sample: Optional[int] = None) -> None:
        """"Resample finer than this scale": scales 1..scale of sample from_sample (None: the most typical) kept,
        the finer ones drawn again."""
        n = self.n_scales()
        what = f"resampling finer than scale {scale}"
        self.selected_nodule(what)
        if not 1 <= scale < n:
            raise ReviewError(f"{what}: scale {scale} is the finest of {n}; move the scale slider to a coarser "
                              f"scale whose shape you want to keep, then resample finer than it")
        self.refine(Refinement(lock_scales=int(scale), from_sample=from_sample or None))

    def use_sample(self, sample: int) -> None:
        """Sample i (1-based) of the selected nodule becomes its result."""
        self.selected_nodule(f"using sample {sample}")
        n = self.n_samples()
        if not 1 <= sample <= n:
            raise ReviewError(f"no sample {sample}: the selected nodule's result has {n} samples")
        self.refine(Refinement(use_sample=int(sample)))

    def n_samples(self) -> int:
        """How many samples the selected nodule's result has (what the sample picker offers)."""
        return int(self.report().get("n_samples", 0) or 0)

    def _show_outline(self, run) -> None:
        """A click's first outline, as soon as the worker sent it: shown until the result replaces it."""
        outline = run.take_outline() if hasattr(run, "take_outline") else None
        if outline is None or self.volume_node is None:
            return
        try:
            mrml.show_outline(self.scene, self.volume_node, outline)
        except mrml.ResultError:  # another volume was opened meanwhile: its result will not be shown either
            return
        self.status.message += f" (first outline {outline.area_mm2:.0f} mm\u00b2 in {run.outline_seconds:.1f} s)"

    # ------------------------------------------------------------------------------------------ results

    def results(self) -> Optional[mrml.ResultNodes]:
        return mrml.find_results(self.scene, self.volume_node) if self.volume_node is not None else None

    def _require_results(self) -> mrml.ResultNodes:
        nodes = self.results()
        if nodes is None:
            raise ReviewError("no result yet: click on a nodule first")
        return nodes

    def nodule_prompts(self) -> Dict[str, List[str]]:
        """Each nodule's prompts in words (its click, then each refinement), as its report records them."""
        entries = self.report().get("nodules", [])
        return {n["id"]: [mrml.prompt_words(p) for p in n.get("prompts") or []] for n in entries}

    def regions(self) -> List[Dict[str, Any]]:
        """A several-input result's segments, per region, per lesion, in the report's order: {id (the segment's),
        name, region, lesion, volume (mL), samples (their range, mL)}; [] for anything else."""
        report = self.report()
        out = []
        for region in report.get("regions", []) if "regions" in report else []:
            for lesion in region.get("lesions", []):
                v = lesion["sample_volume_ml"]
                out.append({"id": lesion["segment"].replace(" ", "_"), "name": lesion["segment"],
                            "region": region["name"], "lesion": int(lesion["lesion"]),
                            "volume": f"{lesion['consensus_volume_ml']:.2f}",
                            "samples": f"{v['min']:.2f}-{v['max']:.2f}"})
        return out

    def has_regions(self) -> bool:
        return "regions" in self.report()

    def show_region(self, sid: str, show: bool) -> None:
        """Show or hide one region segment of a several-input result (an id of regions())."""
        if sid not in {r["id"] for r in self.regions()}:
            raise ReviewError(f"no region segment {sid!r:.60} in this result")
        display = self._require_results().segmentation.GetDisplayNode()
        if display is not None:
            display.SetSegmentVisibility(sid, bool(show))

    def region_shown(self, sid: str) -> bool:
        nodes = self.results()
        display = nodes.segmentation.GetDisplayNode() if nodes is not None else None
        return bool(display is not None and display.GetSegmentVisibility(sid))

    def nodules(self) -> List[mrml.NoduleInfo]:
        """The volume's nodules, in the order they were made (each click outside them adds one)."""
        return mrml.list_nodules(self.scene, self.volume_node) if self.volume_node is not None else []

    def _consensus_shown(self, nodes: mrml.ResultNodes, show: bool) -> None:
        nid = nodes.nodule
        display = nodes.segmentation.GetDisplayNode()
        if nid and display is not None and nodes.segmentation.GetSegmentation().GetSegment(nid) is not None:
            display.SetSegmentVisibility(nid, bool(show))

    def select_nodule(self, nid: str) -> None:
        """The nodule the scale slider, the heat map and the report follow."""
        nodes = self._require_results()
        self._consensus_shown(nodes, True)  # a nodule left mid-scrub gets its consensus back
        try:
            mrml.select_nodule(self.scene, self.volume_node, nid)
        except mrml.ResultError as e:
            raise ReviewError(str(e)) from e

    def delete_nodule(self, nid: str) -> None:
        self._require_nodule_action()
        try:
            mrml.delete_nodule(self.scene, self.volume_node, nid)
        except mrml.ResultError as e:
            raise ReviewError(str(e)) from e
        self.service.memory.forget(self._run_key(), nid)
        if not self.nodules():  # the last one took the undo history with it: its step numbers start again
            self._forget_undo_memory()

    def clear_nodules(self) -> int:
        self._require_nodule_action()
        self.service.memory.forget(self._run_key())
        self._forget_undo_memory()
        return mrml.clear_nodules(self.scene, self.volume_node) if self.volume_node is not None else 0

    def _forget_undo_memory(self) -> None:
        key = self._run_key()
        for k in [k for k in self._memory_before if k[0] == key]:
            del self._memory_before[k]

    def _run_key(self):
        """The volume's key for the worker and the service's memory of its nodules."""
        return (self.volume_key, self.volume_node.GetID()) if self.volume_node is not None else None

    def undo(self) -> str:
        """Undo the last run on the volume (a redone nodule gets its previous result back, an added one goes);
        returns what was undone, in words."""
        self._require_nodule_action()
        if self.volume_node is None:
            raise ReviewError("open a volume first")
        step = mrml.last_undo_step(self.scene, self.volume_node)
        try:
            undone = mrml.undo_last(self.scene, self.volume_node)[1]
        except mrml.ResultError as e:
            raise ReviewError(str(e)) from e
        # a refinement starts from what the scene shows again: the result the nodule had before that step (kept
        # when this page made it), else none (the nodule is clicked again before it is refined)
        key = self._run_key()
        before = self._memory_before.pop((key, step[0]), None) if step is not None else None
        if step is not None:
            self.service.memory.forget(key, step[1])
            if before is not None and any(n.id == step[1] for n in self.nodules()):
                self.service.memory.put(key, step[1], before.result, before.settings)
        return undone

    def can_undo(self) -> bool:
        return self.volume_node is not None and mrml.can_undo(self.scene, self.volume_node)

    def _require_nodule_action(self):
        if self.status.running:  # the run's result is written against the nodules as they are
            raise ReviewError("ARSeg is working on a click: wait for it or cancel it first")

    def n_scales(self) -> int:
        nodes = self.results()
        return nodes.sequence.GetNumberOfDataNodes() if nodes is not None and nodes.sequence is not None else 0

    def select_scale(self, k: int) -> None:
        """The scale slider: the consensus after scale k, alone, over the image (the selected nodule's consensus is
        hidden while scrubbing, else an empty coarse scale would look like the finished one); at the finest scale
        the consensus itself is on show again and the scale view is hidden."""
        nodes = self._require_results()
        n = nodes.sequence.GetNumberOfDataNodes()
        k = max(1, min(n, int(k)))
        mrml.select_scale(nodes, k, show=k < n)
        # the proxy follows the browser only where a Sequences logic watched the scene when the browser was added;
        # mrml makes its private one on first use, after that: update the proxy explicitly
        mrml.sequences_logic(self.scene).UpdateProxyNodesFromSequences(nodes.browser)
        self._consensus_shown(nodes, k == n)

    def show_disagreement(self, show: bool, opacity: float = 0.5) -> None:
        nodes = self.results()
        if nodes is not None and "regions" in nodes.report:  # several inputs: each region's disagreement segment
            display = nodes.segmentation.GetDisplayNode()
            segmentation = nodes.segmentation.GetSegmentation()
            for sid in mrml.segment_ids(nodes.segmentation):
                if mrml.segment_tag(segmentation.GetSegment(sid), mrml.KIND_TAG) == mrml.KIND_DISAGREEMENT:
                    display.SetSegmentVisibility(sid, bool(show))
                    display.SetSegmentOpacity2DFill(sid, float(opacity))
        elif nodes is not None:
            mrml.show_disagreement(self.scene, nodes, bool(show), float(opacity))

    def samples_kept(self) -> int:
        """How many `Sample i` segments the selected nodule has (runs with 'keep samples' ticked)."""
        nodes = self.results()
        if nodes is None or not nodes.nodule:
            return 0
        present = set(mrml.segment_ids(nodes.segmentation))
        return sum(1 for i in range(1, pipeline.MAX_SAMPLES + 1) if mrml.sample_segment_id(i, nodes.nodule) in present)

    def show_sample(self, i: int) -> None:
        """Show the selected nodule's sample i (1-based) and hide its others; 0 hides them all."""
        nodes = self._require_results()
        kept = self.samples_kept()
        if i and not 1 <= i <= kept:
            raise ReviewError("this nodule's run kept no such sample: tick 'keep samples' and click it again")
        display = nodes.segmentation.GetDisplayNode()
        for k in range(1, kept + 1):
            display.SetSegmentVisibility(mrml.sample_segment_id(k, nodes.nodule), k == i)

    def report(self) -> Dict[str, Any]:
        nodes = self.results()
        return dict(nodes.report) if nodes is not None else {}

    def report_rows(self) -> List[Dict[str, str]]:
        report = self.report()
        if not report:
            return []
        rows = region_report_rows(report) if "regions" in report else mrml.report_rows(report)
        return [{"measure": a, "value": b, "unit": c} for a, b, c in rows]

    def file_stem(self) -> str:
        return mrml.volume_stem(Path(self.catalog.get(self.volume_key).path)) if self.volume_key else "volume"

    def segmentation_bytes(self) -> bytes:
        """The .seg.nrrd that Slicer's own storage node writes, as `arseg segment` writes it."""
        nodes = self._require_results()
        with tempfile.TemporaryDirectory(prefix="arseg-web-") as tmp:
            path = mrml.save_segmentation(nodes.segmentation, Path(tmp) / f"{self.file_stem()}.seg.nrrd")
            return path.read_bytes()

    def report_bytes(self) -> bytes:
        report = dict(self._require_results().report)
        entry = self.catalog.get(self.volume_key)
        report["source"] = entry.label  # the label: no server path leaves the server
        if entry.inputs:  # a case: each input's file name
            report["sources"] = {name: path.name for name, path in entry.inputs}
        return (json.dumps(report, indent=2) + "\n").encode()
