"""Arrange one series' frames on a regular (slice, phase) grid and find what is wrong with it.

Slices are ordered by position along the slice normal (never by InstanceNumber or file name),
phases by TriggerTime. Gaps are kept as empty cells (the volume holds zeros there) so the affine
stays exact for every slice that exists; each problem becomes an entry in `issues`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from services.preprocess import geometry
from services.preprocess.reader import Frame

POSITION_TOL_MM = 0.05  # frames closer than this along the normal share a slice
# Direction cosines closer than this (~0.6 deg) form one stack: which images may share a volume.
# Not geometry.IOP_TOLERANCE (rounding of one orientation), which flags drift within the stack.
ORIENTATION_TOL = 0.01
SPACING_TOL_MM = 1e-3
# Phases of a slice with gaps: an image sits at a phase when its position in the slice's cycle
# (trigger time / the slice's step) is within PHASE_TOL steps of the phase's (scanners write
# trigger times to a fraction of a millisecond, a phase step is tens of ms); the slice's step
# (RR / phases, one breath-hold each) is within STEP_RANGE of the series' median step.
PHASE_TOL = 0.15
STEP_RANGE = 0.25
MAX_UNFIT = 0.25  # the share of a slice's images its step may leave out (odd or extra images)


@dataclass
class Grid:
    cells: list[list[Frame | None]]  # [slice][phase]
    iop: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    affine: np.ndarray  # RAS+, voxel (col, row, slice) -> mm
    slice_step_mm: float | None
    trigger_times_ms: list[float]
    issues: list[dict] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return len(self.cells)

    @property
    def n_phases(self) -> int:
        return len(self.cells[0]) if self.cells else 0

    @property
    def normal(self) -> np.ndarray:
        return geometry.slice_normal(self.iop)

    @property
    def frames(self) -> list[Frame]:
        return [f for row in self.cells for f in row if f is not None]


def median(values) -> np.ndarray:
    """Median along the first axis. (np.median's first call imports numpy.ma: ~50 ms of a
    command that takes well under a second.)"""
    a = np.sort(np.asarray(values, dtype=float), axis=0)
    return (a[(len(a) - 1) // 2] + a[len(a) // 2]) / 2


def _same_plane(a: Frame, b: Frame) -> bool:
    return max(abs(x - y) for x, y in zip(a.iop, b.iop)) < ORIENTATION_TOL


def same_geometry(a: Frame, b: Frame) -> bool:
    """Same orientation (within tolerance), pixel spacing and matrix: one stack can hold both."""
    return (_same_plane(a, b) and (a.rows, a.cols) == (b.rows, b.cols)
            and max(abs(x - y) for x, y in zip(a.pixel_spacing, b.pixel_spacing)) < SPACING_TOL_MM)


def _cluster_positions(values: np.ndarray) -> list[list[int]]:
    """Indices of values grouped into clusters whose neighbours are < POSITION_TOL_MM apart."""
    order = np.argsort(values, kind="stable")
    clusters: list[list[int]] = []
    last = None
    for idx in order:
        if last is None or values[idx] - last > POSITION_TOL_MM:
            clusters.append([])
        clusters[-1].append(int(idx))
        last = values[idx]
    return clusters


def _split_geometry(frames: list[Frame], issues: list[dict]) -> list[Frame]:
    """Keep the largest group of frames sharing orientation, pixel spacing and matrix."""
    placed = [f for f in frames if f.ipp and f.iop and f.pixel_spacing]
    unplaced = [f for f in frames if not (f.ipp and f.iop and f.pixel_spacing)]
    if unplaced:
        issues.append({"type": "missing_geometry",
                       "detail": f"{len(unplaced)} frame(s) lack ImagePositionPatient/"
                                 "ImageOrientationPatient/PixelSpacing; left out of the volume",
                       "excluded": sorted({f.file for f in unplaced})})
    groups: list[list[Frame]] = []  # few groups: compare each frame with each group's first
    for f in placed:
        group = next((g for g in groups if same_geometry(g[0], f)), None)
        if group is None:
            groups.append([f])
        else:
            group.append(f)
    if len(groups) <= 1:
        return placed
    ranked = sorted(groups, key=len, reverse=True)
    keep = ranked[0]
    for other in ranked[1:]:
        f0, k0 = other[0], keep[0]
        if not _same_plane(f0, k0):
            kind, what = "inconsistent_geometry", f"orientation {list(f0.iop)}"
        elif (f0.rows, f0.cols) != (k0.rows, k0.cols):
            kind, what = "inconsistent_matrix", f"matrix {f0.rows}x{f0.cols}"
        else:
            kind, what = "inconsistent_pixel_spacing", f"pixel spacing {list(f0.pixel_spacing)}"
        issues.append({"type": kind,
                       "detail": f"{len(other)} of {len(placed)} frames have {what}, unlike the "
                                 f"{len(keep)} kept; they are left out of the volume",
                       "excluded": sorted({f.file for f in other})})
    return keep


def _slice_grid(positions: np.ndarray, issues: list[dict]) -> tuple[list[int | None], float | None]:
    """Map sorted distinct slice positions to grid indices, inserting gaps for missing slices.

    Returns grid (for each grid slot, index into positions or None) and the step in mm."""
    n = len(positions)
    if n == 1:
        return [0], None
    diffs = np.diff(positions)
    step = float(median(diffs))
    # With a missing slice the median can still be a double step when few slices remain;
    # the smallest gap that is a whole fraction of the others is the true step.
    smallest = float(diffs.min())
    if smallest > 0 and np.allclose(diffs / smallest, np.round(diffs / smallest), atol=0.05):
        step = smallest
    grid: list[int | None] = [0]
    irregular = False
    for i, d in enumerate(diffs):
        ratio = d / step
        whole = int(round(ratio))
        if whole >= 2 and abs(ratio - whole) < 0.1:
            for _ in range(whole - 1):
                issues.append({"type": "missing_slice", "slice": len(grid),
                               "detail": f"no images at {d / whole:.2f} mm steps between "
                                         f"slices at {positions[i]:.2f} and "
                                         f"{positions[i + 1]:.2f} mm along the normal; "
                                         "the volume holds zeros there"})
                grid.append(None)
        elif abs(ratio - 1) > 0.05:
            irregular = True
        grid.append(i + 1)
    if irregular:
        issues.append({"type": "irregular_slice_spacing",
                       "detail": f"slice gaps {np.round(diffs, 2).tolist()} mm are not a whole "
                                 f"multiple of {step:.2f} mm; the affine is approximate"})
    return grid, step


def _sort_key(has_trigger: bool):
    if has_trigger:
        return lambda f: (f.trigger_time_ms, f.temporal_index or 0, f.instance_number or 0,
                          f.frame_number or 0)
    return lambda f: (f.temporal_index or 0, f.instance_number or 0, f.frame_number or 0)


def _cycle_step(times: list[float]) -> float | None:
    """A complete slice's trigger-time step: its median gap. Slices of one series often differ
    in RR (one breath-hold each), so each has its own."""
    return float(median(np.diff(times))) if len(times) > 1 else None


def _cycle_units(frames: list[Frame], step: float) -> np.ndarray:
    return np.array([f.trigger_time_ms for f in frames]) / step


def _candidate_steps(times: np.ndarray, ref_units: np.ndarray, series_step: float) -> np.ndarray:
    """The steps a slice with gaps may have: the series' step, and each step that puts one of
    its images exactly on one of the series' phases, within STEP_RANGE of the series' step.
    (Its own median gap is no estimate: with every other phase gone it is a double step.)"""
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = times[:, None] / ref_units[None, :]
    steps = steps[np.isfinite(steps) & (np.abs(steps / series_step - 1) <= STEP_RANGE)]
    return np.unique(np.append(steps, series_step))


def _match(units: np.ndarray, ref_units: np.ndarray) -> tuple[np.ndarray, float]:
    """Each image's phase (-1: none within PHASE_TOL is free), one image per phase, matched
    globally (linear_sum_assignment): a gap does not push later images one phase on. A far
    match costs as much as leaving the image out, so the assignment never shifts a run of
    images by a phase each to make room for one odd image. Returns (phases, cost)."""
    from scipy.optimize import linear_sum_assignment  # only slices that do not fit get here

    dist = np.abs(units[:, None] - ref_units[None, :])
    cost = np.where(dist <= PHASE_TOL, dist, 1.0)
    rows, cols = linear_sum_assignment(cost)
    phases = np.full(len(units), -1)
    fits = dist[rows, cols] <= PHASE_TOL
    phases[rows[fits]] = cols[fits]
    return phases, float(cost[rows, cols].sum())


def _place_by_time(frames: list[Frame], ref_units: np.ndarray, series_step: float
                   ) -> tuple[list[Frame | None], list[Frame], list[Frame], float]:
    """Match a slice's frames to the series' phases by their position in the slice's own cycle
    (trigger time / its step), trying each step the slice may have (_candidate_steps) and
    keeping the one that fits best. An image is placed only where every step that fits as
    many images puts it: when the images left do not pin the slice's step down (one image late
    in the cycle, say), it could be at more than one phase and stays out.
    Returns (row, frames that fit no phase, frames of uncertain phase, the step used)."""
    times = np.array([f.trigger_time_ms for f in frames])
    tried = [(_match(times / step, ref_units), step)
             for step in _candidate_steps(times, ref_units, series_step)]
    (best, _), step = min(tried, key=lambda t: t[0][1])
    n_out = int((best < 0).sum())
    if n_out > len(frames) * MAX_UNFIT:
        # Not the slice's cycle (its RR is outside STEP_RANGE, or its times are garbage): what
        # this step fits, it fits by chance.
        return [None] * len(ref_units), list(frames), [], float(step)
    sure = best >= 0
    for phases, _ in (t[0] for t in tried):
        if (phases < 0).sum() <= n_out:
            sure &= phases == best
    row: list[Frame | None] = [None] * len(ref_units)
    for i in np.flatnonzero(sure):
        row[best[i]] = frames[i]
    unfit = [f for f, p in zip(frames, best) if p < 0]
    uncertain = [f for f, p, ok in zip(frames, best, sure) if p >= 0 and not ok]
    return row, unfit, uncertain, float(step)


def _place_untimed(row: list[Frame | None], timed: list[Frame], untimed: list[Frame]
                   ) -> tuple[list[Frame], list[Frame]]:
    """Put images without a trigger time into the empty cells their InstanceNumber order points
    to: a run of untimed images between two placed neighbours (in InstanceNumber order) fills
    the empty cells between those neighbours' phases when the counts match. Frames of one
    enhanced file share an InstanceNumber: their TemporalPositionIndex orders them instead.
    Returns (placed, left out)."""
    cell = {id(f): p for p, f in enumerate(row) if f is not None}
    anchors = [f for f in timed if id(f) in cell]
    frames = anchors + untimed
    numbers = [f.instance_number for f in frames]
    if len(set(numbers)) < len(frames):
        numbers = [f.temporal_index for f in frames]
    if None in numbers or len(set(numbers)) < len(frames):
        return [], untimed  # no order to go by
    order = {id(f): n for f, n in zip(frames, numbers)}
    placed, left = [], []
    sequence = sorted(frames, key=lambda f: order[id(f)])
    run: list[Frame] = []
    last = -1
    for f in sequence + [None]:
        if f is not None and id(f) not in cell:
            run.append(f)
            continue
        if run:
            stop = cell[id(f)] if f is not None else len(row)
            empty = [p for p in range(last + 1, stop) if row[p] is None]
            if len(empty) == len(run):
                for p, g in zip(empty, run):
                    row[p] = g
                placed += run
            else:
                left += run
            run = []
        if f is not None:
            last = cell[id(f)]
    return placed, left


def _report_unplaced(issues: list[dict], slice_index: int, unfit: list[Frame],
                     uncertain: list[Frame]) -> None:
    why = []
    if unfit:
        why.append(f"{len(unfit)} have trigger times no free phase of the series is near (at "
                   f"any cycle length within {STEP_RANGE:.0%} of the series')")
    if uncertain:
        why.append(f"{len(uncertain)} could be at more than one phase (the slice's other images "
                   "do not pin its cycle length down)")
    if why:
        issues.append({"type": "unplaced_image", "slice": slice_index,
                       "detail": f"{len(unfit) + len(uncertain)} image(s) of slice {slice_index} "
                                 f"left out of the volume: {'; '.join(why)}",
                       "excluded": sorted(f.file for f in unfit + uncertain)})


def _assign_phases(by_slice: list[list[Frame]], issues: list[dict], grid_slices: list[int | None],
                   has_trigger: bool) -> tuple[list[list[Frame | None]], list[float]]:
    """Order each slice's frames by TriggerTime and align them to a common phase axis.

    Slices with every phase define the phase axis and, when their images sit on it in order
    (the common case), are taken as they are. Other slices are matched to it by position in
    the cycle, images without a trigger time by InstanceNumber order; what cannot be placed is
    reported and its cell left empty."""
    key = _sort_key(has_trigger)
    slot = {source: k for k, source in enumerate(grid_slices) if source is not None}
    timed_by_slice, untimed_by_slice = [], []
    for s, frames in enumerate(by_slice):
        timed = sorted((f for f in frames if not has_trigger or f.trigger_time_ms is not None),
                       key=key)
        if has_trigger:  # the same trigger time twice at one position is a duplicate image
            seen: dict[float, Frame] = {}
            for f in timed:
                if f.trigger_time_ms in seen:
                    issues.append({"type": "duplicate_image",
                                   "detail": f"{f.file} repeats trigger time "
                                             f"{f.trigger_time_ms} ms at slice {slot[s]}; "
                                             "ignored"})
                else:
                    seen[f.trigger_time_ms] = f
            timed = list(seen.values())
        timed_by_slice.append(timed)
        untimed_by_slice.append([f for f in frames if has_trigger and f.trigger_time_ms is None])
    n_phases = max(len(fs) for fs in timed_by_slice)
    full = [fs for fs in timed_by_slice if len(fs) == n_phases]
    if has_trigger:
        ref = median([[f.trigger_time_ms for f in fs] for fs in full])
        # The phase axis in steps of each full slice's own cycle (slices differ in RR).
        steps = [_cycle_step([f.trigger_time_ms for f in fs]) or 1.0 for fs in full]
        series_step = float(median(steps))
        units = [_cycle_units(fs, st) for fs, st in zip(full, steps)]
        ref_units = median(units)
        if n_phases > 1 and max(np.diff(u).max() for u in units) > 1.5:
            # No slice has every phase: the fullest have gaps too, in other places. The axis
            # is then the whole steps from the earliest of their images to the latest.
            origin = min(u[0] for u in units)
            n_axis = max(int(round(u[-1] - origin)) for u in units) + 1
            issues.append({"type": "incomplete_phase_axis",
                           "detail": f"no slice has every phase (the fullest have {n_phases} "
                                     f"images with gaps); the phase axis is {n_axis} whole "
                                     "steps of their cycles, without any phase that no slice "
                                     "has before its first or after its last image"})
            n_phases, ref_units = n_axis, origin + np.arange(n_axis)
            ref = ref_units * series_step
    else:
        ref = np.zeros(n_phases)
    cells: list[list[Frame | None]] = []
    expected_ms = []  # per slice, where in its own cycle each phase is
    for s, (timed, untimed) in enumerate(zip(timed_by_slice, untimed_by_slice)):
        row: list[Frame | None] = list(timed) + [None] * (n_phases - len(timed))
        expected_ms.append(ref)
        if has_trigger and timed and n_phases > 1:  # one phase: nothing to match
            step = _cycle_step([f.trigger_time_ms for f in timed]) if len(timed) == n_phases \
                else None
            # The common case, every phase in order, needs no matching.
            if step is None or np.abs(_cycle_units(timed, step) - ref_units).max() > 0.5:
                row, unfit, uncertain, step = _place_by_time(timed, ref_units, series_step)
                _report_unplaced(issues, slot[s], unfit, uncertain)
            expected_ms[-1] = ref_units * step
        if untimed:
            placed, left = _place_untimed(row, timed, untimed)
            for f in placed:
                p = row.index(f)
                issues.append({"type": "missing_trigger_time", "slice": slot[s], "phase": p,
                               "detail": f"{f.file} has no TriggerTime; placed at phase "
                                         f"{p} of slice {slot[s]} by its InstanceNumber "
                                         "among the slice's other images"})
            if left:
                issues.append({"type": "missing_trigger_time",
                               "detail": f"{len(left)} image(s) of slice {slot[s]} have no "
                                         "TriggerTime and their InstanceNumbers do not point "
                                         "to one empty phase; left out of the volume",
                               "excluded": sorted(f.file for f in left)})
        cells.append(row)
    for grid_index, source in enumerate(grid_slices):
        if source is None:
            continue
        for p, f in enumerate(cells[source]):
            if f is None:
                issues.append({"type": "missing_phase", "slice": grid_index, "phase": p,
                               "detail": f"slice {grid_index} has no image near trigger time "
                                         f"{expected_ms[source][p]:.1f} ms; the volume holds "
                                         "zeros there"})
    return cells, [round(float(t), 3) for t in ref]


def build_grid(frames: list[Frame]) -> Grid | None:
    """Arrange a series' frames into slices x phases; None when none has usable geometry."""
    issues: list[dict] = []
    frames = _split_geometry(frames, issues)
    if not frames:
        return None
    ref = frames[0]
    normal = geometry.slice_normal(ref.iop)
    ipps = np.array([f.ipp for f in frames])
    dist = ipps @ normal
    clusters = _cluster_positions(dist)
    positions = np.array([dist[c].mean() for c in clusters])
    slot_of, step = _slice_grid(positions, issues)
    # A series is timed when most images have a trigger time; the others are placed by
    # InstanceNumber or left out, instead of the whole series losing its phase axis.
    has_trigger = sum(f.trigger_time_ms is not None for f in frames) * 2 > len(frames)
    by_slice = [[frames[i] for i in c] for c in clusters]
    if not has_trigger and any(len(fs) > 1 for fs in by_slice):
        issues.append({"type": "ambiguous_order",
                       "detail": "several images per slice position without TriggerTime; "
                                 "ordered by temporal index / InstanceNumber"})
    cells_by_source, trigger_times = _assign_phases(by_slice, issues, slot_of, has_trigger)
    empty = [None] * len(cells_by_source[0])
    cells = [cells_by_source[s] if s is not None else list(empty) for s in slot_of]

    # Affine from the first and last slices that exist, so gaps do not bend it.
    present = [(k, s) for k, s in enumerate(slot_of) if s is not None]
    (k0, s0), (k1, s1) = present[0], present[-1]
    ipp0 = np.mean([f.ipp for f in by_slice[s0]], axis=0)
    ipp1 = np.mean([f.ipp for f in by_slice[s1]], axis=0)
    step_vec = (ipp1 - ipp0) / (k1 - k0) if k1 > k0 else \
        normal * float(ref.spacing_between_slices or ref.slice_thickness or 1.0)
    affine = geometry.nifti_affine(ipp0, ref.iop, ref.pixel_spacing, step_vec)
    # Every image must sit where the affine puts its slice (catches in-plane shifts too).
    worst = 0.0
    for k, s in present:
        predicted = ipp0 + (k - k0) * step_vec
        for f in by_slice[s]:
            worst = max(worst, float(np.linalg.norm(np.asarray(f.ipp) - predicted)))
    drift = geometry.orientation_deviation([f.iop for f in frames], ref.iop)
    if drift > geometry.IOP_TOLERANCE:  # more than rounding (the SR/SEG writers' limit too)
        issues.append({"type": "inconsistent_geometry",
                       "detail": f"orientation varies by up to {np.degrees(drift):.2f} deg "
                                 "between images; the affine uses the first image's"})
    if worst > 0.1 and not any(i["type"] == "irregular_slice_spacing" for i in issues):
        issues.append({"type": "inconsistent_geometry",
                       "detail": f"image positions deviate up to {worst:.2f} mm from a regular "
                                 "stack; the affine is approximate"})
    return Grid(cells=cells, iop=ref.iop, pixel_spacing=ref.pixel_spacing, rows=ref.rows,
                cols=ref.cols, affine=affine,
                slice_step_mm=float(np.linalg.norm(step_vec)) if k1 > k0 else step,
                trigger_times_ms=trigger_times if has_trigger else [], issues=issues)


def volume(grid: Grid) -> np.ndarray:
    """The grid's voxels after rescale, shaped (cols, rows, slices[, phases]).

    Integer data with identity rescale keeps its stored dtype; otherwise float32."""
    frames = grid.frames
    identity = all(f.slope == 1 and f.intercept == 0 for f in frames)
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    dtype = Counter(f.pixels.dtype for f in frames).most_common(1)[0][0] if identity else \
        (np.int32 if integral else np.float32)
    # Filled as (phase, slice, row, col) in C order: its transpose is the NIfTI (x, y, z, t)
    # array in Fortran order, so writing needs no copy.
    data = np.zeros((grid.n_phases, grid.n_slices, grid.rows, grid.cols), dtype=dtype)
    for k, row in enumerate(grid.cells):
        for t, f in enumerate(row):
            if f is None:
                continue
            if identity:
                data[t, k] = f.pixels
            else:
                data[t, k] = f.pixels * f.slope + f.intercept
    out = data.T
    return out[..., 0] if grid.n_phases == 1 else out
