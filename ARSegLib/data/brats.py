"""BraTS cases (`<id>_<modality>.nii.gz`, `<id>_seg.nii.gz`) as 2D axial slices via SimpleITK.

Labels follow BraTS 2017+: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing; they are mapped to
0..3 (background, NCR/NET, ED, ET) for the multi-class engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

BRATS_LABELS = {0: 0, 1: 1, 2: 2, 4: 3}
REGION_NAMES = ("background", "necrotic / non-enhancing core", "oedema", "enhancing tumour")


@dataclass
class BraTSSlices:
    images_NChw: np.ndarray  # float32, per-case z-scored modalities
    labels_Nhw: np.ndarray  # uint8 in 0..3
    case_ids: List[str]
    slice_index: List[int]


def read_case(case_dir, modalities: Sequence[str] = ("flair", "t1ce")):
    """Returns (image_Ckhw float32, label_khw uint8 in 0..3) of one case folder."""
    import SimpleITK as sitk

    case_dir = Path(case_dir)
    cid = case_dir.name
    imgs = []
    for m in modalities:
        p = case_dir / f"{cid}_{m}.nii.gz"
        if not p.exists():
            raise FileNotFoundError(f"BraTS case {cid} lacks modality {m!r}: {p}")
        imgs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / f"{cid}_seg.nii.gz")))
    unknown = set(np.unique(seg).tolist()) - set(BRATS_LABELS)
    if unknown:
        raise ValueError(f"{cid}: unexpected labels {sorted(unknown)} in the segmentation")
    lut = np.zeros(256, np.uint8)
    for src, dst in BRATS_LABELS.items():
        lut[src] = dst
    return np.stack(imgs), lut[seg]


def load_brats(root, crop_size: int = 128, modalities: Sequence[str] = ("flair", "t1ce"),
               min_tumour_voxels: int = 1) -> BraTSSlices:
    """Axial slices that show tumour, centre-cropped/padded to crop_size, from every case under root."""
    root = Path(root)
    cases = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*_seg.nii.gz")))
    if not cases:
        raise FileNotFoundError(f"no BraTS cases (folders with *_seg.nii.gz) under {root}")
    images, labels, ids, ks = [], [], [], []
    for case in cases:
        img_Ckhw, lab_khw = read_case(case, modalities)
        for k in range(lab_khw.shape[0]):
            if (lab_khw[k] > 0).sum() < min_tumour_voxels:
                continue
            images.append(_center(img_Ckhw[:, k], crop_size))
            labels.append(_center(lab_khw[k][None], crop_size)[0])
            ids.append(case.name)
            ks.append(k)
    return BraTSSlices(np.stack(images).astype(np.float32), np.stack(labels).astype(np.uint8), ids, ks)


def _center(x_Chw: np.ndarray, size: int) -> np.ndarray:
    C, h, w = x_Chw.shape
    out = np.zeros((C, size, size), x_Chw.dtype)
    sh, sw = min(h, size), min(w, size)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    oy, ox = (size - sh) // 2, (size - sw) // 2
    out[:, oy:oy + sh, ox:ox + sw] = x_Chw[:, y0:y0 + sh, x0:x0 + sw]
    return out


# --------------------------------------------------------------------------------------------- training slices

def case_folders(root) -> List[Path]:
    """Every case folder under root (a folder holding `<id>_seg.nii.gz`), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS data folder not found: {root}")
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / f"{p.name}_seg.nii.gz").is_file())


def read_volume_ras(path):
    """(array (k, j, i) float32, 4 x 4 IJK->RAS) of an image file: SimpleITK's LPS geometry turned to RAS, as
    Slicer reads the file."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None]
    m[:3, 3] = image.GetOrigin()
    m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m  # LPS -> RAS
    return sitk.GetArrayFromImage(image), m


@dataclass
class BraTSPlanes:
    """A case's axial planes as the volume pipeline cuts them: modalities (N, C, h, w) float32 and the label map
    (N, h, w) uint8 in 0..3, on the whole-volume grid at the model's pixel spacing."""

    images_NChw: np.ndarray
    labels_Nhw: np.ndarray
    case_ids: List[str]


def case_planes(case_dir, modalities: Sequence[str], crop_size: int, pixel_spacing: float,
                brain_only: bool = True) -> BraTSPlanes:
    """One case's axial planes resampled exactly as `pipeline.whole_volume_grid` + `resample_to_grid` resample a
    volume at inference (trilinear; 0, the z-scored background, outside), labels by the largest share of their
    one-hot maps resampled the same way. brain_only: the planes that hold brain (the brain mask)."""
    from ..pipeline import resample_to_grid, whole_volume_grid

    case_dir = Path(case_dir)
    cid = case_dir.name
    arrays, m = [], None
    for name in modalities:
        array, m_name = read_volume_ras(case_dir / f"{cid}_{name}.nii.gz")
        if m is not None and (array.shape != arrays[0].shape or not np.allclose(m, m_name, atol=1e-4)):
            raise ValueError(f"{cid}: {name} is not on the grid of {modalities[0]}")
        arrays.append(array.astype(np.float32))
        m = m_name
    seg, _ = read_volume_ras(case_dir / f"{cid}_seg.nii.gz")
    unknown = set(np.unique(seg).tolist()) - set(BRATS_LABELS)
    if unknown:
        raise ValueError(f"{cid}: unexpected labels {sorted(unknown)} in the segmentation")
    grid = whole_volume_grid(arrays[0].shape, m, crop_size, pixel_spacing)
    if grid.shape[1:] != (crop_size, crop_size):
        raise ValueError(f"{cid}: a plane needs {grid.shape[1]} x {grid.shape[2]} pixels at {pixel_spacing} mm, "
                         f"more than one {crop_size} crop")
    images = np.stack([resample_to_grid(a, m, grid, fill_value=0.0) for a in arrays], 1)
    shares = np.stack([resample_to_grid((seg == src).astype(np.float32), m, grid, fill_value=float(dst == 0))
                       for src, dst in sorted(BRATS_LABELS.items(), key=lambda kv: kv[1])], 1)
    labels = shares.argmax(1).astype(np.uint8)
    keep = np.ones(len(labels), dtype=bool)
    if brain_only:
        brain, _ = read_volume_ras(case_dir / f"{cid}_brainmask.nii.gz")
        keep = resample_to_grid((brain > 0).astype(np.float32), m, grid, 0.0).reshape(len(labels), -1).max(1) > 0.5
    return BraTSPlanes(images[keep], labels[keep], [cid] * int(keep.sum()))


def load_planes(root, case_ids: Sequence[str], modalities: Sequence[str], crop_size: int,
                pixel_spacing: float) -> BraTSPlanes:
    """The brain planes of the named cases (folder names under root), stacked."""
    folders = {p.name: p for p in case_folders(root)}
    missing = [c for c in case_ids if c not in folders]
    if missing:
        raise FileNotFoundError(f"BraTS cases not found under {root}: {', '.join(missing)} "
                                f"(there: {', '.join(folders) or 'none'})")
    parts = [case_planes(folders[c], modalities, crop_size, pixel_spacing) for c in case_ids]
    return BraTSPlanes(np.concatenate([p.images_NChw for p in parts]), np.concatenate([p.labels_Nhw for p in parts]),
                       [c for p in parts for c in p.case_ids])


# --------------------------------------------------------------------------------------------- the brats-glioma task

MODALITIES = ("flair", "t1ce")
PIXEL_SPACING_MM = 2.0  # a 240 mm brain in one 128-pixel crop (120 pixels of it)
CROP_SIZE = 128
# split by patient: three to train, one to choose checkpoints on, one never seen until the report
SPLIT = {"train": ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1"),
         "val": ("brats_2013_pat0004_1",), "test": ("brats_2013_pat0005_1",)}


def brats_config():
    """The brats-glioma architecture: the lung model's autoencoder over 4 one-hot classes, a smaller segmentor
    over FLAIR + T1ce (two cores, minutes of training)."""
    from ..engine import ARSegConfig
    from ..engine.config import AutoencoderConfig, SamplingConfig, SegmentorConfig

    return ARSegConfig(
        autoencoder=AutoencoderConfig(crop_size=CROP_SIZE, n_classes=len(BRATS_LABELS), latent_size=8,
                                      channels=(16, 32, 48, 64), decoder_channels=32, vocab_size=128, code_dim=16,
                                      scales=(1, 2, 3, 4, 5, 6, 7, 8)),
        segmentor=SegmentorConfig(in_channels=len(MODALITIES), unet_channels=(16, 32, 48, 64), embed_dim=128,
                                  depth=3, heads=4),
        sampling=SamplingConfig(n_samples=16, temperature=1.0))


_BRAIN_NEOPLASM = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered "
                   "Structure~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^")


def brats_task() -> dict:
    """The card's task block of brats-glioma: two inputs already z-scored within the brain, four classes (the
    reader's 0..3), three nested regions as BraTS scores them."""
    zscore = {"method": "zscore_in_brain", "clip": [-5.0, 10.0],
              "description": "brain voxels z-scored per volume (subtract the mean, divide by the standard deviation; "
                             "0 outside the brain), as the BRATS cases are shipped; the model clips to [-5, 10]"}
    return {
        "name": "brain tumour (glioma), BraTS regions",
        "inputs": [{"name": "flair", "title": "FLAIR", "intensity": zscore},
                   {"name": "t1ce", "title": "T1ce", "intensity": zscore}],
        "classes": {"1": "necrotic / non-enhancing tumour core (BraTS label 1)",
                    "2": "peritumoral oedema (BraTS label 2)", "3": "GD-enhancing tumour (BraTS label 4)"},
        "regions": [
            {"name": "Whole tumour", "classes": [1, 2, 3], "color": [0.30, 0.80, 0.30], "terminology": _BRAIN_NEOPLASM},
            {"name": "Tumour core", "classes": [1, 3], "color": [0.95, 0.75, 0.15], "terminology": _BRAIN_NEOPLASM},
            {"name": "Enhancing tumour", "classes": [3], "color": [0.20, 0.45, 0.95], "terminology": _BRAIN_NEOPLASM},
        ],
        "fill_value": 0.0,
    }


def brats_card() -> dict:
    """The card fields of brats-glioma besides weights and configuration (export_model adds those)."""
    train, val, test = (", ".join(SPLIT[k]) for k in ("train", "val", "test"))
    return {
        "description": "AR-Seg brain-tumour model (BraTS regions) from FLAIR + T1ce: every axial plane of a brain "
                       "at 2 mm in one 128 x 128 crop, 16 samples of the label map, consensus and disagreement per "
                       "region (whole tumour, tumour core, enhancing tumour). Trained on three patients: a "
                       "demonstration of a second task, not a clinical model.",
        "crop_size": CROP_SIZE,
        "pixel_spacing_mm": PIXEL_SPACING_MM,
        "intensity": {"method": "zscore_in_brain", "description": "see task.inputs"},
        "labels": {"1": "Whole tumour", "2": "Tumour core", "3": "Enhancing tumour"},
        "modes": ["volume"],
        "modes_note": "whole volume only: trained on every brain plane of each training patient (with and "
                      "without tumour), the tumour being the object of the scan; click mode is not validated.",
        "task": brats_task(),
        "licence": {"weights_trained_on": "BRATS 2015 training cases (BRATS 2013 carried over), CC BY-NC-SA 3.0",
                    "terms": "non-commercial use only, attribution, share-alike (CC BY-NC-SA 3.0): the model "
                             "is derived from data under that licence; cite the BraTS papers "
                             "(Menze et al., IEEE TMI 2015)"},
        "training": {"data": f"../shared/data/brats: 5 BRATS 2015 cases, FLAIR + T1ce (z-scored within the brain). "
                             f"Split by patient: train {train}; val (checkpoint choice) {val}; test (report only) "
                             f"{test}. Every brain plane, resampled to 2 mm as the volume pipeline does."},
    }
