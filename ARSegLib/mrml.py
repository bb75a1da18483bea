"""Results -> MRML nodes, on desktop Slicer and on slicer-core's headless `slicer.vtkMRMLScene()`. No Qt.

The node contract (DESIGN.md, "What the user sees"), per input volume:

- segmentation "<volume> ARSeg": `Consensus` (visible), `Disagreement` (voxels where samples differ from the
  consensus), `Scale 1/K` ... `Scale K/K` (the consensus after each scale, hidden), optionally `Sample i`
  (hidden); reference geometry = the volume's; terminology SCT "Nodule" in "Lung" for the nodule masks;
- scalar volume "<volume> ARSeg disagreement": the fraction of samples that differ, with a heat colour table;
- sequence "<volume> ARSeg scales" of K segmentations, browsed by "<volume> ARSeg scale browser", whose
  proxy "<volume> ARSeg scale" shows one scale at a time (the scale slider);
- table "<volume> ARSeg report": consensus volume, sample volumes, each sample's IoU with the consensus.

Every node ARSeg makes carries the attribute ARSeg.Role (and ARSeg.SourceVolumeID for per-volume results);
a re-run removes only nodes with both, for that volume. User nodes are never modified. Nodes are built
first and added last: an error leaves the scene as it was.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .pipeline import VolumeResult

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
ROLE_COLORMAP = "colormap"

CONSENSUS_ID = "Consensus"
DISAGREEMENT_ID = "Disagreement"
HEAT_COLORMAP_NAME = "ARSeg Heat"

# DICOM / SNOMED CT codes as Slicer's terminology strings serialise them (vtkSlicerTerminologiesModuleLogic):
# category "Morphologically Altered Structure", type "Nodule", anatomic region "Lung".
NODULE_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered "
                      "Structure~SCT^27925004^Nodule~^^~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^")


class ResultError(ValueError):
    """A result that cannot be written into this scene (wrong volume, unreadable file...)."""


@dataclass
class OutputOptions:
    """What goes into the scene besides the consensus."""

    include_samples: bool = False  # `Sample i` segments (hidden); N more labelmaps
    disagreement_threshold: float = 0.0  # `Disagreement` segment: voxels where more than this fraction differ
    consensus_color: Tuple[float, float, float] = (0.95, 0.75, 0.15)
    disagreement_color: Tuple[float, float, float] = (0.90, 0.20, 0.20)
    sample_color: Tuple[float, float, float] = (0.60, 0.60, 0.70)
    show_scale_proxy: bool = False  # the scrubbing view starts hidden; the module shows it when the slider moves


@dataclass
class ResultNodes:
    """The nodes one run added, and its report."""

    segmentation: Any
    disagreement_volume: Any
    sequence: Any
    browser: Any
    proxy: Any
    table: Any
    colormap: Any
    report: Dict[str, Any] = field(default_factory=dict)
    result: Optional[VolumeResult] = None

    @property
    def scale_segment_ids(self) -> List[str]:
        n = self.report.get("n_scales", 0)
        return [scale_segment_id(k) for k in range(1, n + 1)]


def scale_segment_id(k: int) -> str:
    return f"Scale_{k}"


def sample_segment_id(i: int) -> str:
    return f"Sample_{i}"


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


def volume_array(volume_node) -> np.ndarray:
    """A copy of the voxels in (k, j, i) order (a copy: inference may run on another thread)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else None
        raise ResultError(f"volume {name!r} has no image data")
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    comps = scalars.GetNumberOfComponents()
    array = numpy_support.vtk_to_numpy(scalars)
    shape = tuple(reversed(dims)) + ((comps,) if comps > 1 else ())
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


def load_volume(scene, path, name: Optional[str] = None):
    """Read an image file the way Slicer does (NRRD, NIfTI, MHA, ...; LPS files become RAS) into the scene."""
    return _read_into_scene(scene, slicer.vtkMRMLScalarVolumeNode(), slicer.vtkMRMLVolumeArchetypeStorageNode(),
                            Path(path), name, "image volume", lambda node: node.GetImageData() is not None)


def volume_stem(path: Path) -> str:
    name = path.name
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


def _segment(segment_id: str, name: str, color, labelmap, terminology: Optional[str] = None):
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*color)
    # chosen, not generated: Slicer must not rename or recolour them when terminology settings change
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    if terminology:
        segment.SetTerminology(terminology)
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
    """The scene's ARSeg heat colour table (transparent at 0, then dark red -> red -> yellow -> white), made once."""
    for node in _nodes_with_attribute(scene, "vtkMRMLColorTableNode", ROLE_ATTRIBUTE, ROLE_COLORMAP):
        return node, False
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(HEAT_COLORMAP_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i in range(256):
        t = i / 255.0
        r, g, b = min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2))
        node.SetColor(i, f"{t:.3f}", r, g, b, 0.0 if i == 0 else min(1.0, 0.35 + t))
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
    """(measure, value, unit) rows of the table node."""
    rows = [("Model", str(report["model"]), ""), ("Mode", str(report["mode"]), "")]
    if report.get("point_ras_mm"):
        rows.append(("Point (R, A, S)", ", ".join(f"{v:.2f}" for v in report["point_ras_mm"]), "mm"))
    rows += [("Consensus volume", f"{report['consensus_volume_mm3']:.1f}", "mm3"),
             ("Sample volume min", f"{report['sample_volume_mm3']['min']:.1f}", "mm3"),
             ("Sample volume max", f"{report['sample_volume_mm3']['max']:.1f}", "mm3"),
             ("Sample volume mean", f"{report['sample_volume_mm3']['mean']:.1f}", "mm3")]
    for i, (v, iou) in enumerate(zip(report["sample_volumes_mm3"], report["sample_iou_with_consensus"]), 1):
        rows.append((f"Sample {i} volume", f"{v:.1f}", "mm3"))
        rows.append((f"Sample {i} IoU with consensus", f"{iou:.4f}", ""))
    settings = report.get("settings", {})
    for key in ("n_samples", "temperature", "top_k", "top_p", "seed", "pixel_spacing_mm"):
        if key in settings:
            rows.append((f"Setting {key}", str(settings[key]), ""))
    return rows


def _table_node(name: str, rows: List[Tuple[str, str, str]]):
    node = slicer.vtkMRMLTableNode()
    node.SetName(name)
    table = node.GetTable()
    columns = []
    for title in ("Measure", "Value", "Unit"):
        column = vtk.vtkStringArray()
        column.SetName(title)
        columns.append(column)
    for row in rows:
        for column, value in zip(columns, row):
            column.InsertNextValue(value)
    for column in columns:
        table.AddColumn(column)
    return node


def _segmentation_node(name, result: VolumeResult, local_m, options: OutputOptions):
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name)
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                        _reference_geometry(local_m, result.volume_shape))
    start = [a for a, _ in result.box]
    hidden = []
    segments = [(CONSENSUS_ID, "Consensus", options.consensus_color, result.consensus, NODULE_TERMINOLOGY)]
    disagreement_mask = (result.disagreement > options.disagreement_threshold).astype(np.uint8)
    segments.append((DISAGREEMENT_ID, "Disagreement", options.disagreement_color, disagreement_mask, None))
    hidden.append(DISAGREEMENT_ID)
    for k in range(1, result.n_scales + 1):
        segments.append((scale_segment_id(k), f"Scale {k}/{result.n_scales}", _scale_color(k, result.n_scales),
                         result.scale_mask(k), NODULE_TERMINOLOGY))
        hidden.append(scale_segment_id(k))
    if options.include_samples:
        for i in range(1, result.n_samples + 1):
            segments.append((sample_segment_id(i), f"Sample {i}", options.sample_color, result.sample_mask(i),
                             NODULE_TERMINOLOGY))
            hidden.append(sample_segment_id(i))
    for segment_id, label, color, mask, terminology in segments:
        segment = _segment(segment_id, label, color, _oriented_labelmap(mask, start, local_m), terminology)
        segmentation.AddSegment(segment, segment_id)
    return node, hidden


def _scale_item(result: VolumeResult, k: int, local_m, reference: str):
    item = slicer.vtkMRMLSegmentationNode()
    item.SetName(f"Scale {k}/{result.n_scales}")
    segmentation = item.GetSegmentation()
    segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                        reference)
    start = [a for a, _ in result.box]
    # one segment ID in every item, so that the proxy's display settings carry over while scrubbing
    segment = _segment("Scale", f"Scale {k}/{result.n_scales}", _scale_color(k, result.n_scales),
                       _oriented_labelmap(result.scale_mask(k), start, local_m), NODULE_TERMINOLOGY)
    segmentation.AddSegment(segment, "Scale")
    return item


def _disagreement_volume(name, result: VolumeResult, local_m):
    """The fraction of disagreeing samples on the result's box, aligned voxel for voxel with the input volume."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    k0, j0, i0 = (a for a, _ in result.box)
    offset = np.eye(4)
    offset[:3, 3] = (i0, j0, k0)
    m = local_m @ offset
    image = vtk.vtkImageData()
    nk, nj, ni = result.box_shape
    image.SetDimensions(ni, nj, nk)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    values[:] = result.disagreement.astype(np.float32).reshape(-1)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_numpy_to_matrix(m))
    return node


def write_result(scene, volume_node, result: VolumeResult, options: Optional[OutputOptions] = None) -> ResultNodes:
    """Add one run's nodes for volume_node, replacing ARSeg's earlier ones for it. Atomic: on error, no change."""
    options = options or OutputOptions()
    if volume_node is None or volume_node.GetScene() is not scene:
        raise ResultError("the input volume must be a node of this scene")
    _check_result_fits(volume_node, result)
    register_segmentation_converters()
    base = volume_node.GetName() or "Volume"
    local_m = local_ijk_to_ras(volume_node)
    report = result.report(base)

    # build everything outside the scene
    segmentation, hidden = _segmentation_node(f"{base} ARSeg", result, local_m, options)
    disagreement = _disagreement_volume(f"{base} ARSeg disagreement", result, local_m)
    sequence = slicer.vtkMRMLSequenceNode()
    sequence.SetName(f"{base} ARSeg scales")
    sequence.SetIndexName("scale")
    sequence.SetIndexUnit("")
    sequence.SetIndexType(sequence.NumericIndex)
    reference = _reference_geometry(local_m, result.volume_shape)
    for k in range(1, result.n_scales + 1):
        sequence.SetDataNodeAtValue(_scale_item(result, k, local_m, reference), str(k))
    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(f"{base} ARSeg scale browser")
    table = _table_node(f"{base} ARSeg report", report_rows(report))
    table.SetAttribute(REPORT_ATTRIBUTE, json.dumps(report))
    colormap, new_colormap = heat_colormap(scene)
    for node, role in ((segmentation, ROLE_SEGMENTATION), (disagreement, ROLE_DISAGREEMENT), (sequence, ROLE_SEQUENCE),
                       (browser, ROLE_BROWSER), (table, ROLE_REPORT)):
        _mark(node, role, volume_node, result.model_name)

    # every sequence item carries ARSeg's marks: the Sequences logic copies an item into the proxy whenever
    # the selected scale changes, and the proxy must stay recognisable as ARSeg's
    for k in range(sequence.GetNumberOfDataNodes()):
        _mark(sequence.GetNthDataNode(k), ROLE_PROXY, volume_node, result.model_name)

    # then add; only when everything is in place, remove the earlier results; on failure, remove what was added
    previous = result_nodes_of(scene, volume_node)
    added: list = []
    parent_id = volume_node.GetTransformNodeID()
    try:
        scene.StartState(scene.BatchProcessState)
        try:
            if new_colormap:
                added.append(scene.AddNode(colormap))
            for node in (segmentation, disagreement, sequence, browser, table):
                added.append(scene.AddNode(node))
            segmentation.CreateDefaultDisplayNodes()
            added.append(segmentation.GetDisplayNode())
            display = segmentation.GetDisplayNode()
            for segment_id in hidden:
                display.SetSegmentVisibility(segment_id, False)
            disagreement.CreateDefaultDisplayNodes()
            dd = disagreement.GetDisplayNode()
            added.append(dd)
            dd.SetAndObserveColorNodeID(colormap.GetID())
            dd.AutoWindowLevelOff()
            dd.SetWindowLevelMinMax(0.0, 1.0)
            dd.SetApplyThreshold(True)
            dd.SetLowerThreshold(1e-6)  # agreement is transparent over the CT
            dd.SetUpperThreshold(1.0)
            if parent_id:
                segmentation.SetAndObserveTransformNodeID(parent_id)
                disagreement.SetAndObserveTransformNodeID(parent_id)
            browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
            browser.SetIndexDisplayFormat("%.0f")
        finally:
            scene.EndState(scene.BatchProcessState)

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
        for node in reversed(added):
            if node is not None and node.GetScene() is not None:
                scene.RemoveNode(node)
        raise
    _remove_nodes(scene, previous)
    return ResultNodes(segmentation=segmentation, disagreement_volume=disagreement, sequence=sequence,
                       browser=browser, proxy=proxy, table=table, colormap=colormap, report=report, result=result)


def select_scale(nodes: ResultNodes, k: int, show: bool = True):
    """Show the consensus after scale k (1-based) through the proxy: what the scale slider does."""
    n = nodes.sequence.GetNumberOfDataNodes()
    if not 1 <= k <= n:
        raise IndexError(f"scale {k} out of 1..{n}")
    nodes.browser.SetSelectedItemNumber(k - 1)
    display = nodes.proxy.GetDisplayNode()
    if display is not None:
        display.SetVisibility(bool(show))


def find_results(scene, volume_node) -> Optional[ResultNodes]:
    """ARSeg's current result nodes for a volume (after a run, a scene reload, or from the console), or None."""
    by_role = {n.GetAttribute(ROLE_ATTRIBUTE): n for n in result_nodes_of(scene, volume_node)}
    if ROLE_SEGMENTATION not in by_role:
        return None
    table = by_role.get(ROLE_REPORT)
    report_json = table.GetAttribute(REPORT_ATTRIBUTE) if table is not None else None
    colormap = next(iter(_nodes_with_attribute(scene, "vtkMRMLColorTableNode", ROLE_ATTRIBUTE, ROLE_COLORMAP)), None)
    return ResultNodes(segmentation=by_role[ROLE_SEGMENTATION], disagreement_volume=by_role.get(ROLE_DISAGREEMENT),
                       sequence=by_role.get(ROLE_SEQUENCE), browser=by_role.get(ROLE_BROWSER),
                       proxy=by_role.get(ROLE_PROXY), table=table, colormap=colormap,
                       report=json.loads(report_json) if report_json else {})


def show_disagreement(scene, nodes: ResultNodes, show: bool = True, opacity: float = 0.5):
    """The disagreement heat map over the image in every slice view (what the module's toggle does)."""
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
    return path


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


# --------------------------------------------------------------------------------------------- node -> nodes

def segment_node(volume_node, predictor, card, point_ras=None, settings=None, options: Optional[OutputOptions] = None,
                 progress=None, cancel=None):
    """Segment a volume node in its scene (click mode at point_ras, else the whole volume); returns ResultNodes.

    Synchronous: for the console and tests. The module runs the same three steps with the middle one on a
    worker thread: volume_array/world_ijk_to_ras, pipeline.segment_*, write_result."""
    from . import pipeline

    array, m = volume_array(volume_node), world_ijk_to_ras(volume_node)
    if point_ras is None:
        result = pipeline.segment_volume(array, m, predictor, card, settings, progress=progress, cancel=cancel)
    else:
        result = pipeline.segment_click(array, m, point_ras, predictor, card, settings, progress=progress,
                                        cancel=cancel)
    return write_result(volume_node.GetScene(), volume_node, result, options)


# --------------------------------------------------------------------------------------------- file -> file

def segment_file(volume_path, out_path, predictor, card, point_ras=None, settings=None,
                 options: Optional[OutputOptions] = None, report_path=None, progress=None, cancel=None,
                 scene=None):
    """One image file -> its .seg.nrrd (and report JSON), through a scene of its own unless one is given.

    The CLI (`arseg segment`, `arseg batch`) and ARSegLogic.segmentFiles share this path. Returns
    (VolumeResult, ResultNodes)."""
    scene = scene if scene is not None else new_scene()
    volume_node = load_volume(scene, volume_path)
    nodes = segment_node(volume_node, predictor, card, point_ras, settings, options, progress, cancel)
    result = nodes.result
    save_segmentation(nodes.segmentation, out_path)
    if report_path is not None:
        report_path = Path(report_path)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report = dict(nodes.report, source=str(volume_path), segmentation=str(out_path))
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    return result, nodes
