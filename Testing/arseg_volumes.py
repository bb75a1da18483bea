"""Volumes for the pipeline, MRML and CLI tests: lung1 (real CT) reduced to a region around its nodule,
the same voxels in another IJK orientation, and synthetic volumes with known geometry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# voxels of lung1 kept around the nodule (bbox k 86..93, j 343..387, i 299..335 in ct/SOURCE.md):
# enough for the click grid (128 x 0.7 mm = 90 mm, +- 20 mm) to see lung, wall and nodule, small enough to be quick
LUNG1_REGION = (slice(78, 102), slice(290, 440), slice(240, 395))  # (k, j, i)


@dataclass
class Volume:
    array: np.ndarray  # (k, j, i)
    ijk_to_ras: np.ndarray
    nodule_ras: tuple = None
    label: np.ndarray = None


def read_nrrd_ras(path: Path):
    """(array (k, j, i), IJK->RAS) of an LPS NRRD, as Slicer reads it (RAS = diag(-1, -1, 1) LPS)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.array(image.GetOrigin())
    return sitk.GetArrayFromImage(image), m


def lung1_region(lung1_dir: Path, region=LUNG1_REGION) -> Volume:
    array, m = read_nrrd_ras(lung1_dir / "image.nrrd")
    label, _ = read_nrrd_ras(lung1_dir / "label.nrrd")
    offset = np.eye(4)
    offset[:3, 3] = [region[2].start, region[1].start, region[0].start]
    nodule = json.loads((lung1_dir / "nodule.json").read_text())["centroid_ras_mm"]
    return Volume(np.ascontiguousarray(array[region]), m @ offset, tuple(nodule), np.ascontiguousarray(label[region]))


def reorient(volume: Volume, perm=(2, 0, 1), flip=(0, 2)) -> Volume:
    """The same RAS content on another IJK grid: numpy axes permuted then flipped, IJK->RAS adjusted to match."""
    a = np.transpose(volume.array, perm)
    shape_b = a.shape
    b = np.flip(a, axis=flip)
    # affine from B's numpy index to A's numpy index: undo the flip, then the transpose
    to_a = np.zeros((4, 4))
    to_a[3, 3] = 1
    for d in range(3):
        sign, shift = (-1.0, shape_b[d] - 1) if d in flip else (1.0, 0.0)
        to_a[perm[d], d] = sign
        to_a[perm[d], 3] = shift
    swap = np.eye(4)[[2, 1, 0, 3]]  # numpy (k, j, i) <-> IJK (i, j, k)
    m = volume.ijk_to_ras @ swap @ to_a @ swap
    label = None if volume.label is None else np.ascontiguousarray(np.flip(np.transpose(volume.label, perm), flip))
    return Volume(np.ascontiguousarray(b), m, volume.nodule_ras, label)


def ras_of_index(m: np.ndarray, kji) -> np.ndarray:
    k, j, i = kji
    return (m @ np.array([i, j, k, 1.0]))[:3]


def write_nrrd(volume: Volume, path: Path) -> Path:
    """Write a volume as an LPS NRRD with its exact geometry (what a scanner export gives)."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0]) @ volume.ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps / spacing).reshape(-1)))
    image.SetOrigin(tuple(float(v) for v in np.diag([-1.0, -1.0, 1.0]) @ volume.ijk_to_ras[:3, 3]))
    sitk.WriteImage(image, str(path), True)
    return path


def rotation(axis: str, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    r = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    return np.array(r)
