"""Axial long/short-axis diameters and mean intensity against hand-computed values: ellipses and rectangles with
known axes, anisotropic voxels, oblique and permuted IJK->RAS matrices, rotated shapes, empty masks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ARSegLib import measures
from ARSegLib.pipeline import pack_masks, unpack_mask


def ellipse(shape_rc, centre_rc, a_mm, b_mm, spacing_rc=(1.0, 1.0), angle_deg=0.0):
    """Voxel centres inside an ellipse with semi-axis a_mm along the rows (turned by angle_deg) and b_mm across."""
    r, c = np.mgrid[0:shape_rc[0], 0:shape_rc[1]].astype(np.float64)
    y, x = (r - centre_rc[0]) * spacing_rc[0], (c - centre_rc[1]) * spacing_rc[1]
    t = math.radians(angle_deg)
    along, across = y * math.cos(t) + x * math.sin(t), -y * math.sin(t) + x * math.cos(t)
    return (along / a_mm) ** 2 + (across / b_mm) ** 2 <= 1.0 + 1e-12


def ijk_to_ras(spacing_ijk, rotation=None, origin=(0.0, 0.0, 0.0)):
    m = np.eye(4)
    m[:3, :3] = (np.eye(3) if rotation is None else np.asarray(rotation)) @ np.diag(spacing_ijk)
    m[:3, 3] = origin
    return m


def rotation_about(axis, degrees):
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def test_axis_aligned_ellipse_on_its_slice():
    mask = np.zeros((3, 25, 25), bool)
    mask[1] = ellipse((25, 25), (12, 12), 10, 5)  # tips at voxel centres: 20 mm along j (A), 10 mm along i (R)
    d = measures.axial_diameters(mask, ijk_to_ras((1.0, 1.0, 2.5)))
    assert (d.long_mm, d.short_mm, d.mean_mm, d.slice_index) == (pytest.approx(20), pytest.approx(10),
                                                                  pytest.approx(15), 1)
    assert sorted(d.long_ends_ras) == [(12.0, 2.0, 2.5), (12.0, 22.0, 2.5)]
    assert sorted(d.short_ends_ras) == [(7.0, 12.0, 2.5), (17.0, 12.0, 2.5)]


@pytest.mark.parametrize("spacing_ji, a_mm, b_mm", [((0.5, 1.0), 6.0, 4.0), ((1.0, 0.5), 6.0, 4.0),
                                                     ((0.5, 1.0), 3.0, 5.0)])
def test_anisotropic_voxels_are_measured_in_mm(spacing_ji, a_mm, b_mm):
    # semi-axes a multiple of their spacing: the tips fall on voxel centres, so the axes are exact
    mask = np.zeros((2, 41, 41), bool)
    mask[0] = ellipse((41, 41), (20, 20), a_mm, b_mm, spacing_ji)
    d = measures.axial_diameters(mask, ijk_to_ras((spacing_ji[1], spacing_ji[0], 3.0)))
    assert d.long_mm == pytest.approx(2 * max(a_mm, b_mm))
    assert d.short_mm == pytest.approx(2 * min(a_mm, b_mm))


def test_rectangle_long_axis_is_its_diagonal_short_axis_the_perpendicular_chord():
    # 5 x 3 voxels of 1 mm: centres span L = 4 by W = 2 mm; the long axis is the diagonal D = sqrt(20); the
    # longest chord perpendicular to it runs from a corner to the opposite long side: W * D / L
    mask = np.zeros((1, 7, 9), bool)
    mask[0, 2:5, 2:7] = True
    d = measures.axial_diameters(mask, ijk_to_ras((1.0, 1.0, 1.0)))
    assert d.long_mm == pytest.approx(math.sqrt(20))
    assert d.short_mm == pytest.approx(2 * math.sqrt(20) / 4)
    # the ends returned lie that far apart and at right angles
    a, b = (np.array(p) for p in d.long_ends_ras)
    c, e = (np.array(p) for p in d.short_ends_ras)
    assert np.linalg.norm(b - a) == pytest.approx(d.long_mm, abs=2e-3)
    assert np.linalg.norm(e - c) == pytest.approx(d.short_mm, abs=2e-3)
    assert abs(np.dot(b - a, e - c)) < 1e-2


def test_a_line_of_voxels_has_no_width_and_one_voxel_measures_zero():
    mask = np.zeros((1, 10, 10), bool)
    mask[0, np.arange(8), np.arange(8)] = True  # a diagonal staircase of 8 voxels
    d = measures.axial_diameters(mask, ijk_to_ras((1.0, 1.0, 1.0)))
    assert d.long_mm == pytest.approx(7 * math.sqrt(2)) and d.short_mm == 0.0
    one = np.zeros((2, 3, 3), bool)
    one[1, 1, 1] = True
    d = measures.axial_diameters(one, ijk_to_ras((0.7, 0.7, 2.5)))
    assert (d.long_mm, d.short_mm, d.slice_index) == (0.0, 0.0, 1)


@pytest.mark.parametrize("angle", [17.0, 30.0, 45.0, 72.0])
def test_rotated_ellipse_within_a_voxel(angle):
    spacing = 0.25
    mask = np.zeros((1, 81, 81), bool)
    mask[0] = ellipse((81, 81), (40, 40), 8.0, 4.0, (spacing, spacing), angle)
    d = measures.axial_diameters(mask, ijk_to_ras((spacing, spacing, 1.0)))
    assert abs(d.long_mm - 16.0) <= spacing and abs(d.short_mm - 8.0) <= spacing
    # the long axis turned by the angle from the rows (j, i.e. A): its direction in (A, R)
    a, b = (np.array(p) for p in d.long_ends_ras)
    direction = math.degrees(math.atan2(abs(b[0] - a[0]), abs(b[1] - a[1])))
    assert abs(direction - min(angle, 180 - angle)) < 3.0


def test_oblique_direction_matrix_measures_the_same_shape_the_same():
    mask = np.zeros((5, 31, 31), bool)
    mask[1] = ellipse((31, 31), (15, 15), 4.0, 2.0, (0.5, 0.8))
    mask[2] = ellipse((31, 31), (15, 15), 6.0, 3.2, (0.5, 0.8))  # the largest slice
    mask[3] = ellipse((31, 31), (15, 15), 5.0, 2.4, (0.5, 0.8))
    straight = measures.axial_diameters(mask, ijk_to_ras((0.8, 0.5, 2.0)))
    rotation = rotation_about(2, 35.0) @ rotation_about(0, 20.0)  # turned in-plane and tilted 20 degrees
    origin = (-40.0, 12.5, 100.0)
    oblique = measures.axial_diameters(mask, ijk_to_ras((0.8, 0.5, 2.0), rotation, origin), offset_kji=(10, 0, 0))
    assert straight.slice_index == 2 and oblique.slice_index == 12
    assert straight.long_mm == pytest.approx(12.0) and straight.short_mm == pytest.approx(6.4)
    assert oblique.long_mm == pytest.approx(straight.long_mm) and oblique.short_mm == pytest.approx(straight.short_mm)
    # its ends are the straight ones carried by the same rotation (and the slice offset along the tilted k)
    shift = rotation @ np.array([0.0, 0.0, 10 * 2.0]) + origin
    for ends_s, ends_o in ((straight.long_ends_ras, oblique.long_ends_ras),
                           (straight.short_ends_ras, oblique.short_ends_ras)):
        carried = sorted(tuple(np.round(rotation @ np.array(p) + shift, 2)) for p in ends_s)
        np.testing.assert_allclose(carried, sorted(tuple(np.round(p, 2)) for p in ends_o), atol=0.01)


def test_the_axial_slices_are_along_the_axis_nearest_s():
    # stored with i running superior (a permuted, sagittal-like grid): the axial slices are the i = const planes
    rotation = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # i -> S, j -> A, k -> R
    mask = np.zeros((25, 25, 4), bool)  # (k = R, j = A, i = S)
    mask[:, :, 2] = ellipse((25, 25), (12, 12), 5.0, 10.0)  # 10 mm semi-axis along j (A), 5 mm along k (R)
    assert measures.slice_axis(ijk_to_ras((3.0, 1.0, 1.0), rotation)) == 0
    d = measures.axial_diameters(mask, ijk_to_ras((3.0, 1.0, 1.0), rotation))
    assert (d.long_mm, d.short_mm, d.slice_index) == (pytest.approx(20.0), pytest.approx(10.0), 2)
    assert {p[2] for p in d.long_ends_ras} == {6.0}  # S of slice i = 2 (3 mm slices)


def test_the_slice_with_the_largest_long_axis_is_measured_not_the_largest_area():
    mask = np.zeros((3, 41, 41), bool)
    mask[0] = ellipse((41, 41), (20, 20), 8, 8)  # a disc: 16 x 16 mm, area 201 mm2
    mask[2] = ellipse((41, 41), (20, 20), 10, 3)  # thin and long: 20 x 6 mm, area 94 mm2
    d = measures.axial_diameters(mask, ijk_to_ras((1.0, 1.0, 1.0)))
    assert (d.slice_index, d.long_mm, d.short_mm) == (2, pytest.approx(20.0), pytest.approx(6.0))


def test_empty_mask():
    d = measures.axial_diameters(np.zeros((3, 4, 5), bool), np.eye(4))
    assert (d.long_mm, d.short_mm, d.mean_mm, d.slice_index, d.long_ends_ras) == (0.0, 0.0, 0.0, -1, None)
    assert d.empty
    assert measures.mean_intensity(np.ones((3, 4, 5)), np.zeros((3, 4, 5))) is None
    with pytest.raises(ValueError, match="3D"):
        measures.axial_diameters(np.zeros((4, 5)), np.eye(4))


def test_result_measures_consensus_samples_range_and_mean_intensity():
    volume = np.full((6, 30, 30), -800, dtype=np.int16)
    box = ((1, 5), (2, 28), (2, 28))
    consensus = np.zeros((4, 26, 26), np.uint8)
    consensus[2] = ellipse((26, 26), (13, 13), 10, 6)  # 20 x 12 mm
    small = np.zeros_like(consensus)
    small[1] = ellipse((26, 26), (13, 13), 8, 4)  # 16 x 8 mm
    empty = np.zeros_like(consensus)
    samples = np.stack([consensus, small, empty])
    full = np.zeros(volume.shape, bool)
    full[1:5, 2:28, 2:28] = consensus > 0
    volume[full] = 40
    volume[3, 15, 15] = 140  # one brighter voxel inside: the mean is worked out by hand below
    n_inside = int(full.sum())
    result = SimpleNamespace(consensus=consensus, box=box, ijk_to_ras=ijk_to_ras((1.0, 1.0, 2.0)), n_samples=3,
                             sample_mask=lambda i: unpack_mask(pack_masks(samples), i - 1))
    out = measures.result_measures(result, volume)
    d = out["diameters_mm"]
    assert (d["long"], d["short"], d["mean"], d["slice_index"]) == (20.0, 12.0, 16.0, 3)
    assert d["samples"] == {"long": {"min": 0.0, "max": 20.0}, "short": {"min": 0.0, "max": 12.0},
                            "mean": {"min": 0.0, "max": 16.0}}
    assert out["mean_intensity"] == pytest.approx(round((40 * (n_inside - 1) + 140) / n_inside, 1))
    assert "mean_intensity" not in measures.result_measures(result)  # no voxels given: no intensity
    # a VolumeResult's packed samples (only their marked box unpacked) measure the same
    result.sample_bits = pack_masks(samples)
    assert measures.result_measures(result, volume) == out
