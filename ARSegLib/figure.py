"""The figure `arseg segment --png` writes (and the README's picture): for each nodule, the axial plane through the
click as a radiologist reads it. No MRML, no Qt: matplotlib on a VolumeResult's preview.

Per nodule, one row: the CT in a lung window with the plane named (axial, slice index, S in mm), orientation
letters, a scale bar in mm, the click marked and the zoomed region outlined; the consensus after each scale on the
zoomed region, each labelled with its token grid and cell size (a coarse grid cannot draw a small nodule, so an
empty or shifted first scale is expected, and says so); the consensus outline and the disagreement over the CT
with a colour bar; the volume, the samples' range and how many samples mark a nodule printed above the row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

LUNG_WINDOW = (-1350.0, 150.0)  # HU: width 1500, level -600
CONSENSUS_COLOR = "#f2c12e"
IF_PRESENT_COLOR = "#33c4f2"
CLICK_COLOR = "#33e0ff"
# the samples agree where at most this fraction differs from the consensus (4 of 16; one reader in four of LIDC's):
# the heat map is transparent there, in this figure and in the slice views (mrml). Not 0: on lung1 no consensus
# voxel has all 16 samples agreeing, as on each plane some samples draw nothing (3 of 16 on the click's plane, so
# its whole inside differed by 3/16 and was drawn as disagreement); what is drawn is where the outline is uncertain
AGREEMENT_FRACTION = 0.25


def heat_rgba(disagreement_hw: np.ndarray) -> np.ndarray:
    """RGBA of the disagreement heat: the colour bar's colours, nearly opaque where more than AGREEMENT_FRACTION
    of the samples differ, transparent where they agree."""
    import matplotlib.pyplot as plt

    d = np.clip(np.asarray(disagreement_hw, dtype=np.float64), 0, 1)
    heat = plt.get_cmap("hot")(d * 0.85 + 0.15)
    heat[..., 3] = np.where(d > AGREEMENT_FRACTION, 0.85, 0.0)
    return heat


def _zoom_box(p, spacing: float, margin_mm: float = 8.0, min_mm: float = 36.0):
    """(r0, r1, c0, c1): a square around what was drawn (or the click), with a margin, inside the crop."""
    h, w = p.image.shape
    drawn = (p.consensus > 0) | (p.disagreement > 0) | p.scale_consensus.any(0)
    if p.if_present is not None:
        drawn |= p.if_present > 0
    cr, cc = p.click_rc if p.click_rc is not None else ((h - 1) / 2, (w - 1) / 2)
    rows, cols = np.nonzero(drawn)
    rows, cols = np.append(rows, cr), np.append(cols, cc)
    margin = margin_mm / spacing
    side = max(min_mm / spacing, rows.max() - rows.min() + 2 * margin, cols.max() - cols.min() + 2 * margin)
    side = min(side, h, w)
    mid_r, mid_c = (rows.max() + rows.min()) / 2, (cols.max() + cols.min()) / 2
    r0 = int(round(min(max(mid_r - side / 2, 0), h - side)))
    c0 = int(round(min(max(mid_c - side / 2, 0), w - side)))
    return r0, r0 + int(round(side)), c0, c0 + int(round(side))


def _ct(ax, p, box=None):
    image, lo, hi = (p.image_hu, *LUNG_WINDOW) if p.image_hu is not None else (p.image, 0.0, 1.0)
    r0, r1, c0, c1 = box or (0, image.shape[0], 0, image.shape[1])
    # pixel edges at -0.5 ... n - 0.5 in crop coordinates, so overlays share one frame whatever the zoom
    ax.imshow(image[r0:r1, c0:c1], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
              extent=(c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5))
    ax.set_xlim(c0 - 0.5, c1 - 0.5)
    ax.set_ylim(r1 - 0.5, r0 - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _mask(ax, mask, color, alpha=0.55):
    from matplotlib.colors import ListedColormap

    if mask is not None and mask.any():
        h, w = mask.shape
        ax.imshow(np.ma.masked_where(mask == 0, mask), cmap=ListedColormap([color]), alpha=alpha, vmin=0, vmax=1,
                  interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))


def _outline(ax, mask, color, style="solid", width=1.4):
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=width, linestyles=style)


def _click(ax, p, size=11):
    if p.click_rc is not None:
        ax.plot(p.click_rc[1], p.click_rc[0], marker="+", color=CLICK_COLOR, markersize=size, markeredgewidth=1.6)


def _letters(ax, size=8):
    # rows run anterior -> posterior, columns patient right -> left: the radiological axial view
    from matplotlib import patheffects

    style = dict(color="white", fontsize=size, fontweight="bold", transform=ax.transAxes, ha="center", va="center",
                 path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
    for x, y, letter in ((0.5, 0.96, "A"), (0.5, 0.04, "P"), (0.03, 0.5, "R"), (0.97, 0.5, "L")):
        ax.text(x, y, letter, **style)


def _scale_bar(ax, spacing: float, box, size=7):
    r0, r1, c0, c1 = box
    span_mm = (c1 - c0) * spacing
    length_mm = next((v for v in (50, 20, 10, 5, 2) if v <= span_mm / 3), 1)
    length = length_mm / spacing
    x0 = c0 + 0.06 * (c1 - c0)
    y = r1 - 0.09 * (r1 - r0)
    ax.plot([x0, x0 + length], [y, y], color="white", linewidth=2.5, solid_capstyle="butt")
    from matplotlib import patheffects

    ax.text(x0 + length / 2, y - 0.03 * (r1 - r0), f"{length_mm} mm", color="white", fontsize=size, ha="center",
            va="bottom", path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])


def _plane_title(p) -> str:
    where = [f"S {p.plane_s_mm:.1f} mm"]
    if p.slice_index >= 0 and p.n_slices:
        where.insert(0, f"slice {p.slice_index} (0-based, of {p.n_slices})")
    return "Axial, " + ", ".join(where)


def _summary(entry: Dict[str, Any], result) -> str:
    vols = result.sample_volumes_mm3
    point = result.point_ras
    where = f" at R, A, S = {point[0]:.1f}, {point[1]:.1f}, {point[2]:.1f} mm" if point is not None else ""
    head = f"{entry.get('name', 'Result')}{where}"
    marking = f"{result.samples_marking} of {result.n_samples} samples mark a nodule"
    if result.consensus_volume_mm3 > 0:
        d = entry.get("diameters_mm")
        axes = f"; axial {d['long']:.1f} × {d['short']:.1f} mm" if d else ""
        return (f"{head}: consensus {result.consensus_volume_mm3:,.0f} mm³; samples {vols.min():,.0f}-{vols.max():,.0f}"
                f" mm³ ({marking}){axes}")
    return (f"{head}: consensus empty (most samples mark nothing); {marking}: {result.if_present_volume_mm3:,.0f} "
            f"mm³ if present (dashed outline)")


def _entry_for(result, report: Optional[Dict[str, Any]], index: int) -> Dict[str, Any]:
    for entry in (report or {}).get("nodules", []):
        if result.point_ras is not None and entry.get("point_ras_mm") is not None and \
                np.allclose(entry["point_ras_mm"], result.point_ras, atol=1e-3):
            return entry
    return {"name": f"Nodule {index + 1}" if result.mode == "click" else "Whole volume"}


def write_figure(results: Sequence[Any], path, report: Optional[Dict[str, Any]] = None, title: str = "") -> Path:
    """One row per result (nodule): CT with the plane named, each scale, consensus and disagreement; as PNG."""
    import matplotlib.pyplot as plt

    fig = build_figure(results, report, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def build_figure(results: Sequence[Any], report: Optional[Dict[str, Any]] = None, title: str = ""):
    """The matplotlib figure write_figure saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.cm
    import matplotlib.colors
    import matplotlib.pyplot as plt
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    results = [r for r in results if r.preview is not None]
    if report and report.get("nodules"):
        # a later point inside an earlier nodule redid it: draw what the report holds, not the replaced result
        current = [r for i, r in enumerate(results) if "id" in _entry_for(r, report, i)]
        results = current or results
    if not results:
        raise ValueError("no result with a preview to draw")
    k = results[0].preview.scale_consensus.shape[0]
    scale_cols = min(4, k)
    scale_rows = math.ceil(k / scale_cols)
    fig = plt.figure(figsize=(2.6 * 2 + 1.35 * scale_cols + 2.6 + 0.6, 0.35 + len(results) * (2.75 + 0.55)))
    outer = fig.add_gridspec(len(results), 1, hspace=0.2, top=1 - 0.35 / fig.get_figheight(), bottom=0.01,
                             left=0.01, right=0.955)
    for row, result in enumerate(results):
        p = result.preview
        spacing = p.pixel_spacing_mm or float(result.settings.get("pixel_spacing_mm", 1.0))
        box = _zoom_box(p, spacing)
        crop_mm = p.image.shape[1] * spacing
        inner = outer[row].subgridspec(scale_rows + 1, 3 + scale_cols,
                                       width_ratios=[2.2] + [1] * scale_cols + [2.2, 0.09],
                                       height_ratios=[0.42] + [1] * scale_rows, wspace=0.06, hspace=0.3)
        text = fig.add_subplot(inner[0, :])
        text.axis("off")
        text.text(0.0, 0.55, _summary(_entry_for(result, report, row), result), fontsize=9.5, fontweight="bold",
                  transform=text.transAxes, va="bottom")

        # the CT through the click: where we are
        ax = fig.add_subplot(inner[1:, 0])
        _ct(ax, p)
        _outline(ax, p.consensus, CONSENSUS_COLOR, width=1.0)
        if not p.consensus.any() and p.if_present is not None:
            _outline(ax, p.if_present, IF_PRESENT_COLOR, "dashed", 1.0)
        r0, r1, c0, c1 = box
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="white",
                               linestyle=":", linewidth=0.9))
        _click(ax, p, 9)
        _letters(ax)
        _scale_bar(ax, spacing, (0, p.image.shape[0], 0, p.image.shape[1]))
        shown = [f"{crop_mm:.0f} mm crop"] + (["lung window"] if p.image_hu is not None else []) + \
            (["+ the click"] if p.click_rc is not None else [])
        ax.set_title(f"{_plane_title(p)}\n{', '.join(shown)}", fontsize=8)

        # the scales, coarse to fine, on the zoomed region
        sides = p.scale_sides or tuple(range(1, k + 1))
        for s in range(k):
            ax = fig.add_subplot(inner[1 + s // scale_cols, 1 + s % scale_cols])
            _ct(ax, p, box)
            mask = p.scale_consensus[s]
            _mask(ax, mask, CONSENSUS_COLOR, 0.6)
            _click(ax, p, 7)
            side = sides[s] if s < len(sides) else s + 1
            cell = crop_mm / side
            label = f"scale {s + 1}/{k}: {side}×{side} tokens\nof {cell:.0f} mm{' (coarse)' if cell > 15 else ''}"
            ax.set_title(label, fontsize=6.5, pad=2, linespacing=1.0)
            if not mask.any():
                note = f"empty: {cell:.0f} mm tokens\ntoo coarse here" if cell > 15 else "empty"
                ax.text(0.5, 0.2, note, color="#ffb0b0", fontsize=6.5, ha="center", va="center",
                        transform=ax.transAxes, fontweight="bold",
                        bbox=dict(facecolor="black", alpha=0.65, edgecolor="none", pad=1.5))
            else:
                ax.text(0.03, 0.04, f"{mask.sum() * spacing * spacing:.0f} mm²", color="white", fontsize=6,
                        transform=ax.transAxes,
                        path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])

        # consensus outline and disagreement heat over the CT
        ax = fig.add_subplot(inner[1:, 1 + scale_cols])
        _ct(ax, p, box)
        h, w = p.disagreement.shape
        # the heat's colours as on its bar (nearly opaque), the CT showing where the samples agree
        heat = heat_rgba(p.disagreement)
        ax.imshow(heat, interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        bar_colors = plt.get_cmap("hot")(np.linspace(0.15, 1.0, 256))
        bar_colors[np.linspace(0.0, 1.0, 256) <= AGREEMENT_FRACTION] = (0.55, 0.55, 0.55, 1.0)  # not drawn
        im = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0.0, 1.0),
                                          cmap=matplotlib.colors.ListedColormap(bar_colors))
        _outline(ax, p.consensus, CONSENSUS_COLOR)
        if not p.consensus.any() and p.if_present is not None:
            _outline(ax, p.if_present, IF_PRESENT_COLOR, "dashed")
        _click(ax, p)
        _letters(ax, 7)
        _scale_bar(ax, spacing, box)
        ax.set_title("consensus (outline) and where\nsamples disagree", fontsize=8)
        cax = fig.add_subplot(inner[1:, 2 + scale_cols])
        bar = fig.colorbar(im, cax=cax)
        bar.set_label(f"fraction of samples that differ from\nthe consensus (grey, up to {AGREEMENT_FRACTION:g}: "
                      f"not drawn)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    what = f"{len(results)} nodule(s)" if results[0].mode == "click" else "whole volume, the plane with most consensus"
    fig.suptitle(title or f"ARSeg, model {results[0].model_name}: {what}; coarse scales use few "
                          f"large tokens, so an empty or shifted scale 1-2 is expected for a small nodule",
                 fontsize=9, y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig
