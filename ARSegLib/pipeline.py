"""Volume <-> crops: from a 3D volume and a click (or the whole volume) to the model's 2D crops and back.

No MRML and no Qt here: the input is a numpy volume in slicer.util's (k, j, i) order plus its 4 x 4 IJK->RAS
matrix, the output a `VolumeResult` on that volume's own voxel grid. The GUI, the console, the CLI and the
tests all come through these two functions:

- `segment_click(volume, ijk_to_ras, point_ras, predictor, card)`: a local axial grid around the click at
  the model's pixel spacing, every plane of it as one batch, the 3D connected component through the click.
- `segment_volume(volume, ijk_to_ras, predictor, card)`: every axial plane tiled into crops, in chunks.

Crops are cut on a grid aligned with the RAS axes (rows run anterior -> posterior, columns right -> left):
the radiological axial view in which the LIDC crops were cut, whatever the volume's own IJK orientation.
Resampling goes through the inverse IJK->RAS matrix, so oblique, permuted and flipped volumes are handled
the same way; results come back to the volume's grid by nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from . import limits

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]
OutlineFn = Optional[Callable[["Outline"], None]]

MAX_SAMPLES = limits.MAX_SAMPLES  # samples are kept as bits of one integer per voxel


# --------------------------------------------------------------------------------------------- errors

class VolumeError(ValueError):
    """An input the pipeline cannot segment; the message says what is wrong and what to do."""


class NotAVolumeError(VolumeError):
    pass


class NonFiniteVolumeError(VolumeError):
    pass


class ConstantVolumeError(VolumeError):
    pass


class PointOutsideVolumeError(VolumeError):
    pass


class UnsupportedModelError(VolumeError):
    pass


class UnsupportedModeError(UnsupportedModelError):
    """The model card does not list the asked-for mode (click or whole volume) among those it was validated for."""


class SettingsError(VolumeError):
    """A setting out of range (NaN, negative, too large...): refused before any work."""


MODE_CLICK, MODE_VOLUME = "click", "volume"
MODE_WORDS = {MODE_CLICK: "click (a point on the object)", MODE_VOLUME: "whole volume (every slice)"}


def card_modes(card) -> Tuple[str, ...]:
    """The modes a model card says its model was trained and validated for. A card that says nothing is taken as
    click-only: every model so far saw only crops centred on an object, and whole-volume tiling of such a model
    marks structures everywhere (lung1 with lidc-nodule: 4,964 mm3 in 38 components, none on the nodule)."""
    data = getattr(card, "data", card) or {}
    modes = data.get("modes", [MODE_CLICK]) if isinstance(data, dict) else [MODE_CLICK]
    return tuple(str(m) for m in modes)


def _object_word(card) -> str:
    """What a click segments, in the card's words: its task's first region ("nodule" for the lung card)."""
    try:
        return card.task.regions[0].name.lower()
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):  # a card object without a task
        return "object"


def check_mode(card, mode: str) -> None:
    """UnsupportedModeError unless the card lists mode; the message says what the model can do instead."""
    modes = card_modes(card)
    if mode not in modes:
        name = getattr(card, "name", "this model")
        can = " or ".join(MODE_WORDS.get(m, m) for m in modes) or "nothing"
        hint = f" Give a point on the {_object_word(card)} (--point R,A,S on the command line)." \
            if MODE_CLICK in modes else ""
        raise UnsupportedModeError(
            f"model {name!r} is not validated for {MODE_WORDS.get(mode, mode)} mode: its card lists only "
            f"{can}, the mode it was trained and validated for.{hint}")


# --------------------------------------------------------------------------------------------- settings

@dataclass
class SegmentSettings:
    """What the user can choose for one run. None means: the model card's own value."""

    n_samples: int = limits.DEFAULT_SAMPLES
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    # how each crop is sampled (engine SamplingConfig): test-time views, candidates per kept sample, and the shift
    # of the presence head's logit; e.g. views=1, oversample=1 for the fastest click, presence_logit_shift=0 for
    # the head as trained
    views: Optional[int] = None
    oversample: Optional[int] = None
    # with oversampling, the scale whose masks herding compares; only the kept candidates draw the finer scales
    # (0: the last scale, every candidate drawn to the end)
    selection_scale: Optional[int] = None
    presence_logit_shift: Optional[float] = None
    # click mode: planes above and below the click, and how far from the click a component may start
    half_height_mm: float = limits.DEFAULT_HALF_HEIGHT_MM
    component_tolerance_mm: float = 5.0
    # a click off the object's centre is run again on a grid centred on the object the samples found there (the
    # model saw only object-centred crops: 6 mm off lung1's nodule centre its consensus was empty), at most this
    # many times, while that centre is farther than recentre_min_mm from the grid's; 0 runs the click as given
    recentre_passes: int = 3
    recentre_min_mm: float = 1.5
    # a click's planes in waves outward from the click: first those within first_wave_mm (at least the component
    # tolerance), then wave_step_planes more on each side where the kept result still reaches the outermost plane
    # run, until it does not or the grid ends. The result kept is connected to the click, so planes beyond one it
    # does not reach cannot change it: the output is the one batch's exactly (tested); lung1 runs 13 of its 17
    # planes. None: every plane in one batch
    first_wave_mm: Optional[float] = 12.5
    wave_step_planes: int = 1
    # crops per forward pass (memory grows with crops x candidates): a click's planes of an ordinary CT go in one
    # batch, a thin-slice scan's or a whole volume's in chunks; fewer per pass when a crop draws more than 32
    # candidates (samples x oversample), so a pass never holds more sequences than 32 crops of 32
    batch_size: int = 32

    MAX_TEMPERATURE = limits.MAX_TEMPERATURE
    MAX_VIEWS = 8  # engine/views.py's N_VIEWS, the symmetries of the square (this module loads without torch)
    MAX_OVERSAMPLE = 8  # candidates per kept sample: memory and time grow with it
    MAX_SELECTION_SCALE = 16  # no more scales than that in any card; the engine checks the model's own count
    MAX_PRESENCE_SHIFT = 5.0  # a logit shift of 5 turns a presence of 0.5 into 0.993
    MAX_HALF_HEIGHT_MM = limits.MAX_HALF_HEIGHT_MM
    MAX_RECENTRE_PASSES = 4  # each pass costs one click's inference

    def check(self) -> SegmentSettings:
        """SettingsError naming the first setting out of range; self otherwise. Called before any work."""

        def whole(name, lo, hi=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or \
                    (hi is not None and value > hi):
                span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
                raise SettingsError(f"{name} must be a whole number {span}, got {value!r}")

        def real(name, lo, hi, lo_open=False, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
            if not ok:
                span = f"{'above' if lo_open else 'at least'} {lo} and at most {hi}"
                raise SettingsError(f"{name} must be a finite number {span}, got {value!r}")

        whole("n_samples", 1, MAX_SAMPLES)
        real("temperature", 0.0, self.MAX_TEMPERATURE, lo_open=True, optional=True)
        if self.top_k is not None:
            whole("top_k", 0)
        real("top_p", 0.0, 1.0, optional=True)
        if self.views is not None:
            whole("views", 1, self.MAX_VIEWS)
        if self.oversample is not None:
            whole("oversample", 1, self.MAX_OVERSAMPLE)
        if self.selection_scale is not None:
            whole("selection_scale", 0, self.MAX_SELECTION_SCALE)
        real("presence_logit_shift", -self.MAX_PRESENCE_SHIFT, self.MAX_PRESENCE_SHIFT, optional=True)
        whole("seed", 0, limits.MAX_SEED)
        real("half_height_mm", 0.0, self.MAX_HALF_HEIGHT_MM)
        real("component_tolerance_mm", 0.0, 100.0)
        whole("recentre_passes", 0, self.MAX_RECENTRE_PASSES)
        real("recentre_min_mm", 0.0, 100.0)
        real("first_wave_mm", 0.0, self.MAX_HALF_HEIGHT_MM, optional=True)
        whole("wave_step_planes", 1)
        whole("batch_size", 1)
        return self

    def crops_per_pass(self, sampling) -> int:
        """batch_size, scaled down for crops that draw more than 32 candidates (results do not depend on it)."""
        return max(1, self.batch_size * 32 // max(32, sampling.n_candidates))

    def sampling(self, base):
        """The engine's SamplingConfig with these overrides applied to the model's defaults."""
        over: Dict[str, Any] = {"n_samples": int(self.n_samples), "seed": int(self.seed)}
        for name in ("temperature", "top_k", "top_p", "views", "oversample", "selection_scale", "presence_logit_shift"):
            value = getattr(self, name)
            if value is not None:
                over[name] = value
        if self.temperature is not None:
            over["temperature_per_scale"] = ()  # an explicit temperature overrides a per-scale schedule
        return dataclasses.replace(base, **over)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OutlineSettings:
    """The fast pass behind a click's first outline (segment_click's on_outline): the plane through the click
    alone, one view, a few candidates, no herding. On lung1 (native, 2 cores) 8 such samples took 0.075 s and their
    consensus had Dice 0.96 with the final result's on that plane; the full sampling's result replaces it."""

    n_samples: int = 8
    views: int = 1
    oversample: int = 1

    def sampling(self, full):
        """The full run's SamplingConfig (temperature, presence shift, seed) with this pass's cheap choices."""
        return dataclasses.replace(full, n_samples=self.n_samples, views=self.views, oversample=self.oversample,
                                   selection_scale=0)


FIRST_OUTLINE = OutlineSettings()


# --------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class AxialGrid:
    """A stack of axial planes aligned with the RAS axes, indexed (plane, row, column) like a numpy array.

    RAS of index (z, r, c) = origin_ras + z * dz * (0, 0, 1) + r * drow * (0, -1, 0) + c * dcol * (-1, 0, 0):
    rows run anterior -> posterior and columns right -> left, as an axial CT is shown and as LIDC was cut.
    """

    origin_ras: Tuple[float, float, float]
    spacing: Tuple[float, float, float]  # (dz, drow, dcol) in mm
    shape: Tuple[int, int, int]  # (planes, rows, columns)

    @property
    def index_to_ras(self) -> np.ndarray:
        dz, drow, dcol = self.spacing
        m = np.eye(4)
        m[:3, 0] = (0.0, 0.0, dz)
        m[:3, 1] = (0.0, -drow, 0.0)
        m[:3, 2] = (-dcol, 0.0, 0.0)
        m[:3, 3] = self.origin_ras
        return m

    @property
    def ras_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_ras)


def _as_matrix(ijk_to_ras) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise VolumeError(f"the IJK->RAS matrix must be a finite 4 x 4 matrix, got shape {m.shape}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise VolumeError("the IJK->RAS matrix is singular (a zero spacing or collinear axes)")
    return m


def check_volume(volume, ijk_to_ras) -> Tuple[np.ndarray, np.ndarray]:
    """The volume as a 3D numpy array and its matrix, or a VolumeError that says what is wrong."""
    array = np.asarray(volume)
    if array.ndim != 3:
        raise NotAVolumeError(f"expected a 3D scalar volume (k, j, i), got an array of {array.ndim} dimensions "
                              f"with shape {array.shape}; ARSeg segments single-channel 3D images")
    if min(array.shape) < 1:
        raise NotAVolumeError(f"the volume is empty (shape {array.shape})")
    if min(array.shape) < 2:
        raise NotAVolumeError(f"the volume has a single slice (shape {array.shape}): a 2D image, and ARSeg "
                              f"segments 3D volumes")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise NotAVolumeError(f"the volume must hold real numbers, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteVolumeError(f"the volume contains {bad} NaN or infinite voxels; fix or mask them first")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise ConstantVolumeError(f"the volume is constant (every voxel is {lo}): there is nothing to segment")
    return array, _as_matrix(ijk_to_ras)


def _axis_nearest_s(m: np.ndarray) -> int:
    """The IJK axis whose direction is closest to superior (the slice axis of an axial scan)."""
    cosines = np.abs(m[2, :3]) / np.linalg.norm(m[:3, :3], axis=0)
    return int(np.argmax(cosines))


def point_to_ijk(point_ras, ijk_to_ras) -> np.ndarray:
    p = np.append(np.asarray(point_ras, dtype=np.float64).reshape(3), 1.0)
    return (np.linalg.inv(_as_matrix(ijk_to_ras)) @ p)[:3]


def check_point(point_ras, volume_shape, ijk_to_ras) -> np.ndarray:
    """Continuous IJK of the point, or PointOutsideVolumeError. The volume spans voxel centres +- half a voxel."""
    p = np.asarray(point_ras, dtype=np.float64).reshape(-1)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise VolumeError(f"the point must be three finite RAS coordinates, got {point_ras!r}")
    ijk = point_to_ijk(p, ijk_to_ras)
    dims_ijk = np.asarray(volume_shape[::-1], dtype=np.float64)
    if np.any(ijk < -0.5) or np.any(ijk > dims_ijk - 0.5):
        raise PointOutsideVolumeError(
            f"the point R={p[0]:.1f}, A={p[1]:.1f}, S={p[2]:.1f} mm lies outside the volume (voxel "
            f"{np.round(ijk, 1).tolist()} of a {[int(d) for d in dims_ijk]} grid); click inside the image")
    return ijk


def click_grid(point_ras, volume_shape, ijk_to_ras, crop_size: int, pixel_spacing: float,
               half_height_mm: float) -> Tuple[AxialGrid, int]:
    """The local grid around a click and the index of the plane through the click.

    In-plane: crop_size x crop_size at the model's pixel spacing, the click at the centre. Across planes:
    the volume's spacing along its axis nearest S, with one plane through the voxel centres nearest the click
    (so that an axial scan is sampled on its own slices, not between them), covering +- half_height_mm.
    """
    m = _as_matrix(ijk_to_ras)
    ijk = check_point(point_ras, volume_shape, m)
    axis = _axis_nearest_s(m)
    dz = abs(m[2, axis])
    snapped = ijk.copy()
    snapped[axis] = np.clip(np.round(ijk[axis]), 0, volume_shape[::-1][axis] - 1)
    s_click_plane = float((m @ np.append(snapped, 1.0))[2])
    n_half = max(0, int(round(half_height_mm / dz)))
    centre = (crop_size - 1) / 2.0
    r, a = float(point_ras[0]), float(point_ras[1])
    grid = AxialGrid(origin_ras=(r + centre * pixel_spacing, a + centre * pixel_spacing, s_click_plane - n_half * dz),
                     spacing=(dz, pixel_spacing, pixel_spacing), shape=(2 * n_half + 1, crop_size, crop_size))
    return grid, n_half


def _volume_corners_ras(volume_shape, m: np.ndarray) -> np.ndarray:
    dims = np.asarray(volume_shape[::-1], dtype=np.float64)
    corners = np.array([[x, y, z] for x in (-0.5, dims[0] - 0.5) for y in (-0.5, dims[1] - 0.5)
                        for z in (-0.5, dims[2] - 0.5)])
    return (m[:3, :3] @ corners.T).T + m[:3, 3]


def small_input_warning(volume_shape, ijk_to_ras, crop_size: int, pixel_spacing: float) -> Optional[str]:
    """A warning when the volume's in-plane extent is smaller than the model's crop (None otherwise): the rest of
    every crop is padding, which the model never saw in training, so what it marks there means little (a 10 x 10
    x 3 noise volume was called a 330.8 mm3 nodule)."""
    corners = _volume_corners_ras(volume_shape, _as_matrix(ijk_to_ras))
    width_r, width_a = corners.max(0)[:2] - corners.min(0)[:2]
    side = crop_size * pixel_spacing
    if min(width_r, width_a) >= side:
        return None
    covered = min(width_r, side) * min(width_a, side) / side ** 2
    return (f"the volume covers {width_r:.1f} x {width_a:.1f} mm in-plane, less than the model's crop of {side:.1f} "
            f"x {side:.1f} mm ({crop_size} pixels of {pixel_spacing:g} mm): {100 * (1 - covered):.0f} % of each crop "
            f"lies outside the image, which the model was not trained for; the result may be meaningless")


def whole_volume_grid(volume_shape, ijk_to_ras, crop_size: int, pixel_spacing: float) -> AxialGrid:
    """Axial planes at the volume's own slice positions, each covering the volume's R-A extent in whole tiles."""
    m = _as_matrix(ijk_to_ras)
    axis = _axis_nearest_s(m)
    n_planes = int(volume_shape[::-1][axis])
    dz = abs(m[2, axis])
    centre_ijk = (np.asarray(volume_shape[::-1], dtype=np.float64) - 1) / 2
    first, last = centre_ijk.copy(), centre_ijk.copy()
    first[axis], last[axis] = 0, n_planes - 1
    s_first, s_last = ((m @ np.append(first, 1.0))[2], (m @ np.append(last, 1.0))[2])
    corners = _volume_corners_ras(volume_shape, m)
    lo, hi = corners.min(0), corners.max(0)
    tiles_col = max(1, math.ceil((hi[0] - lo[0]) / (crop_size * pixel_spacing)))
    tiles_row = max(1, math.ceil((hi[1] - lo[1]) / (crop_size * pixel_spacing)))
    ncol, nrow = tiles_col * crop_size, tiles_row * crop_size
    centre_r, centre_a = (lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2
    origin = (centre_r + (ncol - 1) / 2 * pixel_spacing, centre_a + (nrow - 1) / 2 * pixel_spacing,
              min(s_first, s_last))
    return AxialGrid(origin_ras=origin, spacing=(dz, pixel_spacing, pixel_spacing), shape=(n_planes, nrow, ncol))


def resample_to_grid(volume: np.ndarray, ijk_to_ras, grid: AxialGrid, fill_value: float,
                     planes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Trilinear resampling of the volume on the grid's planes (float32, (planes, rows, cols)).

    Points outside the volume get fill_value (the volume's minimum: air in a CT)."""
    m = _as_matrix(ijk_to_ras)
    index_to_ijk = np.linalg.inv(m) @ grid.index_to_ras
    planes = range(grid.shape[0]) if planes is None else planes
    _, nrow, ncol = grid.shape
    rows, cols = np.meshgrid(np.arange(nrow, dtype=np.float64), np.arange(ncol, dtype=np.float64), indexing="ij")
    out = np.empty((len(planes), nrow, ncol), dtype=np.float32)
    for n, z in enumerate(planes):
        ijk = (index_to_ijk[:3, 0:1] * z + index_to_ijk[:3, 1:2] * rows.reshape(1, -1)
               + index_to_ijk[:3, 2:3] * cols.reshape(1, -1) + index_to_ijk[:3, 3:4])
        coords_kji = ijk[::-1]
        ndimage.map_coordinates(volume, coords_kji, output=out[n].reshape(-1), order=1, mode="constant",
                                cval=fill_value, prefilter=False)
    return out


def prepare_crops(crops: np.ndarray, intensity: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """Intensity preparation from the model card. Returns (prepared float32 crops, which crops carry any signal).

    minmax_per_crop: each crop's own min..max to [0, 1] (how the LIDC PNGs were made). A constant crop (all
    outside the volume, or uniform) has no contrast to segment: it is marked as empty and not sent to the model.
    """
    method = (intensity or {}).get("method", "minmax_per_crop")
    if method != "minmax_per_crop":
        raise UnsupportedModelError(f"intensity preparation {method!r} of this model card is not supported by the "
                                    f"volume pipeline (supported: 'minmax_per_crop')")
    flat = crops.reshape(len(crops), -1)
    lo, hi = flat.min(1), flat.max(1)
    has_signal = hi > lo
    scale = np.where(has_signal, hi - lo, 1.0)
    prepared = ((crops - lo[:, None, None]) / scale[:, None, None]).astype(np.float32)
    prepared[~has_signal] = 0.0
    return prepared, has_signal


# --------------------------------------------------------------------------------------------- grid -> volume

def grid_box_in_volume(grid: AxialGrid, volume_shape, ijk_to_ras) -> Optional[Tuple[Tuple[int, int], ...]]:
    """The (k, j, i) index ranges [start, stop) of the volume voxels the grid can cover, or None if none."""
    m = _as_matrix(ijk_to_ras)
    nz, nr, nc = grid.shape
    corners = np.array([[z, r, c, 1.0] for z in (-0.5, nz - 0.5) for r in (-0.5, nr - 0.5) for c in (-0.5, nc - 0.5)])
    ijk = (np.linalg.inv(m) @ grid.index_to_ras @ corners.T)[:3]
    lo = np.floor(ijk.min(1)).astype(int)
    hi = np.ceil(ijk.max(1)).astype(int) + 1
    dims = np.asarray(volume_shape[::-1])
    lo, hi = np.clip(lo, 0, dims), np.clip(hi, 0, dims)
    if np.any(hi <= lo):
        return None
    return tuple((int(lo[a]), int(hi[a])) for a in (2, 1, 0))  # back to (k, j, i)


def map_grid_to_volume(arrays: Dict[str, np.ndarray], grid: AxialGrid, ijk_to_ras,
                       box: Tuple[Tuple[int, int], ...], slab: int = 8) -> Dict[str, np.ndarray]:
    """Nearest-neighbour lookup of grid arrays (..., planes, rows, cols) at the centres of the box's voxels.

    Voxels whose centre falls outside the grid get 0. Done slab by slab so that a whole CT stays in memory."""
    m = _as_matrix(ijk_to_ras)
    ijk_to_index = grid.ras_to_index @ m
    (k0, k1), (j0, j1), (i0, i1) = box
    shape = (k1 - k0, j1 - j0, i1 - i0)
    out = {name: np.zeros(a.shape[:-3] + shape, dtype=a.dtype) for name, a in arrays.items()}
    flat = {name: a.reshape(a.shape[:-3] + (-1,)) for name, a in arrays.items()}
    nz, nr, nc = grid.shape
    jj, ii = np.meshgrid(np.arange(j0, j1, dtype=np.float64), np.arange(i0, i1, dtype=np.float64), indexing="ij")
    jj, ii = jj.reshape(-1), ii.reshape(-1)
    for ks in range(k0, k1, slab):
        ke = min(k1, ks + slab)
        kk = np.repeat(np.arange(ks, ke, dtype=np.float64), len(ii))
        ijk = np.stack([np.tile(ii, ke - ks), np.tile(jj, ke - ks), kk])
        idx = np.rint(ijk_to_index[:3, :3] @ ijk + ijk_to_index[:3, 3:4]).astype(np.int64)
        inside = ((idx[0] >= 0) & (idx[0] < nz) & (idx[1] >= 0) & (idx[1] < nr) & (idx[2] >= 0) & (idx[2] < nc))
        lin = (idx[0] * nr + idx[1]) * nc + idx[2]
        lin = np.where(inside, lin, 0)
        for name, a in flat.items():
            values = a[..., lin]
            values[..., ~inside] = 0
            out[name][..., ks - k0:ke - k0, :, :] = values.reshape(a.shape[:-1] + (ke - ks, j1 - j0, i1 - i0))
    return out


# --------------------------------------------------------------------------------------------- bits

def _bits_dtype(n: int):
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if n <= np.dtype(dtype).itemsize * 8:
            return dtype
    raise ValueError(f"cannot pack {n} masks into one integer (at most {MAX_SAMPLES})")


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(X, ...) binary masks -> one unsigned integer per voxel, bit x set where mask x is."""
    dtype = _bits_dtype(masks.shape[0])
    packed = np.zeros(masks.shape[1:], dtype=dtype)
    for x in range(masks.shape[0]):
        packed |= (masks[x] > 0).astype(dtype) << dtype(x)
    return packed


def unpack_mask(packed: np.ndarray, bit: int) -> np.ndarray:
    return ((packed >> packed.dtype.type(bit)) & packed.dtype.type(1)).astype(np.uint8)


# --------------------------------------------------------------------------------------------- components

CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-neighbourhood: a nodule's slices touch diagonally


def _bounding_box(mask: np.ndarray) -> Optional[Tuple[slice, ...]]:
    """The smallest box holding every foreground voxel (None if there is none): labelling only that box gives the
    same components at a fraction of the cost (a nodule fills little of its crop)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _component_near_point(mask: np.ndarray, point_index, spacing, tolerance_mm: float) -> np.ndarray:
    """The connected component containing the point, or the one nearest to it within tolerance_mm, else empty."""
    out = np.zeros(mask.shape, dtype=bool)
    box = _bounding_box(mask > 0)
    if box is None:
        return out
    labels, _ = ndimage.label(mask[box] > 0, structure=CONNECTIVITY)
    offset = np.array([b.start for b in box])
    fg = np.argwhere(labels > 0)
    d = np.sqrt((((fg + offset - np.asarray(point_index)[None]) * np.asarray(spacing)[None]) ** 2).sum(1))
    nearest = int(np.argmin(d))
    if d[nearest] <= tolerance_mm:
        out[box] = labels == labels[tuple(fg[nearest])]
    return out


def _components_touching(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The connected components of mask that overlap region."""
    out = np.zeros(mask.shape, dtype=bool)
    box = _bounding_box(mask > 0)
    if box is None:
        return out
    labels, _ = ndimage.label(mask[box] > 0, structure=CONNECTIVITY)
    keep = np.unique(labels[region[box] & (labels > 0)])
    out[box] = np.isin(labels, keep[keep > 0])
    return out


# --------------------------------------------------------------------------------------------- result

@dataclass
class TokenMaps:
    """The token maps behind a click's samples, per plane of its grid, packed small (a lung1 click: 17 planes x 16
    samples x 204 tokens, 55 kB) and plain numpy, so a result pickles and crosses the worker without torch.

    idx_ZNL: every scale's tokens of sample n on plane z, scale after scale in raster order; view_ZN: the
    symmetric view it was drawn on; drawn_ZN: False where the sample is empty there (or the plane had no signal).
    computed_Z: False on planes with signal that the click's waves did not reach (their result could not change
    the click's); a refinement whose result reaches a plane beside one draws them with `sampling` (the click's
    SamplingConfig as a dict), which gives the tokens a one-batch click would have kept. None: every plane
    computed."""

    idx_ZNL: np.ndarray
    view_ZN: np.ndarray
    drawn_ZN: np.ndarray
    scales: Tuple[int, ...]
    computed_Z: Optional[np.ndarray] = None
    sampling: Optional[Dict[str, Any]] = None

    @classmethod
    def empty(cls, n_planes: int, like, scales) -> TokenMaps:
        n, length = like.idx_BNL.shape[1:]
        return cls(idx_ZNL=np.zeros((n_planes, n, length), dtype=like.idx_BNL.dtype),
                   view_ZN=np.zeros((n_planes, n), dtype=np.int8), drawn_ZN=np.zeros((n_planes, n), dtype=bool),
                   scales=tuple(int(v) for v in scales))

    def put(self, planes, tokens) -> None:
        """The engine's SampleTokens of crops `planes` (one crop per plane) into those planes."""
        self.idx_ZNL[planes] = tokens.idx_BNL
        self.view_ZN[planes] = tokens.view_BN
        self.drawn_ZN[planes] = tokens.drawn_BN
        if self.computed_Z is not None:
            self.computed_Z[planes] = True

    def missing_planes(self) -> List[int]:
        """Planes whose tokens the click's waves did not compute (empty for a one-batch click)."""
        return [] if self.computed_Z is None else [int(z) for z in np.flatnonzero(~self.computed_Z)]

    def of_planes(self, planes):
        """The engine's SampleTokens of these planes (imported here: this module loads without torch)."""
        from .engine.consensus import SampleTokens

        return SampleTokens(idx_BNL=self.idx_ZNL[planes], view_BN=self.view_ZN[planes],
                            drawn_BN=self.drawn_ZN[planes])


@dataclass
class Preview:
    """One plane through the click (or the busiest tile of a whole volume), on the model's crop grid."""

    image: np.ndarray  # (h, w) prepared crop in [0, 1]
    scale_consensus: np.ndarray  # (K, h, w)
    consensus: np.ndarray  # (h, w)
    disagreement: np.ndarray  # (h, w)
    title: str = ""
    # where the plane is, for a figure a reader can place: rows run A -> P, columns R -> L (radiological axial)
    image_hu: Optional[np.ndarray] = None  # (h, w) the crop in the volume's own units (Hounsfield in a CT)
    if_present: Optional[np.ndarray] = None  # (h, w) the consensus of the samples that mark an object
    pixel_spacing_mm: float = 0.0
    plane_s_mm: float = 0.0  # S of the plane (mm)
    slice_index: int = -1  # the volume's slice index along its axis nearest S (-1: between slices)
    n_slices: int = 0
    click_rc: Optional[Tuple[float, float]] = None  # (row, column) of the click in the crop
    scale_sides: Tuple[int, ...] = ()  # token map side of each scale (1, 2, ... 8)


@dataclass
class Outline:
    """A click's first, fast answer on the plane through the click (OutlineSettings), handed to on_outline before
    the full sampling runs; the final VolumeResult replaces it. Never part of the result or of a nodule's history."""

    mask: np.ndarray  # uint8 (h, w): the fast consensus' component at the click, on the crop grid
    grid: AxialGrid  # that one plane, shape (1, h, w)
    box: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]  # (k, j, i) ranges of volume_mask
    volume_mask: np.ndarray  # uint8 (box): mask on the volume's own voxels (the clicked slice of an axial scan)
    volume_shape: Tuple[int, int, int]
    ijk_to_ras: np.ndarray
    point_ras: Tuple[float, float, float]
    area_mm2: float
    n_samples: int
    seconds: float  # from the call of segment_click until the outline was ready


@dataclass
class VolumeResult:
    """Everything one run produced, on the input volume's own voxel grid.

    To keep a whole CT in memory, arrays cover `box` (index ranges [start, stop) along k, j, i) and masks of
    several samples or scales are packed as bits of one integer per voxel; `full()`, `scale_mask()` and
    `sample_mask()` give plain arrays. Volumes are counted on the volume's grid: what the segments contain."""

    mode: str  # "click" or "volume"
    volume_shape: Tuple[int, int, int]  # (k, j, i)
    ijk_to_ras: np.ndarray
    box: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
    consensus: np.ndarray  # uint8 (box): 1 inside the consensus
    disagreement: np.ndarray  # float32 (box): fraction of samples that differ from the consensus
    scale_bits: np.ndarray  # (box): bit k is the consensus after scale k + 1
    sample_bits: np.ndarray  # (box): bit i is sample i + 1
    n_scales: int
    n_samples: int
    voxel_volume_mm3: float
    consensus_volume_mm3: float
    sample_volumes_mm3: np.ndarray  # (N,)
    sample_iou: np.ndarray  # (N,) IoU of each sample with the consensus (IoU(empty, empty) = 1)
    model_name: str
    settings: Dict[str, Any]
    point_ras: Optional[Tuple[float, float, float]] = None
    grid: Optional[AxialGrid] = None
    preview: Optional[Preview] = None
    timings_s: Dict[str, float] = field(default_factory=dict)
    # samples split on whether an object is there: how many mark one (kept component non-empty), and the
    # consensus of those (uint8, box): shown when the plain consensus is empty ("if present")
    samples_marking: int = 0
    if_present: Optional[np.ndarray] = None
    if_present_volume_mm3: float = 0.0
    # click mode: every sample's token maps on every plane of `grid`, what a later refinement keeps or redraws
    tokens: Optional[TokenMaps] = None

    @property
    def presence_fraction(self) -> float:
        """The fraction of samples that mark an object at the click."""
        return self.samples_marking / self.n_samples if self.n_samples else 0.0

    @property
    def box_slices(self) -> Tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in self.box)

    @property
    def box_shape(self) -> Tuple[int, int, int]:
        return tuple(b - a for a, b in self.box)

    def full(self, array: np.ndarray) -> np.ndarray:
        """A box array pasted into a zero array of the whole volume's shape."""
        out = np.zeros(tuple(self.volume_shape), dtype=array.dtype)
        out[self.box_slices] = array
        return out

    def scale_mask(self, k: int) -> np.ndarray:
        """Consensus after scale k (1-based, coarse to fine), uint8 over the box."""
        if not 1 <= k <= self.n_scales:
            raise IndexError(f"scale {k} out of 1..{self.n_scales}")
        return unpack_mask(self.scale_bits, k - 1)

    def sample_mask(self, i: int) -> np.ndarray:
        """Sample i (1-based), uint8 over the box."""
        if not 1 <= i <= self.n_samples:
            raise IndexError(f"sample {i} out of 1..{self.n_samples}")
        return unpack_mask(self.sample_bits, i - 1)

    def prompts(self) -> List[Dict[str, Any]]:
        """The prompts that made this result, oldest first: the prompt history a refinement records in settings,
        else its refinement after the click, else the click alone (PromptHistory.to_list's form)."""
        history = self.settings.get("prompt_history")
        if history:
            return list(history)
        out = [] if self.point_ras is None else [{"kind": "click",
                                                  "point_ras": [round(float(v), 3) for v in self.point_ras]}]
        if self.settings.get("refinement"):
            out.append(self.settings["refinement"])
        return out

    def report(self, source_name: str = "", volume=None) -> Dict[str, Any]:
        """The numbers a reader checks, as a JSON-ready dict (the MRML table shows the same): volumes, the axial
        long/short-axis diameters with the samples' range (measures.py), the prompts that made it, and, given the
        input volume's (k, j, i) voxels, the mean intensity inside the consensus (HU in a CT)."""
        from .measures import result_measures

        vols = self.sample_volumes_mm3
        return {
            "source": source_name,
            "mode": self.mode,
            "model": self.model_name,
            "point_ras_mm": None if self.point_ras is None else [round(float(v), 3) for v in self.point_ras],
            "consensus_volume_mm3": round(float(self.consensus_volume_mm3), 3),
            "sample_volume_mm3": {"min": round(float(vols.min()), 3), "max": round(float(vols.max()), 3),
                                  "mean": round(float(vols.mean()), 3)},
            "sample_volumes_mm3": [round(float(v), 3) for v in vols],
            "sample_iou_with_consensus": [round(float(v), 4) for v in self.sample_iou],
            "samples_marking": int(self.samples_marking),
            "presence_fraction": round(float(self.presence_fraction), 4),
            "if_present_volume_mm3": round(float(self.if_present_volume_mm3), 3),
            **result_measures(self, volume),
            "prompts": self.prompts(),
            "n_samples": self.n_samples,
            "n_scales": self.n_scales,
            "voxel_volume_mm3": self.voxel_volume_mm3,
            "settings": self.settings,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }


def _voxel_volume(m: np.ndarray) -> float:
    return float(abs(np.linalg.det(m[:3, :3])))


def _volume_statistics(consensus: np.ndarray, sample_bits: np.ndarray, n_samples: int, voxel_mm3: float):
    cons = consensus > 0
    n_cons = int(cons.sum())
    volumes, ious = np.zeros(n_samples), np.zeros(n_samples, dtype=np.float32)
    for i in range(n_samples):
        s = unpack_mask(sample_bits, i).astype(bool)
        n_s = int(s.sum())
        inter = int((s & cons).sum())
        union = n_s + n_cons - inter
        volumes[i] = n_s * voxel_mm3
        ious[i] = 1.0 if union == 0 else inter / union
    return n_cons * voxel_mm3, volumes, ious


# --------------------------------------------------------------------------------------------- model

def _check_model(predictor, card, settings: SegmentSettings):
    if predictor.n_classes > 1:
        raise UnsupportedModelError(f"model {card.name!r} predicts {predictor.n_classes} classes; the volume "
                                    f"pipeline handles binary models only so far")
    if predictor.config.segmentor.in_channels != 1:
        raise UnsupportedModelError(f"model {card.name!r} expects {predictor.config.segmentor.in_channels} image "
                                    f"channels; a single scalar volume gives one")
    if not 1 <= settings.n_samples <= MAX_SAMPLES:
        raise ValueError(f"the number of samples must be between 1 and {MAX_SAMPLES}, got {settings.n_samples}")
    spacing = card.pixel_spacing_mm
    if spacing is None or not spacing > 0:
        raise UnsupportedModelError(f"model card {card.name!r} states no pixel_spacing_mm")
    if card.crop_size != predictor.crop_size:
        raise UnsupportedModelError(f"model card {card.name!r} says crop {card.crop_size}, "
                                    f"the model {predictor.crop_size}")
    return float(spacing), int(predictor.crop_size)


def _settings_record(card, settings: SegmentSettings, sampling, pixel_spacing: float) -> Dict[str, Any]:
    record = settings.to_dict()
    record.update({"temperature": float(sampling.temperature), "top_k": int(sampling.top_k),
                   "top_p": float(sampling.top_p), "views": int(sampling.views),
                   "oversample": int(sampling.oversample), "selection_scale": int(sampling.selection_scale),
                   "presence_logit_shift": float(sampling.presence_logit_shift), "pixel_spacing_mm": pixel_spacing,
                   "intensity": dict(card.intensity).get("method"),
                   # which card exactly (its sealed fields' digest): a shipped card's sampling may change in a release
                   "model_card_sha256": (getattr(card, "data", None) or {}).get("card_sha256")})
    return record


def _run_model(predictor, crops: np.ndarray, sampling, progress: ProgressFn, cancel: CancelFn,
               step_offset: int, total_steps: int, crop_ids: Sequence[int], keep_tokens: bool = False):
    """All crops through the predictor in one call; progress counted in scales across chunks. crop_ids: each
    crop's place in the whole run, so its samples do not depend on how the run is chunked. keep_tokens: the
    result carries the samples' token maps (a click keeps them for a later refinement)."""
    k = len(predictor.config.autoencoder.scales)
    total = total_steps or k

    def on_progress(done, _total):
        if progress is not None:
            progress(step_offset + done, total)

    if keep_tokens:
        return predictor.segment(crops, sampling=sampling, progress=on_progress, cancel=cancel, crop_ids=crop_ids,
                                 keep_tokens=True)
    return predictor.segment(crops, sampling=sampling, progress=on_progress, cancel=cancel, crop_ids=crop_ids)


def _single_input_intensity(card) -> Dict[str, Any]:
    """The intensity preparation of a one-input card: its task's input (task.py), else the card's own field."""
    task = getattr(card, "task", None)
    return dict(task.inputs[0].intensity) if task is not None else dict(card.intensity)


def _prepare_run(volume, ijk_to_ras, predictor, card, settings: Optional[SegmentSettings]):
    """Checks shared by both modes: (settings, volume array, IJK->RAS, pixel spacing, crop size, sampling)."""
    settings = (settings or SegmentSettings()).check()
    array, m = check_volume(volume, ijk_to_ras)
    pixel_spacing, crop = _check_model(predictor, card, settings)
    return settings, array, m, pixel_spacing, crop, settings.sampling(predictor.config.sampling)


# --------------------------------------------------------------------------------------------- click mode

def segment_click(volume, ijk_to_ras, point_ras, predictor, card, settings: Optional[SegmentSettings] = None,
                  progress: ProgressFn = None, cancel: CancelFn = None, refinement=None,
                  previous: Optional[VolumeResult] = None, on_outline: OutlineFn = None) -> VolumeResult:
    """Segment the object under a RAS point: the local grid's planes as one batch, the 3D component kept.

    The model saw only object-centred crops, so a click off the object's centre is answered again on a grid
    centred on what the first pass found (the samples' mean mask kept at the click), up to
    settings.recentre_passes times, while that centre lies more than settings.recentre_min_mm from the grid's.
    The component kept is always the one at the user's click; a click near the centre runs once, unchanged.

    refinement (prompts.Refinement) with previous (the object's current result, from a click or a refinement):
    the object's new result, on previous's grid (no re-centring); see `refine_click`. With refinement None (or
    empty) the click runs as above.

    on_outline, when given, receives an Outline of the plane through the click from a fast pass (FIRST_OUTLINE)
    before the full sampling starts; the result is the same with or without it (its own random streams)."""
    t0 = time.perf_counter()
    if refinement is not None and not refinement.empty:
        return refine_click(volume, ijk_to_ras, predictor, card, refinement, previous, settings, progress, cancel)
    settings, array, m, pixel_spacing, crop, sampling = _prepare_run(volume, ijk_to_ras, predictor, card, settings)
    click = np.asarray(point_ras, dtype=np.float64).reshape(3)
    if on_outline is not None:
        on_outline(first_outline(array, m, click, predictor, card, settings, sampling, pixel_spacing, crop, cancel,
                                 t0))
    centre, centres, found = click, [], None
    while True:
        previous, pass_index = found, len(centres)

        def pass_progress(done, total, p=pass_index):  # a re-centred pass is more work: the total grows
            if progress is not None:
                progress(p * total + done, (p + 1) * total)

        found = _click_pass(array, m, click, centre, predictor, card, settings, sampling, pixel_spacing, crop,
                            pass_progress, cancel)
        if previous is not None and not found.samples.any():
            found = previous  # re-centred, no sample marks anything at the click any more: keep what was found
            break
        centres.append([round(float(v), 3) for v in centre])
        object_centre = found.object_centre_ras()
        if object_centre is None or len(centres) > settings.recentre_passes:
            break
        grid_centre = found.grid.index_to_ras @ np.array([found.centre_plane, (crop - 1) / 2.0, (crop - 1) / 2.0, 1.0])
        if np.linalg.norm(object_centre - grid_centre[:3]) <= settings.recentre_min_mm:
            break
        centre = object_centre
    result = _click_result(found, array, m, click, predictor, card, settings, sampling, pixel_spacing)
    result.settings["grid_centres_ras_mm"] = centres  # the click's, then each re-centred one
    result.timings_s = {"prepare": found.t_prepare, "model": found.t_model, "passes": len(centres),
                        "waves": found.waves, "planes_run": found.planes_run, "total": time.perf_counter() - t0}
    return result


# --------------------------------------------------------------------------------------------- refinement

REFINE_MAX_ROUNDS = 4  # candidate pools per prompted plane at most (the first is the click's own pool)


def _grid_index_of_voxel(point_ras, m: np.ndarray, grid: AxialGrid) -> Tuple[int, int, int]:
    """The grid index whose value the volume voxel holding the point receives (map_grid_to_volume's nearest
    neighbour of that voxel's centre): a prompt on it is a prompt on exactly that voxel."""
    ijk = np.rint(point_to_ijk(point_ras, m))
    centre_ras = m @ np.append(ijk, 1.0)
    return tuple(int(v) for v in np.rint((grid.ras_to_index @ centre_ras)[:3]))


def _check_refinement(refinement, previous, array, m, predictor):
    """PromptError (or VolumeError) for a refinement that cannot be acted on, before any work."""
    from .prompts import PromptError, Refinement

    if not isinstance(refinement, Refinement):
        raise PromptError(f"a refinement is a prompts.Refinement, got {type(refinement).__name__}")
    if not isinstance(previous, VolumeResult) or previous.mode != MODE_CLICK or previous.grid is None:
        raise PromptError("a refinement needs the object's current click result (previous=...), got "
                          f"{'nothing' if previous is None else type(previous).__name__}")
    if tuple(previous.volume_shape) != tuple(array.shape) or not np.allclose(previous.ijk_to_ras, m):
        raise PromptError("the previous result belongs to another volume (its shape or IJK->RAS differs)")
    refinement.check_against(previous.n_scales, previous.n_samples)
    if refinement.use_sample is None and previous.tokens is None:
        raise PromptError("the previous result keeps no token maps (made by an older version or a stand-in "
                          "model): click the object again, then refine it")
    if previous.n_scales != len(predictor.config.autoencoder.scales):
        raise PromptError(f"the previous result has {previous.n_scales} scales, the model "
                          f"{len(predictor.config.autoencoder.scales)}: it was made by another model")
    for p in refinement.prompts:
        check_point(p.point_ras, array.shape, m)
    return refinement_grid_indices(refinement, previous, m)


def refinement_grid_indices(refinement, previous: VolumeResult, m: np.ndarray):
    """[(kind, (z, r, c))] of the refinement's points on the previous result's grid, or the PromptError that says
    which point lies outside it (callers check before any work: the run service, refine_click)."""
    from .prompts import PromptError

    indices = []
    for p in refinement.prompts:
        z, r, c = _grid_index_of_voxel(p.point_ras, m, previous.grid)
        nz, h, w = previous.grid.shape
        if not (0 <= z < nz and 0 <= r < h and 0 <= c < w):
            raise PromptError(f"the {p.kind} point R={p.point_ras[0]:.1f}, A={p.point_ras[1]:.1f}, "
                              f"S={p.point_ras[2]:.1f} mm lies outside this nodule's grid (planes +-"
                              f"{previous.settings.get('half_height_mm', 0):g} mm, {h} x {w} pixels around it)")
        indices.append((p.kind, (z, r, c)))
    return indices


def _history(previous: VolumeResult):
    from .prompts import PromptHistory, Refinement

    old = previous.settings.get("prompt_history") or []
    click = previous.point_ras if previous.point_ras is not None else (0.0, 0.0, 0.0)
    return PromptHistory(click_ras=tuple(click), refinements=[Refinement.from_dict(d) for d in old[1:]])


def refine_click(volume, ijk_to_ras, predictor, card, refinement, previous: VolumeResult,
                 settings: Optional[SegmentSettings] = None, progress: ProgressFn = None,
                 cancel: CancelFn = None) -> VolumeResult:
    """An object's new result under a refinement, on the grid of its previous result (no re-centring).

    - Include / exclude points (this refinement's and every earlier one's of the object) act on the plane each
      lies on: its samples are drawn again under its prompts (engine/steering.py: candidate filtering, the first
      pool being the click's own, up to REFINE_MAX_ROUNDS pools), so every kept sample marks each include
      voxel and no kept sample marks an exclude voxel where the budget finds such candidates; only satisfying
      samples are kept (repeated when fewer than N satisfy; when none satisfies all, those satisfying the most).
      settings["prompt_satisfaction"] says, per prompt, how many candidates satisfied it. Other planes keep their
      samples (decoded again from their token maps). The consensus keeps the component at the click and those
      through the include points.
    - lock_scales = k: every plane is drawn again with scales 1..k of sample from_sample (or the most typical, the
      one agreeing best with the consensus) teacher-forced, only the finer scales drawn.
    - use_sample = i: sample i becomes the consensus, no model run (settings["consensus_from_sample"] says so).
    The refinement and the object's prompt history are in settings; the samples' count is previous's."""
    t0 = time.perf_counter()
    settings = dataclasses.replace(settings or SegmentSettings(), n_samples=int(previous.n_samples)) \
        if isinstance(previous, VolumeResult) else settings
    settings, array, m, pixel_spacing, crop, sampling = _prepare_run(volume, ijk_to_ras, predictor, card, settings)
    indices = _check_refinement(refinement, previous, array, m, predictor)
    history = _history(previous)
    history.refinements.append(refinement)
    if refinement.use_sample is not None:
        result = _use_sample(previous, refinement.use_sample, m)
    else:
        result = _resample_click(array, m, predictor, card, settings, sampling, pixel_spacing, refinement, previous,
                                 history, indices, progress, cancel)
    result.settings["refinement"] = refinement.to_dict()
    result.settings["prompt_history"] = history.to_list()
    result.timings_s["total"] = time.perf_counter() - t0
    return result


def _use_sample(previous: VolumeResult, sample: int, m: np.ndarray) -> VolumeResult:
    """Sample i (1-based) as the consensus; the samples stay as they were, for browsing."""
    chosen = previous.sample_mask(sample)
    n = previous.n_samples
    disagreeing = np.zeros(chosen.shape, dtype=np.uint8)
    for i in range(n):
        disagreeing += unpack_mask(previous.sample_bits, i) != chosen
    cons_mm3, volumes, ious = _volume_statistics(chosen, previous.sample_bits, n, previous.voxel_volume_mm3)
    preview = previous.preview
    if preview is not None and previous.grid is not None:
        z = int(np.clip(np.round((previous.grid.ras_to_index @ np.append(previous.point_ras, 1.0))[0]), 0,
                        previous.grid.shape[0] - 1))
        preview = dataclasses.replace(preview, consensus=_volume_to_grid_plane(previous.full(chosen), m,
                                                                               previous.grid, z))
    settings = dict(previous.settings)
    settings["consensus_from_sample"] = int(sample)
    return dataclasses.replace(previous, consensus=chosen, disagreement=disagreeing.astype(np.float32) / n,
                               consensus_volume_mm3=cons_mm3, sample_volumes_mm3=volumes, sample_iou=ious,
                               settings=settings, preview=preview, timings_s={"model": 0.0})


def _volume_to_grid_plane(mask: np.ndarray, m: np.ndarray, grid: AxialGrid, z: int) -> np.ndarray:
    """A volume mask looked up (nearest voxel) at the pixels of grid plane z."""
    _, h, w = grid.shape
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    index = np.stack([np.full(h * w, float(z)), rr.ravel(), cc.ravel(), np.ones(h * w)])
    ijk = np.rint((np.linalg.inv(m) @ grid.index_to_ras @ index)[:3]).astype(np.int64)
    dims = np.asarray(mask.shape[::-1])[:, None]
    inside = ((ijk >= 0) & (ijk < dims)).all(0)
    out = np.zeros(h * w, dtype=np.uint8)
    out[inside] = mask[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
    return out.reshape(h, w)


def _every_plane_drawn(tokens: TokenMaps, predictor, prepared, has_signal, settings: SegmentSettings,
                       cancel: CancelFn) -> TokenMaps:
    """The click's token maps with the planes its waves skipped drawn now, with the click's own sampling and crop
    ids: the token maps a one-batch click would have kept (a crop's samples depend on its image, id and seed), so
    a refinement of a click run in waves is the refinement of the one-batch click."""
    missing = [z for z in tokens.missing_planes() if has_signal[z]]
    if not missing:
        return tokens
    from .engine.config import SamplingConfig

    sampling = SamplingConfig(**tokens.sampling)
    full = TokenMaps(idx_ZNL=tokens.idx_ZNL.copy(), view_ZN=tokens.view_ZN.copy(), drawn_ZN=tokens.drawn_ZN.copy(),
                     scales=tokens.scales, computed_Z=tokens.computed_Z.copy(), sampling=tokens.sampling)
    batch = settings.crops_per_pass(sampling)
    for i in range(0, len(missing), batch):
        chunk = missing[i:i + batch]
        res = predictor.segment(prepared[chunk], sampling=sampling, cancel=cancel, crop_ids=chunk, keep_tokens=True)
        full.put(chunk, res.tokens)
    return full


def _resample_click(array, m, predictor, card, settings, sampling, pixel_spacing, refinement, previous, history,
                    indices, progress, cancel) -> VolumeResult:
    from .engine.steering import CropPrompts, LockedPrefix, SteeringConfig, sample_under_prompts, samples_from_tokens
    from .prompts import EXCLUDE, INCLUDE

    t_start = time.perf_counter()
    grid, tokens = previous.grid, previous.tokens
    nz, h, w = grid.shape
    n, k = previous.n_samples, previous.n_scales
    raw = resample_to_grid(array, m, grid, fill_value=float(array.min()))
    prepared, has_signal = prepare_crops(raw, card.intensity)
    click = np.asarray(previous.point_ras, dtype=np.float64)
    click_index = (grid.ras_to_index @ np.append(click, 1.0))[:3]
    click_plane = int(np.clip(np.round(click_index[0]), 0, nz - 1))
    click_index = (float(click_plane), round(float(click_index[1]), 6), round(float(click_index[2]), 6))
    click_rc = (int(np.clip(np.round(click_index[1]), 0, h - 1)), int(np.clip(np.round(click_index[2]), 0, w - 1)))

    # every point prompt the object has had, earlier ones first, each on the plane it lies on
    points = []
    for earlier in history.refinements[:-1]:
        for p in earlier.prompts:
            points.append((p.kind, _grid_index_of_voxel(p.point_ras, m, grid), p))
    points += [(kind, index, p) for (kind, index), p in zip(indices, refinement.prompts)]
    per_plane: Dict[int, List] = {}
    for kind, (z, r, c), p in points:
        per_plane.setdefault(z, []).append((kind, (r, c), p))
    prefix_source = None
    if refinement.lock_scales:
        prefix_source = (refinement.from_sample or int(np.argmax(previous.sample_iou)) + 1) - 1
        skipped = set(tokens.missing_planes())
        redraw = [z for z in range(nz) if has_signal[z] and z not in skipped]
        # a fresh draw of the finer scales each time the same lock is asked for again; N candidates, not N x
        # oversample: the locked coarse scales fix the mode whose share herding would otherwise balance, and the
        # refinement costs about half a click
        sampling = dataclasses.replace(sampling, seed=(int(sampling.seed) + 7919 * len(history.refinements))
                                       % (1 << 63), oversample=1)
    else:
        redraw = sorted(z for z in per_plane if has_signal[z])
    # a click run in waves has planes without token maps: a refinement runs without them (a lock redraws the planes
    # that have them) and draws them only if the refined result reaches a plane beside one (then again, with them):
    # beyond planes it does not reach, they cannot change it (as for the click)
    includes = [(float(z), float(r), float(c)) for kind, (z, r, c), _ in points if kind == INCLUDE]
    out = None  # the prompted planes' redraw: without a lock it needs no token maps, so a second round reuses it
    samples = np.zeros((n, nz, h, w), dtype=np.uint8)
    scales = np.zeros((k, nz, h, w), dtype=np.uint8)
    consensus = np.zeros((nz, h, w), dtype=np.uint8)

    def put(planes, res):
        samples[:, planes] = (res.samples_BNhw > 0).transpose(1, 0, 2, 3)
        scales[:, planes] = (res.scale_consensus_BKhw > 0).transpose(1, 0, 2, 3)
        consensus[planes] = res.consensus_Bhw > 0

    while True:
        kept_planes = [z for z in range(nz) if z not in redraw and tokens.drawn_ZN[z].any()]
        samples[:], scales[:], consensus[:] = 0, 0, 0
        new_tokens = TokenMaps(idx_ZNL=tokens.idx_ZNL.copy(), view_ZN=tokens.view_ZN.copy(),
                               drawn_ZN=tokens.drawn_ZN.copy(), scales=tokens.scales,
                               computed_Z=None if tokens.computed_Z is None else tokens.computed_Z.copy(),
                               sampling=tokens.sampling)
        new_tokens.drawn_ZN[[z for z in range(nz) if z not in redraw and z not in kept_planes]] = False

        satisfaction = []
        if redraw:
            crop_prompts, implied_B = [], []
            for z in redraw:
                here = per_plane.get(z, [])
                include_rc = tuple(rc for kind, rc, _ in here if kind == INCLUDE)
                exclude_rc = tuple(rc for kind, rc, _ in here if kind == EXCLUDE)
                # the click says the object is there: without it, an exclude point inside the object is met best
                # by the candidates that draw nothing, and the clicked plane empties (unless the click itself is
                # excluded, or a lock keeps the coarse shape anyway); not reported among the user's prompts
                implied = (z == click_plane and prefix_source is None and exclude_rc and not include_rc
                           and click_rc not in exclude_rc)
                implied_B.append(int(bool(implied)))
                crop_prompts.append(CropPrompts(include_rc=include_rc + ((click_rc,) if implied else ()),
                                                exclude_rc=exclude_rc))
            prefix = None
            if prefix_source is not None:
                prefix = LockedPrefix.from_tokens(tokens.of_planes(redraw), prefix_source, refinement.lock_scales,
                                                  tokens.scales)

            def on_progress(done, total):
                if progress is not None:
                    progress(done, total)

            if out is None or prefix is not None:
                out = sample_under_prompts(predictor, prepared[redraw], sampling, prompts=crop_prompts,
                                           prefix=prefix, steering=SteeringConfig(max_rounds=REFINE_MAX_ROUNDS),
                                           crop_ids=redraw, progress=on_progress, cancel=cancel)
            put(redraw, out.result)
            new_tokens.put(redraw, out.result.tokens)
            for b, z in enumerate(redraw):
                here = per_plane.get(z, [])
                incl = [e for e in here if e[0] == INCLUDE]
                excl = [e for e in here if e[0] == EXCLUDE]
                for q, (kind, _, p) in enumerate(incl + excl):
                    q += implied_B[b] if q >= len(incl) else 0  # the implied click sits between the two
                    satisfaction.append({"kind": kind, "point_ras": [round(v, 3) for v in p.point_ras],
                                         "plane": int(z), "candidates": int(out.candidates_B[b]),
                                         "satisfying": int(out.satisfying_B[b][q]),
                                         "satisfying_all_prompts_of_plane": int(out.satisfying_all_B[b]),
                                         "distinct_kept": int(out.distinct_kept_B[b]),
                                         "every_kept_sample_satisfies": bool(out.kept_satisfy_B[b])})
        elif progress is not None:
            progress(k, k)
        for kind, (z, r, c), p in points:  # a prompt on a plane without signal cannot be met: say so
            if z not in redraw:
                satisfaction.append({"kind": kind, "point_ras": [round(v, 3) for v in p.point_ras],
                                     "plane": int(z), "candidates": 0, "satisfying": 0, "every_kept_sample_satisfies":
                                     bool((samples[:, z, r, c] > 0).all() if kind == INCLUDE
                                          else not samples[:, z, r, c].any())})
        if kept_planes:
            put(kept_planes, samples_from_tokens(predictor, tokens.of_planes(kept_planes)))
        t_model = time.perf_counter()

        kept_consensus, kept_samples, kept_scales = _keep_object(consensus, samples, scales, click_index,
                                                                 grid.spacing, settings.component_tolerance_mm,
                                                                 includes)
        unrun = [z for z in tokens.missing_planes() if has_signal[z] and z not in redraw]
        if not unrun or not _reaches_planes((kept_consensus, kept_samples, kept_scales),
                                            [z + d for z in unrun for d in (-1, 1) if 0 <= z + d < nz]):
            break
        tokens = _every_plane_drawn(tokens, predictor, prepared, has_signal, settings, cancel)
        if prefix_source is not None:  # the lock redraws every plane with signal from its tokens now
            redraw = [z for z in range(nz) if has_signal[z]]
    centre_plane = nz // 2  # unused after the click: a refinement does not re-centre
    found = _ClickPass(grid=grid, click_plane=click_plane, centre_plane=centre_plane, click_index=click_index,
                       prepared=prepared, raw=raw, consensus=kept_consensus, samples=kept_samples,
                       scales=kept_scales, tokens=new_tokens)
    result = _click_result(found, array, m, click, predictor, card, settings, sampling, pixel_spacing)
    for key in ("grid_centres_ras_mm",):
        if key in previous.settings:
            result.settings[key] = previous.settings[key]
    result.settings["prompt_satisfaction"] = satisfaction
    result.settings["redrawn_planes"] = [int(z) for z in redraw]
    if prefix_source is not None:
        result.settings["locked_from_sample"] = prefix_source + 1
    result.timings_s = {"prepare": 0.0, "model": t_model - t_start}
    return result


def first_outline(array, m, click, predictor, card, settings: SegmentSettings, sampling, pixel_spacing: float,
                  crop: int, cancel: CancelFn = None, t0: Optional[float] = None,
                  outline: OutlineSettings = FIRST_OUTLINE) -> Outline:
    """The fast pass of OutlineSettings on the plane through the click of the click's first grid: its consensus'
    component at the click (or, if the consensus is empty, the consensus of the samples that mark something)."""
    t0 = time.perf_counter() if t0 is None else t0
    grid, plane = click_grid(click, array.shape, m, crop, pixel_spacing, settings.half_height_mm)
    plane_grid = AxialGrid(origin_ras=tuple(grid.index_to_ras @ np.array([plane, 0.0, 0.0, 1.0]))[:3],
                           spacing=grid.spacing, shape=(1, crop, crop))
    raw = resample_to_grid(array, m, plane_grid, fill_value=float(array.min()))
    prepared, has_signal = prepare_crops(raw, card.intensity)
    click_index = (0.0, (crop - 1) / 2.0, (crop - 1) / 2.0)
    mask = np.zeros((1, crop, crop), dtype=bool)
    if has_signal[0]:
        res = predictor.segment(prepared, sampling=outline.sampling(sampling), cancel=cancel, crop_ids=[plane])
        tol = settings.component_tolerance_mm
        mask = _component_near_point(res.consensus_Bhw > 0, click_index, grid.spacing, tol)
        if not mask.any():
            _, if_present = presence_consensus((res.samples_BNhw[0] > 0)[:, None])
            mask = _component_near_point(if_present, click_index, grid.spacing, tol)
    box = grid_box_in_volume(plane_grid, array.shape, m)
    volume_mask = map_grid_to_volume({"m": mask.astype(np.uint8)}, plane_grid, m, box)["m"]
    return Outline(mask=mask[0].astype(np.uint8), grid=plane_grid, box=box, volume_mask=volume_mask,
                   volume_shape=tuple(int(v) for v in array.shape), ijk_to_ras=m.copy(),
                   point_ras=tuple(float(v) for v in click), area_mm2=float(mask.sum()) * pixel_spacing ** 2,
                   n_samples=outline.n_samples, seconds=time.perf_counter() - t0)


@dataclass
class _ClickPass:
    """One pass of a click on a grid centred at some point: the kept masks on that grid, before the volume."""

    grid: AxialGrid
    click_plane: int  # the plane through the user's click
    centre_plane: int  # the plane through the grid's centre (the click's on the first pass)
    click_index: Tuple[float, float, float]  # the user's click in grid (plane, row, column) coordinates
    prepared: np.ndarray
    raw: np.ndarray
    consensus: np.ndarray  # bool (planes, h, w): the consensus component at the click
    samples: np.ndarray  # bool (N, planes, h, w): each sample's components on it (or at the click)
    scales: np.ndarray  # bool (K, planes, h, w)
    t_prepare: float = 0.0
    t_model: float = 0.0
    tokens: Optional[TokenMaps] = None
    waves: int = 1  # the click's planes were run in this many waves (_first_wave, _next_wave)
    planes_run: int = 0  # planes with signal that the model ran

    def object_centre_ras(self) -> Optional[np.ndarray]:
        """RAS centre of the object the samples mark at the click (their mean mask's centre of mass)."""
        votes = self.samples.sum(0, dtype=np.float64)
        if not votes.any():
            return None
        index = np.array(ndimage.center_of_mass(votes))
        return (self.grid.index_to_ras @ np.append(index, 1.0))[:3]


def _click_pass(array, m, click, centre, predictor, card, settings, sampling, pixel_spacing, crop, progress,
                cancel) -> _ClickPass:
    t0 = time.perf_counter()
    grid, centre_plane = click_grid(centre, array.shape, m, crop, pixel_spacing, settings.half_height_mm)
    click_index = (grid.ras_to_index @ np.append(click, 1.0))[:3]
    click_plane = int(np.clip(np.round(click_index[0]), 0, grid.shape[0] - 1))
    raw = resample_to_grid(array, m, grid, fill_value=float(array.min()))
    prepared, has_signal = prepare_crops(raw, _single_input_intensity(card))
    t_prep = time.perf_counter()

    nz, h, w = grid.shape
    n, k = settings.n_samples, len(predictor.config.autoencoder.scales)
    samples = np.zeros((n, nz, h, w), dtype=np.uint8)
    scales = np.zeros((k, nz, h, w), dtype=np.uint8)
    consensus = np.zeros((nz, h, w), dtype=np.uint8)
    click_index = (float(click_plane), round(float(click_index[1]), 6), round(float(click_index[2]), 6))
    # one batch per wave for an ordinary CT (17 planes of 2.5 mm); thin-slice scans are split so memory stays bounded
    batch = settings.crops_per_pass(sampling)
    tokens, run = None, np.zeros(nz, dtype=bool)  # run: planes whose per-plane outputs are in
    chunks_done, waves = 0, 0
    lo, hi = _first_wave(click_plane, nz, settings, grid.spacing[0])
    while True:
        new = np.arange(lo, hi + 1)[~run[lo:hi + 1]]
        run[new] = True
        rows = new[has_signal[new]]
        chunks = [rows[i:i + batch] for i in range(0, len(rows), batch)]
        waves, wave_start = waves + 1, chunks_done
        for ci, chunk in enumerate(chunks):  # the total grows with each wave, as with each re-centred pass
            res = _run_model(predictor, prepared[chunk], sampling, progress, cancel, (wave_start + ci) * k,
                             (wave_start + len(chunks)) * k, chunk, keep_tokens=True)
            chunks_done += 1
            samples[:, chunk] = (res.samples_BNhw > 0).transpose(1, 0, 2, 3)
            scales[:, chunk] = (res.scale_consensus_BKhw > 0).transpose(1, 0, 2, 3)
            consensus[chunk] = res.consensus_Bhw > 0
            if getattr(res, "tokens", None) is not None:  # stand-in predictors of the tests have none
                if tokens is None:
                    tokens = TokenMaps.empty(nz, res.tokens, predictor.config.autoencoder.scales)
                    tokens.computed_Z, tokens.sampling = ~has_signal, dataclasses.asdict(sampling)
                tokens.put(chunk, res.tokens)
        kept = _keep_object(consensus, samples, scales, click_index, grid.spacing, settings.component_tolerance_mm)
        lo_next, hi_next = _next_wave(kept, lo, hi, nz, settings.wave_step_planes)
        if (lo_next, hi_next) == (lo, hi):
            break
        lo, hi = lo_next, hi_next
    if chunks_done == 0 and progress is not None:
        progress(k, k)
    t_model = time.perf_counter()
    kept_consensus, kept_samples, kept_scales = kept
    return _ClickPass(grid=grid, click_plane=click_plane, centre_plane=centre_plane, click_index=click_index,
                      prepared=prepared, raw=raw,
                      consensus=kept_consensus, samples=kept_samples, scales=kept_scales,
                      t_prepare=t_prep - t0, t_model=t_model - t_prep, tokens=tokens, waves=waves,
                      planes_run=int((run & has_signal).sum()))


def _reaches_planes(kept, planes) -> bool:
    """Whether any kept mask (consensus (Z, h, w), samples or scales (N, Z, h, w)) has a voxel on these planes."""
    planes = sorted(set(planes))
    return bool(planes) and any(bool(mask[..., planes, :, :].any()) for mask in kept)


def _first_wave(click_plane: int, nz: int, settings: SegmentSettings, plane_mm: float) -> Tuple[int, int]:
    """The planes (first, last) of a click's first wave: within settings.first_wave_mm of the click, and at least
    every plane within the component tolerance (where the component at the click may start); all with None."""
    if settings.first_wave_mm is None:
        return 0, nz - 1
    half = max(int(round(settings.first_wave_mm / plane_mm)),
               int(math.floor(settings.component_tolerance_mm / plane_mm + 1e-9)))
    return max(0, click_plane - half), min(nz - 1, click_plane + half)


def _next_wave(kept, lo: int, hi: int, nz: int, step: int) -> Tuple[int, int]:
    """The planes run so far (lo..hi) grown by step on each side where something kept (the consensus component,
    a sample's or a scale's components) lies on the outermost plane run; (lo, hi) itself when nothing does. The
    components connect neighbouring planes only, so a kept set with nothing on an edge plane is whole: planes
    beyond it cannot join it."""
    def on_plane(z):
        return any(bool(mask[..., z, :, :].any()) for mask in kept)

    new_lo = max(0, lo - step) if lo > 0 and on_plane(lo) else lo
    new_hi = min(nz - 1, hi + step) if hi < nz - 1 and on_plane(hi) else hi
    return new_lo, new_hi


def _keep_object(consensus, samples, scales, click_index, spacing, tol, include_indices=()):
    """What belongs to the clicked object: the consensus component through (or nearest) the click; for samples
    and scales, their components that overlap it (or, if the consensus is empty, that reach the click); the click
    on its nearest plane (the plane a centred grid has through it), in-plane where it falls. A refinement's
    include points (grid indices) add the consensus components through them: the user said they belong."""
    kept_consensus = _component_near_point(consensus, click_index, spacing, tol)
    for index in include_indices:
        kept_consensus |= _component_near_point(consensus, index, spacing, 0.0)
    kept_samples = np.stack([_keep(samples[i], kept_consensus, click_index, spacing, tol)
                             for i in range(len(samples))])
    kept_scales = np.stack([_keep(scales[s], kept_consensus, click_index, spacing, tol) for s in range(len(scales))])
    return kept_consensus, kept_samples, kept_scales


def _keep(mask, region, click_index, spacing, tol) -> np.ndarray:
    """A sample's (or scale's, or if-present's) part of the clicked object: its components that overlap the kept
    consensus, or, where that is empty, its component at (or within tol of) the click."""
    if region.any():
        return _components_touching(mask, region)
    return _component_near_point(mask, click_index, spacing, tol)


def _click_result(found: _ClickPass, array, m, click, predictor, card, settings, sampling,
                  pixel_spacing) -> VolumeResult:
    """The last pass's kept masks as a VolumeResult on the volume's grid, with the preview through the click."""
    grid, click_plane, n = found.grid, found.click_plane, settings.n_samples
    kept_consensus, kept_samples, kept_scales = found.consensus, found.samples, found.scales
    disagreeing = (kept_samples != kept_consensus[None]).sum(0).astype(np.uint8)
    disagreement = disagreeing.astype(np.float32) / n
    marking, if_present = presence_consensus(kept_samples)
    if_present = _keep(if_present, kept_consensus, found.click_index, grid.spacing,
                       settings.component_tolerance_mm).astype(np.uint8)

    axis = _axis_nearest_s(m)
    click_ijk = point_to_ijk(click, m)
    k = kept_scales.shape[0]
    preview = Preview(image=found.prepared[click_plane],
                      scale_consensus=kept_scales[:, click_plane].astype(np.uint8),
                      consensus=kept_consensus[click_plane].astype(np.uint8),
                      disagreement=disagreement[click_plane], title="plane through the click",
                      image_hu=found.raw[click_plane].copy(), if_present=if_present[click_plane].copy(),
                      pixel_spacing_mm=float(pixel_spacing),
                      plane_s_mm=float(grid.origin_ras[2] + click_plane * grid.spacing[0]),
                      slice_index=int(np.clip(np.round(click_ijk[axis]), 0, array.shape[::-1][axis] - 1)),
                      n_slices=int(array.shape[::-1][axis]), click_rc=found.click_index[1:],
                      scale_sides=tuple(int(v) for v in predictor.config.autoencoder.scales))
    result = _to_volume("click", array.shape, m, grid, kept_consensus.astype(np.uint8), disagreeing,
                        pack_masks(kept_scales), pack_masks(kept_samples), k, n, card, settings, sampling,
                        pixel_spacing, preview)
    result.samples_marking = int(marking)
    box = grid_box_in_volume(grid, array.shape, m)
    result.if_present = map_grid_to_volume({"m": if_present}, grid, m, box)["m"]
    result.if_present_volume_mm3 = float(result.if_present.sum()) * result.voxel_volume_mm3
    result.point_ras = tuple(float(v) for v in click)
    result.tokens = found.tokens
    return result


def presence_consensus(samples: np.ndarray) -> Tuple[int, np.ndarray]:
    """(how many samples mark anything, the consensus of those that do) of (N, ...) kept sample masks.

    A voxel is in that consensus when at least half of the marking samples hold it, as the LIDC labels keep a
    voxel that at least half of the readers who outlined the nodule marked. When the samples split on whether a
    nodule is there at all (a ground-glass nodule: 7 of 16), the plain consensus is empty but this is not."""
    flat = samples.reshape(len(samples), -1) > 0
    marking = flat.any(1)
    n_marking = int(marking.sum())
    if n_marking == 0:
        return 0, np.zeros(samples.shape[1:], dtype=np.uint8)
    votes = (samples[marking] > 0).sum(0)
    return n_marking, (2 * votes >= n_marking).astype(np.uint8)


def _to_volume(mode, volume_shape, m, grid, consensus, disagreeing, scale_bits, sample_bits, k, n, card,
               settings, sampling, pixel_spacing, preview) -> VolumeResult:
    """Grid arrays -> the volume's grid. disagreeing: how many samples differ (uint8: a quarter of float32's
    memory for a whole CT); the result holds the fraction."""
    box = grid_box_in_volume(grid, volume_shape, m)
    if box is None:  # cannot happen for a point inside the volume; kept for a clear message
        raise PointOutsideVolumeError("the segmentation grid does not overlap the volume")
    mapped = map_grid_to_volume({"consensus": consensus, "disagreeing": disagreeing, "scales": scale_bits,
                                 "samples": sample_bits}, grid, m, box)
    voxel_mm3 = _voxel_volume(m)
    cons_mm3, volumes, ious = _volume_statistics(mapped["consensus"], mapped["samples"], n, voxel_mm3)
    return VolumeResult(
        mode=mode, volume_shape=tuple(int(s) for s in volume_shape), ijk_to_ras=m.copy(), box=box,
        consensus=mapped["consensus"], disagreement=mapped["disagreeing"].astype(np.float32) / n,
        scale_bits=mapped["scales"],
        sample_bits=mapped["samples"], n_scales=k, n_samples=n, voxel_volume_mm3=voxel_mm3,
        consensus_volume_mm3=cons_mm3, sample_volumes_mm3=volumes, sample_iou=ious, model_name=card.name,
        settings=_settings_record(card, settings, sampling, pixel_spacing), grid=grid, preview=preview)


# --------------------------------------------------------------------------------------------- whole volume

def segment_volume(volume, ijk_to_ras, predictor, card, settings: Optional[SegmentSettings] = None,
                   progress: ProgressFn = None, cancel: CancelFn = None) -> VolumeResult:
    """Segment every axial plane of the volume, tiled into crops at the model's spacing, in chunks of crops."""
    t0 = time.perf_counter()
    settings, array, m, pixel_spacing, crop, sampling = _prepare_run(volume, ijk_to_ras, predictor, card, settings)
    grid = whole_volume_grid(array.shape, m, crop, pixel_spacing)
    nz, nrow, ncol = grid.shape
    tiles_r, tiles_c = nrow // crop, ncol // crop
    n, k = settings.n_samples, len(predictor.config.autoencoder.scales)
    fill = float(array.min())

    consensus = np.zeros(grid.shape, dtype=np.uint8)
    disagreeing = np.zeros(grid.shape, dtype=np.uint8)  # samples differing from the consensus
    scale_bits = np.zeros(grid.shape, dtype=_bits_dtype(k))
    sample_bits = np.zeros(grid.shape, dtype=_bits_dtype(n))
    best = (-1, 0, 0, 0)  # (consensus pixels, plane, tile row, tile col) for the preview

    # tiles are cut plane by plane and sent in chunks; only planes of the current chunk are resampled
    tiles = [(z, tr, tc) for z in range(nz) for tr in range(tiles_r) for tc in range(tiles_c)]
    batch = settings.crops_per_pass(sampling)
    chunks = [tiles[i:i + batch] for i in range(0, len(tiles), batch)]
    total_steps = len(chunks) * k
    plane_cache: Dict[int, np.ndarray] = {}
    preview_image = None
    for ci, chunk in enumerate(chunks):
        planes = sorted({z for z, _, _ in chunk})
        for z in list(plane_cache):
            if z not in planes:
                del plane_cache[z]
        missing = [z for z in planes if z not in plane_cache]
        if missing:
            for z, plane in zip(missing, resample_to_grid(array, m, grid, fill, planes=missing)):
                plane_cache[z] = plane
        raw = np.stack([plane_cache[z][tr * crop:(tr + 1) * crop, tc * crop:(tc + 1) * crop] for z, tr, tc in chunk])
        prepared, has_signal = prepare_crops(raw, _single_input_intensity(card))
        rows = np.flatnonzero(has_signal)
        if len(rows):
            res = _run_model(predictor, prepared[rows], sampling, progress, cancel, ci * k, total_steps,
                             ci * batch + rows)
            for r_out, r_in in enumerate(rows):
                z, tr, tc = chunk[r_in]
                win = (z, slice(tr * crop, (tr + 1) * crop), slice(tc * crop, (tc + 1) * crop))
                consensus[win] = res.consensus_Bhw[r_out] > 0
                disagreeing[win] = np.rint(res.disagreement_Bhw[r_out] * n).astype(np.uint8)
                scale_bits[win] = pack_masks(res.scale_consensus_BKhw[r_out])
                sample_bits[win] = pack_masks(res.samples_BNhw[r_out])
                area = int((res.consensus_Bhw[r_out] > 0).sum())
                if area > best[0]:
                    best = (area, z, tr, tc)
                    preview_image = prepared[r_in].copy()
        else:
            if progress is not None:
                progress((ci + 1) * k, total_steps)
            if cancel is not None and cancel():
                from .engine import Cancelled

                raise Cancelled()
    t_model = time.perf_counter()

    _, z, tr, tc = best
    if preview_image is None:  # nothing had contrast: show the middle plane's centre tile
        z, tr, tc = nz // 2, tiles_r // 2, tiles_c // 2
        preview_image = np.zeros((crop, crop), dtype=np.float32)
    win = (z, slice(tr * crop, (tr + 1) * crop), slice(tc * crop, (tc + 1) * crop))
    preview = Preview(image=preview_image,
                      scale_consensus=np.stack([unpack_mask(scale_bits[win], s) for s in range(k)]),
                      consensus=consensus[win].copy(), disagreement=disagreeing[win].astype(np.float32) / n,
                      title=f"plane {z}, tile ({tr}, {tc}): the largest consensus",
                      pixel_spacing_mm=float(pixel_spacing), plane_s_mm=float(grid.origin_ras[2] + z * grid.spacing[0]),
                      slice_index=int(z if m[2, _axis_nearest_s(m)] > 0 else nz - 1 - z), n_slices=int(nz),
                      scale_sides=tuple(int(v) for v in predictor.config.autoencoder.scales))
    result = _to_volume("volume", array.shape, m, grid, consensus, disagreeing, scale_bits, sample_bits, k, n,
                        card, settings, sampling, pixel_spacing, preview)
    result.samples_marking = int(np.count_nonzero(result.sample_volumes_mm3))
    result.timings_s = {"model": t_model - t0, "total": time.perf_counter() - t0}
    return result


# --------------------------------------------------------------------------------------------- helpers

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (Dice(empty, empty) = 1); the metrics module's definition, for volumes."""
    from .metrics import dice as _dice

    return _dice(a, b)


__all__: List[str] = [
    "SegmentSettings", "AxialGrid", "VolumeResult", "Preview", "VolumeError", "NotAVolumeError",
    "NonFiniteVolumeError", "ConstantVolumeError", "PointOutsideVolumeError", "UnsupportedModelError",
    "UnsupportedModeError", "SettingsError", "card_modes", "check_mode", "presence_consensus",
    "check_volume", "check_point", "click_grid", "whole_volume_grid", "resample_to_grid", "prepare_crops",
    "grid_box_in_volume", "map_grid_to_volume", "pack_masks", "unpack_mask", "segment_click", "segment_volume",
    "small_input_warning", "Outline", "OutlineSettings", "FIRST_OUTLINE", "first_outline",
]
