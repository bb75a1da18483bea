"""Readers of the real data: LIDC crops (tar, directory, splits) and BraTS cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ARSegLib.data.augment import AugmentConfig, augment_batch, dihedral
from ARSegLib.data.lidc import load_lidc


def test_lidc_tar_splits_match_splits_json(lidc_tar, tmp_path, monkeypatch):
    monkeypatch.setenv("ARSEG_CACHE", str(tmp_path))
    import json

    counts = json.loads((lidc_tar.parent / "splits.json").read_text())["counts"]
    val = load_lidc(lidc_tar, "val")
    assert len(val) == counts["val"]["images"]
    assert val.images_Nhw.shape[1:] == (128, 128) and val.images_Nhw.dtype == np.uint8
    assert val.masks_NRhw.shape[1:] == (4, 128, 128) and set(np.unique(val.masks_NRhw)) <= {0, 1}
    # empty reader masks are kept: most crops have at least one
    assert (val.masks_NRhw.reshape(len(val), 4, -1).max(2) == 0).any(1).mean() > 0.3
    test = load_lidc(lidc_tar, "test")  # second read comes from the cache
    assert not set(val.patients) & set(test.patients)
    assert len(test) == counts["test"]["images"]


def test_lidc_reads_both_tars_as_one_training_set(lidc_tar, tmp_path, monkeypatch):
    """The folder of tars (or the tars listed) gives splits.json's counts; the second tar adds train only."""
    monkeypatch.setenv("ARSEG_CACHE", str(tmp_path))
    import json

    more = lidc_tar.parent / "lidc-idri-slices-more.tar"
    if not more.exists():
        pytest.skip(f"real data not available: {more} is absent")
    counts = json.loads((lidc_tar.parent / "splits.json").read_text())["counts"]
    train = load_lidc(lidc_tar.parent, "train")
    assert len(train) == counts["train"]["images"] and len(train.patients) == counts["train"]["patients"]
    assert len(set(train.keys)) == len(train)
    listed = load_lidc([lidc_tar, more], "val")
    assert len(listed) == len(load_lidc(lidc_tar, "val")) == counts["val"]["images"]
    assert len(load_lidc([more], "test")) == 0


def test_lidc_refuses_the_same_data_twice(lung1_dir):
    with pytest.raises(ValueError, match="twice"):
        load_lidc([lung1_dir / "lidc-slices", lung1_dir / "lidc-slices"], cache=False)


def test_lidc_directory_layout_of_one_nodule(lung1_dir):
    d = load_lidc(lung1_dir / "lidc-slices", cache=False)
    assert len(d) == 9 and [k[2] for k in d.keys] == list(range(9))
    assert d.masks_NRhw[4].sum() > 3000  # the middle slice: every reader marked the nodule


def test_split_needs_splits_json(lung1_dir):
    with pytest.raises(FileNotFoundError, match="splits.json"):
        load_lidc(lung1_dir / "lidc-slices", "train", cache=False)


def test_brats_reader_maps_labels(brats_dir):
    from ARSegLib.data.brats import load_brats

    s = load_brats(brats_dir, crop_size=128)
    assert s.images_NChw.shape[1:] == (2, 128, 128)
    assert set(np.unique(s.labels_Nhw)) == {0, 1, 2, 3}
    # every case folder found is read, whatever their number (two once, five now)
    cases = sorted(p.name for p in brats_dir.iterdir() if p.is_dir())
    assert sorted(set(s.case_ids)) == cases


def test_augmentation_moves_masks_with_images():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(4, 1, 16, 16)
    img[:, :, 2:5, 3:9] = 1.0
    masks = (img[:, :1] > 0.5).to(torch.uint8).repeat(1, 4, 1, 1)
    cfg = AugmentConfig(rotate_deg=0.0, intensity_prob=0.0)
    a_img, a_masks = augment_batch(img.clone(), masks.clone(), cfg, g)
    assert torch.equal((a_img[:, 0] > 0.5).to(torch.uint8), a_masks[:, 0])
    assert torch.equal(dihedral(dihedral(img, 1), 3), img)
    # intensity windowing keeps [0, 1]
    x, _ = augment_batch(torch.rand(8, 1, 16, 16), masks.repeat(2, 1, 1, 1), AugmentConfig(intensity_prob=1.0), g)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
