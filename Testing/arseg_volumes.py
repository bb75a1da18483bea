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


def demo_region(region=LUNG1_REGION) -> Volume:
    """The same voxels as lung1_region, cut from the bundled demo slab (Resources/Demo), so that tests that need
    only this region run without ../shared. The slab's own box in lung1 is in its JSON."""
    from ARSegLib.demo import demo_info, demo_label_path, demo_volume_path

    info = demo_info()
    (k0, _), (j0, _), (i0, _) = info["slab_index_kji"]
    array, m = read_nrrd_ras(demo_volume_path())
    label, _ = read_nrrd_ras(demo_label_path())
    local = tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, (k0, j0, i0)))
    if any(s.start < 0 or s.stop > n for s, n in zip(local, array.shape)):
        raise ValueError(f"region {region} is not inside the demo slab {info['slab_index_kji']}")
    offset = np.eye(4)
    offset[:3, 3] = [local[2].start, local[1].start, local[0].start]
    return Volume(np.ascontiguousarray(array[local]), m @ offset, tuple(info["nodule_centroid_ras_mm"]),
                  np.ascontiguousarray(label[local]))


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


class DiscPredictor:
    """A stand-in for ARSegPredictor with known answers: in every crop, `marking` of the N samples mark a ball of
    radius_mm around the crop's centre (the click), the others nothing; scale k of K holds a ball of k/K of that
    radius, except scale 1, which is empty (as coarse scales of a small nodule are). crop_ids are plane indices
    (the click's grid), so the ball is round in 3D around plane `centre_id` (default: the middle plane)."""

    def __init__(self, config, radius_mm: float = 6.0, marking=None, plane_mm: float = 2.5, pixel_mm: float = 0.7,
                 centre_id=None, offset_mm=(0.0, 0.0)):
        self.config, self.radius_mm, self.marking = config, radius_mm, marking
        # (R, A) of the ball's centre from the click, in mm: rows run A -> P, columns R -> L
        self.offset_rc = (-offset_mm[1] / pixel_mm, -offset_mm[0] / pixel_mm)
        self.plane_mm, self.pixel_mm, self.centre_id = plane_mm, pixel_mm, centre_id
        self.crop_size, self.n_classes = config.autoencoder.crop_size, 1
        self.calls = 0

    def _ball(self, crop_id, n_crops, fraction=1.0):
        h = self.crop_size
        centre = (n_crops - 1) // 2 if self.centre_id is None else self.centre_id
        r2 = (self.radius_mm * fraction) ** 2 - ((crop_id - centre) * self.plane_mm) ** 2
        yy, xx = np.mgrid[:h, :h]
        cy, cx = (h - 1) / 2 + self.offset_rc[0], (h - 1) / 2 + self.offset_rc[1]
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) * self.pixel_mm ** 2
        return (d2 <= r2).astype(np.uint8) if r2 > 0 else np.zeros((h, h), np.uint8)

    def segment(self, images, sampling=None, progress=None, cancel=None, crop_ids=None, **_):
        from types import SimpleNamespace

        self.calls += 1
        s = sampling or self.config.sampling
        n, k = s.n_samples, len(self.config.autoencoder.scales)
        b = len(images)
        ids = list(range(b)) if crop_ids is None else [int(c) for c in crop_ids]
        n_crops = max(ids) + 1 if self.centre_id is None else 0
        marking = n if self.marking is None else self.marking
        samples = np.zeros((b, n, self.crop_size, self.crop_size), np.uint8)
        scales = np.zeros((b, k, self.crop_size, self.crop_size), np.uint8)
        for row, cid in enumerate(ids):
            ball = self._ball(cid, n_crops)
            samples[row, :marking] = ball
            for s_ in range(2, k + 1):
                scales[row, s_ - 1] = self._ball(cid, n_crops, s_ / k)
        consensus = (2 * samples.sum(1) > n).astype(np.uint8)
        if progress is not None:
            progress(k, k)
        return SimpleNamespace(samples_BNhw=samples, scale_consensus_BKhw=scales, consensus_Bhw=consensus,
                               disagreement_Bhw=(samples != consensus[:, None]).mean(1).astype(np.float32),
                               presence_B=np.full(b, marking / n, np.float32))
