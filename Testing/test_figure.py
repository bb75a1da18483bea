"""The figure of `arseg segment --png` (ARSegLib.figure): what a radiologist needs to place and read it is on it,
for a nodule the samples agree on and one they split on; no blank panel."""

from __future__ import annotations

import numpy as np
import pytest
from arseg_volumes import DiscPredictor

from ARSegLib import pipeline
from ARSegLib.figure import build_figure, write_figure


@pytest.fixture(scope="module")
def two_results(lung1, tiny):
    predictor, card = tiny
    settings = pipeline.SegmentSettings(n_samples=16, half_height_mm=7.5)
    agreed = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, lung1.nodule_ras, DiscPredictor(predictor.config),
                                    card, settings)
    split = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, np.add(lung1.nodule_ras, (30.0, -15.0, 0.0)),
                                   DiscPredictor(predictor.config, marking=7), card, settings)
    return agreed, split


def _texts(ax):
    return [ax.get_title()] + [t.get_text() for t in ax.texts]


def test_the_figure_names_the_plane_marks_the_click_and_explains_empty_scales(two_results, tmp_path):
    import matplotlib.pyplot as plt

    agreed, split = two_results
    fig = build_figure([agreed, split])
    try:
        texts = [t for ax in fig.axes for t in _texts(ax)]
        everything = " ".join(texts)
        # the plane: axial, slice index, S in mm; orientation letters; a scale bar in mm
        assert everything.count("Axial, slice") == 2 and " S -" in everything
        for letter in "APRL":
            assert texts.count(letter) >= 4, letter
        assert "20 mm" in texts or "10 mm" in texts
        # the click: a '+' marker on every image panel
        images = [ax for ax in fig.axes if ax.images]
        assert len(images) == 2 * (1 + 8 + 1)  # CT, 8 scales, consensus + disagreement per nodule: none blank
        assert all(any(line.get_marker() == "+" for line in ax.lines) for ax in images)
        # scales labelled with their token grid; the empty first scale says why
        assert "scale 1/8: 1×1 tokens\nof 90 mm (coarse)" in texts
        assert any(t.startswith("empty: 90 mm tokens") for t in texts)
        # the numbers: volume, the samples' range; the split nodule's fraction and its volume if present
        assert f"consensus {agreed.consensus_volume_mm3:,.0f} mm³" in everything
        assert "7 of 16 samples mark a nodule" in everything and "if present" in everything
        # a colour bar for the disagreement per nodule
        assert sum("fraction of samples" in ax.get_ylabel() for ax in fig.axes) == 2
    finally:
        plt.close(fig)
    path = write_figure([agreed, split], tmp_path / "f.png")
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 1200 and im.size[1] > 600


def test_a_redone_nodule_is_drawn_once(two_results, lung1, tiny):
    """Points [centre, 2 mm beside it, elsewhere]: the second redid nodule 1; the figure draws the two nodules the
    report holds, the redone one once."""
    import matplotlib.pyplot as plt

    from ARSegLib import mrml

    predictor, card = tiny
    agreed, split = two_results
    again = pipeline.segment_click(lung1.array, lung1.ijk_to_ras, np.add(lung1.nodule_ras, (2.0, 0.0, 0.0)),
                                   DiscPredictor(predictor.config), card,
                                   pipeline.SegmentSettings(n_samples=16, half_height_mm=7.5))
    scene = mrml.new_scene()
    volume = mrml.add_scalar_volume(scene, "lung1", lung1.array, lung1.ijk_to_ras)
    for result in (agreed, again, split):
        nodes = mrml.write_result(scene, volume, result)
    assert nodes.nodule_ids == ["Nodule_1", "Nodule_2"]
    fig = build_figure([agreed, again, split], nodes.report)
    try:
        titles = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().startswith("Nodule")]
        assert len(titles) == 2 and titles[0].startswith("Nodule 1 at R, A, S = -54.4")
        assert titles[1].startswith("Nodule 2")
    finally:
        plt.close(fig)
