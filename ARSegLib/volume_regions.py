"""Several inputs, several regions: named modality volumes on one grid -> a model's whole-volume run -> per
region of the card's task, per lesion, a binary result (consensus, disagreement, scales, samples) on the
volumes' grid, and the report per region.

The path of pipeline.segment_volume, for models whose task names several inputs or whose label maps have
several classes (brats-glioma): the same grid (pipeline.whole_volume_grid), the same resampling, the same
engine call; what differs is that crops stack one channel per input, and that the samples' label maps are
turned into region masks (task.region_masks) before they are counted. A region's consensus holds the voxels
that at least half the samples put in the region (the binary rule of the lung model, per region); its
disagreement is the fraction of samples that differ from it there; its scale k is the region of the engine's
majority label after scale k.

Lesions are the connected parts of the first region (the outermost: whole tumour) in the union of every sample's
first region, keeping those whose consensus holds at least `min_lesion_mm3`; every region of a lesion is
counted inside that part (its territory), so a lesion's samples' range is the lesion's own. Consensus outside
every kept lesion (specks) is reported, not segmented. No MRML, no Qt (mrml.write_region_results writes these).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .pipeline import (
    CONNECTIVITY,
    MODE_VOLUME,
    CancelFn,
    ProgressFn,
    SegmentSettings,
    UnsupportedModelError,
    VolumeError,
    VolumeResult,
    _as_matrix,
    _bits_dtype,
    _run_model,
    _settings_record,
    _volume_corners_ras,
    _volume_statistics,
    check_mode,
    check_volume,
    grid_box_in_volume,
    map_grid_to_volume,
    pack_masks,
    prepare_crops,
    resample_to_grid,
    unpack_mask,
    whole_volume_grid,
)
from .task import Task

# two inputs share a grid when their volumes' corners lie this close in RAS (mm): a hundredth of a voxel of MRI
GRID_TOLERANCE_MM = 0.01
MIN_LESION_MM3 = 100.0  # a lesion smaller than 0.1 mL is a speck: reported, not a segment


class InputsError(VolumeError):
    """Inputs that do not fit the model's task: missing or unknown names, different grids."""


def uses_regions_path(card) -> bool:
    """Whether a model goes through this module rather than pipeline.segment_click / segment_volume: its task
    names several inputs, or its label maps have several classes (the front ends route on this). Reads the card's
    data only: no torch (the Slicer process asks too)."""
    data = getattr(card, "data", None) or {}
    n_classes = ((data.get("config") or {}).get("autoencoder") or {}).get("n_classes", 1)
    return len(card.task.inputs) > 1 or int(n_classes) > 1


# --------------------------------------------------------------------------------------------- inputs

def _check_names(given: Sequence[str], task: Task) -> List[str]:
    """The task's input names in its order, or an InputsError naming what is missing and what is unknown."""
    needed = list(task.input_names)
    unknown, missing = task.unknown_and_missing(given)
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown)}")
        raise InputsError(f"the model's task ({task.name}) takes the inputs {', '.join(needed)}; got "
                          f"{', '.join(given) or 'none'} ({'; '.join(parts)})")
    return needed


def _grid_gap_mm(shape, m, first_shape, first_m) -> Optional[float]:
    """How far (mm) a volume's grid lies from the first's at most: None when the shapes differ."""
    if tuple(shape) != tuple(first_shape):
        return None
    return float(np.abs(_volume_corners_ras(shape, m) - _volume_corners_ras(first_shape, first_m)).max())


def check_inputs(volumes: Mapping[str, Tuple[Any, Any]], task: Task) -> Tuple[np.ndarray, np.ndarray]:
    """{input name: (array (k, j, i), IJK->RAS)} -> (stacked float32 (C, k, j, i) in the task's order, IJK->RAS).

    Refuses, naming what is wrong, before any work: a name the task does not have, a name it needs and lacks,
    a volume the pipeline cannot segment, and inputs not on one grid (same shape, corners within
    GRID_TOLERANCE_MM): align_inputs resamples them onto the first input's grid."""
    needed = _check_names(list(volumes), task)
    arrays, first_m, first_shape = [], None, None
    for name in needed:
        array, m = volumes[name]
        try:
            array, m = check_volume(array, m)
        except VolumeError as e:
            raise type(e)(f"input {name}: {e}") from None
        if first_m is None:
            first_m, first_shape = m, array.shape
        else:
            gap = _grid_gap_mm(array.shape, m, first_shape, first_m)
            if gap is None:
                raise InputsError(f"input {name} has shape {array.shape} (k, j, i), input {needed[0]} {first_shape}: "
                                  f"the inputs must share one grid; resample {name} onto {needed[0]}'s grid first")
            if gap > GRID_TOLERANCE_MM:
                raise InputsError(f"input {name} lies up to {gap:.3g} mm away from input {needed[0]} (its IJK->RAS "
                                  f"differs): the inputs must share one grid (within {GRID_TOLERANCE_MM} mm); "
                                  f"resample {name} onto {needed[0]}'s grid first")
        arrays.append(np.asarray(array, dtype=np.float32))
    return np.stack(arrays), first_m


@dataclass
class AlignedInputs:
    """The task's inputs on one grid (the first input's): what a run takes, and what was done to get there."""

    names: Tuple[str, ...]  # the task's order
    stack: np.ndarray  # float32 (C, k, j, i)
    ijk_to_ras: np.ndarray  # the first input's
    resampled: Dict[str, str] = field(default_factory=dict)  # input name -> what was done to it, for the user

    def volumes(self) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        return {name: (self.stack[c], self.ijk_to_ras) for c, name in enumerate(self.names)}

    @property
    def notices(self) -> List[str]:
        return [f"{name}: {what}" for name, what in self.resampled.items()]


def resample_onto(array: np.ndarray, ijk_to_ras, shape: Sequence[int], target_ijk_to_ras,
                  fill_value: float) -> Tuple[np.ndarray, float]:
    """Trilinear resampling of a volume onto another grid (shape (k, j, i), IJK->RAS), plane by plane; points
    outside the volume get fill_value. Returns (float32 volume, the fraction of the grid's voxels inside it)."""
    index_to_ijk = np.linalg.inv(_as_matrix(ijk_to_ras)) @ _as_matrix(target_ijk_to_ras)
    nk, nj, ni = (int(s) for s in shape)
    src = np.asarray(array, dtype=np.float32)
    limits = np.array(src.shape[::-1], dtype=np.float64)[:, None] - 0.5  # i, j, k
    j, i = np.meshgrid(np.arange(nj, dtype=np.float64), np.arange(ni, dtype=np.float64), indexing="ij")
    plane_ijk = index_to_ijk[:3, 0:1] * i.reshape(1, -1) + index_to_ijk[:3, 1:2] * j.reshape(1, -1) + \
        index_to_ijk[:3, 3:4]
    out = np.empty((nk, nj, ni), dtype=np.float32)
    inside = 0
    for k in range(nk):
        ijk = plane_ijk + index_to_ijk[:3, 2:3] * k
        inside += int(np.count_nonzero(((ijk >= -0.5) & (ijk <= limits)).all(0)))
        ndimage.map_coordinates(src, ijk[::-1], output=out[k].reshape(-1), order=1, mode="constant",
                                cval=fill_value, prefilter=False)
    return out, inside / float(nk * nj * ni)


def align_inputs(volumes: Mapping[str, Tuple[Any, Any]], task: Task, resample: bool = True) -> AlignedInputs:
    """{input name: (array (k, j, i), IJK->RAS)} -> the inputs on the first input's grid (the task's order).

    The names and every volume are checked as check_inputs does. An input on another grid is resampled onto the
    first's (trilinear; outside it the task's fill value, else its own minimum), which AlignedInputs.resampled
    says, or, with resample False, refused. An input that does not overlap the first at all is refused."""
    needed = _check_names(list(volumes), task)
    checked = {}
    for name in needed:
        array, m = volumes[name]
        try:
            checked[name] = check_volume(array, m)
        except VolumeError as e:
            raise type(e)(f"input {name}: {e}") from None
    first = needed[0]
    first_array, first_m = checked[first]
    arrays, resampled = [np.asarray(first_array, dtype=np.float32)], {}
    for name in needed[1:]:
        array, m = checked[name]
        gap = _grid_gap_mm(array.shape, m, first_array.shape, first_m)
        if gap is not None and gap <= GRID_TOLERANCE_MM:
            arrays.append(np.asarray(array, dtype=np.float32))
            continue
        why = (f"shape {array.shape} (k, j, i), {first}'s {first_array.shape}" if gap is None
               else f"up to {gap:.3g} mm away from {first}'s grid")
        if not resample:
            raise InputsError(f"input {name} is on another grid than input {first} ({why}): the inputs must share "
                              f"one grid; resample {name} onto {first}'s grid first")
        fill = float(np.min(array)) if task.fill_value is None else float(task.fill_value)
        moved, covered = resample_onto(array, m, first_array.shape, first_m, fill)
        if covered == 0.0:
            raise InputsError(f"input {name} does not overlap input {first}: no voxel of {first}'s grid lies inside "
                              f"{name} (is it another patient's, or another study's, image?)")
        arrays.append(moved)
        resampled[name] = (f"resampled onto {first}'s grid (trilinear; it was on another grid: {why}); it covers "
                           f"{100 * covered:.0f}% of {first}'s grid" + ("" if covered >= 0.999 else
                                                                        f", the rest filled with {fill:g}"))
    return AlignedInputs(tuple(needed), np.stack(arrays), first_m.copy(), resampled)


def prepare_input_crops(crops_NChw: np.ndarray, task: Task) -> Tuple[np.ndarray, np.ndarray]:
    """Each channel prepared as its input says (minmax_per_crop: pipeline.prepare_crops; zscore_in_brain: already
    z-scored, clipped to the card's clip). Returns (prepared float32, which crops carry any signal: a crop whose
    every channel is constant, e.g. all outside the brain, is not sent to the model)."""
    prepared = np.empty(crops_NChw.shape, dtype=np.float32)
    has_signal = np.zeros(len(crops_NChw), dtype=bool)
    for c, entry in enumerate(task.inputs):
        channel = crops_NChw[:, c]
        if entry.method == "minmax_per_crop":
            prepared[:, c], signal = prepare_crops(channel, dict(entry.intensity))
        elif entry.method == "zscore_in_brain":
            lo, hi = entry.intensity.get("clip", (-np.inf, np.inf))
            prepared[:, c] = np.clip(channel, lo, hi)
            flat = channel.reshape(len(channel), -1)
            signal = flat.max(1) > flat.min(1)
        else:
            raise UnsupportedModelError(f"input {entry.name}: intensity preparation {entry.method!r} is not "
                                        f"supported by the volume pipeline")
        has_signal |= signal
    prepared[~has_signal] = 0.0
    return prepared, has_signal


# --------------------------------------------------------------------------------------------- result

@dataclass
class RegionLesion:
    """One region of one lesion on the volumes' grid (a binary VolumeResult: consensus, disagreement, scales,
    samples), and where it is."""

    region: str
    lesion: int  # 1, 2, ... (by decreasing size of the lesion's first region)
    n_lesions: int
    result: VolumeResult

    @property
    def name(self) -> str:
        """The segment's name: the region's, with the lesion's number where there are several."""
        return self.region if self.n_lesions <= 1 else f"{self.region} {self.lesion}"


@dataclass
class RegionsResult:
    task: Task
    model_name: str
    volume_shape: Tuple[int, int, int]
    ijk_to_ras: np.ndarray
    parts: List[RegionLesion]  # lesion-major, regions in the task's order
    n_lesions: int
    n_samples: int
    n_scales: int
    voxel_volume_mm3: float
    speck_volume_mm3: Dict[str, float]  # per region: consensus outside every kept lesion
    settings: Dict[str, Any]
    timings_s: Dict[str, float] = field(default_factory=dict)

    def region_parts(self, region: str) -> List[RegionLesion]:
        return [p for p in self.parts if p.region == region]

    def region_consensus(self, region: str) -> np.ndarray:
        """The region's consensus over every lesion, uint8 on the whole volume."""
        out = np.zeros(self.volume_shape, dtype=np.uint8)
        for p in self.region_parts(region):
            out |= p.result.full(p.result.consensus)
        return out

    def report(self, source_name: str = "") -> Dict[str, Any]:
        """Per region: the consensus volume (mL), the samples' range (mL), mean disagreement inside the samples'
        union; per lesion the same. JSON-ready."""
        ml = 1e-3

        def numbers(results: Sequence[VolumeResult]) -> Dict[str, Any]:
            cons = sum(r.consensus_volume_mm3 for r in results)
            samples = np.sum([r.sample_volumes_mm3 for r in results], 0) if results else np.zeros(self.n_samples)
            return {"consensus_volume_ml": round(float(cons) * ml, 4),
                    "sample_volume_ml": {"min": round(float(samples.min()) * ml, 4),
                                         "max": round(float(samples.max()) * ml, 4),
                                         "mean": round(float(samples.mean()) * ml, 4)},
                    "samples_marking": int(np.count_nonzero(samples))}

        regions = []
        for region in self.task.regions:
            parts = self.region_parts(region.name)
            entry = {"name": region.name, "classes": list(region.classes), **numbers([p.result for p in parts]),
                     "speck_volume_ml": round(self.speck_volume_mm3.get(region.name, 0.0) * ml, 4),
                     "lesions": [{"lesion": p.lesion, "segment": p.name, **numbers([p.result])} for p in parts]}
            regions.append(entry)
        return {"source": source_name, "mode": MODE_VOLUME, "model": self.model_name, "task": self.task.name,
                "inputs": list(self.task.input_names), "n_lesions": self.n_lesions, "regions": regions,
                "n_samples": self.n_samples, "n_scales": self.n_scales, "voxel_volume_mm3": self.voxel_volume_mm3,
                "min_lesion_ml": round(float(self.settings.get("min_lesion_mm3", MIN_LESION_MM3)) * ml, 4),
                "settings": self.settings, "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()}}


# --------------------------------------------------------------------------------------------- the run

def _check_model(predictor, card, task: Task) -> Tuple[float, int]:
    if predictor.config.segmentor.in_channels != len(task.inputs):
        raise UnsupportedModelError(f"model {card.name!r} takes {predictor.config.segmentor.in_channels} image "
                                    f"channels, its card's task names {len(task.inputs)} inputs")
    if max(predictor.n_classes, 2) != task.n_classes:
        raise UnsupportedModelError(f"model {card.name!r} predicts {predictor.n_classes} classes, its card's task "
                                    f"names {task.n_classes - 1} besides background")
    if not task.pixel_spacing_mm or task.pixel_spacing_mm <= 0:
        raise UnsupportedModelError(f"model card {card.name!r} states no pixel_spacing_mm")
    if card.crop_size != predictor.crop_size:
        raise UnsupportedModelError(f"model card {card.name!r} says crop {card.crop_size}, the model "
                                    f"{predictor.crop_size}")
    return float(task.pixel_spacing_mm), int(predictor.crop_size)


def segment_volume_regions(volumes: Mapping[str, Tuple[Any, Any]], predictor, card,
                           settings: Optional[SegmentSettings] = None, progress: ProgressFn = None,
                           cancel: CancelFn = None, min_lesion_mm3: float = MIN_LESION_MM3) -> RegionsResult:
    """Every axial plane of the inputs (one grid) tiled into crops of C channels at the model's spacing; per
    region and lesion of the card's task, the samples' consensus, disagreement, scales and samples."""
    t0 = time.perf_counter()
    settings = (settings or SegmentSettings()).check()
    check_mode(card, MODE_VOLUME)
    task = card.task
    stack, m = check_inputs(volumes, task)
    pixel_spacing, crop = _check_model(predictor, card, task)
    sampling = settings.sampling(predictor.config.sampling)
    shape = stack.shape[1:]
    grid = whole_volume_grid(shape, m, crop, pixel_spacing)
    nz, nrow, ncol = grid.shape
    tiles_r, tiles_c = nrow // crop, ncol // crop
    n, k, R = settings.n_samples, len(predictor.config.autoencoder.scales), len(task.regions)
    fills = [float(a.min()) if task.fill_value is None else task.fill_value for a in stack]

    votes = np.zeros((R,) + grid.shape, dtype=np.uint8)  # samples putting each voxel in each region
    scale_bits = np.zeros((R,) + grid.shape, dtype=_bits_dtype(k))
    sample_bits = np.zeros((R,) + grid.shape, dtype=_bits_dtype(n))
    tiles = [(z, tr, tc) for z in range(nz) for tr in range(tiles_r) for tc in range(tiles_c)]
    batch = settings.crops_per_pass(sampling)
    chunks = [tiles[i:i + batch] for i in range(0, len(tiles), batch)]
    total_steps = len(chunks) * k
    for ci, chunk in enumerate(chunks):
        planes = sorted({z for z, _, _ in chunk})
        resampled = {z: p for z, p in zip(planes, np.stack(
            [resample_to_grid(a, m, grid, fill, planes=planes) for a, fill in zip(stack, fills)], 1))}
        raw = np.stack([resampled[z][:, tr * crop:(tr + 1) * crop, tc * crop:(tc + 1) * crop] for z, tr, tc in chunk])
        prepared, has_signal = prepare_input_crops(raw, task)
        rows = np.flatnonzero(has_signal)
        if not len(rows):
            if progress is not None:
                progress((ci + 1) * k, total_steps)
            if cancel is not None and cancel():
                from .engine import Cancelled

                raise Cancelled()
            continue
        res = _run_model(predictor, prepared[rows], sampling, progress, cancel, ci * k, total_steps,
                         ci * batch + rows)
        for r_out, r_in in enumerate(rows):
            z, tr, tc = chunk[r_in]
            win = (z, slice(tr * crop, (tr + 1) * crop), slice(tc * crop, (tc + 1) * crop))
            for ri, region in enumerate(task.regions):
                in_region_Nhw = np.isin(res.samples_BNhw[r_out], region.classes)
                votes[(ri,) + win] = in_region_Nhw.sum(0)
                sample_bits[(ri,) + win] = pack_masks(in_region_Nhw)
                scale_bits[(ri,) + win] = pack_masks(np.isin(res.scale_consensus_BKhw[r_out], region.classes))
    t_model = time.perf_counter()

    box = grid_box_in_volume(grid, shape, m)
    mapped = map_grid_to_volume({"votes": votes, "scales": scale_bits, "samples": sample_bits}, grid, m, box)
    voxel_mm3 = float(abs(np.linalg.det(m[:3, :3])))
    consensus_R = (2 * mapped["votes"].astype(np.int16) >= n) & (mapped["votes"] > 0)
    union_first = mapped["samples"][0] > 0
    labels, n_parts = ndimage.label(union_first | consensus_R[0], structure=CONNECTIVITY)
    sizes = ndimage.sum_labels(consensus_R[0], labels, index=np.arange(1, n_parts + 1)) * voxel_mm3
    kept = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_lesion_mm3]
    record = _settings_record(card, settings, sampling, pixel_spacing)
    record.update({"intensity": {i.name: i.method for i in task.inputs}, "min_lesion_mm3": float(min_lesion_mm3)})
    parts: List[RegionLesion] = []
    territory_all = np.isin(labels, kept)
    specks = {r.name: float((consensus_R[ri] & ~territory_all).sum()) * voxel_mm3 for ri, r in enumerate(task.regions)}
    for number, label in enumerate(kept, 1):
        territory = labels == label
        for ri, region in enumerate(task.regions):
            cons = (consensus_R[ri] & territory).astype(np.uint8)
            samples = np.where(territory, mapped["samples"][ri], 0).astype(sample_bits.dtype)
            scales = np.where(territory, mapped["scales"][ri], 0).astype(scale_bits.dtype)
            differing = np.where(territory, np.where(cons > 0, n - mapped["votes"][ri], mapped["votes"][ri]), 0)
            cons_mm3, volumes, ious = _volume_statistics(cons, samples, n, voxel_mm3)
            result = VolumeResult(
                mode=MODE_VOLUME, volume_shape=tuple(int(s) for s in shape), ijk_to_ras=m.copy(), box=box,
                consensus=cons, disagreement=differing.astype(np.float32) / n, scale_bits=scales,
                sample_bits=samples, n_scales=k, n_samples=n, voxel_volume_mm3=voxel_mm3,
                consensus_volume_mm3=cons_mm3, sample_volumes_mm3=volumes, sample_iou=ious, model_name=card.name,
                settings=dict(record, region=region.name, lesion=number), grid=grid)
            result.samples_marking = int(np.count_nonzero(volumes))
            parts.append(RegionLesion(region.name, number, len(kept), result))
    return RegionsResult(task=task, model_name=card.name, volume_shape=tuple(int(s) for s in shape),
                         ijk_to_ras=m.copy(), parts=parts, n_lesions=len(kept), n_samples=n, n_scales=k,
                         voxel_volume_mm3=voxel_mm3, speck_volume_mm3=specks, settings=record,
                         timings_s={"model": t_model - t0, "total": time.perf_counter() - t0})


__all__ = ["GRID_TOLERANCE_MM", "MIN_LESION_MM3", "InputsError", "uses_regions_path", "check_inputs",
           "AlignedInputs", "resample_onto", "align_inputs", "prepare_input_crops",
           "RegionLesion", "RegionsResult", "segment_volume_regions", "unpack_mask", "_as_matrix"]
