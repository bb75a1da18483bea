"""ARSeg: click-to-segment with an autoregressive next-scale model; every scale, samples, consensus, disagreement.

The module is the GUI only. Everything else is ARSegLib: `runs` (the run service every run goes through: checked
once, run in the worker, applied to the scene), `worker` (the persistent inference process: Slicer's
main thread holds Python's GIL inside Qt's event loop, so inference runs in a process of its own, started with
Slicer's Python, that keeps the model loaded), `pipeline` (volume <-> crops, the 3D component), `mrml` (the
nodes), `models` (the model cards). Slicer's process never imports torch. The same calls serve the console:

    logic = ARSegLogic()
    nodes = logic.segment(volumeNode, point=(R, A, S))           # or point=None: the whole volume
    nodes = logic.segment({"flair": f, "t1ce": t}, model="brats-glioma")   # several inputs: whole volume, per region
    nodes = logic.refine(volumeNode, 1, exclude=[(R, A, S)])     # refine nodule 1 (also include, lock_scales, sample)
    reports = logic.segmentFiles(["a.nrrd", "b.nrrd"], "/tmp/out")

On a fresh install, `ARSegLogic().setupPythonRequirements()` installs torch and the other packages first (the
module's first click does it too); the console calls say so when they are missing.
"""

import dataclasses
import logging
import os
import shutil
import sys
import traceback
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PYTHON_PACKAGES = {"safetensors": "safetensors", "scipy": "scipy"}  # import name -> pip requirement
MINIMUM_TORCH = (2, 1)  # scaled_dot_product_attention with masks, inference_mode, safetensors' torch API
SETUP_CALL = "ARSegLogic().setupPythonRequirements()"


class PythonRequirementsError(RuntimeError):
    """The Python packages ARSeg's worker needs are missing or too old (the console API says so before any work)."""


def _ensureLibraryOnPath():
    """ARSegLib sits beside this file in an installed extension, one level up in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(folder, "ARSegLib")) and folder not in sys.path:
            sys.path.insert(0, folder)
            return


_ensureLibraryOnPath()

from ARSegLib import limits  # noqa: E402 (found once the library is on the path; imports nothing itself)
from ARSegLib.models import DEFAULT_MODEL  # noqa: E402 (the standard library only: no torch, no numpy)


def reimportLibrary():
    """Import every ARSegLib module that Slicer's process holds anew, in the order they were first imported.

    Reload (developer mode) re-runs ARSeg.py only; without this, Slicer would keep the old ARSegLib while the
    restarted worker imports the new one. Done as Slicer's WebServer module reloads its helper package, WebServerLib
    (every module, not a list of them, so a new one cannot be forgotten); only modules already imported are, so
    this imports no torch. Returns their names."""
    import importlib

    names = [name for name in sys.modules if name == "ARSegLib" or name.startswith("ARSegLib.")]
    for name in names:
        del sys.modules[name]
    for name in names:
        importlib.import_module(name)
    return names


#
# ARSeg
#


class ARSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ARSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Sequences", "Markups", "Segmentations"]
        self.parent.contributors = ["ARSeg developers"]
        self.parent.helpText = """
Click on a lung nodule: ARSeg segments it with an autoregressive next-scale model (AR-Seg) and shows the whole
reasoning: the mask after every coarse-to-fine scale (scale slider), several plausible samples, their consensus
and where they disagree (heat map). <b>Segment whole volume</b> runs every slice.
From the Python console: <code>ARSegLogic().segment(volumeNode, point=(R, A, S))</code>,
<code>ARSegLogic().segmentFiles(paths, outputDir)</code>.
"""
        self.parent.acknowledgementText = """
AR-Seg: autoregressive medical image segmentation by next-scale mask prediction. The shipped lung-nodule model
was trained on LIDC-IDRI (The Cancer Imaging Archive, CC BY 3.0).
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled demo (a slab of LIDC-IDRI-0001 around its nodule, shipped with the extension) in Sample Data.

    The module's button loads the file itself (customDownloader); the console's SampleData.downloadSample copies
    it into Slicer's cache first and, without a checksum, reuses whatever file of that name the cache holds (an
    older extension's demo): the checksum makes it compare and copy again (SampleDataLogic.downloadFile)."""
    import SampleData

    from ARSegLib.demo import DEMO_NAME, demo_volume_path, sample_data_source

    try:
        path = demo_volume_path()
        source = sample_data_source()  # uris, fileNames, loadFileType, checksums ("SHA256:...")
    except FileNotFoundError as e:
        logging.warning(f"ARSeg: {e}")
        return
    source["nodeNames"] = DEMO_NAME  # the node's name as the module's button gives it
    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "ARSeg.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        **source, thumbnailFileName=icon,
        customDownloader=lambda source: slicer.util.loadVolume(str(path), {"name": DEMO_NAME}))


#
# Parameters
#


@parameterNodeWrapper
class ARSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    model: str = DEFAULT_MODEL
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    # the limits and defaults are the run settings' own (ARSegLib.limits, which pipeline.SegmentSettings checks);
    # the wrapper sets the spin boxes' ranges from them
    samples: Annotated[int, WithinRange(1, limits.MAX_SAMPLES)] = limits.DEFAULT_SAMPLES
    temperature: Annotated[float, WithinRange(0.0, limits.MAX_TEMPERATURE)] = 0.0  # 0: the card's, as validated
    seed: Annotated[int, WithinRange(0, min(limits.MAX_SEED, 2 ** 31 - 1))] = 0  # a QSpinBox holds a C int
    halfHeightMm: Annotated[float, WithinRange(0.0, limits.MAX_HALF_HEIGHT_MM)] = limits.DEFAULT_HALF_HEIGHT_MM
    includeSamples: bool = False
    fastSampling: bool = False  # no test-time views or candidate selection: about twice as fast


#
# ARSegWidget
#


class ARSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI: inputs, click place mode, whole-volume button, progress and cancel, scale slider, heat toggle.

    Inference runs in ARSeg's worker process; a 25 ms timer polls it (`WorkerRun.poll` never blocks), so the
    main thread only reads the volume when a click starts and writes the nodes when the result arrives."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the WorkerRun in flight
        self._runVolume = None
        self._runIncludeSamples = False  # read when the run starts: the parameter node may be gone when it ends
        self._pendingPoint = None  # a point placed while a run was in flight: it runs next
        self._pendingRefinement = None  # or a refinement asked for meanwhile (refine's keywords, nodule included)
        self._clickNode = None
        self._promptNodes = {}  # "include" / "exclude" -> the point list its place widget adds to
        self._noduleIds = []  # the nodule list's rows
        self._extraInputs = []  # (input name, title, label, selector) of the model's inputs after the first
        self._inputsShown = None  # the (name, title) inputs the selectors show; None: the .ui's one
        self._undoShortcut = None  # Ctrl+Z: the Undo button's onUndo, active while the module is entered

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ARSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ARSegLogic()

        self.ui.modelComboBox.addItems(self.logic.availableModels())
        self.ui.modelComboBox.connect("currentTextChanged(QString)", self.onModelChanged)
        place = self.ui.clickPlaceWidget
        place.setMRMLScene(slicer.mrmlScene)
        place.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        place.buttonsVisible = False
        place.placeButton().show()
        place.placeButton().text = "Click to segment"
        # a QToolButton shows only its icon unless its style says otherwise
        place.placeButton().toolButtonStyle = qt.Qt.ToolButtonTextBesideIcon

        # the selected nodule's extra points: "include" (its samples must all mark it), "exclude" (none may)
        for place, text in ((self.ui.includePlaceWidget, "Add to nodule"), (self.ui.excludePlaceWidget, "Not this")):
            place.setMRMLScene(slicer.mrmlScene)
            place.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
            place.buttonsVisible = False
            place.placeButton().show()
            place.placeButton().text = text
            place.placeButton().toolButtonStyle = qt.Qt.ToolButtonTextBesideIcon
        self.ui.resampleFinerButton.clicked.connect(self.onResampleFiner)
        self.ui.sampleSlider.valueChanged.connect(self.onSampleChanged)
        self.ui.useSampleButton.clicked.connect(self.onUseSample)
        self.ui.segmentWholeVolumeButton.clicked.connect(self.onSegmentWholeVolume)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.scaleSlider.valueChanged.connect(self.onScaleChanged)
        self.ui.disagreementCheckBox.toggled.connect(self.onDisagreementToggled)
        self.ui.showSamplesCheckBox.toggled.connect(self.onShowSamplesToggled)
        self.ui.noduleList.currentRowChanged.connect(self.onNoduleSelected)
        self.ui.deleteNoduleButton.clicked.connect(self.onDeleteNodule)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.installUndoShortcut()
        self.ui.clearNodulesButton.clicked.connect(self.onClearNodules)
        # the results follow the input volume through the parameter node's ModifiedEvent (setParameterNode), not
        # the selector's currentNodeChanged: Qt calls slots in connection order, and that signal reaches a slot
        # connected here before the parameter node wrapper has stored the new volume

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(25)  # the result shows at most 25 ms after inference ends
        self._pollTimer.timeout.connect(self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.updateResultsGui)
        self.initializeParameterNode()
        self.setRunning(False)

    def cleanup(self) -> None:
        """Slicer quitting or the module reloaded: stop the run and the worker process (which holds the model and
        all of inference's memory; Slicer's own process never had either)."""
        if self._run is not None:
            self._run.cancel()
            self._run = None
        self._pollTimer.stop()
        self.removeObservers()
        self.removeUndoShortcut()
        self.logic.stopWorker()

    def enter(self) -> None:
        if self._undoShortcut is not None:
            self._undoShortcut.enabled = True
        self.initializeParameterNode()
        self.startPreload()

    def installUndoShortcut(self) -> None:
        """Ctrl+Z (the platform's Undo keys) runs the Undo button's onUndo while ARSeg is the module shown: one
        QShortcut on the main window, as Segment Editor installs its own Ctrl+Z (in its enter, removed in its exit),
        so that it works with the focus in a slice view; enabled by enter and disabled by exit, so that Ctrl+Z
        belongs to Segment Editor (or any other module) when that module is shown. Created disabled, unless the
        module is shown already (a developer's Reload calls setup, not enter)."""
        self.removeUndoShortcut()
        mainWindow = slicer.util.mainWindow()  # None in Slicer without its main window: the module's panel then
        parent = mainWindow if mainWindow is not None else self.parent
        self._undoShortcut = qt.QShortcut(qt.QKeySequence(qt.QKeySequence.Undo), parent)
        self._undoShortcut.enabled = bool(self.parent is not None and self.parent.isEntered)
        self._undoShortcut.activated.connect(self.onUndo)

    def removeUndoShortcut(self) -> None:
        """Module reload or Slicer quitting: the main window would otherwise keep a second Ctrl+Z (ambiguous)."""
        if self._undoShortcut is None:
            return
        self._undoShortcut.enabled = False
        self._undoShortcut.activated.disconnect(self.onUndo)
        self._undoShortcut.setParent(None)
        self._undoShortcut = None

    def onReload(self) -> None:
        """Developer mode's Reload: stop the worker with the code that started it (the reloaded module's cleanup
        would ask a fresh ARSegLib.worker, which knows no worker), import ARSegLib anew, then reload ARSeg.py."""
        self.logic.stopWorker()
        reimportLibrary()
        ScriptedLoadableModuleWidget.onReload(self)

    def exit(self) -> None:
        if self._undoShortcut is not None:
            self._undoShortcut.enabled = False
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateResultsGui)

    def onSceneStartClose(self, caller, event) -> None:
        # a run in flight is dropped: its volume is leaving with the scene
        if self._run is not None:
            self._run.cancel()
            self._run = None
            self._pollTimer.stop()
            self.setRunning(False)
        self._pendingPoint = None
        self._pendingRefinement = None
        self._runVolume = None
        self.setParameterNode(None)
        self._clickNode = None
        self._promptNodes = {}

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.GetAttribute("ARSeg.Role"):
                self._parameterNode.inputVolume = first
        clickNode = self.logic.clickMarkupsNode()
        event = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        if self._clickNode is not None and self.hasObserver(self._clickNode, event, self.onPointPlaced):
            self.removeObserver(self._clickNode, event, self.onPointPlaced)
        self._clickNode = clickNode
        self.ui.clickPlaceWidget.setCurrentNode(clickNode)
        if not self.hasObserver(clickNode, event, self.onPointPlaced):
            self.addObserver(clickNode, event, self.onPointPlaced)
        for kind, place in (("include", self.ui.includePlaceWidget), ("exclude", self.ui.excludePlaceWidget)):
            node, old = self.logic.promptMarkupsNode(kind), self._promptNodes.get(kind)
            if old is not None and self.hasObserver(old, event, self.onPromptPointPlaced):
                self.removeObserver(old, event, self.onPromptPointPlaced)
            self._promptNodes[kind] = node
            place.setCurrentNode(node)
            if not self.hasObserver(node, event, self.onPromptPointPlaced):
                self.addObserver(node, event, self.onPromptPointPlaced)

    def setParameterNode(self, inputParameterNode: Optional[ARSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateResultsGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateResultsGui)
            index = self.ui.modelComboBox.findText(self._parameterNode.model)
            if index >= 0:
                self.ui.modelComboBox.currentIndex = index
        self.updateInputSelectors()
        self.updateModesGui()
        self.updateResultsGui()

    def onModelChanged(self, text) -> None:
        if self._parameterNode and text:
            self._parameterNode.model = text
            self.updateInputSelectors()
            self.updateModesGui()
            if self.parent.isEntered:
                self.startPreload()

    # --- inputs: one volume selector per input the model's card names

    def updateInputSelectors(self) -> None:
        """One volume selector per input of the model's card: the .ui's for the first (bound to the parameter node),
        built here for the others (a one-input card, the lung model's, shows the .ui's alone). Each is preselected
        when the scene holds a volume named like its input (FLAIR, "t1ce.nii", "case_flair")."""
        model = self._parameterNode.model if self._parameterNode else DEFAULT_MODEL
        inputs = self.logic.modelInputs(model)
        several = len(inputs) > 1
        if inputs != self._inputsShown and (several or self._inputsShown is not None):  # the .ui shows one input
            layout = self.ui.inputsCollapsibleButton.layout()
            for _, _, _, selector in self._extraInputs:
                layout.removeRow(selector)  # deletes the row's label and selector
            self._extraInputs = []
            for row, (name, title) in enumerate(inputs[1:], 1):
                label, selector = self._newInputSelector(name, title)
                layout.insertRow(row, label, selector)
                self._extraInputs.append((name, title, label, selector))
            self.ui.inputVolumeLabel.text = f"{inputs[0][1]} volume:" if several else "Input volume:"
            self._hideOwnVolumesFromInput()
        self._inputsShown = inputs
        if not several:
            return
        named = self.logic.inputsNamedLike(slicer.mrmlScene, model)
        first = named.get(inputs[0][0])
        p = self._parameterNode
        if p is not None and first is not None and (not p.inputVolume or p.inputVolume in named.values()):
            p.inputVolume = first  # the volume called FLAIR, not the one called T1ce, is the first input
        for name, _, _, selector in self._extraInputs:
            if selector.currentNode() is None and named.get(name) is not None:
                selector.setCurrentNode(named[name])

    def _newInputSelector(self, name: str, title: str):
        """(label, selector) for an input after the first."""
        label = qt.QLabel(f"{title} volume:")
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        selector.showChildNodeTypes = False
        selector.addEnabled = selector.removeEnabled = False
        selector.noneEnabled = True
        selector.setMRMLScene(slicer.mrmlScene)
        selector.toolTip = (f"The {title} volume (the model's input {name!r}). On another grid than the first "
                            f"input's, it is resampled onto that grid (the status says so).")
        return label, selector

    def _selectedInputs(self):
        """The input volume node, or, for a model of several inputs, {input name: node}: each must be selected."""
        p = self._parameterNode
        inputs = self.logic.modelInputs(p.model)
        if not p.inputVolume:
            raise ValueError(f"Select the {inputs[0][1]} volume first." if len(inputs) > 1 else
                             "Select an input volume first.")
        if not self._extraInputs:
            return p.inputVolume
        volumes = {inputs[0][0]: p.inputVolume}
        for name, title, _, selector in self._extraInputs:
            if selector.currentNode() is None:
                raise ValueError(f"Select the {title} volume first.")
            volumes[name] = selector.currentNode()
        return volumes

    def updateModesGui(self) -> None:
        """Whole-volume mode only for models whose card says they were trained and validated for it."""
        model = self._parameterNode.model if self._parameterNode else DEFAULT_MODEL
        allowed, why = self.logic.wholeVolumeAllowed(model)
        running = self._run is not None
        self.ui.segmentWholeVolumeButton.enabled = allowed and not running
        self.ui.segmentWholeVolumeButton.toolTip = ("Run every axial slice of the volume (minutes on a CPU)."
                                                    if allowed else why)

    def startPreload(self) -> None:
        """Start the worker process and load the chosen model there when the Python packages are already installed
        (and torch is new enough), so that the first click waits for neither. Never asks to install (the first
        click does): a worker started on an old torch would hold its files while the click upgrades it (on
        Windows pip cannot delete a DLL a live process maps). A worker that fails to start is logged; the click
        that needs it shows the error."""
        p = self._parameterNode
        if not p or self.logic.pythonRequirementsProblem() is not None:
            return
        try:
            self.logic.preload(p.model, p.device)
        except Exception as e:
            logging.warning(f"ARSeg: could not start the inference process: {e}")

    # --- running

    def onPointPlaced(self, caller, event) -> None:
        n = caller.GetNumberOfControlPoints()
        if n == 0:
            return
        position = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(n - 1, position)
        if self._run is not None:
            self._pendingPoint = tuple(position)  # the newest click wins; it runs when this one ends
            self._pendingRefinement = None
            return
        self.startRun(tuple(position))

    def onSegmentWholeVolume(self) -> None:
        self.startRun(None)

    def startRun(self, point) -> None:
        try:
            self._startRun(point)
        except Exception:  # tryWithErrorDisplay has shown it: re-raised, it would print a traceback beside the dialog
            self.ui.statusLabel.text = "Failed."

    def _startRun(self, point) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("ARSeg could not start the segmentation.", waitCursor=True):
            if not p:
                raise ValueError("Select an input volume first.")
            volumes = self._selectedInputs()
            if not self.logic.setupPythonRequirements():
                return
            self._run = self.logic.startSegmentation(volumes, point, model=p.model, device=p.device,
                                                     samples=p.samples, seed=p.seed, halfHeightMm=p.halfHeightMm,
                                                     temperature=p.temperature if p.temperature > 0 else None,
                                                     fast=bool(p.fastSampling))
            self._runVolume = p.inputVolume
            self._runIncludeSamples = bool(p.includeSamples)
            where = "whole volume" if point is None else "R {:.1f}, A {:.1f}, S {:.1f}".format(*point)
            notes = list(getattr(getattr(self._run, "request", None), "input_notes", ()))  # inputs resampled
            for note in notes:
                logging.info(f"ARSeg: {note}")
            self.ui.statusLabel.text = " ".join([f"Segmenting ({where})..."] + [f"Note: {n}." for n in notes])
            self.setRunning(True)
            self._pollTimer.start()

    def onCancel(self) -> None:
        self._pendingPoint = None
        self._pendingRefinement = None
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling..."

    def onPoll(self) -> None:
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        if not run.poll():
            self.ui.progressBar.value = int(100 * run.fraction)
            self._showOutline(run)
            return
        # finished: whatever happens below, the next click must find the module idle and no stale point queued
        self._pollTimer.stop()
        self._run = None
        self.setRunning(False)
        volume, self._runVolume = self._runVolume, None
        point, self._pendingPoint = self._pendingPoint, None
        refinement, self._pendingRefinement = self._pendingRefinement, None
        try:
            if run.cancelled:
                self.ui.statusLabel.text = "Cancelled."
            elif run.error is not None:
                self.ui.statusLabel.text = "Failed."
                slicer.util.errorDisplay(f"ARSeg failed: {run.error}")
            elif volume is None or volume.GetScene() is None:
                self.ui.statusLabel.text = "The volume was removed before the result arrived."
            else:
                nodes = self.logic.applyResult(volume, run.result, includeSamples=self._runIncludeSamples,
                                               request=getattr(run, "request", None))
                seconds = run.seconds if run.seconds is not None else run.result.timings_s.get("total", 0.0)
                # a redo says what it replaced (Undo brings it back); an empty redo that kept the nodule says why
                self.ui.statusLabel.text = " ".join([f"Done in {seconds:.1f} s."] + list(nodes.notices) +
                                                    self.logic.promptNotices(run.result))
                self.showResults(nodes)
        except Exception as e:
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"ARSeg could not add its results to the scene: {e}",
                                     detailedText=traceback.format_exc())
        # the result replaced the first outline (write_result removes it); a run that wrote nothing removes it here
        if volume is not None and volume.GetScene() is not None:
            self.logic.removeOutline(volume)
        if point is not None:
            self.startRun(point)
        elif refinement is not None:
            self.startRefinement(refinement)

    def _showOutline(self, run) -> None:
        """A click's first outline, as soon as the worker sent it, until the result replaces it."""
        outline = run.take_outline() if hasattr(run, "take_outline") else None
        volume = self._runVolume
        if outline is None or volume is None or volume.GetScene() is None:
            return
        try:
            self.logic.showOutline(volume, outline)
        except Exception as e:  # a preview that cannot be drawn must not stop the run
            logging.warning(f"ARSeg: the first outline could not be shown: {e}")
            return
        self.ui.statusLabel.text += f" First outline in {run.outline_seconds:.1f} s; refining..."

    # --- refining the selected nodule (its samples steered: extra points, locked coarse scales, a sample taken)

    def onPromptPointPlaced(self, caller, event) -> None:
        """An include or exclude point placed: the selected nodule is refined with it. A point that starts nothing
        (no nodule selected, a refinement refused) is taken off the image again."""
        n = caller.GetNumberOfControlPoints()
        if n == 0:
            return
        position = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(n - 1, position)
        kind = next((k for k, node in self._promptNodes.items() if node is caller), None)
        if kind is None:
            return
        if not self.requestRefinement(**{kind: [tuple(position)]}):
            caller.RemoveNthControlPoint(n - 1)

    def onResampleFiner(self) -> None:
        """Keep scales 1..k (k: the scale slider's) of the sample shown, or of the most typical sample, and draw
        the finer scales again."""
        volume = self._selectedVolume()
        sample = self.logic.shownSample(volume) if volume is not None else None
        self.requestRefinement(lock_scales=int(self.ui.scaleSlider.value), sample=sample)

    def onUseSample(self) -> None:
        sample = int(self.ui.sampleSlider.value)
        if sample > 0:
            self.requestRefinement(sample=sample)

    def requestRefinement(self, **prompts) -> bool:
        """Refine the selected nodule (refine's keywords: include, exclude, lock_scales, sample) now, or when the
        run in flight ends (points asked for meanwhile add up; anything else replaces what was waiting). Returns
        whether it started or waits; with no nodule selected, the status says so and nothing runs."""
        volume = self._selectedVolume()
        nodule = self.logic.selectedNodule(volume) if volume is not None else None
        if nodule is None:
            self.ui.statusLabel.text = ("Select a nodule first: a refinement changes the selected nodule (click on "
                                        "the image to segment one).")
            return False
        prompts = dict(prompts, nodule=nodule.id)
        if self._run is not None:
            waiting = self._pendingRefinement
            points = ("include", "exclude")
            if waiting is not None and waiting["nodule"] == nodule.id and set(waiting) <= {"nodule", *points} and \
                    set(prompts) <= {"nodule", *points}:
                prompts = dict(waiting, **{k: list(waiting.get(k, [])) + list(prompts.get(k, [])) for k in points})
            self._pendingRefinement, self._pendingPoint = prompts, None
            self.ui.statusLabel.text = f"{nodule.name}: the refinement runs when this run ends."
            return True
        return self.startRefinement(prompts)

    def startRefinement(self, prompts) -> bool:
        try:
            return self._startRefinement(prompts)
        except Exception:  # tryWithErrorDisplay has shown it
            self.ui.statusLabel.text = "Failed."
            return False

    def _startRefinement(self, prompts) -> bool:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("ARSeg could not start the refinement.", waitCursor=True):
            if not p or not p.inputVolume:
                raise ValueError("Select an input volume first.")
            if not self.logic.setupPythonRequirements():
                return False
            self._run = self.logic.startRefinement(p.inputVolume, model=p.model, device=p.device, **prompts)
            self._runVolume = p.inputVolume
            self._runIncludeSamples = bool(p.includeSamples)
            words = self.logic.refinementWords(**{k: v for k, v in prompts.items() if k != "nodule"})
            name = self.logic.noduleName(p.inputVolume, prompts["nodule"])
            self.ui.statusLabel.text = f"Refining {name} ({words})..."
            self.setRunning(True)
            self._pollTimer.start()
        return True

    def setRunning(self, running: bool) -> None:
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        self.ui.cancelButton.enabled = running
        self.updateModesGui()

    # --- results

    def updateResultsGui(self, *args) -> None:
        self._hideOwnVolumesFromInput()
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        nodes = self.logic.results(volume) if volume else None
        self.showResults(nodes)

    def _selectedVolume(self):
        return self._parameterNode.inputVolume if self._parameterNode else None

    def updateNoduleList(self) -> None:
        """One line per nodule of the input volume; the selected one highlighted."""
        volume = self._selectedVolume()
        nodules = self.logic.nodules(volume) if volume is not None else []
        self._noduleIds = [n.id for n in nodules]
        wasBlocked = self.ui.noduleList.blockSignals(True)
        self.ui.noduleList.clear()
        for n in nodules:
            self.ui.noduleList.addItem(self.logic.noduleSummary(n))
        selected = next((i for i, n in enumerate(nodules) if n.selected), -1)
        self.ui.noduleList.setCurrentRow(selected)
        self.ui.noduleList.blockSignals(wasBlocked)
        self.ui.deleteNoduleButton.enabled = bool(nodules)
        self.ui.clearNodulesButton.enabled = bool(nodules)
        self.ui.undoButton.enabled = volume is not None and self.logic.canUndo(volume)

    def _onNoduleRow(self, row, action, what: str) -> None:
        """action(volume, nodule id) for the list's row, its returned results shown."""
        volume = self._selectedVolume()
        if volume is None or not 0 <= row < len(self._noduleIds):
            return
        with slicer.util.tryWithErrorDisplay(f"ARSeg could not {what} this nodule."):
            self.showResults(action(volume, self._noduleIds[row]))

    def onNoduleSelected(self, row) -> None:
        self._onNoduleRow(row, self.logic.selectNodule, "select")

    def onDeleteNodule(self) -> None:
        self._onNoduleRow(self.ui.noduleList.currentRow, self.logic.deleteNodule, "delete")

    def onUndo(self) -> None:
        """The Undo button and Ctrl+Z. Nothing to undo (Ctrl+Z reaches here when the button is disabled): nothing."""
        volume = self._selectedVolume()
        if volume is None or not self.logic.canUndo(volume):
            return
        with slicer.util.tryWithErrorDisplay("ARSeg could not undo its last run."):
            nodes, what = self.logic.undo(volume)
            self.ui.statusLabel.text = f"Undone: {what}."
            self.showResults(nodes)

    def onClearNodules(self) -> None:
        volume = self._selectedVolume()
        if volume is None or not slicer.util.confirmOkCancelDisplay(
                f"Remove every ARSeg result of {volume.GetName()}? Your own nodes are kept.", "ARSeg: clear all"):
            return
        with slicer.util.tryWithErrorDisplay("ARSeg could not clear its results."):
            self.logic.clearNodules(volume)
            self.showResults(None)

    def _hideOwnVolumesFromInput(self) -> None:
        """ARSeg's own disagreement volumes are scalar volumes too: not something to segment."""
        own = [node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
               if node.GetAttribute("ARSeg.Role")]
        for selector in [self.ui.inputVolumeSelector] + [entry[3] for entry in self._extraInputs]:
            selector.sortFilterProxyModel().hiddenNodeIDs = own

    def showResults(self, nodes) -> None:
        if nodes is not None and "regions" in nodes.report:  # several inputs: per region, no scales or nodules
            self.ui.resultsCollapsibleButton.enabled = False
            self.ui.reportLabel.text = self.logic.reportSummary(nodes.report)
            return
        self.updateNoduleList()
        has = nodes is not None and nodes.sequence is not None
        self.ui.resultsCollapsibleButton.enabled = has
        self.updateRefinementGui(nodes if has else None)
        if not has:
            self.ui.reportLabel.text = "No result yet: click on the image or segment the whole volume."
            return
        n = nodes.sequence.GetNumberOfDataNodes()
        # the scale the views show: the browser's (a new result starts at the finest; any parameter change
        # calls this too, and must not move the slider away from the scale the user chose)
        shown = nodes.browser.GetSelectedItemNumber() + 1 if nodes.browser is not None else n
        shown = shown if 1 <= shown <= n else n
        wasBlocked = self.ui.scaleSlider.blockSignals(True)
        self.ui.scaleSlider.minimum, self.ui.scaleSlider.maximum = 1, n
        self.ui.scaleSlider.value = shown
        self.ui.scaleSlider.blockSignals(wasBlocked)
        self.ui.scaleLabel.text = f"Scale {shown}/{n}"
        self.updateResampleButton()
        self.ui.reportLabel.text = self.logic.reportSummary(nodes.report)
        volume = self._selectedVolume()
        if volume is not None:
            # the toggles apply to a new result's (or another nodule's) heat map and samples too
            if self.ui.disagreementCheckBox.checked:
                self.logic.showDisagreement(volume, True)
            self.logic.showSamples(volume, self.ui.showSamplesCheckBox.checked)

    def onScaleChanged(self, value) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is None:
            return
        n = self.ui.scaleSlider.maximum
        self.ui.scaleLabel.text = f"Scale {value}/{n}"
        self.updateResampleButton()
        with slicer.util.tryWithErrorDisplay("ARSeg could not show this scale."):
            self.logic.showScale(volume, int(value))

    def updateResampleButton(self) -> None:
        """"Resample finer than this scale" needs a finer scale to draw and a nodule to refine."""
        volume = self._selectedVolume()
        k, n = int(self.ui.scaleSlider.value), int(self.ui.scaleSlider.maximum)
        nodule = self.logic.selectedNodule(volume) if volume is not None else None
        self.ui.resampleFinerButton.enabled = nodule is not None and k < n
        source = "the sample shown" if self.logic.shownSample(volume) else "the most typical sample"
        self.ui.resampleFinerButton.toolTip = (f"Keep scales 1-{k} of {source} and draw scales {k + 1}-{n} again."
                                               if k < n else "At the finest scale there is nothing finer to draw.")

    def updateRefinementGui(self, nodes) -> None:
        """The sample slider (0: the consensus, i: sample i of the selected nodule) and "Use this sample"."""
        volume = self._selectedVolume()
        nodule = self.logic.selectedNodule(volume) if nodes is not None and volume is not None else None
        count = nodule.n_samples if nodule is not None else 0
        shown = self.logic.shownSample(volume) if nodule is not None else None
        wasBlocked = self.ui.sampleSlider.blockSignals(True)
        self.ui.sampleSlider.minimum, self.ui.sampleSlider.maximum = 0, count
        self.ui.sampleSlider.value = shown or 0
        self.ui.sampleSlider.blockSignals(wasBlocked)
        self.ui.sampleSlider.enabled = count > 0
        self._showSampleLabel(shown or 0, count)
        if nodes is None:
            self.ui.resampleFinerButton.enabled = False

    def _showSampleLabel(self, value, count) -> None:
        self.ui.sampleLabel.text = f"Sample {value}/{count}" if value else "Consensus"
        self.ui.useSampleButton.enabled = bool(value)

    def onSampleChanged(self, value) -> None:
        volume = self._selectedVolume()
        if volume is None:
            return
        value = int(value)
        try:
            with slicer.util.tryWithErrorDisplay("ARSeg could not show this sample."):
                self.logic.showSample(volume, value or None)
        except Exception:  # shown; the slider goes back to what the views show
            value = self.logic.shownSample(volume) or 0
            wasBlocked = self.ui.sampleSlider.blockSignals(True)
            self.ui.sampleSlider.value = value
            self.ui.sampleSlider.blockSignals(wasBlocked)
        self._showSampleLabel(value, int(self.ui.sampleSlider.maximum))
        self.updateResampleButton()

    def onShowSamplesToggled(self, checked) -> None:
        volume = self._selectedVolume()
        if volume is not None:
            with slicer.util.tryWithErrorDisplay("ARSeg could not show the samples."):
                self.logic.showSamples(volume, bool(checked))

    def onDisagreementToggled(self, checked) -> None:
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        if volume is not None:
            with slicer.util.tryWithErrorDisplay("ARSeg could not show the disagreement."):
                self.logic.showDisagreement(volume, bool(checked))


#
# ARSegLogic
#


class ARSegLogic(ScriptedLoadableModuleLogic):
    """Thin: every computation is in ARSegLib, inference in ARSeg's worker process (one per Slicer session, shared
    by every ARSegLogic: the module's and the console's). Usable from the Python console without the GUI."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return ARSegParameterNode(super().getParameterNode())

    # --- Python packages

    @staticmethod
    def missingPythonPackages():
        """Import names of the packages ARSeg needs that are not installed (torch included)."""
        import importlib.util

        return [module for module in ("torch", *PYTHON_PACKAGES) if importlib.util.find_spec(module) is None]

    @staticmethod
    def installedTorchVersion():
        """torch's version as installed (read from its metadata: Slicer's process never imports torch), or None."""
        try:
            from importlib.metadata import PackageNotFoundError, version
        except ImportError:  # pragma: no cover - Python < 3.8
            return None
        try:
            return version("torch")
        except PackageNotFoundError:
            return None

    @staticmethod
    def torchVersionIsSupported(text) -> bool:
        """'2.13.0+cpu' -> True, '1.13.1' -> False (MINIMUM_TORCH); an unreadable version is given the benefit."""
        import re

        match = re.match(r"(\d+)\.(\d+)", text or "")
        return match is None or (int(match.group(1)), int(match.group(2))) >= MINIMUM_TORCH

    def pythonRequirementsProblem(self) -> Optional[str]:
        """What keeps the worker from running, in a phrase ("the Python packages torch, safetensors are not
        installed", "PyTorch 2.0.1 is installed, ARSeg needs >=2.1"), or None when nothing does. Reads what is
        installed (find_spec, metadata), so Slicer's process imports no torch."""
        missing = self.missingPythonPackages()
        if missing:
            return f"the Python packages {', '.join(missing)} are not installed"
        installed = self.installedTorchVersion()
        if installed is not None and not self.torchVersionIsSupported(installed):
            return f"PyTorch {installed} is installed, ARSeg needs >={MINIMUM_TORCH[0]}.{MINIMUM_TORCH[1]}"
        return None

    def checkPythonRequirements(self) -> None:
        """The console API's first step: one clear error that names the call that installs them, instead of the
        worker's "No module named 'torch'" after the volume was sent."""
        problem = self.pythonRequirementsProblem()
        if problem is not None:
            raise PythonRequirementsError(f"ARSeg cannot run yet: {problem}. Install them with {SETUP_CALL} "
                                          f"(it asks before installing; the module's first click does the same).")

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """torch from the PyTorch extension (PyTorchUtils' light-the-torch install), other packages by pip; both
        only once confirmed. An older torch (another extension may have installed one) is offered an upgrade.
        The worker process is stopped before anything is installed: it maps torch's and the packages' libraries,
        and on Windows pip cannot delete a DLL that a live process maps ("Access is denied", torch half removed).
        The next run's worker imports what was installed, without restarting Slicer. Returns whether everything
        is in place."""
        import importlib
        import importlib.util

        required = ">={}.{}".format(*MINIMUM_TORCH)
        installed = self.installedTorchVersion() if importlib.util.find_spec("torch") is not None else None
        needTorch = installed is None or not self.torchVersionIsSupported(installed)
        missing = [pip for module, pip in PYTHON_PACKAGES.items() if importlib.util.find_spec(module) is None]
        if not needTorch and not missing:
            return True
        if needTorch:
            try:
                import PyTorchUtils  # noqa: F401
            except ModuleNotFoundError as e:
                raise RuntimeError("ARSeg needs the PyTorch extension: install 'PyTorch' from the Extensions "
                                   "Manager and restart Slicer.") from e
            if installed is not None:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        f"ARSeg needs PyTorch {required}, but {installed} is installed (perhaps by another "
                        f"extension). Upgrade PyTorch now? (needs a network connection, several minutes)",
                        "ARSeg: upgrade PyTorch"):
                    raise RuntimeError(f"ARSeg needs PyTorch {required}; {installed} is installed. Upgrade it in "
                                       f"the PyTorch Utils module (version requirement {required}).")
            elif askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    f"ARSeg needs PyTorch ({required}). Install it now through the PyTorch extension "
                    f"(light-the-torch picks the build for this computer; needs a network connection, several "
                    f"minutes)?", "ARSeg: install PyTorch"):
                logging.info("ARSeg: PyTorch was not installed")
                return False
        if missing and askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"ARSeg needs the Python packages {', '.join(missing)}. Install them now? "
                f"(needs a network connection, about a minute)", "ARSeg: install Python packages"):
            return False
        self.stopWorker()  # before any install: see above
        if needTorch:
            self._installTorch(required)
        if missing:
            slicer.util.pip_install(" ".join(missing))
        importlib.invalidate_caches()  # find_spec must see what was just installed
        return True

    @staticmethod
    def _installTorch(requirement: str) -> None:
        """PyTorchUtils' own install (its light-the-torch arguments, run by PythonSlicer in a process of its own)
        without PyTorchUtilsLogic.installTorch's last step, `import torch`, nor its `torch` property, which imports
        it too: torch loaded in Slicer's process would hold its DLLs against the next upgrade on Windows, and
        Slicer's process never imports torch."""
        import importlib.util

        from PyTorchUtils import PyTorchUtilsLogic

        if not hasattr(PyTorchUtilsLogic, "_getPipInstallArguments"):  # before SlicerPyTorch of June 2023
            raise RuntimeError("The PyTorch extension is too old for ARSeg: update it in the Extensions Manager.")
        args = PyTorchUtilsLogic._getPipInstallArguments(torchVersionRequirement=requirement)
        if importlib.util.find_spec("light_the_torch") is None:
            PyTorchUtilsLogic._installLightTheTorch()
        # executePythonModule from Slicer 5.11; _executePythonModule (what PyTorchUtils calls) before, deprecated
        run = getattr(slicer.util, "executePythonModule", None) or slicer.util._executePythonModule
        logging.info(f"ARSeg: installing PyTorch with light-the-torch {' '.join(args)}")
        run("light_the_torch", args)

    # --- models and the worker process

    def availableModels(self):
        """Model names for the GUI (reading model cards needs no torch)."""
        try:
            from ARSegLib.models import available_models

            return sorted(set(available_models()) | {DEFAULT_MODEL})
        except ImportError:
            return [DEFAULT_MODEL]

    @staticmethod
    def modelInputs(model):
        """[(input name, title)] of the inputs the model's card names (the lung card: one, "CT"); a card that
        cannot be read: one input (the run says what is wrong with the card)."""
        from ARSegLib.models import ModelError, read_card

        try:
            return [(i.name, i.title) for i in read_card(model).task.inputs]
        except (ModelError, OSError, ValueError):
            return [("volume", "Input")]

    @staticmethod
    def inputsNamedLike(scene, model):
        """{input name: volume node} of the scene's volumes named like the model's inputs (mrml.volumes_for_inputs)."""
        from ARSegLib import mrml
        from ARSegLib.models import read_card

        return mrml.volumes_for_inputs(scene, read_card(model).task)

    @staticmethod
    def workerPython():
        """Slicer's own Python (PythonSlicer, on PATH inside Slicer) runs the worker; elsewhere this Python."""
        return shutil.which("PythonSlicer") or sys.executable

    def worker(self, model: str = DEFAULT_MODEL, device: str = "auto"):
        """The shared inference client; another model or device restarts its process."""
        from ARSegLib import worker

        return worker.shared_client(model, device, python=self.workerPython())

    def preload(self, model: str = DEFAULT_MODEL, device: str = "auto"):
        """Start the worker process and load the model there; returns the load WorkerRun (its result: what the
        worker loaded). A click started meanwhile queues behind it."""
        self.checkPythonRequirements()
        return self.worker(model, device).start()

    @staticmethod
    def stopWorker():
        from ARSegLib import worker

        worker.shutdown_shared()

    @staticmethod
    def settings(samples=16, temperature=None, seed=0, halfHeightMm=20.0, fast=False):
        """fast: sample each slice as it is, every sample kept (no test-time views, no candidate selection)."""
        from ARSegLib.pipeline import SegmentSettings

        return SegmentSettings(n_samples=int(samples), temperature=None if temperature is None else float(temperature),
                               seed=int(seed), half_height_mm=float(halfHeightMm),
                               views=1 if fast else None, oversample=1 if fast else None)

    # --- segmenting

    @staticmethod
    def volumeKey(volumeNode):
        """What identifies a volume's voxels to the worker, which keeps the last volume it was sent: a later click
        on the same, unmodified volume sends no voxels."""
        from ARSegLib import runs

        return runs.volume_key_of(volumeNode)

    def service(self, model: str = DEFAULT_MODEL, device: str = "auto"):
        """The run service on the shared worker (ARSegLib.runs): every run of the module and the console goes
        through it, and it keeps each nodule's current result for a refinement (shared by every ARSegLogic)."""
        from ARSegLib import runs
        from ARSegLib.models import read_card

        return runs.RunService(runs.WorkerBackend(self.worker(model, device), read_card(model)),
                               memory=runs.shared_memory())

    def startSegmentation(self, volumeNode, point=None, model: str = DEFAULT_MODEL, device: str = "auto",
                          samples: int = 16, temperature: Optional[float] = None, seed: int = 0,
                          halfHeightMm: float = 20.0, fast: bool = False):
        """Check the input and send it to the worker (main thread: reading the volume is all it does here); returns
        the run, which the caller polls (`run.poll()`, never blocking) and hands to `applyResult`. volumeNode may
        be {input name: node} for a model of several inputs (aligned onto the first's grid: run.request.input_notes
        says which were resampled)."""
        from ARSegLib.prompts import include

        # bad input says so at once, before the worker sees it
        self.checkPythonRequirements()
        settings = self.settings(samples, temperature, seed, halfHeightMm, fast).check()
        service = self.service(model, device)
        click = None if point is None else include(point)
        if hasattr(volumeNode, "items"):  # several inputs
            request = service.request_for_inputs(volumeNode, click=click, settings=settings)
        else:
            request = service.request_for_node(volumeNode, click=click, settings=settings)
        return service.start(request)

    def showOutline(self, volumeNode, outline):
        """Main thread: a click's first outline (pipeline.Outline) into the scene until its result replaces it."""
        from ARSegLib import mrml

        return mrml.show_outline(volumeNode.GetScene(), volumeNode, outline)

    def removeOutline(self, volumeNode) -> int:
        from ARSegLib import mrml

        return mrml.remove_outline(volumeNode.GetScene(), volumeNode)

    def applyResult(self, volumeNode, result, includeSamples: bool = False, request=None):
        """Main thread: the finished run's nodes into the scene (replacing ARSeg's earlier ones for the volume).
        request: the run's (run.request), which says which nodule it refines and with which settings."""
        from ARSegLib import mrml, runs

        if getattr(request, "input_names", ()):  # several inputs: volumeNode is the first
            return runs.apply_region_result(volumeNode, result, request.input_notes)
        return runs.apply_result(volumeNode, result, mrml.OutputOptions(include_samples=includeSamples),
                                 nodule=getattr(request, "nodule", None),
                                 replace_with_empty=bool(getattr(request, "replace_with_empty", False)),
                                 memory=runs.shared_memory(), volume_key=getattr(request, "volume_key", None),
                                 settings=getattr(request, "settings", None))

    def segment(self, volumeNode, point=None, model: str = DEFAULT_MODEL, device: str = "auto", samples: int = 16,
                temperature: Optional[float] = None, seed: int = 0, halfHeightMm: float = 20.0,
                includeSamples: bool = False, progress=None, cancel=None, points=None, fast: bool = False):
        """Segment volumeNode and wait: a nodule at each RAS point (point=(R, A, S) and/or points=[(R, A, S), ...]),
        or the whole volume when there is none (models validated for it only). Every point is checked before any
        runs. Returns the ResultNodes, which hold every nodule of the volume. For the console and scripts: the GUI
        polls startSegmentation's run instead.

        A model whose card names several inputs takes {input name: node} (segment({"flair": f, "t1ce": t},
        model="brats-glioma")): whole volume, inputs on another grid resampled onto the first's; one segmentation
        of the first input with a segment per region per lesion. Returns mrml.RegionNodes (report per region,
        notices: what was resampled)."""
        from ARSegLib import mrml, runs
        from ARSegLib.prompts import include

        self.checkPythonRequirements()
        clicks = [tuple(float(v) for v in p) for p in ([point] if point is not None else []) + list(points or [])]
        settings = self.settings(samples, temperature, seed, halfHeightMm, fast)
        if hasattr(volumeNode, "items"):  # several inputs: a click is refused by the card's modes, before any work
            if len(clicks) > 1:
                raise ValueError("several inputs take at most one point")
            return self.service(model, device).segment_inputs(volumeNode, settings, progress, cancel,
                                                              click=include(clicks[0]) if clicks else None)
        return self.service(model, device).segment_node(
            volumeNode, runs.clicks(clicks), settings, mrml.OutputOptions(include_samples=includeSamples),
            progress, cancel)

    def refine(self, volumeNode, nodule, exclude=(), include=(), lock_scales: int = 0, sample: Optional[int] = None,
               model: str = DEFAULT_MODEL, device: str = "auto", includeSamples: bool = False, progress=None,
               cancel=None):
        """Refine a nodule (its ID "Nodule_2", name "Nodule 2" or number 2) from its current result and wait:
        exclude points its samples must not mark, include points they must all mark, lock_scales=k keeps scales
        1..k of sample `sample` (or of the most typical sample) and draws the finer ones again; sample alone makes
        that sample the result. Runs with the settings that made the nodule; the nodule keeps its name. Returns
        the ResultNodes."""
        from ARSegLib import mrml

        self.checkPythonRequirements()
        nid = self._noduleId(volumeNode, nodule)
        refinement = self._refinement(exclude, include, lock_scales, sample)
        return self.service(model, device).refine(volumeNode, nid, refinement,
                                                  options=mrml.OutputOptions(include_samples=includeSamples),
                                                  progress=progress, cancel=cancel)

    def startRefinement(self, volumeNode, nodule, exclude=(), include=(), lock_scales: int = 0,
                        sample: Optional[int] = None, model: str = DEFAULT_MODEL, device: str = "auto"):
        """refine's run, not waited for (the module's way): checked here before any work (the nodule's remembered
        result, its model, the points, the sample, the scales), then sent to the worker. Returns the run, which the
        caller polls (`run.poll()`, never blocking) and hands to applyResult (run.request names the nodule)."""
        self.checkPythonRequirements()
        nid = self._noduleId(volumeNode, nodule)
        service = self.service(model, device)
        return service.start(service.refine_request(volumeNode, nid, self._refinement(exclude, include, lock_scales,
                                                                                         sample)))

    @staticmethod
    def _refinement(exclude=(), include=(), lock_scales: int = 0, sample: Optional[int] = None):
        """The console's spelling as a prompts.Refinement: with lock_scales, sample is the one whose coarse scales
        are kept (None: the most typical); alone, it is the sample taken as the result."""
        from ARSegLib import prompts

        return prompts.refinement(include_points=include, exclude_points=exclude, lock_scales=int(lock_scales),
                                  from_sample=sample if lock_scales else None,
                                  use_sample=None if lock_scales else sample)

    @classmethod
    def refinementWords(cls, exclude=(), include=(), lock_scales: int = 0, sample: Optional[int] = None) -> str:
        """A refinement in words, as the report says it ("exclude at R, A, S"; "scales 1-3 of sample 2 kept...")."""
        from ARSegLib import mrml

        return mrml.prompt_words(cls._refinement(exclude, include, lock_scales, sample).to_dict(digits=1))

    def _noduleId(self, volumeNode, nodule) -> str:
        from ARSegLib import mrml

        if isinstance(nodule, int) and not isinstance(nodule, bool):
            return mrml.nodule_id(nodule)
        for info in self.nodules(volumeNode):
            if nodule in (info.id, info.name):
                return info.id
        return str(nodule)  # the service says it has no result of it

    def segmentFiles(self, paths, outputDir, points=None, model: str = DEFAULT_MODEL, device: str = "auto",
                     samples: int = 16, temperature: Optional[float] = None, seed: int = 0,
                     includeSamples: bool = False, fast: bool = False):
        """Each image file -> outputDir/NAME.seg.nrrd + NAME.report.json, in scenes of their own (the user's
        scene is not touched). points: {path: (R, A, S) or [(R, A, S), ...]}: a nodule at each; a file without points
        runs whole (models validated for it only). For a model of several inputs each case is {input name: path}
        (named after its first input's file), run whole. Returns reports."""
        from pathlib import Path

        from ARSegLib import mrml, runs

        self.checkPythonRequirements()
        points = {str(Path(k)): v for k, v in (points or {}).items()}
        settings = self.settings(samples, temperature, seed, 20.0, fast)
        service = self.service(model, device)
        reports = []
        for path in paths:
            if hasattr(path, "items"):  # several inputs: {"flair": path, "t1ce": path}
                first = Path(runs.task_input_nodes(path, service.card.task)[service.card.task.input_names[0]])
                stem = mrml.volume_stem(first)
                out = Path(outputDir) / f"{stem}.seg.nrrd"
                nodes = service.segment_input_files(path, out, settings,
                                                    report_path=Path(outputDir) / f"{stem}.report.json")
                reports.append(nodes.report)
                continue
            path = Path(path)
            stem = mrml.volume_stem(path)
            out = Path(outputDir) / f"{stem}.seg.nrrd"
            given = points.get(str(path))
            several = given is not None and len(given) and not isinstance(given[0], (int, float))
            clicks = [] if given is None else (list(given) if several else [given])
            nodes = service.segment_file(path, out, runs.clicks(clicks), settings,
                                         mrml.OutputOptions(include_samples=includeSamples),
                                         report_path=Path(outputDir) / f"{stem}.report.json")
            reports.append(dict(nodes.report, source=str(path), segmentation=str(out)))
        return reports

    # --- nodules

    def nodules(self, volumeNode):
        """The volume's nodules (mrml.NoduleInfo: id, name, volumes, presence fraction, selected), in click order."""
        from ARSegLib import mrml

        return mrml.list_nodules(volumeNode.GetScene(), volumeNode) if volumeNode is not None else []

    def selectedNodule(self, volumeNode):
        """The selected nodule's mrml.NoduleInfo (the one a refinement changes), or None."""
        return next((n for n in self.nodules(volumeNode) if n.selected), None)

    def noduleName(self, volumeNode, noduleId) -> str:
        """The name the nodule list shows (the user may have renamed its segment)."""
        from ARSegLib import mrml

        return next((n.name for n in self.nodules(volumeNode) if n.id == noduleId), mrml.nodule_name(noduleId))

    def selectNodule(self, volumeNode, noduleId):
        from ARSegLib import mrml

        return mrml.select_nodule(volumeNode.GetScene(), volumeNode, noduleId)

    def deleteNodule(self, volumeNode, noduleId):
        """Returns the remaining results, or None when that was the last nodule."""
        from ARSegLib import mrml, runs

        nodes = mrml.delete_nodule(volumeNode.GetScene(), volumeNode, noduleId)
        runs.shared_memory().forget(runs.volume_key_of(volumeNode), noduleId)
        return nodes

    def undo(self, volumeNode):
        """Undo the last run on volumeNode: (the results, or None when no nodule is left; what was undone). The
        service's remembered result of the nodule it changed goes back to the one before (a refinement starts from
        what the scene shows), or is forgotten when that is not the one the scene now shows."""
        from ARSegLib import mrml, runs

        before = self.nodules(volumeNode)
        mrml.hide_sample(volumeNode.GetScene(), volumeNode)  # a sample of the result being undone
        undone = mrml.undo_last(volumeNode.GetScene(), volumeNode)
        after = {n.id: n for n in self.nodules(volumeNode)}
        memory, key = runs.shared_memory(), runs.volume_key_of(volumeNode)
        for n in before:
            now = after.get(n.id)
            if now is None:
                memory.forget(key, n.id)
            elif dataclasses.replace(now, selected=n.selected) != n:
                restored = memory.restore(key, n.id)
                if restored is not None and not self._sameVolume(restored.result.consensus_volume_mm3,
                                                                 now.consensus_volume_mm3):
                    memory.forget(key, n.id)  # the scene's previous result was not made in this session
        return undone

    @staticmethod
    def _sameVolume(a: float, b: float) -> bool:
        return abs(float(a) - float(b)) <= 0.05 + 1e-3 * abs(float(b))  # the report rounds volumes

    def canUndo(self, volumeNode) -> bool:
        from ARSegLib import mrml

        return mrml.can_undo(volumeNode.GetScene(), volumeNode)

    def clearNodules(self, volumeNode) -> int:
        from ARSegLib import mrml, runs

        runs.shared_memory().forget(runs.volume_key_of(volumeNode))
        return mrml.clear_nodules(volumeNode.GetScene(), volumeNode)

    @staticmethod
    def noduleSummary(nodule) -> str:
        """One line of the nodule list: the volume, or, when most samples see nothing, how many do and how big."""
        text = f"{nodule.name}: {nodule.consensus_volume_mm3:.0f} mm\u00b3"
        if nodule.consensus_volume_mm3 > 0 and nodule.long_axis_mm is not None:
            text += f", {nodule.long_axis_mm:.1f} x {nodule.short_axis_mm:.1f} mm"  # axial long x short axis
        if nodule.n_prompts > 1:
            text += f"; {ARSegLogic.promptSummary(nodule.prompts)}"
        if nodule.consensus_volume_mm3 == 0 and nodule.presence_fraction > 0:
            text += (f" (empty consensus; {100 * nodule.presence_fraction:.0f} % of samples mark a nodule: "
                     f"{nodule.if_present_volume_mm3:.0f} mm\u00b3 if present)")
        return text

    @staticmethod
    def promptNotices(result):
        """What a refinement could not do, in words: each point that not every kept sample satisfies (the budget of
        extra draws found too few candidates that do), so that a prompt is never silently ignored."""
        out = []
        for said in (getattr(result, "settings", None) or {}).get("prompt_satisfaction", []):
            if not said.get("every_kept_sample_satisfies", True):
                where = ", ".join(f"{v:.1f}" for v in said["point_ras"])
                drawn = f" of {said['candidates']} candidates" if said.get("candidates") else ""
                out.append(f"The {said['kind']} point at {where} could not be met by every sample: "
                           f"{said.get('satisfying', 0)}{drawn} satisfy it.")
        return out

    @staticmethod
    def promptSummary(prompts) -> str:
        """The prompts that made a nodule (its report's, PromptHistory.to_list's form) in a few words for the nodule
        list: "1 click, 2 exclude, 1 include, lock 1..3", "1 click, sample 4 used"."""
        clicks = sum(1 for p in prompts if p.get("kind") == "click")
        points = [q.get("kind") for p in prompts for q in p.get("prompts", [])]
        parts = [f"{clicks} click{'s' if clicks != 1 else ''}"] if clicks else []
        parts += [f"{points.count(kind)} {kind}" for kind in ("include", "exclude") if points.count(kind)]
        locked = [p for p in prompts if p.get("lock_scales")]
        if locked:  # the latest lock is the one the nodule's coarse scales come from
            source = f" of sample {locked[-1]['from_sample']}" if locked[-1].get("from_sample") else ""
            parts.append(f"lock 1..{locked[-1]['lock_scales']}{source}")
        used = [p["use_sample"] for p in prompts if p.get("use_sample")]
        if used:
            parts.append(f"sample {used[-1]} used")
        return ", ".join(parts)

    @staticmethod
    def wholeVolumeAllowed(model):
        """(allowed, why not): whole-volume mode only where the model card lists it."""
        from ARSegLib import pipeline
        from ARSegLib.models import ModelError, read_card

        try:
            pipeline.check_mode(read_card(model), pipeline.MODE_VOLUME)
            return True, ""
        except (ModelError, pipeline.VolumeError) as e:
            return False, str(e)

    def showSamples(self, volumeNode, show: bool = True) -> None:
        """The selected nodule's sample segments shown (as outlines) or hidden."""
        from ARSegLib import mrml

        nodes = self.results(volumeNode)
        if nodes is None or nodes.segmentation.GetDisplayNode() is None:
            return
        display = nodes.segmentation.GetDisplayNode()
        segmentation = nodes.segmentation.GetSegmentation()
        for segmentId in mrml.nodule_segment_ids(nodes.segmentation, nodes.nodule):
            segment = segmentation.GetSegment(segmentId)
            if mrml.segment_tag(segment, mrml.KIND_TAG) == mrml.KIND_SAMPLE:
                display.SetSegmentVisibility(segmentId, bool(show))
                display.SetSegmentVisibility2DFill(segmentId, False)

    def showSample(self, volumeNode, sample: Optional[int] = None):
        """Sample `sample` (1-based) of the selected nodule over the CT, its consensus as an outline; None: the
        consensus again. From its kept segments ("Keep every sample"), else from the nodule's result the run service
        remembers this session. Returns the sample's node, or None."""
        from ARSegLib import mrml, runs

        nodes = self.results(volumeNode)
        if nodes is None:
            raise mrml.ResultError(f"{volumeNode.GetName()!r} has no ARSeg results")
        known = runs.shared_memory().get(runs.volume_key_of(volumeNode), nodes.nodule)
        return mrml.show_sample(volumeNode.GetScene(), volumeNode, sample,
                                result=known.result if known is not None else None)

    def shownSample(self, volumeNode) -> Optional[int]:
        """The sample of the selected nodule shown over the CT, or None when its consensus is."""
        from ARSegLib import mrml

        if volumeNode is None:
            return None
        shown = mrml.shown_sample(volumeNode.GetScene(), volumeNode)
        nodes = self.results(volumeNode) if shown is not None else None
        return shown[1] if nodes is not None and shown[0] == nodes.nodule else None

    # --- showing

    def results(self, volumeNode):
        from ARSegLib import mrml

        return mrml.find_results(volumeNode.GetScene(), volumeNode) if volumeNode is not None else None

    def showScale(self, volumeNode, scale: int) -> None:
        from ARSegLib import mrml

        nodes = self.results(volumeNode)
        if nodes is not None and nodes.sequence is not None:
            mrml.select_scale(nodes, scale, show=True)

    def showDisagreement(self, volumeNode, show: bool = True) -> None:
        from ARSegLib import mrml

        nodes = self.results(volumeNode)
        if nodes is not None:
            mrml.show_disagreement(volumeNode.GetScene(), nodes, show)

    @staticmethod
    def reportSummary(report) -> str:
        if not report:
            return ""
        if "regions" in report:  # several inputs: per region, in mL
            from ARSegLib import mrml

            return mrml.region_summary(report)
        vols = report["sample_volume_mm3"]
        ious = report["sample_iou_with_consensus"]
        return (f"Consensus {report['consensus_volume_mm3']:.0f} mm\u00b3; {report['n_samples']} samples "
                f"{vols['min']:.0f}-{vols['max']:.0f} mm\u00b3 (mean {vols['mean']:.0f}); "
                f"IoU with consensus {min(ious):.2f}-{max(ious):.2f}")

    def clickMarkupsNode(self):
        """The point list that the place mode adds to (ARSeg's own node, reused)."""
        return self._markupsNode("clicks", "ARSeg clicks")

    # include points green, exclude points red: told apart from the clicks (Slicer's default markups colour) at once
    PROMPT_COLORS = {"include": (0.20, 0.85, 0.30), "exclude": (0.95, 0.15, 0.15)}

    def promptMarkupsNode(self, kind: str):
        """The point list of the include or exclude place widget (ARSeg's own node, reused), in its kind's colour."""
        if kind not in self.PROMPT_COLORS:
            raise ValueError(f"a prompt point is include or exclude, not {kind!r}")
        return self._markupsNode(f"{kind}-points", f"ARSeg {kind} points", self.PROMPT_COLORS[kind])

    @staticmethod
    def _markupsNode(role: str, name: str, color=None):
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode"):
            if node.GetAttribute("ARSeg.Role") == role:
                return node
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.SetAttribute("ARSeg.Role", role)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if color is not None and display is not None:
            display.SetSelectedColor(*color)  # control points are drawn in the selected colour unless deselected
            display.SetColor(*color)
        return node


#
# ARSegTest
#


class ARSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer on the bundled demo CT (Sample Data "ARSeg lung nodule CT": a slab of LIDC-IDRI-0001 around its
    nodule, shipped with the extension, so nothing is downloaded) with the shipped model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ClickNodulesRerunAndFiles()

    def test_ClickNodulesRerunAndFiles(self):
        import tempfile

        from ARSegLib.demo import DEMO_NAME, demo_point_ras, demo_volume_path

        logic = ARSegLogic()
        self.delayDisplay("Checking Python packages")
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        from ARSegLib.models import ModelError, find_card

        try:
            find_card(DEFAULT_MODEL)
        except ModelError:
            self.delayDisplay(f"Skipped: the shipped model {DEFAULT_MODEL} is not installed")
            return

        self.delayDisplay(f"Loading {DEMO_NAME}")
        volume = slicer.util.loadVolume(str(demo_volume_path()), {"name": "chest"})
        point = demo_point_ras()
        mine = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
        mineMTime = mine.GetMTime()

        self.delayDisplay("Starting the inference process and loading the model there")
        preload = logic.preload()
        self.assertTrue(preload.wait(300))
        self.assertIsNone(preload.error)
        self.assertEqual(preload.result["model"], DEFAULT_MODEL)

        self.delayDisplay("Click to segment")
        nodes = logic.segment(volume, point=point, samples=4)
        self.assertEqual(nodes.segmentation.GetName(), f"{volume.GetName()} ARSeg")
        self.assertTrue(nodes.segmentation.GetDisplayNode().GetSegmentVisibility("Nodule_1"))
        self.assertEqual([n.name for n in logic.nodules(volume)], ["Nodule 1"])
        self.assertGreater(logic.nodules(volume)[0].consensus_volume_mm3, 1000)  # the demo's nodule is ~6 cm3
        self.assertGreater(nodes.table.GetNumberOfRows(), 0)
        logic.showScale(volume, 1)
        logic.showDisagreement(volume, True)

        self.delayDisplay("Refine it: keep scales 1..2, draw the finer ones again; browse a sample; undo")
        clicked = logic.nodules(volume)[0]
        logic.refine(volume, 1, lock_scales=2)
        refined = logic.nodules(volume)
        self.assertEqual([n.name for n in refined], ["Nodule 1"])
        self.assertEqual(logic.promptSummary(refined[0].prompts), "1 click, lock 1..2")
        logic.showSample(volume, 1)
        self.assertEqual(logic.shownSample(volume), 1)
        logic.showSample(volume, None)
        logic.undo(volume)
        self.assertAlmostEqual(logic.nodules(volume)[0].consensus_volume_mm3, clicked.consensus_volume_mm3, delta=0.1)

        self.delayDisplay("A second click elsewhere adds a nodule; a click inside the first redoes it")
        elsewhere = (point[0] + 30.0, point[1], point[2])
        logic.segment(volume, point=elsewhere, samples=4)
        self.assertEqual([n.name for n in logic.nodules(volume)], ["Nodule 1", "Nodule 2"])
        count = slicer.mrmlScene.GetNumberOfNodes()
        logic.segment(volume, point=point, samples=4)
        self.assertEqual([n.name for n in logic.nodules(volume)], ["Nodule 1", "Nodule 2"])
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.assertEqual(mine.GetMTime(), mineMTime)
        remaining = logic.deleteNodule(volume, "Nodule_2")
        self.assertEqual([n.name for n in logic.nodules(volume)], ["Nodule 1"])
        self.assertIsNotNone(remaining)

        self.delayDisplay("A click outside the volume: a clear error, no change")
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):
            logic.segment(volume, point=(bounds[1] + 100.0, 0.0, 0.0), samples=2)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

        self.delayDisplay("Batch from files")
        folder = tempfile.mkdtemp()
        path = os.path.join(folder, "chest.nrrd")
        self.assertTrue(slicer.util.saveNode(volume, path))
        reports = logic.segmentFiles([path], folder, points={path: [point]}, samples=4)
        self.assertEqual(len(reports), 1)
        loaded = slicer.util.loadSegmentation(reports[0]["segmentation"])
        self.assertEqual(loaded.GetSegmentation().GetNthSegment(0).GetName(), "Nodule 1")
        logic.stopWorker()
        self.delayDisplay("Test passed")
