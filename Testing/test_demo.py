"""The bundled demo (Resources/Demo): small, Hounsfield units and geometry of lung1 kept, attributed, listed for
the extension, and the same voxels as ../shared's lung1 where that is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from arseg_volumes import LUNG1_REGION, demo_region, lung1_region, read_nrrd_ras

from ARSegLib import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_is_small_attributed_and_shipped():
    folder = demo.demo_dir()
    assert folder == ROOT / "Resources" / "Demo"
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert size <= 3_000_000, size
    source = (folder / "SOURCE.md").read_text()
    assert "CC BY 3.0" in source and "LIDC-IDRI-0001" in source and "tools/make_demo.py" in source
    cmake = (ROOT / "ARSeg" / "CMakeLists.txt").read_text()
    for p in folder.iterdir():
        assert f"Resources/Demo/{p.name}" in cmake, p.name
    info = demo.demo_info()
    assert info["name"] == demo.DEMO_NAME == "ARSeg lung nodule CT"


def test_demo_keeps_hounsfield_units_geometry_and_the_nodule():
    array, m = read_nrrd_ras(demo.demo_volume_path())
    label, m_label = read_nrrd_ras(demo.demo_label_path())
    assert array.dtype == np.int16 and array.min() == -1024 and array.max() > 300  # air to bone, in HU
    np.testing.assert_allclose(np.abs(np.diag(m)[:3]), (0.703125, 0.703125, 2.5), atol=1e-6)
    np.testing.assert_allclose(m, m_label)
    # the nodule's label centroid is the card's centroid: the slab's voxels sit where they sat in the scan
    kji = np.argwhere(label > 0).mean(0)
    centroid = (m @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]
    np.testing.assert_allclose(centroid, demo.demo_point_ras(), atol=0.05)
    assert np.median(array[label > 0]) > -100  # soft tissue inside the nodule
    volume = label.sum() * abs(np.linalg.det(m[:3, :3]))
    assert volume == np.float64(demo.demo_info()["nodule_volume_mm3"]) or abs(volume - 6708.8) < 1


def test_demo_region_is_lung1s_region(lung1_dir):
    a, b = demo_region(), lung1_region(lung1_dir, LUNG1_REGION)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_allclose(a.ijk_to_ras, b.ijk_to_ras, atol=1e-5)
    assert a.nodule_ras == tuple(json.loads((lung1_dir / "nodule.json").read_text())["centroid_ras_mm"])


def test_sample_data_source_points_at_the_shipped_file():
    from urllib.request import url2pathname

    source = demo.sample_data_source()
    assert source["sampleName"] == "ARSeg lung nodule CT" and source["loadFileType"] == "VolumeFile"
    assert source["uris"].startswith("file://")
    assert Path(url2pathname(source["uris"][len("file://"):])) == demo.demo_volume_path()
    assert source["checksums"] == "SHA256:" + __import__("hashlib").sha256(
        demo.demo_volume_path().read_bytes()).hexdigest()
