"""Pictures a cardiologist checks before signing a draft (issue 16): the contour mosaic and the
volume curves, rendered headless with matplotlib (Agg, no pyplot: no global state, no display).

    png, layout = contour_mosaic(cine, labels, affine, ed_phase=0, es_phase=7, trigger_times_ms=[...])
    png = volume_curves(measurements, trigger_times_ms=[...])

Contour mosaic: one row per phase (ED, then ES), one column per slice, base to apex. Every tile is
the same crop around the heart (labels of both phases, plus a margin), shown as the DICOM image is
shown by a viewer: rows down, columns right (volume[x = column, y = row] transposed). The tiles are
the image's voxels scaled up by whole numbers and placed pixel for pixel (`Figure.figimage`, no
resampling), so each contour pixel lies inside a voxel on its mask's boundary: the outlines are
what the model labelled, not a smoothed guess. `layout` says where each tile is in the PNG and which
voxels it shows (tests map PNG pixels back to voxels with it). The window comes from the crops'
own intensity percentiles (`short_axis.window_uint8`, the findings inputs' rule), one for the whole
mosaic so slices stay comparable. A slice without an image or without any contour is said so
under its tile.

Volume curves: LV and RV cavity volume per phase over trigger time, ED and ES marked, EF in the
legend. A phase without all its images is null in the curve: drawn as a gap with a shaded band,
never interpolated; the segmentation's quality flags that concern the curve are written under it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from services.segmentation.function import LV_CAVITY, LV_MYOCARDIUM, RV_CAVITY

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies, none of them grey.
CONTOUR_COLOURS = {
    "LV endocardium": (240, 228, 66),  # yellow
    "LV epicardium": (213, 94, 0),  # vermillion
    "RV endocardium": (86, 180, 233),  # sky blue
}
_ED_COLOUR, _ES_COLOUR = "#0072B2", "#CC79A7"
_LV_COLOUR, _RV_COLOUR = "#D55E00", "#0072B2"
GAP_COLOUR = "#F3D3D3"  # the band over a phase that is a gap in the curve (light red: not grey like the grid)
TILE_TARGET_PX = 240  # about this many PNG pixels per tile side
MARGIN_MM = 15.0
# Segmentation flags that say something about the curve (drawn on it).
CURVE_FLAGS = ("incomplete_phases", "non_cyclic_curve", "ed_es_from_complete_phases", "ed_equals_es",
               "es_not_measurable", "no_complete_phase", "ed_es_from_rv", "implausible_volume",
               "phase_incomplete", "stack_hole", "missing_slices")


def _figure(width_px: int, height_px: int, dpi: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi, facecolor="black")


def _png(fig, dpi: int) -> bytes:
    buffer = io.BytesIO()
    # No metadata: the same input gives the same bytes (retried report stages).
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=fig.get_facecolor(), metadata={"Software": None})
    return buffer.getvalue()


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's pixels within `width` pixels of its outside (its inner border)."""
    from scipy import ndimage

    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def direction_letters(vector_lps: Sequence[float]) -> str:
    """Patient direction of an image axis in DICOM letters (L/R, A/P, H/F), largest first."""
    names = (("R", "L"), ("A", "P"), ("F", "H"))
    parts = sorted(((abs(v), names[i][v > 0]) for i, v in enumerate(vector_lps) if abs(v) > 0.25), reverse=True)
    return "".join(letter for _mag, letter in parts)


def slice_positions_mm(affine_ras: np.ndarray, n_slices: int) -> list[float]:
    """Each slice's position along its normal (mm), as a scanner's SliceLocation counts it (LPS)."""
    from services.preprocess.geometry import ras_to_lps

    affine = np.asarray(affine_ras, dtype=float)
    normal = ras_to_lps(affine[:3, 2] / np.linalg.norm(affine[:3, 2]))
    origins = ras_to_lps((affine @ np.array([[0, 0, k, 1] for k in range(n_slices)], float).T)[:3].T)
    return [float(p @ normal) for p in origins]


def base_to_apex(affine_ras: np.ndarray, labels_3d: np.ndarray | None, n_slices: int) -> tuple[list[int], str]:
    """Slice indices base first, and how that was decided (the findings inputs' rule)."""
    from services.preprocess.geometry import apex_at_high_index

    lv_mask = None if labels_3d is None else np.isin(labels_3d, [LV_CAVITY, LV_MYOCARDIUM])
    apex_high, meta = apex_at_high_index(affine_ras, lv_mask)
    order = list(range(n_slices)) if apex_high else list(range(n_slices))[::-1]
    return order, meta["apex_rule"]


def _crop_box(labels: np.ndarray, phases: Sequence[int], spacing: tuple[float, float]) -> tuple[int, int, int, int]:
    """(x0, x1, y0, y1) voxel box around the labels of these phases plus a margin; the whole image
    when nothing is labelled. Square in mm, may reach outside the image (padded)."""
    from scipy import ndimage

    nx, ny = labels.shape[:2]
    found = (labels[..., list(phases)] > 0).any(axis=(2, 3))
    if not found.any():
        return 0, nx, 0, ny
    # The heart is the largest labelled region in-plane: a stray blob elsewhere (drawn if it
    # falls in the crop; the segmentation's components_removed flag names it) must not widen it.
    regions, n = ndimage.label(found)
    if n > 1:
        found = regions == np.argmax(np.bincount(regions.ravel())[1:]) + 1
    xs, ys = np.flatnonzero(found.any(axis=1)), np.flatnonzero(found.any(axis=0))
    side_mm = max((xs[-1] - xs[0] + 1) * spacing[0], (ys[-1] - ys[0] + 1) * spacing[1]) + 2 * MARGIN_MM
    half_x, half_y = side_mm / spacing[0] / 2, side_mm / spacing[1] / 2
    cx, cy = (xs[0] + xs[-1] + 1) / 2, (ys[0] + ys[-1] + 1) / 2
    return int(round(cx - half_x)), int(round(cx + half_x)), int(round(cy - half_y)), int(round(cy + half_y))


def _padded(plane: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """plane[x0:x1, y0:y1] with zeros where the box leaves the image."""
    x0, x1, y0, y1 = box
    out = np.zeros((x1 - x0, y1 - y0), dtype=plane.dtype)
    sx0, sx1, sy0, sy1 = max(x0, 0), min(x1, plane.shape[0]), max(y0, 0), min(y1, plane.shape[1])
    if sx1 > sx0 and sy1 > sy0:
        out[sx0 - x0:sx1 - x0, sy0 - y0:sy1 - y0] = plane[sx0:sx1, sy0:sy1]
    return out


def _upscale(image_rows_cols: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(image_rows_cols, scale[0], axis=0), scale[1], axis=1)


def contour_masks(labels_2d: np.ndarray) -> dict[str, np.ndarray]:
    """The mask whose border each contour is: endocardium = LV cavity, epicardium = LV cavity +
    myocardium, RV = RV cavity."""
    return {"LV epicardium": np.isin(labels_2d, (LV_CAVITY, LV_MYOCARDIUM)),
            "LV endocardium": labels_2d == LV_CAVITY,
            "RV endocardium": labels_2d == RV_CAVITY}


def _phase_caption(name: str, phase: int, trigger_times_ms: Sequence[float]) -> str:
    time = f"\n{trigger_times_ms[phase]:.0f} ms" if phase < len(trigger_times_ms) else ""
    return f"{name}\nphase {phase}{time}"


def contour_mosaic(
    cine: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    ed_phase: int,
    es_phase: int | None,
    trigger_times_ms: Sequence[float] = (),
    present: np.ndarray | None = None,
    image_orientation_lps: Sequence[float] | None = None,
    dpi: int = 100,
) -> tuple[bytes, dict[str, Any]]:
    """The ED/ES contour mosaic as PNG bytes, and its layout.

    cine, labels: (x = DICOM column, y = DICOM row, slice, phase); affine: RAS+ (the manifest's);
    present: bool [slice, phase], False where the cell has no image (default: all present);
    image_orientation_lps: the series' ImageOrientationPatient, for the direction letters.
    layout: {"tiles": [{slice, phase, row, png_x, png_y (top-left pixel of the tile), box
    (x0, x1, y0, y1 voxels shown), scale (PNG pixels per voxel: rows, columns), state}], ...}.
    """
    cine, labels = np.asarray(cine), np.asarray(labels)
    if cine.ndim == 3:
        cine, labels = cine[..., None], (labels[..., None] if labels.ndim == 3 else labels)
    if cine.shape != labels.shape:
        raise ValueError(f"cine {cine.shape} and labels {labels.shape} differ in shape")
    n_slices, n_phases = cine.shape[2], cine.shape[3]
    present = np.ones((n_slices, n_phases), bool) if present is None else np.asarray(present, bool)
    rows = [("ED", ed_phase)] + ([("ES", es_phase)] if es_phase is not None and es_phase != ed_phase else [])
    for name, phase in rows:
        if not 0 <= phase < n_phases:
            raise ValueError(f"{name} phase {phase} is outside 0..{n_phases - 1}")
    affine = np.asarray(affine, dtype=float)
    spacing = (float(np.linalg.norm(affine[:3, 0])), float(np.linalg.norm(affine[:3, 1])))
    order, order_rule = base_to_apex(affine, labels[..., ed_phase], n_slices)
    positions = slice_positions_mm(affine, n_slices)
    box = _crop_box(labels, [p for _n, p in rows], spacing)
    side_vox = max(box[1] - box[0], box[3] - box[2])
    base_scale = max(2, math.ceil(TILE_TARGET_PX / side_vox))
    # Rows are y (spacing[1]), columns x (spacing[0]): anisotropic pixels keep their aspect.
    scale = (max(1, round(base_scale * spacing[1] / min(spacing))),
             max(1, round(base_scale * spacing[0] / min(spacing))))
    width = max(1, min(scale) // 2 + (min(scale) > 2))  # contour width in PNG pixels, < one voxel

    from services.findings.short_axis import window_uint8

    crops = {(z, t): _padded(cine[:, :, z, t], box).T.astype(np.float32)
             for _n, t in rows for z in order if present[z, t]}
    inside = _padded(np.ones(cine.shape[:2], bool), box).T  # the padding is not the image
    window = {"window_low": 0.0, "window_high": 1.0}
    if crops:
        stack = np.stack(list(crops.values()))
        gray, window = window_uint8(stack, weight_mask=np.broadcast_to(inside, stack.shape))
        gray[:, ~inside] = 0
        crops = dict(zip(crops, gray))

    tile_h, tile_w = (box[3] - box[2]) * scale[0], (box[1] - box[0]) * scale[1]
    gap = 10
    # Text sized to the tiles, so that it stays readable where the mosaic is shrunk (the PDF).
    font_pt = max(8.0, tile_w * 0.075 * 72 / dpi)
    em = font_pt * dpi / 72  # pixels per em: every margin holds its text, none reaches a tile
    left, top, caption_h, bottom = int(em * 5.5), int(em * 3.3), int(em * 2.6), int(em * 2.2)
    fig_w = left + len(order) * (tile_w + gap)
    fig_h = top + len(rows) * (tile_h + caption_h + gap) + bottom
    fig = _figure(fig_w, fig_h, dpi)
    text = {"color": "white", "fontsize": font_pt}
    tiles = []
    for r, (name, t) in enumerate(rows):
        y_top = top + r * (tile_h + caption_h + gap)
        fig.text(6 / fig_w, 1 - (y_top + tile_h / 2) / fig_h, _phase_caption(name, t, trigger_times_ms),
                 va="center", ha="left", fontweight="bold", **text)
        for c, z in enumerate(order):
            x_left = left + c * (tile_w + gap)
            state = "no_image" if not present[z, t] else "ok"
            if present[z, t]:
                rgb = np.repeat(_upscale(crops[(z, t)], scale)[..., None], 3, axis=2)
                plane = _padded(labels[:, :, z, t], box).T
                if not plane.any():
                    state = "no_contour"
                for contour, mask in contour_masks(plane).items():
                    rgb[outline(_upscale(mask, scale), width)] = CONTOUR_COLOURS[contour]
            else:
                rgb = np.full((tile_h, tile_w, 3), 40, np.uint8)
            # figimage counts from the bottom-left corner: place the tile's top row at y_top.
            fig.figimage(rgb, xo=x_left, yo=fig_h - y_top - tile_h, origin="upper")
            caption = f"{positions[z]:.1f} mm" + {"ok": "", "no_contour": "\nNO CONTOUR FOUND",
                                                   "no_image": "\nNO IMAGE"}[state]
            fig.text((x_left + tile_w / 2) / fig_w, 1 - (y_top + tile_h + 6) / fig_h, caption, ha="center", va="top",
                     color="white" if state == "ok" else "#FF4040", fontsize=font_pt * 0.95,
                     fontweight="normal" if state == "ok" else "bold")
            if state != "ok":  # a frame just outside the tile: the slice is marked at a glance
                from matplotlib.patches import Rectangle

                fig.patches.append(Rectangle(((x_left - 3) / fig_w, 1 - (y_top + tile_h + 3) / fig_h),
                                             (tile_w + 6) / fig_w, (tile_h + 6) / fig_h, transform=fig.transFigure,
                                             fill=False, edgecolor="#FF4040", linewidth=1.5, linestyle="--"))
            tiles.append({"slice": z, "phase": t, "row": name, "png_x": x_left, "png_y": y_top,
                          "box": list(box), "scale": list(scale), "state": state})
        if r == 0:
            for c, z in enumerate(order):
                fig.text((left + c * (tile_w + gap) + tile_w / 2) / fig_w, 1 - (y_top - 4) / fig_h, f"slice {z}",
                         ha="center", va="bottom", **text)
    where = ""
    if image_orientation_lps is not None:
        where = (f"; image right = {direction_letters(image_orientation_lps[:3])}, "
                 f"down = {direction_letters(image_orientation_lps[3:6])}")
    fig.text(6 / fig_w, 1 - 6 / fig_h, f"Contours, base (left) to apex (right){where}; "
             f"window {window['window_low']:.0f}-{window['window_high']:.0f} (1st-99th percentile)",
             va="top", ha="left", **text)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=np.array(rgb) / 255, linewidth=3, label=name)
               for name, rgb in CONTOUR_COLOURS.items()]
    handles.append(Line2D([], [], color="#FF4040", linewidth=1.5, linestyle="--", label="slice without contour/image"))
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, labelcolor="white", fontsize=font_pt,
               bbox_to_anchor=(0.5, 2 / fig_h))
    layout = {"tiles": tiles, "width": fig_w, "height": fig_h, "order": order, "order_rule": order_rule,
              "contour_width_px": width, **window}
    return _png(fig, dpi), layout


def _short(message: str, limit: int = 150) -> str:
    return message if len(message) <= limit else message[:limit - 1].rstrip() + "…"


def _phase_list(phases: Sequence[int]) -> str:
    from services.segmentation.function import compact_ranges

    return compact_ranges(phases)


def curve_data(measurements: Mapping[str, Any], trigger_times_ms: Sequence[float] = ()) -> dict[str, Any]:
    """What `volume_curves` draws: x (ms, or phase numbers without trigger times), the LV/RV
    curves with NaN where nothing is drawn, the gap phases (null in the curve: a phase without all
    its images) and the notes written under the plot (the curve's quality flags)."""
    lv = [np.nan if v is None else v for v in measurements.get("lv_volume_curve_ml") or []]
    rv = [np.nan if v is None else v for v in measurements.get("rv_volume_curve_ml") or []]
    n = max(len(lv), len(rv))
    if n == 0:
        raise ValueError("the measurements have no volume curves")
    have_times = len(trigger_times_ms) == n
    x = np.asarray(trigger_times_ms if have_times else range(n), dtype=float)
    gaps = [t for t in range(n) if (t < len(lv) and np.isnan(lv[t])) or (t < len(rv) and np.isnan(rv[t]))]
    notes = [f"{q['code']}: {_short(q['message'])}" for q in measurements.get("quality", [])
             if q.get("code") in CURVE_FLAGS]
    if not have_times:
        notes.insert(0, "no trigger times in the series: x is the phase number")
    values = {}
    for name, curve in (("LV", lv), ("RV", rv)):
        v = np.asarray(curve, dtype=float)
        unlabelled = [t for t in range(len(v)) if v[t] == 0]
        if 0 < len(unlabelled) < len(v):  # a phase without this cavity is not a volume of 0 ml
            notes.append(f"{name}: no contour at phase(s) {_phase_list(unlabelled)}: not drawn")
            v[unlabelled] = np.nan
        values[name] = v
    return {"x": x, "have_times": have_times, "values": values, "gaps": gaps, "notes": notes}


def volume_curves(measurements: Mapping[str, Any], trigger_times_ms: Sequence[float] = (), dpi: int = 150) -> bytes:
    """LV/RV volume over the cardiac cycle as PNG bytes (the `measure_labels` document)."""
    import textwrap

    from matplotlib.figure import Figure

    data = curve_data(measurements, trigger_times_ms)
    x, have_times, values, notes = data["x"], data["have_times"], data["values"], data["notes"]
    n = len(x)
    wrapped = [textwrap.fill(note, 100, subsequent_indent="   ") for note in notes]
    note_lines = sum(w.count("\n") + 1 for w in wrapped)
    top_in, plot_in, bottom_in, line_in = 0.3, 2.2, 0.45, 0.11
    height = top_in + plot_in + bottom_in + line_in * note_lines + (0.08 if wrapped else 0)
    fig = Figure(figsize=(5.0, height), dpi=dpi, facecolor="white")
    ax = fig.add_axes((0.12, 1 - (top_in + plot_in) / height, 0.85, plot_in / height))

    step = float(np.median(np.diff(x))) if n > 1 else 1.0
    for i, t in enumerate(data["gaps"]):
        ax.axvspan(x[t] - step / 2, x[t] + step / 2, color=GAP_COLOUR, zorder=0,
                   label="phase lacks images: gap" if i == 0 else None)
    for name, colour, prefix in (("LV", _LV_COLOUR, "lv"), ("RV", _RV_COLOUR, "rv")):
        curve = values[name]
        if not len(curve) or not np.nan_to_num(curve).any():
            ax.plot([], [], " ", label=f"{name}: not segmented")
            continue
        ef = measurements.get(f"{prefix}_ef_pct")
        ef_text = f"EF {ef:.1f} %" if ef is not None else "EF not measured"
        ax.plot(x[:len(curve)], curve, "-o", color=colour, markersize=3.5, linewidth=1.6,
                label=f"{name} cavity ({ef_text})")
    for name, key, colour in (("ED", "ed_phase", _ED_COLOUR), ("ES", "es_phase", _ES_COLOUR)):
        phase = measurements.get(key)
        if phase is None:
            continue
        ax.axvline(x[phase], color=colour, linestyle="--", linewidth=1.2)
        right_half = x[phase] > (x[0] + x[-1]) / 2
        ax.annotate(f"{name} (phase {phase})", (x[phase], 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-3 if right_half else 3, -3), textcoords="offset points", va="top",
                    ha="right" if right_half else "left", fontsize=8, color=colour)
    ax.set_xlabel("trigger time (ms)" if have_times else "phase")
    ax.set_ylabel("volume (ml)")
    ax.set_xlim(x[0] - step / 2, x[-1] + step / 2)
    top = np.nanmax([np.nanmax(v) if np.isfinite(v).any() else 0 for v in values.values()] + [1.0])
    ax.set_ylim(0, top * 1.3)  # room for the ED/ES labels and the legend
    ax.grid(True, linewidth=0.4, alpha=0.6)
    ax.set_title("Ventricular volume over the cardiac cycle", fontsize=9)
    ax.legend(loc="lower center", fontsize=7.5, framealpha=0.85, ncol=2)
    if wrapped:
        fig.text(0.01, 0.02 / height, "\n".join(wrapped), fontsize=6, va="bottom", ha="left", color="#A03000")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


__all__ = ["CONTOUR_COLOURS", "CURVE_FLAGS", "base_to_apex", "contour_masks", "contour_mosaic", "curve_data",
           "direction_letters",
           "outline", "slice_positions_mm", "volume_curves"]
