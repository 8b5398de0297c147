"""DICOM patient coordinates (LPS) <-> NIfTI world coordinates (RAS+): the one place this lives.

DICOM positions (ImagePositionPatient, IPP) and directions (ImageOrientationPatient, IOP) are in
the patient's LPS frame: +x towards the patient's Left, +y Posterior, +z Superior. NIfTI affines
(and everything this project writes) use RAS+: +x Right, +y Anterior, +z Superior. So x and y
flip sign and z is shared.

Voxel axes of every volume the project writes (document once, use everywhere):
  i (NIfTI x) = DICOM column index (steps along IOP[0:3], the row direction, by PixelSpacing[1])
  j (NIfTI y) = DICOM row index    (steps along IOP[3:6], the column direction, by PixelSpacing[0])
  k (NIfTI z) = slice, ordered by position along the normal IOP[0:3] x IOP[3:6] (ascending)
  t           = cardiac phase, ordered by TriggerTime (4D cine only)
so a DICOM frame `pixel_array[row, col]` lands at `volume[col, row, k, t]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Flips x and y; its own inverse. Applies to homogeneous 4-vectors and 4x4 affines.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS_TO_LPS = LPS_TO_RAS
_FLIP3 = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(points: Sequence[float] | np.ndarray) -> np.ndarray:
    """Convert point(s) of shape (..., 3) from DICOM LPS to RAS+ mm."""
    return np.asarray(points, dtype=float) * _FLIP3


def ras_to_lps(points: Sequence[float] | np.ndarray) -> np.ndarray:
    """Convert point(s) of shape (..., 3) from RAS+ to DICOM LPS mm."""
    return np.asarray(points, dtype=float) * _FLIP3


def orientation_vectors(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(row_direction, column_direction) unit vectors in LPS from ImageOrientationPatient.

    row_direction is the direction of increasing column index (along a row)."""
    iop = np.asarray(iop, dtype=float)
    return iop[:3], iop[3:6]


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal (LPS) of an image plane: row_direction x column_direction."""
    row, col = orientation_vectors(iop)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def position_along_normal(ipp: Sequence[float], iop: Sequence[float]) -> float:
    """Signed distance (mm) of a slice along its normal: the key that orders slices."""
    return float(np.dot(np.asarray(ipp, dtype=float), slice_normal(iop)))


def pixel_to_lps(ipp: Sequence[float], iop: Sequence[float], pixel_spacing: Sequence[float],
                 col: float | np.ndarray, row: float | np.ndarray) -> np.ndarray:
    """LPS position (mm) of pixel centre (row, col) of a frame, per DICOM PS3.3 C.7.6.2.1.1.

    pixel_spacing is DICOM PixelSpacing: [distance between rows, distance between columns]."""
    row_dir, col_dir = orientation_vectors(iop)
    col = np.asarray(col, dtype=float)[..., None]
    row = np.asarray(row, dtype=float)[..., None]
    return (np.asarray(ipp, dtype=float) + col * float(pixel_spacing[1]) * row_dir
            + row * float(pixel_spacing[0]) * col_dir)


def affine_lps(ipp: Sequence[float], iop: Sequence[float], pixel_spacing: Sequence[float],
               slice_step: Sequence[float] | None = None) -> np.ndarray:
    """4x4 affine mapping voxel (i=col, j=row, k=slice, 1) to LPS mm.

    slice_step is the LPS vector from one slice's IPP to the next; without it (a single slice)
    the k axis is the unit normal (scale it yourself if a thickness is known)."""
    row_dir, col_dir = orientation_vectors(iop)
    step = slice_normal(iop) if slice_step is None else np.asarray(slice_step, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * float(pixel_spacing[1])
    affine[:3, 1] = col_dir * float(pixel_spacing[0])
    affine[:3, 2] = step
    affine[:3, 3] = np.asarray(ipp, dtype=float)
    return affine


def nifti_affine(ipp: Sequence[float], iop: Sequence[float], pixel_spacing: Sequence[float],
                 slice_step: Sequence[float] | None = None) -> np.ndarray:
    """4x4 affine mapping voxel (i=col, j=row, k=slice, 1) to RAS+ mm (what NIfTI stores)."""
    return LPS_TO_RAS @ affine_lps(ipp, iop, pixel_spacing, slice_step)


def affine_from_positions(positions: np.ndarray, iop: Sequence[float],
                          pixel_spacing: Sequence[float], slice_thickness: float | None = None
                          ) -> np.ndarray:
    """RAS+ affine of a regular stack from its slices' IPPs (n, 3), already ordered along k.

    The slice step is the mean IPP difference, which equals every step in a regular stack."""
    positions = np.asarray(positions, dtype=float).reshape(-1, 3)
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = slice_normal(iop) * float(slice_thickness or 1.0)
    return nifti_affine(positions[0], iop, pixel_spacing, step)


def voxel_to_ras(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to voxel indices of shape (..., 3)."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


# Direction cosines of ImageOrientationPatient that differ by less than this are one orientation
# written with rounding (scanners print 6 or fewer decimals; 1e-4 is about 0.006 degrees).
# Preprocessing flags a larger drift within a stack, and the DICOM SEG/SR writers accept images up
# to it as one plane orientation: the same number on both sides.
IOP_TOLERANCE = 1e-4


def orientation_deviation(iops: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Largest absolute difference of any direction cosine of `iops` from `reference`."""
    diffs = np.abs(np.asarray(iops, dtype=float).reshape(-1, 6) - np.asarray(reference, dtype=float))
    return float(diffs.max()) if diffs.size else 0.0


# Nominal LV long axis from base to apex in RAS+: the apex points left (-x), anterior (+y) and
# inferior (-z). Short-axis planning keeps the slice normal within ~45 deg of this axis (either
# sign), so the sign of the dot product tells which end of the stack is the apex.
APEX_DIRECTION_RAS = np.array([-1.0, 1.0, -1.0]) / np.sqrt(3.0)
# Below this |cos| the slice normal is too oblique to trust anatomy; fall back to LV size.
MIN_APEX_COS = 0.3


def apex_at_high_index(affine: np.ndarray, lv_mask: np.ndarray | None = None) -> tuple[bool, dict]:
    """Does the slice index (affine column 2) grow towards the apex? The one rule the findings
    inputs, the report figures and the measuring code's apex check share.

    Primary rule: the slice normal (RAS+) against the nominal base->apex axis. Fallback for very
    oblique stacks: the LV (cavity + myocardium, ``lv_mask`` (x, y, slice)) shrinks towards the apex.
    """
    affine = np.asarray(affine, dtype=float)
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    cos = float(normal @ APEX_DIRECTION_RAS)
    if abs(cos) >= MIN_APEX_COS or lv_mask is None:
        return cos > 0, {"apex_rule": "slice_normal", "normal_cos_apex": round(cos, 4)}
    area = np.asarray(lv_mask, dtype=bool).sum(axis=(0, 1)).astype(float)
    idx = np.flatnonzero(area)
    if len(idx) < 2:
        return cos > 0, {"apex_rule": "slice_normal", "normal_cos_apex": round(cos, 4)}
    slope = float(np.polyfit(idx, area[idx], 1)[0])
    return slope < 0, {"apex_rule": "lv_area_trend", "normal_cos_apex": round(cos, 4), "area_slope_px": slope}
