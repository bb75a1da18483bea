"""Results -> MRML nodes, on desktop Slicer and on slicer-core's headless `slicer.vtkMRMLScene()`. No Qt.

The node contract (DESIGN.md, "What the user sees"), per input volume, holding every nodule segmented on it:

- segmentation "<volume> ARSeg": for each nodule N (one click each; a click inside an existing nodule redoes it)
  `Nodule N` (its consensus, visible), `Nodule N disagreement` (voxels where samples differ from the
  consensus), `Nodule N if present` (the consensus of the samples that mark a nodule, visible only when the
  plain consensus is empty), `Nodule N scale 1/K` ... `K/K` (the consensus after each scale), optionally
  `Nodule N sample i`; all but the first two kinds hidden. Segment IDs `Nodule_N`, `Nodule_N_Disagreement`,
  `Nodule_N_IfPresent`, `Nodule_N_Scale_k`, `Nodule_N_Sample_i`; tags ARSeg.Nodule and ARSeg.Kind say which
  nodule and what each segment is (they travel in the .seg.nrrd). Reference geometry = the volume's;
  terminology SCT "Nodule" in "Lung" for the nodule masks;
- scalar volume "<volume> ARSeg disagreement": the selected nodule's fraction of samples that differ, with a
  heat colour table; every nodule's fraction is kept in the sequence "<volume> ARSeg disagreement by nodule";
- sequence "<volume> ARSeg scales" of the selected nodule's K scales, browsed by "<volume> ARSeg scale
  browser", whose proxy "<volume> ARSeg scale" shows one scale at a time (the scale slider);
- table "<volume> ARSeg report": a row per nodule (consensus volume, the samples' range, how many samples mark
  it and its volume if present, each sample's IoU range with the consensus, the axial long/short axis and mean
  diameter with the samples' range, the mean intensity inside, the prompts, the click); the JSON report
  (attribute ARSeg.Report) has the same per nodule under "nodules", the selected nodule's numbers at its top.

The MRML adapter only: runs (ARSegLib/runs.py) does the runs and applies their results through write_result.
The API for the GUI, the console and the web page: write_result (a run's result -> a new or redone nodule),
list_nodules, nodule_at_point, select_nodule, delete_nodule, clear_nodules, nodule_report, select_scale,
show_disagreement, find_results.

Every node ARSeg makes carries the attribute ARSeg.Role (and ARSeg.SourceVolumeID for per-volume results);
a run replaces only nodes with both, for that volume. User nodes are never modified. Nodes are built
first and added last: an error leaves the scene as it was.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .figure import AGREEMENT_FRACTION
from .pipeline import VolumeResult
from .task import LUNG_TERMINOLOGY

ROLE_ATTRIBUTE = "ARSeg.Role"
SOURCE_ATTRIBUTE = "ARSeg.SourceVolumeID"
MODEL_ATTRIBUTE = "ARSeg.Model"
REPORT_ATTRIBUTE = "ARSeg.Report"  # the report's JSON, also on the table node

ROLE_SEGMENTATION = "segmentation"
ROLE_DISAGREEMENT = "disagreement"
ROLE_SEQUENCE = "scales-sequence"
ROLE_BROWSER = "scales-browser"
ROLE_PROXY = "scales-proxy"
ROLE_REPORT = "report"
ROLE_OUTLINE = "first-outline"  # a click's first outline while its run goes on (show_outline)
ROLE_SAMPLE_VIEW = "sample-view"  # one sample of the selected nodule shown over the CT (show_sample)
ROLE_COLORMAP = "colormap"
ROLE_DISAGREEMENTS = "disagreements-sequence"
ROLE_HISTORY = "undo-history"  # what each run replaced, so that undo_last can restore it (kept across runs)
HISTORY_STEPS_ATTRIBUTE = "ARSeg.UndoSteps"  # JSON list on the history sequence, oldest first
MAX_UNDO_STEPS = 20
HEAT_COLORMAP_NAME = "ARSeg Heat"

# DICOM / SNOMED CT codes as Slicer's terminology strings serialise them (vtkSlicerTerminologiesModuleLogic):
# category "Morphologically Altered Structure", type "Nodule", anatomic region "Lung".
NODULE_TERMINOLOGY = LUNG_TERMINOLOGY  # the lung card's task region (task.py); a card's own: write_region_results


class ResultError(ValueError):
    """A result that cannot be written into this scene (wrong volume, unreadable file...)."""


@dataclass
class OutputOptions:
    """What goes into the scene besides the consensus."""

    include_samples: bool = False  # `Sample i` segments (hidden); N more labelmaps
    disagreement_threshold: float = 0.0  # `Disagreement` segment: voxels where more than this fraction differ
    # the heat map (disagreement volume) is transparent where at most this fraction differs: the samples agree
    heat_agreement_fraction: float = AGREEMENT_FRACTION
    consensus_color: Tuple[float, float, float] = (0.95, 0.75, 0.15)
    disagreement_color: Tuple[float, float, float] = (0.90, 0.20, 0.20)
    sample_color: Tuple[float, float, float] = (0.60, 0.60, 0.70)
    show_scale_proxy: bool = False  # the scrubbing view starts hidden; the module shows it when the slider moves
    # the nodule masks' terminology: the card's task region's (for_task; the lung card's is LUNG_TERMINOLOGY)
    terminology: str = NODULE_TERMINOLOGY

    def for_task(self, task) -> OutputOptions:
        """These options with the task's first region's terminology, and its colour unless another was chosen:
        what a card says its results are, not the lung card's words (identical for the lung card)."""
        region = task.regions[0]
        color = region.color if self.consensus_color == OutputOptions.consensus_color else self.consensus_color
        return dataclasses.replace(self, terminology=region.terminology or self.terminology,
                                   consensus_color=tuple(color))


@dataclass
class ResultNodes:
    """ARSeg's nodes for one volume, its report, and which nodule is selected (the one a run just wrote)."""

    segmentation: Any
    disagreement_volume: Any
    sequence: Any
    browser: Any
    proxy: Any
    table: Any
    colormap: Any
    report: Dict[str, Any] = field(default_factory=dict)
    result: Optional[VolumeResult] = None
    nodule: Optional[str] = None  # the selected nodule's ID ("Nodule_2"): the slider and heat map show it
    disagreements: Any = None  # sequence of every nodule's disagreement fraction, indexed by nodule ID
    results: List[VolumeResult] = field(default_factory=list)  # every result of this call (several points)
    # what the user should know about this call: a nodule redone (old -> new volume), an empty redo refused
    notices: List[str] = field(default_factory=list)

    @property
    def nodule_ids(self) -> List[str]:
        return [n["id"] for n in self.report.get("nodules", [])]

    @property
    def nodule_name(self) -> Optional[str]:
        return nodule_name(self.nodule) if self.nodule else None

    @property
    def scale_segment_ids(self) -> List[str]:
        n = self.report.get("n_scales", 0)
        return [scale_segment_id(k, self.nodule) for k in range(1, n + 1)]


@dataclass
class NoduleInfo:
    """One nodule of a volume, as the module lists it."""

    id: str  # segment ID of its consensus, e.g. "Nodule_2"
    name: str  # "Nodule 2" (the segment's name, which the user may have changed)
    consensus_volume_mm3: float
    presence_fraction: float  # the fraction of samples that mark a nodule here
    if_present_volume_mm3: float
    point_ras_mm: Optional[List[float]]
    selected: bool
    long_axis_mm: Optional[float] = None  # axial long / short axis of the consensus (None: an older report)
    short_axis_mm: Optional[float] = None
    n_prompts: int = 0  # the click and each refinement that made it
    prompts: Tuple[Dict[str, Any], ...] = ()  # those prompts (PromptHistory.to_list's form), oldest first
    n_samples: int = 0  # how many samples its result has (0: an older report)


NODULE_TAG = "ARSeg.Nodule"  # segment tag: the nodule a segment belongs to
KIND_TAG = "ARSeg.Kind"  # segment tag: consensus, disagreement, if-present, scale or sample
KIND_CONSENSUS, KIND_DISAGREEMENT, KIND_IF_PRESENT, KIND_SCALE, KIND_SAMPLE = (
    "consensus", "disagreement", "if-present", "scale", "sample")
SELECTED_ATTRIBUTE = "ARSeg.SelectedNodule"
WHOLE_VOLUME_ID = "Whole_volume"  # a whole-volume run (models validated for it) is one entry, replaced by the next

# the consensus colour of nodule 1, 2, ... (then round again): distinct on a grey CT and from the red disagreement
NODULE_COLORS = ((0.95, 0.75, 0.15), (0.20, 0.75, 0.95), (0.85, 0.40, 0.95), (0.35, 0.85, 0.35),
                 (0.95, 0.55, 0.25), (0.55, 0.60, 1.00))


def nodule_id(number: int) -> str:
    return f"Nodule_{number}"


def nodule_number(nid: str) -> Optional[int]:
    head, _, tail = nid.rpartition("_")
    return int(tail) if head == "Nodule" and tail.isdigit() else None


def nodule_name(nid: str) -> str:
    return "Whole volume" if nid == WHOLE_VOLUME_ID else nid.replace("_", " ")


def disagreement_segment_id(nid: str) -> str:
    return f"{nid}_Disagreement"


def if_present_segment_id(nid: str) -> str:
    return f"{nid}_IfPresent"


def scale_segment_id(k: int, nodule: Optional[str] = None) -> str:
    return f"{nodule}_Scale_{k}" if nodule else f"Scale_{k}"


def sample_segment_id(i: int, nodule: Optional[str] = None) -> str:
    return f"{nodule}_Sample_{i}" if nodule else f"Sample_{i}"


# --------------------------------------------------------------------------------------------- converters

_CONVERTER_RULES = ("vtkBinaryLabelmapToClosedSurfaceConversionRule", "vtkClosedSurfaceToBinaryLabelmapConversionRule",
                    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
                    "vtkFractionalLabelmapToClosedSurfaceConversionRule")


def register_segmentation_converters():
    """Register the representation converters, as Slicer's Segmentations module does at start-up.

    Desktop Slicer has them already; slicer-core has none until someone registers them, and without them a
    segmentation cannot make its closed surface (3D view) or convert between representations."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in _CONVERTER_RULES:
        cls = getattr(slicer, name, None)
        if cls is not None and name not in have:
            factory.RegisterConverterRule(cls())


def new_scene():
    """An empty scene with the segmentation converters registered (a headless stand-in for Slicer's)."""
    register_segmentation_converters()
    return slicer.vtkMRMLScene()


# --------------------------------------------------------------------------------------------- volume in

def _matrix_to_numpy(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(m: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def local_ijk_to_ras(volume_node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _matrix_to_numpy(m)


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """IJK -> world RAS, through the volume's parent transform when it is linear."""
    local = local_ijk_to_ras(volume_node)
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return local
    if not parent.IsTransformToWorldLinear():
        raise ResultError(f"volume {volume_node.GetName()!r} is under a non-linear transform; harden it first")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return _matrix_to_numpy(to_world) @ local


def volume_array(volume_node, copy: bool = True) -> np.ndarray:
    """The voxels in (k, j, i) order: a copy, unless copy=False gives a read-only view of the node's own memory
    (for a caller that only reads it at once, e.g. to hand the voxels to the inference worker)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else None
        raise ResultError(f"volume {name!r} has no image data")
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    comps = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars)
    shape = tuple(reversed(dims)) + ((comps,) if comps > 1 else ())
    if not copy:
        view = array.reshape(shape)
        view.flags.writeable = False
        return view
    return np.array(array.reshape(shape), copy=True)


def add_scalar_volume(scene, name: str, array: np.ndarray, ijk_to_ras: np.ndarray):
    """A scalar volume node from a (k, j, i) array and its IJK->RAS matrix (console use, tests)."""
    array = np.ascontiguousarray(array)
    if array.ndim not in (3, 4):
        raise ResultError(f"a volume node holds a (k, j, i) or (k, j, i, components) array, got shape {array.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(array.reshape(-1, array.shape[3] if array.ndim == 4 else 1), deep=True)
    image.GetPointData().SetScalars(vtk_array)
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_numpy_to_matrix(np.asarray(ijk_to_ras, dtype=np.float64)))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def _read_into_scene(scene, node, storage, path: Path, name: Optional[str], what: str, loaded=lambda node: True):
    """Read a file through a storage node, as Slicer does. On failure both nodes leave the scene again."""
    if not path.is_file():
        raise ResultError(f"{what} file not found: {path}")
    node.SetName(name or volume_stem(path))
    storage.SetFileName(str(path))
    scene.AddNode(node)
    scene.AddNode(storage)
    if not _quietly(lambda: storage.ReadData(node)) or not loaded(node):
        scene.RemoveNode(storage)
        scene.RemoveNode(node)
        raise ResultError(f"cannot read {path} as {'an' if what[0] in 'aeiou' else 'a'} {what} "
                          f"(corrupt or not a supported format)")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


# --------------------------------------------------------------------------------------------- DICOM series in

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder: what names it to a user, and its files in slice order (GDCM's sort)."""

    uid: str
    description: str
    files: Tuple[str, ...]

    def words(self) -> str:
        what = f" ({self.description!r})" if self.description else ""
        return f"{self.uid}{what}, {len(self.files)} file(s)"


def dicom_series(folder) -> List[DicomSeries]:
    """The DICOM series directly inside a folder (SimpleITK's GDCM scan; sub-folders are not searched)."""
    import SimpleITK as sitk

    out = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        description = ""
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            _quietly(reader.ReadImageInformation)
            if reader.HasMetaDataKey("0008|103e"):
                description = reader.GetMetaData("0008|103e").strip()
        except (RuntimeError, IndexError):  # the scan listed it, so its header is read later with a clear error
            pass
        out.append(DicomSeries(uid=str(uid), description=description, files=files))
    return out


def is_dicom_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and bool(dicom_series(path))


def pick_dicom_series(folder, series_uid: Optional[str] = None) -> DicomSeries:
    """The one DICOM series of a folder (or the one with series_uid); ResultError naming the series (UID,
    description, number of files) when there are several, or when there is none."""
    folder = Path(folder)
    found = dicom_series(folder)
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid]
        if not chosen:
            held = "; ".join(s.words() for s in found) or "none"
            raise ResultError(f"{folder} holds no DICOM series {series_uid} (it holds: {held})")
        return chosen[0]
    if not found:
        raise ResultError(f"{folder} is a folder without a DICOM series (no DICOM files directly inside it); give "
                          f"an image file (NRRD, NIfTI, MHA, ...) or a folder holding one DICOM series")
    if len(found) > 1:
        listed = "; ".join(s.words() for s in found)
        raise ResultError(f"{folder} holds {len(found)} DICOM series: {listed}. Pass a folder holding only the one "
                          f"to segment (move the other series' files out), or from Python "
                          f"mrml.load_volume(scene, folder, series_uid=UID)")
    return found[0]


def _read_dicom_series(series: DicomSeries):
    """(array (k, j, i), IJK->RAS) of a series: SimpleITK's series reader gives LPS; RAS is Slicer's frame."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        image = _quietly(reader.Execute)
    except RuntimeError as e:
        raise ResultError(f"cannot read DICOM series {series.words()}: {str(e).strip().splitlines()[-1]}") from None
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image), LPS_TO_RAS @ m


def _dicom_info(series: DicomSeries) -> Dict[str, Any]:
    """describe_image_file's answer for a series: its first file's rows and columns by its number of files (a
    single multi-frame file says its own size)."""
    info = describe_image_file(series.files[0]) or {"dimension": 2, "size": (0, 0), "components": 1}
    if len(series.files) == 1:
        return info
    columns, rows = info["size"][:2]
    return {"dimension": 3, "size": (columns, rows, len(series.files)), "components": info["components"]}


def describe_image_file(path) -> Optional[Dict[str, Any]]:
    """{"dimension", "size", "components"} from the file's header (SimpleITK), or None where it cannot tell. A
    folder is read as a DICOM series (ResultError when it holds none or several)."""
    if Path(path).is_dir():
        return _dicom_info(pick_dicom_series(path))
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        _quietly(reader.ReadImageInformation)
        return {"dimension": int(reader.GetDimension()), "size": tuple(int(v) for v in reader.GetSize()),
                "components": int(reader.GetNumberOfComponents())}
    except Exception:  # not an image SimpleITK knows: Slicer's reader below says what it can
        return None


def check_image_file(path, series_uid: Optional[str] = None) -> None:
    """ResultError naming what the file holds when it is not a 3D single-component volume (2D picture, 4D series,
    colour or vector image), before anything is read into a scene. A folder must hold one DICOM series (or the
    series series_uid) of at least two slices."""
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise ResultError(f"image volume file not found: {path}")
    _refuse_unless_volume(path, _dicom_info(pick_dicom_series(path, series_uid)) if path.is_dir()
                          else describe_image_file(path))


def _refuse_unless_volume(path: Path, info: Optional[Dict[str, Any]]) -> None:
    if info is None:
        return
    size = " x ".join(str(v) for v in info["size"])
    comps = info["components"]
    what = None
    if info["dimension"] == 2 or (info["dimension"] == 3 and min(info["size"]) == 1):
        what = f"a 2D image ({size} pixels{f', {comps} components per pixel' if comps > 1 else ''})"
    elif info["dimension"] > 3:
        what = f"a {info['dimension']}D image ({size}), e.g. a time series"
    elif comps > 1:
        what = f"a 3D image with {comps} components per voxel ({size}; colour or vector data)"
    if what:
        raise ResultError(f"{path.name} is {what}; ARSeg segments 3D single-component volumes such as a CT series "
                          f"(NRRD, NIfTI, MHA, a folder of DICOM files, ...)")


def load_volume(scene, path, name: Optional[str] = None, series_uid: Optional[str] = None):
    """Read an image file the way Slicer does (NRRD, NIfTI, MHA, ...; LPS files become RAS) into the scene; a
    folder holding one DICOM series (or series_uid of several) is read with SimpleITK's series reader, its
    geometry (origin, spacing, direction) carried from LPS to RAS. Checked before the scene is touched."""
    path = Path(path)
    if path.is_dir():
        series = pick_dicom_series(path, series_uid)  # the folder is scanned once
        _refuse_unless_volume(path, _dicom_info(series))
        array, m = _read_dicom_series(series)
        return add_scalar_volume(scene, name or path.name, array, m)
    check_image_file(path)
    return _read_into_scene(scene, slicer.vtkMRMLScalarVolumeNode(), slicer.vtkMRMLVolumeArchetypeStorageNode(),
                            Path(path), name, "image volume", lambda node: node.GetImageData() is not None)


def volume_stem(path: Path) -> str:
    name = path.name
    if path.is_dir():  # a DICOM series folder: its name, dots and all
        return name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _quietly(fn):
    """VTK readers print their complaints; ARSeg raises its own clear error instead."""
    was = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()
    try:
        return fn()
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(was)


# --------------------------------------------------------------------------------------------- labelmaps

def _oriented_labelmap(mask_box: np.ndarray, box_start_kji: Sequence[int], ijk_to_ras: np.ndarray):
    """A vtkOrientedImageData on the volume's grid holding mask_box, trimmed to the mask's bounding box."""
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    nz = np.argwhere(mask_box > 0)
    if len(nz) == 0:
        image.SetExtent(0, -1, 0, -1, 0, -1)  # an empty segment, as Slicer makes one
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        return image
    lo, hi = nz.min(0), nz.max(0) + 1
    sub = (mask_box[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] > 0).astype(np.uint8)
    k0, j0, i0 = (int(box_start_kji[a] + lo[a]) for a in range(3))
    image.SetExtent(i0, i0 + sub.shape[2] - 1, j0, j0 + sub.shape[1] - 1, k0, k0 + sub.shape[0] - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = sub.reshape(-1)
    return image


def terminology_tag_name() -> str:
    """The segment tag Slicer keeps a terminology entry in ("TerminologyEntry")."""
    getter = getattr(slicer.vtkSegment, "GetTerminologyEntryTagName", None)
    return (getter() if getter is not None else None) or "TerminologyEntry"


def set_terminology(segment, terminology: str) -> None:
    """vtkSegment.SetTerminology exists from Slicer 5.10 on; on 5.8 the terminology is the segment's
    TerminologyEntry tag, which is what SetTerminology writes on newer versions too (and what .seg.nrrd saves)."""
    setter = getattr(segment, "SetTerminology", None)
    if setter is not None:
        setter(terminology)
    else:
        segment.SetTag(terminology_tag_name(), terminology)


def get_terminology(segment) -> str:
    getter = getattr(segment, "GetTerminology", None)
    if getter is not None:
        return getter() or ""
    return segment_tag(segment, terminology_tag_name())


def segment_tag(segment, name: str) -> str:
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def _segment(segment_id: str, name: str, color, labelmap, terminology: Optional[str] = None,
             tags: Optional[Dict[str, str]] = None):
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*color)
    # chosen, not generated: Slicer must not rename or recolour them when terminology settings change
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    if terminology:
        set_terminology(segment, terminology)
    for key, value in (tags or {}).items():
        segment.SetTag(key, str(value))
    return segment


def _reference_geometry(ijk_to_ras: np.ndarray, volume_shape) -> str:
    image = slicer.vtkOrientedImageData()
    k, j, i = volume_shape
    image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    image.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras))
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(image)


def _scale_color(k: int, n: int) -> Tuple[float, float, float]:
    """Coarse scales blue, fine scales yellow (viridis-like), so the proxy's colour tells the scale."""
    t = 0.0 if n <= 1 else (k - 1) / (n - 1)
    stops = np.array([[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38],
                      [0.99, 0.91, 0.14]])
    x = t * (len(stops) - 1)
    a = int(min(np.floor(x), len(stops) - 2))
    c = stops[a] + (x - a) * (stops[a + 1] - stops[a])
    return tuple(float(v) for v in c)


def segment_array(segmentation_node, segment_id: str, volume_shape, ijk_to_ras) -> np.ndarray:
    """A segment as a uint8 (k, j, i) array on a volume's grid (the segment's labelmap must be on that grid)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise ResultError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}")
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    out = np.zeros(tuple(volume_shape), dtype=np.uint8)
    if image is None:
        return out
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    if not np.allclose(_matrix_to_numpy(m), ijk_to_ras, atol=1e-4):
        raise ResultError(f"segment {segment_id!r} is not on the volume's grid")
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    if i1 < i0 or j1 < j0 or k1 < k0:
        return out
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values = values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    label = segment.GetLabelValue()
    mask = (values == label).astype(np.uint8)
    K, J, I = volume_shape
    sk, sj, si = slice(max(k0, 0), min(k1 + 1, K)), slice(max(j0, 0), min(j1 + 1, J)), slice(max(i0, 0), min(i1 + 1, I))
    out[sk, sj, si] = mask[sk.start - k0:sk.stop - k0, sj.start - j0:sj.stop - j0, si.start - i0:si.stop - i0]
    return out


# --------------------------------------------------------------------------------------------- colours

def heat_colormap(scene):
    """The scene's ARSeg heat colour table over the fraction of samples that differ (0..1): transparent up to
    AGREEMENT_FRACTION (the samples agree), then dark red -> red -> yellow -> white; made once per scene."""
    for node in _nodes_with_attribute(scene, "vtkMRMLColorTableNode", ROLE_ATTRIBUTE, ROLE_COLORMAP):
        return node, False
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(HEAT_COLORMAP_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i in range(256):
        t = i / 255.0
        r, g, b = min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2))
        node.SetColor(i, f"{t:.3f}", r, g, b, 0.0 if i <= round(AGREEMENT_FRACTION * 255) else min(1.0, 0.35 + t))
    node.SetAttribute(ROLE_ATTRIBUTE, ROLE_COLORMAP)
    return node, True


# --------------------------------------------------------------------------------------------- scene queries

def _nodes_of_class(scene, class_name: str = "vtkMRMLNode") -> list:
    collection = scene.GetNodesByClass(class_name)
    nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    return nodes


def _nodes_with_attribute(scene, class_name: str, name: str, value: str) -> list:
    return [n for n in _nodes_of_class(scene, class_name) if n.GetAttribute(name) == value]


def result_nodes_of(scene, volume_node) -> list:
    """ARSeg's own nodes for this volume (role and source both set by ARSeg)."""
    vid = volume_node.GetID()
    return [n for n in _nodes_of_class(scene)
            if n.GetAttribute(ROLE_ATTRIBUTE) and n.GetAttribute(SOURCE_ATTRIBUTE) == vid]


def remove_results(scene, volume_node) -> int:
    """Remove ARSeg's earlier results for this volume (and their display/storage nodes); returns how many nodes."""
    return _remove_nodes(scene, result_nodes_of(scene, volume_node))


def _remove_nodes(scene, nodes) -> int:
    order = {ROLE_BROWSER: 0, ROLE_PROXY: 1, ROLE_SEQUENCE: 2}
    nodes = sorted(nodes, key=lambda n: order.get(n.GetAttribute(ROLE_ATTRIBUTE), 3))
    removed = 0
    for node in nodes:
        if node.GetScene() is None:
            continue  # already removed along with its browser
        helpers = []
        for getter, count in (("GetNthDisplayNode", "GetNumberOfDisplayNodes"),
                              ("GetNthStorageNode", "GetNumberOfStorageNodes")):
            if hasattr(node, count):
                helpers += [getattr(node, getter)(i) for i in range(getattr(node, count)())]
        scene.RemoveNode(node)
        removed += 1
        for helper in helpers:
            if helper is not None and helper.GetScene() is not None:
                scene.RemoveNode(helper)
    return removed


# --------------------------------------------------------------------------------------------- sequences

_private_sequences_logic: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sequences_logic(scene):
    """Desktop Slicer's Sequences logic when it serves this scene, else one private logic per scene (slicer-core).

    The logic creates proxy nodes and keeps them in step with the browser's selected item (the scale slider);
    the private one lives as long as the scene's Python object."""
    modules = getattr(slicer, "modules", None)
    sequences = getattr(modules, "sequences", None) if modules is not None else None
    if sequences is not None:
        logic = sequences.logic()
        if logic is not None and logic.GetMRMLScene() is scene:
            return logic
    logic = _private_sequences_logic.get(scene)
    if logic is None:
        logic = slicer.vtkSlicerSequencesLogic()
        logic.SetMRMLScene(scene)
        _private_sequences_logic[scene] = logic
    return logic


# --------------------------------------------------------------------------------------------- the writer

def _mark(node, role: str, volume_node, model_name: str):
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetAttribute(SOURCE_ATTRIBUTE, volume_node.GetID())
    node.SetAttribute(MODEL_ATTRIBUTE, model_name)


def _check_result_fits(volume_node, result: VolumeResult):
    shape = volume_array_shape(volume_node)
    if tuple(shape) != tuple(result.volume_shape):
        raise ResultError(f"the result is for a volume of shape {result.volume_shape}, but "
                          f"{volume_node.GetName()!r} has shape {tuple(shape)}")
    if not np.allclose(world_ijk_to_ras(volume_node), result.ijk_to_ras, atol=1e-4):
        raise ResultError(f"the result was computed on another geometry than {volume_node.GetName()!r}'s")


def volume_array_shape(volume_node) -> Tuple[int, int, int]:
    image = volume_node.GetImageData()
    if image is None:
        raise ResultError(f"volume {volume_node.GetName()!r} has no image data")
    return tuple(reversed(image.GetDimensions()))


def report_rows(report: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(measure, value, unit) rows of one nodule's report (the selected one's, at the top of a volume's report)."""
    rows = [("Model", str(report["model"]), ""), ("Mode", str(report["mode"]), "")]
    if report.get("name"):
        rows.insert(0, ("Nodule", str(report["name"]), ""))
    if report.get("point_ras_mm"):
        rows.append(("Point (R, A, S)", ", ".join(f"{v:.2f}" for v in report["point_ras_mm"]), "mm"))
    rows += [("Consensus volume", f"{report['consensus_volume_mm3']:.1f}", "mm3"),
             ("Sample volume min", f"{report['sample_volume_mm3']['min']:.1f}", "mm3"),
             ("Sample volume max", f"{report['sample_volume_mm3']['max']:.1f}", "mm3"),
             ("Sample volume mean", f"{report['sample_volume_mm3']['mean']:.1f}", "mm3")]
    if "samples_marking" in report:
        rows += [("Samples marking a nodule", f"{report['samples_marking']} of {report['n_samples']}", ""),
                 ("Volume if present", f"{report['if_present_volume_mm3']:.1f}", "mm3")]
    rows += measure_rows(report)
    for i, (v, iou) in enumerate(zip(report["sample_volumes_mm3"], report["sample_iou_with_consensus"]), 1):
        rows.append((f"Sample {i} volume", f"{v:.1f}", "mm3"))
        rows.append((f"Sample {i} IoU with consensus", f"{iou:.4f}", ""))
    settings = report.get("settings", {})
    for key in ("n_samples", "temperature", "top_k", "top_p", "seed", "pixel_spacing_mm"):
        if key in settings:
            rows.append((f"Setting {key}", str(settings[key]), ""))
    return rows


def _point_words(point) -> str:
    return ", ".join(f"{v:.1f}" for v in point)


def prompt_words(prompt: Dict[str, Any]) -> str:
    """One entry of a report's "prompts" (PromptHistory.to_list's form) in words: "click at R, A, S" or a
    refinement's points, locked scales or chosen sample."""
    if prompt.get("kind") == "click":
        return f"click at {_point_words(prompt['point_ras'])}"
    parts = [f"{p['kind']} at {_point_words(p['point_ras'])}" for p in prompt.get("prompts", [])]
    if prompt.get("lock_scales"):
        source = f"sample {prompt['from_sample']}" if prompt.get("from_sample") else "the most typical sample"
        parts.append(f"scales 1-{prompt['lock_scales']} of {source} kept, finer ones redrawn")
    if prompt.get("use_sample"):
        parts.append(f"sample {prompt['use_sample']} used")
    return "; ".join(parts) or "refinement"


def _span_words(span: Dict[str, float]) -> str:
    return f"{span['min']:.1f}-{span['max']:.1f}"


def measure_rows(report: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """(measure, value, unit) rows of what a radiologist reads besides the volume: the axial long/short axis and
    their mean with the samples' range, the mean intensity in the consensus, the prompts (absent keys: no row)."""
    rows: List[Tuple[str, str, str]] = []
    d = report.get("diameters_mm")
    if d:
        where = f" (axial slice {d['slice_index']})" if d.get("slice_index", -1) >= 0 else ""
        for key, what in (("long", "Long axis"), ("short", "Short axis"), ("mean", "Mean diameter")):
            rows.append((f"{what}{where if key == 'long' else ''}", f"{d[key]:.1f}", "mm"))
            rows.append((f"{what}, samples", _span_words(d["samples"][key]), "mm"))
    if report.get("mean_intensity") is not None:
        rows.append(("Mean intensity in the consensus", f"{report['mean_intensity']:.1f}", "HU (CT)"))
    for i, prompt in enumerate(report.get("prompts") or [], 1):
        rows.append((f"Prompt {i}", prompt_words(prompt), "R, A, S mm"))
    return rows


NODULE_COLUMNS = ("Nodule", "Consensus (mm3)", "Samples min (mm3)", "Samples max (mm3)", "Samples mean (mm3)",
                  "Samples marking", "If present (mm3)", "IoU with consensus", "Long axis (mm)", "Short axis (mm)",
                  "Mean diameter (mm)", "Samples long axis (mm)", "Mean intensity", "Prompts", "Point R, A, S (mm)",
                  "Model")


def nodule_rows(report: Dict[str, Any]) -> List[Tuple[str, ...]]:
    """The report table: a row per nodule, the columns of NODULE_COLUMNS."""
    rows = []
    for n in report.get("nodules", []):
        ious = n["sample_iou_with_consensus"] or [0.0]
        point = n.get("point_ras_mm")
        d = n.get("diameters_mm")
        intensity = n.get("mean_intensity")
        rows.append((n["name"], f"{n['consensus_volume_mm3']:.1f}", f"{n['sample_volume_mm3']['min']:.1f}",
                     f"{n['sample_volume_mm3']['max']:.1f}", f"{n['sample_volume_mm3']['mean']:.1f}",
                     f"{n.get('samples_marking', n['n_samples'])} of {n['n_samples']}",
                     f"{n.get('if_present_volume_mm3', n['consensus_volume_mm3']):.1f}",
                     f"{min(ious):.2f}-{max(ious):.2f}",
                     *((f"{d['long']:.1f}", f"{d['short']:.1f}", f"{d['mean']:.1f}", _span_words(d["samples"]["long"]))
                       if d else ("",) * 4),
                     "" if intensity is None else f"{intensity:.1f}",
                     "; ".join(prompt_words(p) for p in n.get("prompts") or []),
                     ", ".join(f"{v:.2f}" for v in point) if point else "", str(n["model"])))
    return rows


def _fill_table(node, report: Dict[str, Any]):
    table = node.GetTable()
    while table.GetNumberOfColumns():
        table.RemoveColumn(0)
    columns = []
    for title in NODULE_COLUMNS:
        column = vtk.vtkStringArray()
        column.SetName(title)
        columns.append(column)
    for row in nodule_rows(report):
        for column, value in zip(columns, row):
            column.InsertNextValue(value)
    for column in columns:
        table.AddColumn(column)
    node.SetAttribute(REPORT_ATTRIBUTE, json.dumps(report))
    node.Modified()
    return node


def _table_node(name: str, report: Dict[str, Any]):
    node = slicer.vtkMRMLTableNode()
    node.SetName(name)
    return _fill_table(node, report)


# the selected nodule's numbers sit at the top of a volume's report too: what a one-nodule reader (the module's
# summary line, `arseg segment`'s printout) reads
def volume_report(source: str, nodules: List[Dict[str, Any]], selected: Optional[str]) -> Dict[str, Any]:
    chosen = next((n for n in nodules if n["id"] == selected), nodules[-1] if nodules else {})
    report = dict(chosen)
    report.update(source=source, selected_nodule=chosen.get("id"), nodules=nodules, n_nodules=len(nodules))
    return report


def _nodule_entry(result: VolumeResult, nid: str, volume=None) -> Dict[str, Any]:
    """volume: the input's (k, j, i) voxels, for the mean intensity in the consensus."""
    entry = result.report("", volume)
    entry.pop("source", None)
    return {"id": nid, "name": nodule_name(nid), **entry}


# --------------------------------------------------------------------------------------------- segments of nodules

def _segment_mask(segment) -> Tuple[Optional[np.ndarray], Tuple[int, int, int], Optional[np.ndarray]]:
    """(0/1 mask over the segment's labelmap extent, its (k, j, i) start, the labelmap's IJK->RAS); the label
    value picks the segment out of a shared labelmap layer (as Slicer keeps them after editing or loading)."""
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None:
        return None, (0, 0, 0), None
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    if i1 < i0 or j1 < j0 or k1 < k0 or image.GetPointData().GetScalars() is None:
        return None, (k0, j0, i0), _matrix_to_numpy(m)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0 + 1, j1 - j0 + 1,
                                                                                 i1 - i0 + 1)
    return (values == segment.GetLabelValue()).astype(np.uint8), (k0, j0, i0), _matrix_to_numpy(m)


def _copy_segment(segment, local_m: np.ndarray):
    """A fresh segment with the same voxels, name, colour and tags, in a labelmap of its own."""
    mask, start, m = _segment_mask(segment)
    if m is not None and mask is not None and not np.allclose(m, local_m, atol=1e-4):
        raise ResultError(f"segment {segment.GetName()!r} is not on the volume's grid; ARSeg cannot keep it")
    labelmap = _oriented_labelmap(mask if mask is not None else np.zeros((0, 0, 0), np.uint8), start, local_m)
    tags = {key: segment_tag(segment, key) for key in (NODULE_TAG, KIND_TAG)}
    return _segment("", segment.GetName(), segment.GetColor(), labelmap, get_terminology(segment) or None,
                    {k: v for k, v in tags.items() if v})


def nodule_segment_ids(segmentation_node, nid: str) -> List[str]:
    """Every segment of one nodule, in order (by the ARSeg.Nodule tag; by the ID pattern for untagged ones)."""
    segmentation = segmentation_node.GetSegmentation()
    out = []
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        tag = segment_tag(segmentation.GetSegment(sid), NODULE_TAG)
        if tag == nid or (not tag and (sid == nid or sid.startswith(nid + "_"))):
            out.append(sid)
    return out


def _segment_holds(segment, point_local_ras) -> bool:
    mask, (k0, j0, i0), m = _segment_mask(segment)
    if mask is None:
        return False
    i, j, k = np.rint((np.linalg.inv(m) @ np.append(np.asarray(point_local_ras, float), 1.0))[:3]).astype(int)
    k, j, i = k - k0, j - j0, i - i0
    return bool(0 <= k < mask.shape[0] and 0 <= j < mask.shape[1] and 0 <= i < mask.shape[2] and mask[k, j, i])


def nodule_at_point(scene, volume_node, point_ras) -> Optional[str]:
    """The nodule whose consensus (or, where that is empty, its consensus if present) holds the world RAS point:
    a click there redoes that nodule instead of adding one. None if no nodule does."""
    nodes = find_results(scene, volume_node)
    if nodes is None:
        return None
    return _nodule_holding(nodes, volume_node, point_ras)


def _nodule_holding(nodes: ResultNodes, volume_node, point_ras) -> Optional[str]:
    ijk = np.linalg.inv(world_ijk_to_ras(volume_node)) @ np.append(np.asarray(point_ras, float), 1.0)
    local = (local_ijk_to_ras(volume_node) @ ijk)[:3]
    segmentation = nodes.segmentation.GetSegmentation()
    for nid in nodes.nodule_ids:
        for sid in (nid, if_present_segment_id(nid)):
            segment = segmentation.GetSegment(sid)
            if segment is not None and _segment_holds(segment, local):
                return nid
    return None


# a click just outside a nodule's edge finds the same nodule (the component within 5 mm of the click is kept):
# when the new mask lies mostly on an existing nodule, that nodule is redone rather than drawn twice
SAME_NODULE_OVERLAP = 0.5


def _nodule_overlapping(nodes: ResultNodes, result: VolumeResult, local_m) -> Optional[str]:
    """The existing nodule whose mask covers at least half of the new result's (consensus, or if present), or
    None. The new mask is on the result's box; each nodule's on its own labelmap extent."""
    new = result.consensus if result.consensus.any() else result.if_present
    if new is None or not new.any():
        return None
    start = np.array([a for a, _ in result.box])
    segmentation = nodes.segmentation.GetSegmentation()
    best, best_share = None, 0.0
    for nid in nodes.nodule_ids:
        covered = 0
        for sid in (nid, if_present_segment_id(nid)):
            segment = segmentation.GetSegment(sid)
            if segment is None:
                continue
            mask, seg_start, m = _segment_mask(segment)
            if mask is None or not np.allclose(m, local_m, atol=1e-4):
                continue
            lo = np.maximum(start, seg_start)
            hi = np.minimum(start + np.array(new.shape), np.array(seg_start) + np.array(mask.shape))
            if np.any(hi <= lo):
                continue
            a = new[tuple(slice(l - s0, h - s0) for l, h, s0 in zip(lo, hi, start))]
            b = mask[tuple(slice(l - s0, h - s0) for l, h, s0 in zip(lo, hi, seg_start))]
            covered = max(covered, int(np.count_nonzero((a > 0) & (b > 0))))
        share = covered / int(np.count_nonzero(new))
        if share > best_share:
            best, best_share = nid, share
    return best if best_share >= SAME_NODULE_OVERLAP else None


def _new_nodule_id(nodule_ids: Sequence[str]) -> str:
    # numbers are never reused within a volume: "Nodule 3" stays the third click's nodule after 2 is deleted
    numbers = [n for n in (nodule_number(i) for i in nodule_ids) if n is not None]
    return nodule_id(max(numbers, default=0) + 1)


def _nodule_segments(nid: str, number: int, result: VolumeResult, options: OutputOptions):
    """(segment ID, name, colour, box mask, terminology, kind, visible) of one nodule's segments."""
    name = nodule_name(nid)
    color = options.consensus_color if number <= 1 else NODULE_COLORS[(number - 1) % len(NODULE_COLORS)]
    consensus_shown = bool(result.consensus.any())
    out = [(nid, name, color, result.consensus, options.terminology, KIND_CONSENSUS, True)]
    disagreement = (result.disagreement > options.disagreement_threshold).astype(np.uint8)
    out.append((disagreement_segment_id(nid), f"{name} disagreement", options.disagreement_color, disagreement,
                None, KIND_DISAGREEMENT, False))
    if result.if_present is not None:
        paler = tuple(0.5 + 0.5 * c for c in color)
        out.append((if_present_segment_id(nid), f"{name} if present", paler, result.if_present, options.terminology,
                    KIND_IF_PRESENT, not consensus_shown and bool(result.if_present.any())))
    for k in range(1, result.n_scales + 1):
        out.append((scale_segment_id(k, nid), f"{name} scale {k}/{result.n_scales}", _scale_color(k, result.n_scales),
                    result.scale_mask(k), options.terminology, KIND_SCALE, False))
    if options.include_samples:
        for i in range(1, result.n_samples + 1):
            out.append((sample_segment_id(i, nid), f"{name} sample {i}", options.sample_color, result.sample_mask(i),
                        options.terminology, KIND_SAMPLE, False))
    return out


def _new_segmentation_node(name: str, local_m, volume_shape):
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                        _reference_geometry(local_m, volume_shape))
    return node


def _scale_item(name: str, k: int, n_scales: int, segment):
    item = slicer.vtkMRMLSegmentationNode()
    item.SetName(f"{name} scale {k}/{n_scales}")
    segmentation = item.GetSegmentation()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    # one segment ID in every item, so that the proxy's display settings carry over while scrubbing
    segmentation.AddSegment(segment, "Scale")
    return item


def _fill_scales(sequence, nodes_of_nodule: List[Any], volume_node, model_name: str):
    sequence.RemoveAllDataNodes()
    for k, item in enumerate(nodes_of_nodule, 1):
        sequence.SetDataNodeAtValue(item, str(k))
    # every sequence item carries ARSeg's marks: the Sequences logic copies an item into the proxy whenever the
    # selected scale changes, and the proxy must stay recognisable as ARSeg's
    for k in range(sequence.GetNumberOfDataNodes()):
        _mark(sequence.GetNthDataNode(k), ROLE_PROXY, volume_node, model_name)


def _disagreement_volume(name, fraction_box: np.ndarray, box, local_m):
    """The fraction of disagreeing samples on the result's box, aligned voxel for voxel with the input volume."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    k0, j0, i0 = (a for a, _ in box)
    offset = np.eye(4)
    offset[:3, 3] = (i0, j0, k0)
    m = local_m @ offset
    image = vtk.vtkImageData()
    nk, nj, ni = fraction_box.shape
    image.SetDimensions(ni, nj, nk)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values[:] = fraction_box.astype(np.float32).reshape(-1)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_numpy_to_matrix(m))
    return node


def _show_fraction(target, source):
    """The displayed disagreement volume takes the voxels and geometry of one nodule's stored fraction."""
    image = vtk.vtkImageData()
    image.DeepCopy(source.GetImageData())
    m = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(m)
    target.SetAndObserveImageData(image)
    target.SetIJKToRASMatrix(m)


def add_closed_surfaces(segmentation_node, shown: Optional[Dict[str, bool]] = None) -> int:
    """The closed surface (3D view) of every nodule's consensus, and of each "if present" segment that `shown`
    marks visible (all of them if None), where it lacks one; returns how many were made.

    Only these: the scales, samples and disagreement are hidden, and a surface costs the main thread about 10 ms
    apiece on every click (a lung1 nodule's). The segments are converted in a scratch segmentation because
    vtkSegmentation.CreateRepresentation converts every segment; each keeps its surface when it leaves the scratch
    one. The node's segmentation then contains the representation (Slicer asks its first segment, always a
    consensus), so the 3D view draws it, as after Segment Editor's "Show 3D"."""
    name = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    segmentation = segmentation_node.GetSegmentation()
    wanted = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    kinds = {sid: segment_tag(segmentation.GetSegment(sid), KIND_TAG) for sid in wanted}
    wanted = [sid for sid in wanted if segmentation.GetSegment(sid).GetRepresentation(name) is None and (
        kinds[sid] == KIND_CONSENSUS or (kinds[sid] == KIND_IF_PRESENT and (shown or {}).get(sid, shown is None)))]
    if not wanted:
        return 0
    register_segmentation_converters()
    scratch = slicer.vtkSegmentation()
    scratch.SetSourceRepresentationName(segmentation.GetSourceRepresentationName())
    scratch.CopyConversionParameters(segmentation)
    for sid in wanted:
        scratch.AddSegment(segmentation.GetSegment(sid), sid)
    try:
        if not scratch.CreateRepresentation(name):
            raise ResultError("Slicer could not make the nodules' closed surfaces (no converter registered?)")
    finally:
        for sid in wanted:
            scratch.RemoveSegment(sid)
    return len(wanted)


def place_beside_volume(scene, volume_node, nodes) -> None:
    """Put the nodes where the volume is in Subject Hierarchy (its study, for a CT loaded from DICOM), as
    TotalSegmentator does, instead of at the scene's top level. The volume stays where it is. Nothing happens
    where the volume has no subject-hierarchy item (a headless scene that does not use the hierarchy)."""
    hierarchy = scene.GetSubjectHierarchyNode()
    volume_item = hierarchy.GetItemByDataNode(volume_node) if hierarchy is not None else 0
    if not volume_item:
        return
    parent = hierarchy.GetItemParent(volume_item) or hierarchy.GetSceneItemID()
    # headless, nothing removes an item when its node leaves the scene (desktop Slicer's Subject Hierarchy module
    # does): the items made here for an earlier run's nodes go now
    stale = vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), stale, True)
    for i in range(stale.GetNumberOfIds()):
        item = stale.GetId(i)
        data = hierarchy.GetItemDataNode(item)
        if hierarchy.GetItemAttribute(item, ROLE_ATTRIBUTE) and (data is None or data.GetScene() is not scene):
            hierarchy.RemoveItem(item, False, False)
    for node in nodes:
        if node is None or node.GetScene() is not scene or node.GetHideFromEditors():
            continue  # desktop Slicer gives hidden nodes no item either
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:  # headless: no Subject Hierarchy module made the item when the node was added
            item = hierarchy.CreateItem(parent, node)
            hierarchy.SetItemAttribute(item, ROLE_ATTRIBUTE, node.GetAttribute(ROLE_ATTRIBUTE) or "result")


def write_result(scene, volume_node, result: VolumeResult, options: Optional[OutputOptions] = None,
                 nodule: Optional[str] = None, replace_with_empty: bool = False) -> ResultNodes:
    """A run's result into the scene as a nodule of volume_node: a new one ("Nodule N", N one more than the
    highest so far), or, when the click lies inside an existing nodule, or its new mask lies mostly (half or
    more) on one, or nodule= names one, that nodule redone. The other nodules are kept as they were; the new
    one is selected. A whole-volume result is the entry "Whole volume". Atomic: every node is built first,
    then added, then ARSeg's previous nodes for this volume are removed; on an error the scene is as it was.

    Nothing is lost: a redo says so in the returned notices and undo_last restores the nodule's previous
    result; a redo that found nothing does not replace a nodule that has a mask (the scene stays as it was and
    a notice says why) unless replace_with_empty is set."""
    options = options or OutputOptions()
    if volume_node is None or volume_node.GetScene() is not scene:
        raise ResultError("the input volume must be a node of this scene")
    _check_result_fits(volume_node, result)
    register_segmentation_converters()
    base = volume_node.GetName() or "Volume"
    local_m = local_ijk_to_ras(volume_node)

    previous = find_results(scene, volume_node)
    # results written before nodules existed (no "nodules" in the report) are replaced as a whole
    kept = previous.report.get("nodules", []) if previous is not None else []
    if nodule is not None and nodule not in [n["id"] for n in kept]:
        raise ResultError(f"{base!r} has no nodule {nodule!r} to redo (it has {[n['id'] for n in kept]})")
    if nodule is None:
        if result.mode != "click":
            nodule = WHOLE_VOLUME_ID
        elif previous is not None and kept and result.point_ras is not None:
            nodule = _nodule_holding(previous, volume_node, result.point_ras) or \
                _nodule_overlapping(previous, result, local_m)
        nodule = nodule or _new_nodule_id([n["id"] for n in kept])
    replaced = next((n for n in kept if n["id"] == nodule), None)
    if replaced is not None and _entry_marks(replaced) and not _result_marks(result) and not replace_with_empty:
        # e.g. a click on a nodule's edge that the model answers with nothing: the user's nodule is kept
        nodes = find_results(scene, volume_node)
        nodes.results = [result]
        nodes.notices = [f"{nodule_name(nodule)} kept as it was ({_entry_volume(replaced)}): the run at "
                         f"{_ras_words(result.point_ras)} found nothing there ({result.samples_marking} of "
                         f"{result.n_samples} samples mark anything)"]
        return nodes
    entry = _nodule_entry(result, nodule, volume_array(volume_node, copy=False))
    nodules = [entry if n["id"] == nodule else n for n in kept]
    if nodule not in [n["id"] for n in nodules]:
        nodules.append(entry)
    report = volume_report(base, nodules, nodule)
    number = nodule_number(nodule) or 1

    # build everything outside the scene: the segmentation with every nodule, in the order they were made
    segmentation = _new_segmentation_node(f"{base} ARSeg", local_m, result.volume_shape)
    start = [a for a, _ in result.box]
    visibility: Dict[str, bool] = {}
    for n in nodules:
        if n["id"] == nodule:
            for sid, name, color, mask, terminology, kind, visible in _nodule_segments(nodule, number, result, options):
                segment = _segment(sid, name, color, _oriented_labelmap(mask, start, local_m), terminology,
                                   {NODULE_TAG: nodule, KIND_TAG: kind})
                segmentation.GetSegmentation().AddSegment(segment, sid)
                visibility[sid] = visible
        else:
            old_display = previous.segmentation.GetDisplayNode()
            for sid in nodule_segment_ids(previous.segmentation, n["id"]):
                old = previous.segmentation.GetSegmentation().GetSegment(sid)
                segmentation.GetSegmentation().AddSegment(_copy_segment(old, local_m), sid)
                visibility[sid] = bool(old_display.GetSegmentVisibility(sid)) if old_display is not None else False

    add_closed_surfaces(segmentation, visibility)  # the nodules in the 3D view

    # every nodule's disagreement fraction, kept for when it is selected again
    disagreements = slicer.vtkMRMLSequenceNode()
    disagreements.SetName(f"{base} ARSeg disagreement by nodule")
    disagreements.SetIndexName("nodule")
    disagreements.SetIndexType(disagreements.TextIndex)
    fraction = _disagreement_volume(f"{base} ARSeg {nodule_name(nodule)} disagreement", result.disagreement,
                                    result.box, local_m)
    for n in nodules:
        item = fraction if n["id"] == nodule else (
            previous.disagreements.GetDataNodeAtValue(n["id"]) if previous.disagreements is not None else None)
        if item is not None:
            disagreements.SetDataNodeAtValue(item, n["id"])
    disagreement = _disagreement_volume(f"{base} ARSeg disagreement", result.disagreement, result.box, local_m)

    sequence = slicer.vtkMRMLSequenceNode()
    sequence.SetName(f"{base} ARSeg scales")
    sequence.SetIndexName("scale")
    sequence.SetIndexUnit("")
    sequence.SetIndexType(sequence.NumericIndex)
    items = [_scale_item(base, k, result.n_scales, _segment(
        "Scale", f"{nodule_name(nodule)} scale {k}/{result.n_scales}", _scale_color(k, result.n_scales),
        _oriented_labelmap(result.scale_mask(k), start, local_m), options.terminology))
        for k in range(1, result.n_scales + 1)]
    _fill_scales(sequence, items, volume_node, result.model_name)
    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(f"{base} ARSeg scale browser")
    table = _table_node(f"{base} ARSeg report", report)
    colormap, new_colormap = heat_colormap(scene)
    for node, role in ((segmentation, ROLE_SEGMENTATION), (disagreement, ROLE_DISAGREEMENT), (sequence, ROLE_SEQUENCE),
                       (browser, ROLE_BROWSER), (table, ROLE_REPORT), (disagreements, ROLE_DISAGREEMENTS)):
        _mark(node, role, volume_node, result.model_name)
    segmentation.SetAttribute(SELECTED_ATTRIBUTE, nodule)
    segmentation.SetAttribute(REPORT_ATTRIBUTE, json.dumps(report))

    # what undo_last needs to put the nodule back as it was (taken before the earlier nodes go)
    undo = _undo_step(previous, nodule, replaced, local_m, result.volume_shape)

    # then add; only when everything is in place, remove the earlier results; on failure, remove what was added
    previous_nodes = [n for n in result_nodes_of(scene, volume_node) if n.GetAttribute(ROLE_ATTRIBUTE) != ROLE_HISTORY]
    added: list = []
    parent_id = volume_node.GetTransformNodeID()
    try:
        scene.StartState(scene.BatchProcessState)
        try:
            if new_colormap:
                added.append(scene.AddNode(colormap))
            for node in (segmentation, disagreement, sequence, browser, table, disagreements):
                added.append(scene.AddNode(node))
            segmentation.CreateDefaultDisplayNodes()
            added.append(segmentation.GetDisplayNode())
            display = segmentation.GetDisplayNode()
            for segment_id, visible in visibility.items():
                display.SetSegmentVisibility(segment_id, bool(visible))
            disagreement.CreateDefaultDisplayNodes()
            dd = disagreement.GetDisplayNode()
            added.append(dd)
            dd.SetAndObserveColorNodeID(colormap.GetID())
            dd.AutoWindowLevelOff()
            dd.SetWindowLevelMinMax(0.0, 1.0)
            dd.SetApplyThreshold(True)
            # where the samples agree the CT shows through (Slicer's scalar display draws a voxel or not: the
            # table's alpha counts only as zero or not, so the threshold is what hides up to 4 of 16 differing)
            dd.SetLowerThreshold(float(options.heat_agreement_fraction) + 1e-6)
            dd.SetUpperThreshold(1.0)
            if parent_id:
                segmentation.SetAndObserveTransformNodeID(parent_id)
                disagreement.SetAndObserveTransformNodeID(parent_id)
        finally:
            scene.EndState(scene.BatchProcessState)
        # after the batch: a Sequences logic watching the scene makes the proxy when the browser gets its sequence,
        # and a proxy made inside the batch left the slice views drawing none of the new segmentation
        # (Testing/test_mrml_views.py)
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        browser.SetIndexDisplayFormat("%.0f")

        sequences_logic(scene).UpdateProxyNodesFromSequences(browser)
        proxy = browser.GetProxyNode(sequence)
        if proxy is None:
            raise ResultError("the sequence browser made no proxy node for the scales")
        added.append(proxy)
        browser.SetOverwriteProxyName(sequence, False)  # keep our name while the slider scrubs
        browser.SetSelectedItemNumber(result.n_scales - 1)  # the finest scale, i.e. the consensus
        proxy.SetName(f"{base} ARSeg scale")
        _mark(proxy, ROLE_PROXY, volume_node, result.model_name)
        if parent_id:
            proxy.SetAndObserveTransformNodeID(parent_id)
        if proxy.GetDisplayNode() is None:
            proxy.CreateDefaultDisplayNodes()
        for i in range(proxy.GetNumberOfDisplayNodes()):
            added.append(proxy.GetNthDisplayNode(i))
        for i in range(proxy.GetNumberOfStorageNodes()):
            added.append(proxy.GetNthStorageNode(i))
        proxy.GetDisplayNode().SetVisibility(bool(options.show_scale_proxy))
    except Exception:
        # a Sequences logic that observes the scene makes the proxy as soon as the browser has its sequence:
        # it goes too, with its display and storage nodes
        proxy = browser.GetProxyNode(sequence) if browser.GetScene() is not None else None
        if proxy is not None:
            added += [proxy] + [proxy.GetNthDisplayNode(i) for i in range(proxy.GetNumberOfDisplayNodes())] + \
                     [proxy.GetNthStorageNode(i) for i in range(proxy.GetNumberOfStorageNodes())]
        # the browser first: while it is in the scene, that logic makes a new proxy for each one removed
        for node in [browser] + list(reversed(added)):
            if node is not None and node.GetScene() is not None:
                scene.RemoveNode(node)
        raise
    _remove_nodes(scene, previous_nodes)
    place_beside_volume(scene, volume_node, (segmentation, disagreement, table, sequence, browser, proxy,
                                             disagreements))
    _push_undo(scene, volume_node, result.model_name, *undo)
    notices = []
    if replaced is not None:
        notices.append(f"{nodule_name(nodule)} redone: {_entry_volume(replaced)} -> {_entry_volume(entry)} "
                       f"(undo restores the previous result)")
    return ResultNodes(segmentation=segmentation, disagreement_volume=disagreement, sequence=sequence,
                       browser=browser, proxy=proxy, table=table, colormap=colormap, report=report, result=result,
                       nodule=nodule, disagreements=disagreements, results=[result], notices=notices)


# --------------------------------------------------------------------------------------------- undo

def _entry_marks(entry: Dict[str, Any]) -> bool:
    return float(entry.get("consensus_volume_mm3", 0.0)) > 0 or float(entry.get("if_present_volume_mm3", 0.0)) > 0


def _result_marks(result: VolumeResult) -> bool:
    return bool(result.consensus.any()) or (result.if_present is not None and bool(result.if_present.any()))


def _entry_volume(entry: Dict[str, Any]) -> str:
    consensus = float(entry.get("consensus_volume_mm3", 0.0))
    if consensus == 0 and float(entry.get("if_present_volume_mm3", 0.0)) > 0:
        return f"0 mm3, {float(entry['if_present_volume_mm3']):.0f} mm3 if present"
    return f"{consensus:.0f} mm3"


def _ras_words(point) -> str:
    return "the volume" if point is None else "R,A,S " + ", ".join(f"{float(v):.1f}" for v in point)


def _undo_step(previous: Optional[ResultNodes], nid: str, replaced: Optional[Dict[str, Any]], local_m,
               volume_shape):
    """(step, segments, disagreement fraction) that puts nid back as it was before this write: gone again if
    the write adds it; its segments, report row and disagreement fraction if the write replaces it."""
    selected = previous.nodule if previous is not None else None
    if replaced is None or previous is None:
        return {"kind": "added", "nodule": nid, "selected": selected}, None, None
    snapshot = _new_segmentation_node("undo", local_m, volume_shape)
    display = previous.segmentation.GetDisplayNode()
    visible = []
    for sid in nodule_segment_ids(previous.segmentation, nid):
        snapshot.GetSegmentation().AddSegment(_copy_segment(previous.segmentation.GetSegmentation().GetSegment(sid),
                                                            local_m), sid)
        if display is not None and display.GetSegmentVisibility(sid):
            visible.append(sid)
    fraction = previous.disagreements.GetDataNodeAtValue(nid) if previous.disagreements is not None else None
    step = {"kind": "replaced", "nodule": nid, "selected": selected, "entry": replaced, "visible": visible}
    return step, snapshot, fraction


def _history_node(scene, volume_node, model_name: Optional[str] = None):
    """The volume's undo history (a sequence node, hidden from editors); made when model_name is given."""
    for node in result_nodes_of(scene, volume_node):
        if node.GetAttribute(ROLE_ATTRIBUTE) == ROLE_HISTORY:
            return node
    if model_name is None:
        return None
    history = slicer.vtkMRMLSequenceNode()
    history.SetName(f"{volume_node.GetName() or 'Volume'} ARSeg undo history")
    history.SetIndexName("step")
    history.SetIndexType(history.TextIndex)
    history.SetHideFromEditors(True)
    _mark(history, ROLE_HISTORY, volume_node, model_name)
    scene.AddNode(history)
    return history


def _undo_steps(history) -> List[Dict[str, Any]]:
    return json.loads(history.GetAttribute(HISTORY_STEPS_ATTRIBUTE) or "[]") if history is not None else []


def _set_undo_steps(history, steps: List[Dict[str, Any]]) -> None:
    history.SetAttribute(HISTORY_STEPS_ATTRIBUTE, json.dumps(steps))


def _drop_step_items(history, step: Dict[str, Any]) -> None:
    for value in (step["index"], f"{step['index']} disagreement"):
        if history.GetDataNodeAtValue(value) is not None:
            history.RemoveDataNodeAtValue(value)


def _push_undo(scene, volume_node, model_name: str, step: Dict[str, Any], snapshot, fraction) -> None:
    history = _history_node(scene, volume_node, model_name)
    steps = _undo_steps(history)
    step = dict(step, index=str(int(steps[-1]["index"]) + 1 if steps else 1))
    if snapshot is not None:
        history.SetDataNodeAtValue(snapshot, step["index"])
    if fraction is not None:
        history.SetDataNodeAtValue(fraction, f"{step['index']} disagreement")
    steps.append(step)
    while len(steps) > MAX_UNDO_STEPS:
        _drop_step_items(history, steps.pop(0))
    _set_undo_steps(history, steps)


def can_undo(scene, volume_node) -> bool:
    return bool(_undo_steps(_history_node(scene, volume_node)))


def last_undo_step(scene, volume_node) -> Optional[Tuple[str, str]]:
    """(its index, its nodule) of the step undo_last would undo next, or None: what a front end that keeps more
    per step (the page: the run service's memory of that nodule) ties its own record to."""
    steps = _undo_steps(_history_node(scene, volume_node))
    return (steps[-1]["index"], steps[-1]["nodule"]) if steps else None


def undo_last(scene, volume_node) -> Tuple[Optional[ResultNodes], str]:
    """Undo the last run on this volume: a nodule it added goes, a nodule it redid gets its previous result
    (segments, disagreement, report row) back. Returns (the nodes, or None when no nodule is left; what was
    undone, in words). ResultError when there is nothing to undo."""
    history = _history_node(scene, volume_node)
    steps = _undo_steps(history)
    if not steps:
        raise ResultError(f"nothing to undo for {volume_node.GetName()!r}")
    step = steps[-1]
    nid = step["nodule"]
    nodes = _results_or_error(scene, volume_node)
    if step["kind"] == "added":
        words = f"{nodule_name(nid)} removed (undo of the run that added it)"
        _set_undo_steps(history, steps[:-1])
        nodes = delete_nodule(scene, volume_node, nid)  # the last nodule takes the history with it
        if nodes is not None and step.get("selected") in nodes.nodule_ids and step["selected"] != nodes.nodule:
            nodes = select_nodule(scene, volume_node, step["selected"])
        return nodes, words
    local_m = local_ijk_to_ras(volume_node)
    snapshot = history.GetDataNodeAtValue(step["index"])
    segmentation = nodes.segmentation.GetSegmentation()
    for sid in nodule_segment_ids(nodes.segmentation, nid):
        segmentation.RemoveSegment(sid)
    display = nodes.segmentation.GetDisplayNode()
    saved = snapshot.GetSegmentation()
    for i in range(saved.GetNumberOfSegments()):
        sid = saved.GetNthSegmentID(i)
        segmentation.AddSegment(_copy_segment(saved.GetSegment(sid), local_m), sid)
        if display is not None:
            display.SetSegmentVisibility(sid, sid in step.get("visible", []))
    fraction = history.GetDataNodeAtValue(f"{step['index']} disagreement")
    if fraction is not None and nodes.disagreements is not None:
        nodes.disagreements.SetDataNodeAtValue(fraction, nid)
    entries = [step["entry"] if n["id"] == nid else n for n in nodes.report.get("nodules", [])]
    nodes.report = volume_report(nodes.report.get("source", ""), entries, nid)
    nodes.segmentation.SetAttribute(REPORT_ATTRIBUTE, json.dumps(nodes.report))
    if nodes.table is not None:
        _fill_table(nodes.table, nodes.report)
    _drop_step_items(history, step)
    _set_undo_steps(history, steps[:-1])
    nodes = select_nodule(scene, volume_node, nid)
    return nodes, f"{nodule_name(nid)} back to its previous result ({_entry_volume(step['entry'])})"


def select_scale(nodes: ResultNodes, k: int, show: bool = True):
    """Show the selected nodule's consensus after scale k (1-based) through the proxy: what the scale slider does."""
    n = nodes.sequence.GetNumberOfDataNodes()
    if not 1 <= k <= n:
        raise IndexError(f"scale {k} out of 1..{n}")
    nodes.browser.SetSelectedItemNumber(k - 1)
    display = nodes.proxy.GetDisplayNode() if nodes.proxy is not None else None
    if display is not None:
        display.SetVisibility(bool(show))


# --------------------------------------------------------------------------------------------- first outline

OUTLINE_SEGMENT_ID = "FirstOutline"
OUTLINE_COLOR = (0.30, 0.85, 1.00)


def outline_node(scene, volume_node):
    """The volume's first-outline node while a click's run goes on, else None."""
    return next((n for n in result_nodes_of(scene, volume_node) if n.GetAttribute(ROLE_ATTRIBUTE) == ROLE_OUTLINE),
                None)


def show_outline(scene, volume_node, outline):
    """A click's first outline (pipeline.Outline: one plane from a fast pass) as a segmentation node of its own,
    drawn as an outline in the slice views, until the result replaces it. It is no nodule: not in the report, the
    nodule list or the undo history. write_result removes it with ARSeg's earlier nodes, in the same scene update
    that adds the result (no frame shows neither); remove_outline does for a run that ends otherwise."""
    if volume_node is None or volume_node.GetScene() is not scene:
        raise ResultError("the input volume must be a node of this scene")
    if tuple(volume_array_shape(volume_node)) != tuple(outline.volume_shape) or \
            not np.allclose(world_ijk_to_ras(volume_node), outline.ijk_to_ras, atol=1e-4):
        raise ResultError(f"the outline was computed on another volume than {volume_node.GetName()!r}")
    register_segmentation_converters()
    local_m = local_ijk_to_ras(volume_node)
    node = _new_segmentation_node(f"{volume_node.GetName() or 'Volume'} ARSeg first outline", local_m,
                                  outline.volume_shape)
    labelmap = _oriented_labelmap(outline.volume_mask, [b[0] for b in outline.box], local_m)
    node.GetSegmentation().AddSegment(_segment(OUTLINE_SEGMENT_ID, "First outline", OUTLINE_COLOR, labelmap),
                                      OUTLINE_SEGMENT_ID)
    _mark(node, ROLE_OUTLINE, volume_node, "")
    remove_outline(scene, volume_node)
    scene.AddNode(node)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetVisibility2DFill(False)  # an outline: the reviewer sees the CT inside it
    display.SetVisibility3D(False)
    return node


def remove_outline(scene, volume_node) -> int:
    """Remove the volume's first outline, if there is one (how many nodes went)."""
    node = outline_node(scene, volume_node)
    return _remove_nodes(scene, [node]) if node is not None else 0


# --------------------------------------------------------------------------------------------- one sample shown

SAMPLE_VIEW_SEGMENT_ID = "ShownSample"
SAMPLE_VIEW_COLOR = (0.95, 0.35, 0.60)  # apart from the nodules' colours and the red disagreement
SHOWN_SAMPLE_ATTRIBUTE = "ARSeg.ShownSample"  # on the sample-view node: "Nodule_2/5"
CONSENSUS_FILL_ATTRIBUTE = "ARSeg.ConsensusFillOpacity"  # the consensus' 2D fill opacity before the sample showed


def sample_view_node(scene, volume_node):
    """The volume's sample-view node while one sample is shown (show_sample), else None."""
    return next((n for n in result_nodes_of(scene, volume_node)
                 if n.GetAttribute(ROLE_ATTRIBUTE) == ROLE_SAMPLE_VIEW), None)


def shown_sample(scene, volume_node) -> Optional[Tuple[str, int]]:
    """(nodule ID, sample number) of the sample shown over the CT, or None when the consensus is."""
    node = sample_view_node(scene, volume_node)
    if node is None:
        return None
    nid, _, number = (node.GetAttribute(SHOWN_SAMPLE_ATTRIBUTE) or "").rpartition("/")
    return (nid, int(number)) if nid and number.isdigit() else None


def show_sample(scene, volume_node, sample: Optional[int], result: Optional[VolumeResult] = None):
    """Sample `sample` (1-based) of the selected nodule over the CT, filled, while that nodule's consensus is drawn
    as an outline only (the reviewer compares the two); None shows the consensus again. The sample's voxels come
    from its kept segment (OutputOptions.include_samples) or else from `result`, the nodule's current result (the
    run service remembers it for the session); with neither, a ResultError says how to get them.

    Like the first outline, the sample is a node of its own, no nodule: not in the report, the nodule list or the
    undo history, and write_result removes it with ARSeg's earlier nodes (a new result opens on its consensus).
    Returns the sample-view node, or None."""
    nodes = _results_or_error(scene, volume_node)
    hide_sample(scene, volume_node, nodes)
    if sample is None:
        return None
    nid = nodes.nodule
    entry = nodule_report(nodes, nid)
    n = int(entry.get("n_samples", 0))
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or not 1 <= sample <= n:
        raise ResultError(f"{nodule_name(nid)} has samples 1 to {n}, not {sample!r}")
    local_m = local_ijk_to_ras(volume_node)
    kept = nodes.segmentation.GetSegmentation().GetSegment(sample_segment_id(int(sample), nid))
    if kept is not None:
        mask, start, m = _segment_mask(kept)
        if mask is None:
            mask, start = np.zeros((0, 0, 0), np.uint8), (0, 0, 0)
        elif not np.allclose(m, local_m, atol=1e-4):
            raise ResultError(f"{kept.GetName()!r} is not on the volume's grid")
    elif result is not None:
        _check_result_fits(volume_node, result)
        if result.n_samples != n or result.point_ras is None or entry.get("point_ras_mm") is None or \
                not np.allclose(result.point_ras, entry["point_ras_mm"], atol=1e-2):
            raise ResultError(f"the result given is not {nodule_name(nid)}'s current one")
        mask, start = result.sample_mask(int(sample)), [a for a, _ in result.box]
    else:
        raise ResultError(f"the samples of {nodule_name(nid)} were not kept: turn on \"Keep every sample\" and "
                          f"segment it again, or refine it in this session")
    register_segmentation_converters()
    base = volume_node.GetName() or "Volume"
    node = _new_segmentation_node(f"{base} ARSeg {nodule_name(nid)} sample {sample}", local_m,
                                  volume_array_shape(volume_node))
    node.GetSegmentation().AddSegment(_segment(SAMPLE_VIEW_SEGMENT_ID, f"{nodule_name(nid)} sample {sample}",
                                               SAMPLE_VIEW_COLOR, _oriented_labelmap(mask, start, local_m)),
                                      SAMPLE_VIEW_SEGMENT_ID)
    _mark(node, ROLE_SAMPLE_VIEW, volume_node, str(entry.get("model", "")))
    node.SetAttribute(SHOWN_SAMPLE_ATTRIBUTE, f"{nid}/{int(sample)}")
    display = nodes.segmentation.GetDisplayNode()
    if display is not None and nodes.segmentation.GetSegmentation().GetSegment(nid) is not None:
        node.SetAttribute(CONSENSUS_FILL_ATTRIBUTE, repr(float(display.GetSegmentOpacity2DFill(nid))))
        display.SetSegmentOpacity2DFill(nid, 0.0)
    scene.AddNode(node)
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetVisibility3D(False)
    return node


def hide_sample(scene, volume_node, nodes: Optional[ResultNodes] = None) -> int:
    """Remove the sample shown over the CT, if any, and fill its nodule's consensus again (how many nodes went)."""
    node = sample_view_node(scene, volume_node)
    if node is None:
        return 0
    shown = shown_sample(scene, volume_node)
    nodes = nodes if nodes is not None else find_results(scene, volume_node)
    opacity = node.GetAttribute(CONSENSUS_FILL_ATTRIBUTE)
    display = nodes.segmentation.GetDisplayNode() if nodes is not None else None
    if shown is not None and opacity is not None and display is not None and \
            nodes.segmentation.GetSegmentation().GetSegment(shown[0]) is not None:
        display.SetSegmentOpacity2DFill(shown[0], float(opacity))
    return _remove_nodes(scene, [node])


def find_results(scene, volume_node) -> Optional[ResultNodes]:
    """ARSeg's current result nodes for a volume (after a run, a scene reload, or from the console), or None."""
    by_role = {n.GetAttribute(ROLE_ATTRIBUTE): n for n in result_nodes_of(scene, volume_node)}
    if ROLE_SEGMENTATION not in by_role:
        return None
    table = by_role.get(ROLE_REPORT)
    report_json = table.GetAttribute(REPORT_ATTRIBUTE) if table is not None else None
    report_json = report_json or by_role[ROLE_SEGMENTATION].GetAttribute(REPORT_ATTRIBUTE)
    report = json.loads(report_json) if report_json else {}
    colormap = next(iter(_nodes_with_attribute(scene, "vtkMRMLColorTableNode", ROLE_ATTRIBUTE, ROLE_COLORMAP)), None)
    selected = by_role[ROLE_SEGMENTATION].GetAttribute(SELECTED_ATTRIBUTE) or report.get("selected_nodule")
    return ResultNodes(segmentation=by_role[ROLE_SEGMENTATION], disagreement_volume=by_role.get(ROLE_DISAGREEMENT),
                       sequence=by_role.get(ROLE_SEQUENCE), browser=by_role.get(ROLE_BROWSER),
                       proxy=by_role.get(ROLE_PROXY), table=table, colormap=colormap, report=report, nodule=selected,
                       disagreements=by_role.get(ROLE_DISAGREEMENTS))


def _results_or_error(scene, volume_node) -> ResultNodes:
    nodes = find_results(scene, volume_node)
    if nodes is None:
        name = volume_node.GetName() if volume_node is not None else None
        raise ResultError(f"volume {name!r} has no ARSeg results")
    return nodes


def list_nodules(scene, volume_node) -> List[NoduleInfo]:
    """The volume's nodules in the order they were made (empty if ARSeg has none for it)."""
    nodes = find_results(scene, volume_node)
    if nodes is None:
        return []
    segmentation = nodes.segmentation.GetSegmentation()
    out = []
    for n in nodes.report.get("nodules", []):
        segment = segmentation.GetSegment(n["id"])
        out.append(NoduleInfo(id=n["id"], name=segment.GetName() if segment is not None else n["name"],
                              consensus_volume_mm3=float(n["consensus_volume_mm3"]),
                              presence_fraction=float(n.get("presence_fraction", 1.0)),
                              if_present_volume_mm3=float(n.get("if_present_volume_mm3", 0.0)),
                              point_ras_mm=n.get("point_ras_mm"), selected=n["id"] == nodes.nodule,
                              long_axis_mm=(n.get("diameters_mm") or {}).get("long"),
                              short_axis_mm=(n.get("diameters_mm") or {}).get("short"),
                              n_prompts=len(n.get("prompts") or []), prompts=tuple(n.get("prompts") or ()),
                              n_samples=int(n.get("n_samples", 0))))
    return out


def nodule_report(nodes: ResultNodes, nid: Optional[str] = None) -> Dict[str, Any]:
    """One nodule's report (the selected one by default): volumes, samples, presence, settings."""
    nid = nid or nodes.nodule
    for n in nodes.report.get("nodules", []):
        if n["id"] == nid:
            return n
    raise ResultError(f"no nodule {nid!r} (nodules: {nodes.nodule_ids})")


def select_nodule(scene, volume_node, nid: str) -> ResultNodes:
    """Make nid the selected nodule: the scale sequence (slider), the disagreement volume and the report's top
    numbers become its own. Changes only ARSeg's nodes for this volume."""
    nodes = _results_or_error(scene, volume_node)
    entry = nodule_report(nodes, nid)
    hide_sample(scene, volume_node, nodes)  # a sample shown is the previously selected nodule's
    local_m = local_ijk_to_ras(volume_node)
    segmentation = nodes.segmentation.GetSegmentation()
    n_scales = int(entry["n_scales"])
    base = volume_node.GetName() or "Volume"
    items = []
    for k in range(1, n_scales + 1):
        segment = segmentation.GetSegment(scale_segment_id(k, nid))
        if segment is None:
            raise ResultError(f"{nodule_name(nid)} has no segment {scale_segment_id(k, nid)!r}; segment it again")
        copy = _copy_segment(segment, local_m)
        items.append(_scale_item(base, k, n_scales, copy))
    if nodes.sequence is not None:
        _fill_scales(nodes.sequence, items, volume_node, entry["model"])
        if nodes.browser is not None:
            sequences_logic(scene).UpdateProxyNodesFromSequences(nodes.browser)
            nodes.browser.SetSelectedItemNumber(n_scales - 1)
            sequences_logic(scene).UpdateProxyNodesFromSequences(nodes.browser)
    stored = nodes.disagreements.GetDataNodeAtValue(nid) if nodes.disagreements is not None else None
    if nodes.disagreement_volume is not None:
        if stored is not None:
            _show_fraction(nodes.disagreement_volume, stored)
        else:  # a scene without the stored fractions: the binary disagreement segment stands in for it
            mask, start, _ = _segment_mask(segmentation.GetSegment(disagreement_segment_id(nid)))
            if mask is not None:
                box = tuple((a, a + n) for a, n in zip(start, mask.shape))
                _show_fraction(nodes.disagreement_volume,
                               _disagreement_volume("", mask.astype(np.float32), box, local_m))
    report = volume_report(nodes.report.get("source", base), nodes.report.get("nodules", []), nid)
    nodes.segmentation.SetAttribute(SELECTED_ATTRIBUTE, nid)
    nodes.segmentation.SetAttribute(REPORT_ATTRIBUTE, json.dumps(report))
    if nodes.table is not None:
        _fill_table(nodes.table, report)
    nodes.report, nodes.nodule = report, nid
    return nodes


def delete_nodule(scene, volume_node, nid: str) -> Optional[ResultNodes]:
    """Remove one nodule (its segments, stored disagreement and report row). The last nodule takes every ARSeg
    node of the volume with it (returns None); if the selected one goes, the most recent other is selected."""
    nodes = _results_or_error(scene, volume_node)
    nodule_report(nodes, nid)  # says so if there is no such nodule
    remaining = [n for n in nodes.report.get("nodules", []) if n["id"] != nid]
    if not remaining:
        clear_nodules(scene, volume_node)
        return None
    for sid in nodule_segment_ids(nodes.segmentation, nid):
        nodes.segmentation.GetSegmentation().RemoveSegment(sid)
    history = _history_node(scene, volume_node)
    if history is not None:  # undo steps of a deleted nodule have nothing left to act on
        steps = _undo_steps(history)
        for step in steps:
            if step["nodule"] == nid:
                _drop_step_items(history, step)
        _set_undo_steps(history, [step for step in steps if step["nodule"] != nid])
    if nodes.disagreements is not None and nodes.disagreements.GetDataNodeAtValue(nid) is not None:
        nodes.disagreements.RemoveDataNodeAtValue(nid)
    selected = nodes.nodule if nodes.nodule != nid else remaining[-1]["id"]
    nodes.report = volume_report(nodes.report.get("source", ""), remaining, selected)
    nodes.segmentation.SetAttribute(REPORT_ATTRIBUTE, json.dumps(nodes.report))
    if nodes.table is not None:
        _fill_table(nodes.table, nodes.report)
    if selected != nodes.nodule:
        return select_nodule(scene, volume_node, selected)
    return nodes


def clear_nodules(scene, volume_node) -> int:
    """Remove every ARSeg node of this volume (all nodules); returns how many nodes went."""
    return remove_results(scene, volume_node)


def show_disagreement(scene, nodes: ResultNodes, show: bool = True, opacity: float = 0.5):
    """The selected nodule's disagreement heat map over the image in every slice view (the module's toggle)."""
    volume_id = nodes.disagreement_volume.GetID() if nodes.disagreement_volume is not None else None
    for composite in _nodes_of_class(scene, "vtkMRMLSliceCompositeNode"):
        if show and volume_id:
            composite.SetForegroundVolumeID(volume_id)
            composite.SetForegroundOpacity(opacity)
        elif composite.GetForegroundVolumeID() == volume_id:
            composite.SetForegroundVolumeID(None)


# --------------------------------------------------------------------------------------------- files

def save_segmentation(segmentation_node, path, crop_to_minimum_extent: bool = True) -> Path:
    """Write a .seg.nrrd exactly as Slicer does (its segmentation storage node: SegmentN_Name, extents, tags)."""
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ResultError(f"a segmentation is written as .seg.nrrd, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    # Slicer's "crop to minimum extent" save option: the file holds the segments' extent, not the whole CT
    # times every layer; the reference geometry stays in the header, so Slicer restores it on load
    storage.SetCropToMinimumExtent(crop_to_minimum_extent)
    # a temporary storage node, not the node's own: saving a copy must not redirect where the node is saved
    if not _quietly(lambda: storage.WriteData(segmentation_node)):
        raise ResultError(f"could not write {path}")
    _check_readable(path)
    return path


def _check_readable(path: Path) -> None:
    """VTK's NRRD writer reports no failed write: on a full disk it left a truncated .seg.nrrd that looked
    written. Reading the file back (its header and compressed voxels) is what shows it is whole."""
    import SimpleITK as sitk

    try:
        sitk.ReadImage(str(path))
    except RuntimeError:
        if shutil.disk_usage(path.parent).free < (1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise ResultError(f"{path} was not written completely: it cannot be read back") from None


def load_segmentation(scene, path, name: Optional[str] = None):
    register_segmentation_converters()
    return _read_into_scene(scene, slicer.vtkMRMLSegmentationNode(), slicer.vtkMRMLSegmentationStorageNode(),
                            Path(path), name, "segmentation")


def reference_geometry_of(segmentation_node) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """(IJK->RAS, (k, j, i) shape) from the segmentation's reference image geometry."""
    text = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not text:
        raise ResultError(f"segmentation {segmentation_node.GetName()!r} has no reference geometry")
    image = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(text, image, False)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    return _matrix_to_numpy(m), (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)


def segment_names(segmentation_node) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def segment_ids(segmentation_node) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


# --------------------------------------------------------------------------------------------- file -> file

def _temporary_name(path: Path) -> Path:
    # beside the target (a rename within one folder is atomic); ends like the target, which savers check
    return path.with_name(f".arseg-tmp-{os.getpid()}-{path.name}")


def write_files_atomically(writers: Dict[Path, Any]) -> List[Path]:
    """writers: {final path: fn(temporary path)}. Every file is written under a temporary name beside its target,
    then all are moved into place; if any write fails, the temporary files and the folders made for them are
    removed and nothing of this run is left (an existing file of the same name stays as it was)."""
    made_dirs: List[Path] = []
    temporary: List[Tuple[Path, Path]] = []
    try:
        for final in writers:
            missing = []
            parent = final.parent
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for d in reversed(missing):
                d.mkdir()
                made_dirs.append(d)
        for final, write in writers.items():
            tmp = _temporary_name(final)
            temporary.append((tmp, final))
            write(tmp)
            if not tmp.is_file():
                raise ResultError(f"could not write {final}")
    except BaseException:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)
        for d in reversed(made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    for tmp, final in temporary:
        os.replace(tmp, final)
    return [final for _, final in temporary]


def write_outputs(nodes: ResultNodes, volume_path, out_path, report_path=None, png_path=None) -> List[Path]:
    """A volume's results as files: the .seg.nrrd (every nodule), the report JSON and the figure (which needs
    nodes.results), written under temporary names and moved into place together (runs.RunService.segment_file:
    the CLI and the Slicer module's segmentFiles)."""
    out_path = Path(out_path)
    writers: Dict[Path, Any] = {out_path: lambda tmp: save_segmentation(nodes.segmentation, tmp)}
    if report_path is not None:
        report = dict(nodes.report, source=str(volume_path), segmentation=str(out_path))
        writers[Path(report_path)] = lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n")
    if png_path is not None:
        from .figure import write_figure

        writers[Path(png_path)] = lambda tmp: write_figure(nodes.results, tmp, nodes.report)
    return write_files_atomically(writers)


# --------------------------------------------------------------------------------------------- several inputs, regions
# A model whose card's task names several inputs and regions (volume_regions.py): one segmentation per case, a
# segment per region per lesion named from the task ("Whole tumour", or "Whole tumour 2" where there are
# several lesions), coloured and coded (terminology) as the card says, with its disagreement and scales hidden.

REGION_TAG = "ARSeg.Region"
LESION_TAG = "ARSeg.Lesion"


def region_segments(result) -> List[Tuple[str, str, Tuple[float, float, float], Any, Optional[str], str, bool, Dict]]:
    """(segment ID, name, colour, box mask, terminology, kind, visible, tags) of every region of every lesion."""
    out = []
    for part in result.parts:
        region = result.task.region(part.region)
        sid = part.name.replace(" ", "_")
        r = part.result
        tags = {REGION_TAG: part.region, LESION_TAG: str(part.lesion)}
        out.append((sid, part.name, tuple(region.color), r.consensus, region.terminology or None, KIND_CONSENSUS,
                    True, tags))
        out.append((f"{sid}_Disagreement", f"{part.name} disagreement", OutputOptions().disagreement_color,
                    (r.disagreement > 0).astype(np.uint8), None, KIND_DISAGREEMENT, False, tags))
        for k in range(1, r.n_scales + 1):
            out.append((f"{sid}_Scale_{k}", f"{part.name} scale {k}/{r.n_scales}", _scale_color(k, r.n_scales),
                        r.scale_mask(k), region.terminology or None, KIND_SCALE, False, tags))
    return out


def write_region_results(scene, volume_node, result, report: Optional[Dict[str, Any]] = None):
    """A volume_regions.RegionsResult into the scene as the segmentation "<volume> ARSeg" of volume_node (the first
    input), replacing ARSeg's earlier nodes for that volume. Built outside the scene, then added: an error leaves
    the scene as it was. The report (RegionsResult.report) is the node's ARSeg.Report attribute."""
    if volume_node is None or volume_node.GetScene() is not scene:
        raise ResultError("the input volume must be a node of this scene")
    if tuple(volume_array_shape(volume_node)) != tuple(result.volume_shape) or \
            not np.allclose(world_ijk_to_ras(volume_node), result.ijk_to_ras, atol=1e-4):
        raise ResultError(f"the result was computed on another grid than {volume_node.GetName()!r}'s")
    register_segmentation_converters()
    base = volume_node.GetName() or "Volume"
    local_m = local_ijk_to_ras(volume_node)
    segmentation = _new_segmentation_node(f"{base} ARSeg", local_m, result.volume_shape)
    visibility: Dict[str, bool] = {}
    for sid, name, color, mask, terminology, kind, visible, tags in region_segments(result):
        start = [a for a, _ in next(p.result.box for p in result.parts)]
        segment = _segment(sid, name, color, _oriented_labelmap(mask, start, local_m), terminology,
                           {KIND_TAG: kind, **tags})
        segmentation.GetSegmentation().AddSegment(segment, sid)
        visibility[sid] = visible
    report = report if report is not None else result.report(base)
    _mark(segmentation, ROLE_SEGMENTATION, volume_node, result.model_name)
    segmentation.SetAttribute(REPORT_ATTRIBUTE, json.dumps(report))
    remove_results(scene, volume_node)
    scene.AddNode(segmentation)
    segmentation.CreateDefaultDisplayNodes()
    display = segmentation.GetDisplayNode()
    for sid, visible in visibility.items():
        display.SetSegmentVisibility(sid, visible)
    return segmentation


def _name_words(name: str) -> List[str]:
    return [w for w in re.split(r"[^0-9a-z]+", str(name).lower()) if w]


def volumes_for_inputs(scene, task) -> Dict[str, Any]:
    """The scene's volumes named like the task's inputs, {input name: node}, for a front end to preselect: a
    volume whose name, in any case, is the input's name or title ("FLAIR", "flair.nii") or holds it as a word
    ("case7_t1ce"), exact names first; ARSeg's own volumes and volumes taken by an earlier input are skipped. An
    input no volume is named like is left out."""
    volumes = [n for n in _nodes_of_class(scene, "vtkMRMLScalarVolumeNode") if not n.GetAttribute(ROLE_ATTRIBUTE)]
    found: Dict[str, Any] = {}
    for entry in task.inputs:
        words = {entry.name.lower(), entry.title.lower()}
        free = [n for n in volumes if n not in found.values()]
        exact = [n for n in free if _bare_name(n.GetName()) in words]
        by_word = [n for n in free if words & set(_name_words(n.GetName()))]
        if exact or by_word:
            found[entry.name] = (exact or by_word)[0]
    return found


def _bare_name(name: str) -> str:
    """A node's name without a file's extensions ("FLAIR.nii.gz" -> "flair"), lower case."""
    return re.sub(r"(\.(nii|gz|nrrd|nhdr|mha|mhd|dcm))+$", "", str(name or "").lower())


@dataclass
class RegionNodes:
    """What a several-input run put in the scene: the segmentation of its first input (a segment per region per
    lesion), the result and report (RegionsResult.report), and what the user should know (inputs resampled)."""

    segmentation: Any
    result: Any  # volume_regions.RegionsResult
    report: Dict[str, Any]
    notices: List[str] = field(default_factory=list)
    regions = True  # front ends tell these from ResultNodes by this


def region_summary(report: Dict[str, Any]) -> str:
    """One line per region of a RegionsResult report: its consensus volume and the samples' range, in mL."""
    lines = [f"{report.get('n_lesions', 0)} lesion(s)"]
    for region in report.get("regions", []):
        v = region["sample_volume_ml"]
        lines.append(f"{region['name']}: {region['consensus_volume_ml']:.2f} mL (samples {v['min']:.2f}-"
                     f"{v['max']:.2f} mL)")
    return "\n".join(lines)


def write_region_outputs(nodes: RegionNodes, image_kji: np.ndarray, sources: Dict[str, Any], out_path,
                         report_path=None, png_path=None) -> List[Path]:
    """A several-input run's files: OUT.seg.nrrd (a segment per region per lesion), the report JSON (with each
    input's file) and the figure (on image_kji, the first input), written together (write_files_atomically)."""
    from .figure_regions import write_regions_figure

    report = dict(nodes.report, sources={name: str(path) for name, path in sources.items()},
                  segmentation=str(out_path))
    writers: Dict[Path, Any] = {Path(out_path): lambda tmp: save_segmentation(nodes.segmentation, tmp)}
    if report_path is not None:
        writers[Path(report_path)] = lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n")
    if png_path is not None:
        writers[Path(png_path)] = lambda tmp: write_regions_figure(nodes.result, image_kji, tmp, report)
    written = write_files_atomically(writers)
    nodes.report = report
    return written
