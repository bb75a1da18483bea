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
