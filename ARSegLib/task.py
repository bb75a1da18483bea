"""What a model segments, from its card's "task" block: the named inputs (modalities) and the intensity
preparation of each, the classes of its label maps, the regions built from them (with a name, a colour and a
terminology entry each), and, from the card's own fields, the modes, pixel spacing and crop.

A card without a task block is a lung-nodule card from before tasks existed: it is read as one CT input
prepared as its `intensity` field says, one class, one region "Nodule" (LUNG_TERMINOLOGY). Pure Python and
numpy: no torch, no MRML. models.py checks the block (ModelError naming the field) before a Task is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# DICOM / SNOMED CT codes as Slicer's terminology strings serialise them (vtkSlicerTerminologiesModuleLogic):
# category "Morphologically Altered Structure", type "Nodule", anatomic region "Lung"
LUNG_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered "
                    "Structure~SCT^27925004^Nodule~^^~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^")
LUNG_REGION_COLOR = (0.95, 0.75, 0.15)  # mrml.OutputOptions.consensus_color
# the intensity preparations the pipeline implements (pipeline.prepare_crops, volume_regions.prepare_input_crops)
INTENSITY_METHODS = ("minmax_per_crop", "zscore_in_brain")


@dataclass(frozen=True)
class TaskInput:
    """One image the model takes: its name (the key a caller gives it under, e.g. "flair"), a title to show
    ("FLAIR"), and its intensity preparation ({"method": ..., method's fields})."""

    name: str
    title: str
    intensity: Mapping[str, Any]

    @property
    def method(self) -> str:
        return str(self.intensity.get("method", "minmax_per_crop"))


@dataclass(frozen=True)
class TaskRegion:
    """A region the user sees: the union of some of the model's classes (BraTS tumour core = 1 u 3)."""

    name: str
    classes: Tuple[int, ...]
    color: Tuple[float, float, float]
    terminology: str = ""


@dataclass(frozen=True)
class Task:
    name: str
    inputs: Tuple[TaskInput, ...]
    classes: Mapping[int, str]  # label value -> what it is (0, background, is implied)
    regions: Tuple[TaskRegion, ...]
    modes: Tuple[str, ...]
    pixel_spacing_mm: Optional[float]
    crop_size: int
    # what lies outside a volume when a crop reaches past it: None the volume's minimum (air in a CT), else this
    # value in the prepared units' source (0: a z-scored brain's background)
    fill_value: Optional[float] = None

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def unknown_and_missing(self, given: Sequence[str]) -> Tuple[List[str], List[str]]:
        """The given input names that are not the task's, and the task's inputs not given (each in order)."""
        return [n for n in given if n not in self.input_names], [n for n in self.input_names if n not in given]

    @property
    def region_names(self) -> Tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    @property
    def n_classes(self) -> int:
        """Label values including background (binary: 2, whose engine config says n_classes 1)."""
        return max(self.classes) + 1

    def region(self, name: str) -> TaskRegion:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"no region {name!r} in task {self.name!r} (regions: {', '.join(self.region_names)})")

    def region_masks(self, label_map: np.ndarray) -> Dict[str, np.ndarray]:
        return region_masks(label_map, self.regions)


def region_masks(label_map: np.ndarray, regions: Sequence[TaskRegion]) -> Dict[str, np.ndarray]:
    """Each region's mask (bool, the label map's shape): the voxels whose label is one of the region's classes."""
    labels = np.asarray(label_map)
    return {r.name: np.isin(labels, np.asarray(r.classes, dtype=labels.dtype if labels.dtype.kind in "iu" else None))
            for r in regions}


def lung_task_block(card_data: Mapping[str, Any]) -> Dict[str, Any]:
    """The task block a card without one stands for (the lung-nodule model's): its intensity and label name."""
    labels = card_data.get("labels") or {"1": "Lung nodule"}
    return {"name": "lung nodule",
            "inputs": [{"name": "volume", "title": "CT",
                        "intensity": dict(card_data.get("intensity") or {"method": "minmax_per_crop"})}],
            "classes": {"1": labels.get("1", "Lung nodule")},
            "regions": [{"name": "Nodule", "classes": [1], "color": list(LUNG_REGION_COLOR),
                         "terminology": LUNG_TERMINOLOGY}]}


def task_from_card(card_data: Mapping[str, Any], modes: Sequence[str], crop_size: int) -> Task:
    """The Task of a checked card (models.validate_card has checked the block's fields)."""
    block = card_data.get("task") or lung_task_block(card_data)
    inputs = tuple(TaskInput(str(i["name"]), str(i.get("title", i["name"])),
                             dict(i.get("intensity") or {"method": "minmax_per_crop"})) for i in block["inputs"])
    regions = tuple(TaskRegion(str(r["name"]), tuple(int(c) for c in r["classes"]),
                               tuple(float(v) for v in r.get("color", LUNG_REGION_COLOR)),
                               str(r.get("terminology", ""))) for r in block["regions"])
    fill = block.get("fill_value")
    return Task(name=str(block.get("name", card_data.get("name", ""))), inputs=inputs,
                classes={int(k): str(v) for k, v in block["classes"].items()}, regions=regions,
                modes=tuple(modes), pixel_spacing_mm=card_data.get("pixel_spacing_mm"), crop_size=int(crop_size),
                fill_value=None if fill is None else float(fill))
