"""The review page: Slicer's own slice and 3D views (trame-slicer, rendered on the server) and ARSeg's panel.

A click on the CT in a slice view places a point, as in Slicer's module (persistent place mode on one markups
point list): the point's RAS position starts a run in the inference client; an asyncio task polls it and, when
it has finished, writes the result as ARSeg's MRML nodes (ARSegLib.mrml, the node contract Slicer uses), which
Slicer's displayable managers draw. The panel: the volume chooser (catalog keys only), progress and cancel,
"go to point", the scale slider, the disagreement toggle and opacity, samples on demand, the report, downloads.
The prompts: a Nodule / Include / Exclude toggle says what the next click does (Include / Exclude: a point that
refines the selected nodule; Shift+click: an exclude point, read from the slice view's interactor), "Resample finer
than this scale" and "Use this sample" with the sample picker; each is a ReviewSession refinement, run like a click.
A model of several inputs (brats-glioma): the chooser lists cases, an "Show" toggle picks the input on show, the
whole-volume button segments the case, and its regions are listed (per region, per lesion, in mL, each can be hidden).

No Qt; nothing here reads a path from the browser (catalog.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Optional

import slicer
import vtk
from trame.app import TrameApp
from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_server.utils.asynchronous import create_task
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories

from .. import mrml
from . import page_state
from .page_state import PROMPT_MODES, ViewChoices
from .review import WINDOW_PRESETS, ReviewError, ReviewSession, ReviewSettings, user_message

log = logging.getLogger(__name__)

POLL_S = 0.1  # progress polling while a run is in flight: a tenth of a second is smooth and costs nothing
PRELOAD_POLL_S = 0.25  # talking to the worker while it loads the model (nothing is shown meanwhile)
LAYOUT = "Axial Primary"  # a large axial view (where one clicks) beside 3D, coronal and sagittal
CLICK_COLOR = (0.2, 0.8, 1.0)  # the click's point: cyan, unlike the consensus (amber) and the heat map (red)
# above the interactor style's observers, which take a Shift+press for themselves (it never reaches a default one)
SHIFT_CLICK_PRIORITY = 100.0


def parse_ras(text) -> tuple:
    """'R, A, S' in millimetres -> (R, A, S); a ReviewError with the expected form otherwise."""
    if not isinstance(text, str) or len(text) > page_state.MAX_TEXT:
        raise ReviewError(f"a point is three numbers R, A, S in millimetres (e.g. -56.4, -86.3, -116.0), "
                          f"got {page_state.shown(text)}")
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(abs(x) < 1e6 for x in values):
        raise ReviewError(f"a point is three numbers R, A, S in millimetres (e.g. -56.4, -86.3, -116.0), got {text!r}")
    return values


def _download(name_expression: str, trigger_name: str, mime: str) -> str:
    """The browser's side of a download: the server returns the bytes as an attachment, the page saves them."""
    return f"utils.download({name_expression}, trigger('{trigger_name}'), '{mime}')"


class ARSegWebApp(TrameApp):
    """One trame server, one scene, one review session (trame shares one state among a server's clients)."""

    def __init__(self, server, catalog, client_, card=None, settings: Optional[ReviewSettings] = None,
                 title: str = "ARSeg"):
        super().__init__(server)
        self.slicer_app = SlicerApp()
        mrml.register_segmentation_converters()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        # creating the views makes VTK 9.6 warn, once per view, that trame-slicer observes a deprecated interactor
        # event: four blocks of noise on every start that say nothing to a user of the page
        vtk.vtkObject.GlobalWarningDisplayOff()
        try:
            self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
            self.layout_manager.set_layout(LAYOUT)
        finally:
            vtk.vtkObject.GlobalWarningDisplayOn()
        self.session = ReviewSession(self.slicer_app.scene, catalog, client_, card, settings)
        self._poll_task = None
        self._preload_task = None
        self._click_started = 0.0
        self.choices = ViewChoices()  # the state values the server acts on, checked (page_state.py)
        self.title = title
        self._clicks = self._click_list()
        self._observe_shift_clicks()
        self._init_state()
        self._build_ui()
        self.server.controller.on_client_exited.add(self._on_client_exited)

    # ------------------------------------------------------------------------------------------ state

    def _init_state(self):
        s = self.state
        s.trame__title = self.title
        s.volume_choices = self.session.catalog.choices()
        s.volume_key = None
        s.volume_loaded = False
        s.download_stem = "ARSeg"
        s.run_state, s.run_fraction, s.run_message = "idle", 0.0, ""
        s.error_message = ""
        s.goto_text = ""
        s.window_presets = list(WINDOW_PRESETS)
        s.window_preset = "Auto"
        s.n_scales, s.scale = 0, 0
        s.show_disagreement, s.disagreement_opacity = False, 0.5
        s.include_samples, s.n_samples_kept, s.sample_shown = False, 0, 0
        s.report_rows = []
        s.nodules = []
        s.prompt_modes = [{"title": title, "value": mode} for mode, title in PROMPT_MODES.items()]
        s.prompt_mode = self.choices.prompt_mode
        s.n_samples, s.sample_pick = 0, 0
        s.can_undo = False
        s.has_result = False
        s.whole_volume_allowed = "volume" in self.session.modes
        s.several_inputs = self.session.several_inputs
        s.input_choices, s.input_shown = [], ""
        s.regions = []
        s.region_result = False
        s.timings = {}
        s.change("volume_key")(self._on_volume_key)
        s.change("scale")(self._on_scale)
        s.change("show_disagreement", "disagreement_opacity")(self._on_disagreement)
        s.change("include_samples")(self._on_include_samples)
        s.change("sample_shown")(self._on_sample_shown)
        s.change("window_preset")(self._on_window_preset)
        s.change("prompt_mode")(self._on_prompt_mode)
        s.change("sample_pick")(self._on_sample_pick)
        s.change("input_shown")(self._on_input_shown)

    def _fail(self, message: str):
        self.state.error_message = message

    def _refuse(self, error: ReviewError, **good):
        """A state value the server will not act on: say why, and set the keys back to their last good values."""
        self._fail(str(error))
        for key, value in good.items():
            self.state[key] = value

    # ------------------------------------------------------------------------------------------ the worker

    def preload(self, load_run):
        """Keep talking to the worker from the server's loop while it loads the model. Started at the server's
        start, the worker waits for its client to connect, and gives up after ARSegLib.worker's connect deadline
        when nobody does; without this the client would first connect at the page's first click, which may come
        long after (the first click then started a new worker: cold, twice as slow)."""
        if self._preload_task is None or self._preload_task.done():
            self._preload_task = create_task(self._pump_until_loaded(load_run))

    async def _pump_until_loaded(self, load_run):
        t0 = time.perf_counter()
        while not load_run.poll():
            await asyncio.sleep(PRELOAD_POLL_S)
        if load_run.error is not None:
            message = user_message(load_run.error)
            print(f"arseg view: the model could not be loaded: {message}", file=sys.stderr, flush=True)
            with self.state:
                self._fail(message)
        else:
            print(f"arseg view: model loaded in the worker ({time.perf_counter() - t0:.1f} s after the page "
                  f"started serving)", flush=True)

    # ------------------------------------------------------------------------------------------ volumes

    def _on_volume_key(self, volume_key=None, **_):
        if volume_key is None or (self.session.volume_key == volume_key and self.session.volume_node is not None):
            return
        try:
            node = self.session.open_volume(volume_key)
        except ReviewError as e:
            self._refuse(e, volume_key=self.session.volume_key)
            return
        self.state.error_message = ""
        self.state.volume_loaded = True
        self.state.download_stem = self.session.file_stem()
        self.state.input_choices = self.session.input_choices()
        self.choices.input_shown = self.state.input_shown = next(iter(self.session.input_nodes), "")
        self._show_volume(node)
        self.slicer_app.display_manager.reset_views()
        self._refresh_results()

    def _show_volume(self, node):
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(node)
        display.show_volume_in_slice_foreground(None)
        self._apply_window()

    def _on_input_shown(self, input_shown="", **_):
        """A case of several inputs: the input on show (the result stays: it is on the first input's grid)."""
        if not self.session.input_nodes or input_shown == self.choices.input_shown:
            return
        try:
            name = page_state.as_choice("the input shown", input_shown, list(self.session.input_nodes))
            node = self.session.input_node(name)
        except ReviewError as e:
            self._refuse(e, input_shown=self.choices.input_shown)
            return
        self.choices.input_shown = name
        self._show_volume(node)
        if self.session.results() is not None:  # the heat map, where on, stays over whichever input is shown
            self.session.show_disagreement(self.choices.show_disagreement, self.choices.disagreement_opacity)

    def _on_window_preset(self, window_preset="Auto", **_):
        try:
            self.choices.window_preset = page_state.as_choice("the window", window_preset, WINDOW_PRESETS)
        except ReviewError as e:
            self._refuse(e, window_preset=self.choices.window_preset)
            return
        self._apply_window()

    def _apply_window(self):
        try:
            self.session.set_window(self.choices.window_preset)
        except ReviewError as e:
            self._fail(str(e))

    def goto_point(self):
        """Centre every slice view on a typed RAS point (Slicer's "jump slices", centred)."""
        try:
            r, a, s = parse_ras(self.state.goto_text)
        except ReviewError as e:
            self._fail(str(e))
            return
        self.state.error_message = ""
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.slicer_app.scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    # ------------------------------------------------------------------------------------------ clicks

    def _click_list(self):
        """The markups point list every click lands in; persistent place mode, as in the Slicer module."""
        scene = self.slicer_app.scene
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "ARSeg clicks")
        node.SetAttribute(mrml.ROLE_ATTRIBUTE, "clicks")
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*CLICK_COLOR)
        display.SetColor(*CLICK_COLOR)
        display.SetPointLabelsVisibility(False)
        display.SetGlyphScale(1.5)
        node.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._on_point_placed)
        self.slicer_app.markups_logic.place_node(node, persistent=True)
        return node

    def _on_point_placed(self, node, _event):
        n = node.GetNumberOfControlPoints()
        if n == 0:
            return
        point = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n - 1, point)
        self._click_started = time.perf_counter()
        kind = self.choices.prompt_mode
        if self._shift_held():  # Shift+click: _on_shift_click's (Slicer's place mode does not place it anyway)
            kind = None
        with self.state:
            if kind == "click":
                self.start_run(tuple(point))
            elif kind is not None:  # a point on the selected nodule: it refines that nodule
                self._start(self.session.refine_at, kind, tuple(point))
        # keep only the latest point: it marks where the current result was asked for
        for i in range(n - 2, -1, -1):
            node.RemoveNthControlPoint(i)

    def _shift_held(self) -> bool:
        """Shift held at the click, as the slice view's interactor got it from the browser's event."""
        return any(view.interactor().GetShiftKey() for view in self.slicer_app.view_manager.get_slice_views())

    def _observe_shift_clicks(self):
        """Shift+click in a slice view: an exclude point on the selected nodule, whatever the toggle says. Slicer's
        place mode places no point on a Shift+click, so the press is read here, at the view's own slice plane."""
        for view in self.slicer_app.view_manager.get_slice_views():
            view.interactor().AddObserver(vtk.vtkCommand.LeftButtonPressEvent,
                                          lambda interactor, _event, view=view: self._on_shift_click(view, interactor),
                                          SHIFT_CLICK_PRIORITY)

    def _on_shift_click(self, view, interactor):
        if not interactor.GetShiftKey():
            return
        slice_node = view.get_view_node()
        x, y = interactor.GetEventPosition()
        ras = slice_node.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3]
        self._click_started = time.perf_counter()
        with self.state:
            self._start(self.session.refine_at, "exclude", tuple(ras))

    def start_run(self, point_ras=None):
        self._start(self.session.start, point_ras)

    def lock_scales(self):
        """"Resample finer than this scale": the scale on show (checked value) from the picked sample."""
        self._click_started = time.perf_counter()
        self._start(self.session.lock_finer_than, self.choices.scale, self.choices.sample_pick or None)

    def use_sample(self):
        self._click_started = time.perf_counter()
        if not self.choices.sample_pick:
            self._fail("choose a sample in the sample picker first, then use it")
            return
        self._start(self.session.use_sample, self.choices.sample_pick)

    def _start(self, action, *args):
        """A click's run or a refinement's: refused with its message (nothing started), or started and polled."""
        try:
            action(*args)
        except (ReviewError, ValueError) as e:
            self._fail(user_message(e))
            return
        self.state.error_message = ""
        self._publish_status()
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = create_task(self._poll_until_done())

    def start_whole_volume(self):
        self._click_started = time.perf_counter()
        self.start_run(None)

    def cancel_run(self):
        self.session.cancel()
        self._publish_status()

    async def _poll_until_done(self):
        while True:
            status = self.session.poll()
            with self.state:
                self._publish_status()
                if not status.running:
                    if status.state == "done":
                        self._refresh_results()
                        self.state.timings = dict(status.seconds,
                                                  click_to_overlay=round(time.perf_counter() - self._click_started, 3))
                        print(f"arseg view: {status.message} (seconds: {self.state.timings})", flush=True)
                    break
            await asyncio.sleep(POLL_S)
        if status.state == "done":
            # the 3D view's surfaces after the 2D overlay is on its way: they take a while and are seen second
            await asyncio.sleep(0)
            nodes = self.session.results()
            if nodes is not None:
                nodes.segmentation.CreateClosedSurfaceRepresentation()

    def _publish_status(self):
        status = self.session.status
        self.state.run_state = status.state
        self.state.run_fraction = round(100 * status.fraction)
        self.state.run_message = status.message
        if status.state == "failed":
            self.state.error_message = status.message

    # ------------------------------------------------------------------------------------------ results

    def _refresh_results(self):
        s = self.state
        nodes = self.session.results()
        s.has_result = nodes is not None
        s.n_scales = self.session.n_scales()
        s.scale = s.n_scales
        s.report_rows = self.session.report_rows()
        s.region_result = self.session.has_regions()
        s.regions = [dict(r, shown=self.session.region_shown(r["id"])) for r in self.session.regions()]
        prompts = self.session.nodule_prompts()
        s.nodules = [{"id": n.id, "name": n.name, "volume": f"{n.consensus_volume_mm3:.0f}", "selected": n.selected,
                      "prompts": "; ".join(prompts.get(n.id, [])[1:])}  # the refinements after its click
                     for n in self.session.nodules()]
        s.n_samples = self.session.n_samples()
        if self.choices.sample_pick > s.n_samples:
            self.choices.sample_pick = 0
        s.sample_pick = self.choices.sample_pick
        s.can_undo = self.session.can_undo()
        s.n_samples_kept = self.session.samples_kept()
        s.sample_shown = self.choices.sample_shown = 0
        self.choices.scale = s.scale
        if nodes is not None:  # the checked values, never the raw state: a client may have set anything there
            self.session.show_disagreement(self.choices.show_disagreement, self.choices.disagreement_opacity)

    def toggle_region(self, sid=None):
        """Show or hide one region segment of a several-input result."""
        try:
            sid = page_state.as_nodule_id(sid)
            self.session.show_region(sid, not self.session.region_shown(sid))
        except ReviewError as e:
            self._fail(str(e))
            return
        self.state.regions = [dict(r, shown=self.session.region_shown(r["id"])) for r in self.session.regions()]

    def select_nodule(self, nid=None):
        self._nodule_action(self.session.select_nodule, nid)

    def delete_nodule(self, nid=None):
        self._nodule_action(self.session.delete_nodule, nid)

    def clear_nodules(self):
        self._nodule_action(self.session.clear_nodules)
        self._clicks.RemoveAllControlPoints()

    def undo(self):
        try:
            what = self.session.undo()
        except ReviewError as e:
            self._fail(str(e))
            return
        self.state.error_message = ""
        self.state.run_message = f"Undone: {what}."
        self._refresh_results()

    def _nodule_action(self, action, *args):
        try:
            action(*(page_state.as_nodule_id(a) for a in args))
        except ReviewError as e:
            self._fail(str(e))
            return
        self.state.error_message = ""
        self._refresh_results()

    def _on_scale(self, scale=0, **_):
        n = self.session.n_scales()
        if self.session.results() is None or n == 0:  # no result: nothing to scrub; the slider is hidden
            if scale != self.choices.scale:
                self.state.scale = self.choices.scale
            return
        try:
            k = page_state.as_index("the scale", scale, 1, n)
        except ReviewError as e:
            self._refuse(e, scale=self.choices.scale)
            return
        try:
            self.session.select_scale(k)
        except (ReviewError, IndexError) as e:
            self._fail(str(e))
            return
        self.choices.scale = k

    def _on_disagreement(self, show_disagreement=False, disagreement_opacity=0.5, **_):
        try:
            show = page_state.as_bool("the disagreement heat map", show_disagreement)
            opacity = page_state.as_fraction("the heat map's opacity", disagreement_opacity)
        except ReviewError as e:
            self._refuse(e, show_disagreement=self.choices.show_disagreement,
                         disagreement_opacity=self.choices.disagreement_opacity)
            return
        self.choices.show_disagreement, self.choices.disagreement_opacity = show, opacity
        self.session.show_disagreement(show, opacity)

    def _on_include_samples(self, include_samples=False, **_):
        try:
            self.choices.include_samples = page_state.as_bool("keeping the samples", include_samples)
        except ReviewError as e:
            self._refuse(e, include_samples=self.choices.include_samples)
            return
        self.session.settings.include_samples = self.choices.include_samples

    def _on_prompt_mode(self, prompt_mode="click", **_):
        try:
            self.choices.prompt_mode = page_state.as_choice("what a click does", prompt_mode, PROMPT_MODES)
        except ReviewError as e:
            self._refuse(e, prompt_mode=self.choices.prompt_mode)

    def _on_sample_pick(self, sample_pick=0, **_):
        try:
            self.choices.sample_pick = page_state.as_index("the sample picked", 0 if sample_pick is None else
                                                           sample_pick, 0, self.session.n_samples())
        except ReviewError as e:
            self._refuse(e, sample_pick=self.choices.sample_pick)
            return
        if 0 < self.choices.sample_pick <= self.session.samples_kept():  # kept: show it over the CT as well
            self.state.sample_shown = self.choices.sample_pick

    def _on_sample_shown(self, sample_shown=0, **_):
        if self.session.results() is None:
            return
        try:
            i = page_state.as_index("the sample shown", 0 if sample_shown is None else sample_shown, 0,
                                    self.session.samples_kept())
            self.session.show_sample(i)
        except ReviewError as e:
            self._refuse(e, sample_shown=self.choices.sample_shown)
            return
        self.choices.sample_shown = i

    def download_segmentation(self):
        try:
            return self.server.protocol.addAttachment(self.session.segmentation_bytes())
        except (ReviewError, mrml.ResultError) as e:
            self._fail(str(e))
            return None

    def download_report(self):
        try:
            return self.server.protocol.addAttachment(self.session.report_bytes())
        except ReviewError as e:
            self._fail(str(e))
            return None

    def _on_client_exited(self, *_args, **_kwargs):
        # a page closed mid-run: the run finishes (or is cancelled) in the client and its result is written
        # when polled; nothing of the server's state depends on the page that left
        log.info("a page disconnected; run state %s", self.session.status.state)

    # ------------------------------------------------------------------------------------------ UI

    def _build_ui(self):
        ctrl = self.server.controller
        with SinglePageWithDrawerLayout(self.server, theme="dark") as layout:
            self.ui = layout
            client.Style("html { overflow-y: auto; } .arseg-panel .v-label { font-size: 0.85rem; }")
            layout.title.set_text(self.title)
            layout.drawer.width = 340
            with layout.toolbar:
                v3.VSpacer()
                html.Span("{{ run_message }}", id="arseg-run-message", classes="text-caption mr-4")
                html.Span("{{ run_state }}", id="arseg-run-state", style="display: none")
                html.Span("{{ JSON.stringify(timings) }}", id="arseg-timings", style="display: none")
            with layout.drawer, html.Div(classes="arseg-panel pa-3 d-flex flex-column", style="gap: 10px"):
                v3.VSelect(id="arseg-volume", label="Volume", items=("volume_choices",), v_model=("volume_key",),
                           density="compact", hide_details=True, disabled=("run_state === 'running'",))
                html.Div("Click on a nodule in a slice view to segment it: a click outside the nodules so far adds "
                         "one, a click inside one redoes it. Include / Exclude: a click adds that point to the "
                         "selected nodule and refines it (Shift+click: an exclude point).", classes="text-caption",
                         v_show="(volume_loaded || volume_key) && !several_inputs")
                html.Div("Each case is its model's inputs together ({{ input_choices.map(i => i.title).join(' + ') "
                         "}}); Segment whole volume segments the case into its regions.", classes="text-caption",
                         v_show="(volume_loaded || volume_key) && several_inputs")
                with html.Div(classes="d-flex align-center", style="gap: 6px", v_show="input_choices.length > 1"):
                    html.Span("Show", classes="text-caption")
                    with v3.VBtnToggle(id="arseg-input-shown", v_model=("input_shown",), mandatory=True,
                                       density="compact", divided=True, variant="outlined"):
                        v3.VBtn("{{ i.title }}", v_for="i in input_choices", key="i.value", value=("i.value",),
                                size="small")
                with v3.VBtnToggle(id="arseg-prompt-mode", v_model=("prompt_mode",), mandatory=True,
                                   density="compact", divided=True, variant="outlined",
                                   v_show="(volume_loaded || volume_key) && !several_inputs"):
                    for mode, title in PROMPT_MODES.items():
                        v3.VBtn(title, id=f"arseg-mode-{mode}", value=mode, size="small")
                v3.VSelect(id="arseg-window", label="Window", items=("window_presets",), v_model=("window_preset",),
                           density="compact", hide_details=True)
                with html.Div(classes="d-flex", style="gap: 6px"):
                    v3.VTextField(id="arseg-goto", label="Go to R, A, S (mm)", v_model=("goto_text",),
                                  density="compact", hide_details=True, keyup_enter=self.goto_point)
                    v3.VBtn("Go", id="arseg-goto-button", click=self.goto_point, density="compact",
                            disabled=("!volume_key",))
                with html.Div(v_if="run_state === 'running'", classes="d-flex align-center", style="gap: 8px"):
                    v3.VProgressLinear(id="arseg-progress", model_value=("run_fraction",), height=8, rounded=True,
                                       color="amber")
                    v3.VBtn("Cancel", id="arseg-cancel", click=self.cancel_run, density="compact", color="red")
                v3.VBtn("Segment whole volume", id="arseg-whole-volume", v_if="whole_volume_allowed",
                        click=self.start_whole_volume, density="compact",
                        disabled=("!volume_key || run_state === 'running'",))
                v3.VAlert(id="arseg-error", v_if="error_message", text=("error_message",), type="warning",
                          density="compact", closable=True, click_close="error_message = ''")
                with html.Div(v_if="nodules.length", classes="d-flex flex-column", style="gap: 2px"):
                    with html.Div(classes="d-flex align-center"):
                        html.Span("Nodules", classes="text-body-2")
                        v3.VSpacer()
                        v3.VBtn("Undo", id="arseg-undo", v_if="can_undo", click=self.undo, density="compact",
                                variant="text", size="small", disabled=("run_state === 'running'",))
                        v3.VBtn("Clear all", id="arseg-clear-nodules", click=self.clear_nodules, density="compact",
                                variant="text", size="small", disabled=("run_state === 'running'",))
                    with html.Div(v_for="n in nodules", key="n.id", classes="d-flex flex-column"):
                        with html.Div(classes="d-flex align-center arseg-nodule", style="gap: 4px"):
                            v3.VBtn("{{ n.name }}", click=(self.select_nodule, "[n.id]"), density="compact",
                                    size="small", variant=("n.selected ? 'flat' : 'text'",),
                                    color=("n.selected ? 'amber' : undefined",))
                            html.Span("{{ n.volume }} mm\u00b3", classes="text-caption")
                            v3.VSpacer()
                            v3.VBtn(icon="mdi-delete", click=(self.delete_nodule, "[n.id]"), density="compact",
                                    size="small", variant="text", disabled=("run_state === 'running'",))
                        html.Div("{{ n.prompts }}", v_if="n.prompts", classes="text-caption arseg-nodule-prompts",
                                 style="opacity: 0.8; padding-left: 8px")
                with html.Div(v_if="regions.length", id="arseg-regions", classes="d-flex flex-column",
                              style="gap: 2px"):
                    html.Span("Regions (consensus, samples' range)", classes="text-body-2")
                    with html.Div(v_for="r in regions", key="r.id", classes="d-flex align-center arseg-region",
                                  style="gap: 4px"):
                        v3.VBtn(icon=("r.shown ? 'mdi-eye' : 'mdi-eye-off'",), click=(self.toggle_region, "[r.id]"),
                                density="compact", size="small", variant="text")
                        html.Span("{{ r.name }}", classes="text-body-2")
                        v3.VSpacer()
                        html.Span("{{ r.volume }} mL ({{ r.samples }})", classes="text-caption")
                with html.Div(v_if="has_result", classes="d-flex flex-column", style="gap: 6px"):
                    html.Div("Scale {{ scale }}/{{ n_scales }}", id="arseg-scale-label", classes="text-body-2",
                             v_if="!region_result")
                    v3.VSlider(id="arseg-scale", classes="arseg-scale", v_model=("scale",), min=1, max=("n_scales",),
                               step=1, show_ticks="always", hide_details=True, density="compact",
                               v_if="!region_result")
                    with html.Div(classes="d-flex flex-column", style="gap: 4px", v_if="!region_result"):
                        v3.VSelect(id="arseg-sample-pick", label="Sample", v_model=("sample_pick",),
                                   items=("[{title: 'most typical', value: 0}].concat(Array.from({length: n_samples}, "
                                          "(_, i) => ({title: 'Sample ' + (i + 1), value: i + 1})))",),
                                   density="compact", hide_details=True)
                        with html.Div(classes="d-flex", style="gap: 6px"):
                            v3.VBtn("Resample finer than this scale", id="arseg-lock-scales", click=self.lock_scales,
                                    density="compact", size="small", disabled=("run_state === 'running'",))
                            v3.VBtn("Use this sample", id="arseg-use-sample", click=self.use_sample,
                                    density="compact", size="small", disabled=("run_state === 'running'",))
                    v3.VSwitch(id="arseg-disagreement", label="Disagreement heat map", v_model=("show_disagreement",),
                               hide_details=True, density="compact", color="red")
                    v3.VSlider(id="arseg-disagreement-opacity", label="Opacity", v_model=("disagreement_opacity",),
                               min=0, max=1, step=0.05, hide_details=True, density="compact",
                               disabled=("!show_disagreement",))
                    v3.VSelect(id="arseg-sample", v_if="n_samples_kept > 0", label="Show sample",
                               v_model=("sample_shown",),
                               items=("[{title: 'none', value: 0}].concat(Array.from({length: n_samples_kept}, "
                                      "(_, i) => ({title: 'Sample ' + (i + 1), value: i + 1})))",),
                               density="compact", hide_details=True)
                    with html.Div(classes="d-flex", style="gap: 6px"):
                        v3.VBtn("Segmentation", id="arseg-download-seg", prepend_icon="mdi-download",
                                density="compact", click=_download("download_stem + '.seg.nrrd'",
                                                                   ctrl.trigger_name(self.download_segmentation),
                                                                   "application/octet-stream"))
                        v3.VBtn("Report", id="arseg-download-report", prepend_icon="mdi-download", density="compact",
                                click=_download("download_stem + '-report.json'",
                                                ctrl.trigger_name(self.download_report), "application/json"))
                    with v3.VTable(id="arseg-report", density="compact", classes="text-caption",
                                   style="max-height: 40vh; overflow-y: auto"):
                        with html.Tbody():
                            with html.Tr(v_for="row in report_rows", key="row.measure"):
                                html.Td("{{ row.measure }}")
                                html.Td("{{ row.value }} {{ row.unit }}")
                v3.VCheckbox(id="arseg-include-samples", label="Keep the samples of the next run",
                             v_model=("include_samples",), hide_details=True, density="compact",
                             v_if="!several_inputs")
            with layout.content:
                self.layout_manager.initialize_layout_grid(layout)

