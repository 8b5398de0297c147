"""Short-axis stack geometry for the findings inputs: apex/base order, slice choice, label
resampling between grids, and square heart-centred crops.

Arrays follow the project's NIfTI convention: axis 0 = DICOM column (x), axis 1 = DICOM row (y),
axis 2 = slice along the slice normal, optional axis 3 = cardiac phase; affines map voxel indices
to RAS+ mm. Crops are returned with rows = DICOM rows, i.e. in the scanner's display orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from services.preprocess.geometry import apex_at_high_index, voxel_to_ras

LV_CAVITY, LV_MYO, RV_CAVITY = 1, 2, 3


class EmptyMask(ValueError):
    """The labels needed to place the heart are absent (empty or failed segmentation)."""


@dataclass(frozen=True)
class Volume:
    data: np.ndarray
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm

    @property
    def spacing_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def as_volume(img: Any, affine: np.ndarray | None = None) -> Volume:
    """Accept a nibabel image, a (array, affine) pair, or an array plus `affine`."""
    if hasattr(img, "dataobj") and hasattr(img, "affine"):
        return Volume(np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=float))
    if isinstance(img, tuple) and len(img) == 2:
        return Volume(np.asarray(img[0]), np.asarray(img[1], dtype=float))
    if affine is None:
        raise TypeError("need a nibabel image, an (array, affine) pair, or an affine")
    return Volume(np.asarray(img), np.asarray(affine, dtype=float))


def as_labels(arr: np.ndarray) -> np.ndarray:
    return np.rint(np.asarray(arr)).astype(np.uint8)


def end_diastolic_phase(labels4d: np.ndarray) -> int:
    """ED = the phase with the largest LV cavity."""
    return int(np.argmax((labels4d == LV_CAVITY).reshape(-1, labels4d.shape[-1]).sum(axis=0)))


def slices_with(labels3d: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Indices (ascending) of slices that contain any of `labels`."""
    present = np.isin(labels3d, list(labels)).any(axis=(0, 1))
    return np.flatnonzero(present)


def ordered_slices(
    labels3d: np.ndarray, affine: np.ndarray, labels: Sequence[int], order: str = "apex_to_base"
) -> tuple[np.ndarray, dict[str, Any]]:
    """Slices containing `labels`, ordered apex->base (or base->apex)."""
    idx = slices_with(labels3d, labels)
    if len(idx) == 0:
        raise EmptyMask(f"no slice contains labels {list(labels)}: cannot place the heart")
    apex_high, meta = apex_at_high_index(affine, np.isin(labels3d, [LV_CAVITY, LV_MYO]))
    apex_first = idx[::-1] if apex_high else idx
    if order == "apex_to_base":
        out = apex_first
    elif order == "base_to_apex":
        out = apex_first[::-1]
    else:
        raise ValueError(f"unknown slice order {order!r}")
    return np.asarray(out), {**meta, "slice_order": order}


def pick_evenly(ordered: np.ndarray, count: int) -> list[int]:
    """`count` slices spread evenly over `ordered` (first and last kept; repeats if too few)."""
    pos = np.rint(np.linspace(0, len(ordered) - 1, count)).astype(int)
    return [int(ordered[p]) for p in pos]


def resample_labels(labels: Volume, target_shape: Sequence[int], target_affine: np.ndarray) -> np.ndarray:
    """Carry a 3D label map into another grid through patient (RAS+) coordinates, nearest neighbour.

    Every target voxel centre is mapped to world mm by the target affine and back into the source
    voxel grid by the inverse source affine; voxels that fall outside the source grid get 0.
    """
    if labels.data.ndim != 3:
        raise ValueError("resample_labels takes a 3D label map (pick the phase first)")
    ijk = np.indices(tuple(target_shape[:3]), dtype=float).reshape(3, -1).T
    world = voxel_to_ras(target_affine, ijk)  # (N, 3) RAS+ mm
    src = voxel_to_ras(np.linalg.inv(labels.affine), world)  # source voxel indices
    out = ndimage.map_coordinates(as_labels(labels.data), src.T, order=0, mode="constant", cval=0)
    return out.reshape(tuple(target_shape[:3])).astype(np.uint8)


@dataclass(frozen=True)
class CropBox:
    """A square field of view in one stack's in-plane voxel grid."""

    center_xy: tuple[float, float]  # voxel index (float) of the crop centre
    side_mm: float
    spacing_xy: tuple[float, float]

    def as_meta(self) -> dict[str, Any]:
        return {"center_xy_vox": [round(float(c), 3) for c in self.center_xy],
                "side_mm": round(float(self.side_mm), 3),
                "spacing_xy_mm": [round(float(s), 5) for s in self.spacing_xy]}


def heart_crop_box(label_stack: np.ndarray, spacing_mm: Sequence[float], labels: Sequence[int],
                   margin_mm: float) -> CropBox:
    """Square box around the in-plane bounding box of `labels` (over all slices/phases) + margin."""
    present = np.isin(label_stack, list(labels))
    xs = np.flatnonzero(present.any(axis=tuple(a for a in range(present.ndim) if a != 0)))
    ys = np.flatnonzero(present.any(axis=tuple(a for a in range(present.ndim) if a != 1)))
    if len(xs) == 0:
        raise EmptyMask(f"labels {list(labels)} are empty: cannot crop around the heart")
    sx, sy = float(spacing_mm[0]), float(spacing_mm[1])
    extent = max((xs[-1] - xs[0] + 1) * sx, (ys[-1] - ys[0] + 1) * sy)
    center = ((xs[0] + xs[-1]) / 2.0, (ys[0] + ys[-1]) / 2.0)
    return CropBox(center, extent + 2.0 * margin_mm, (sx, sy))


def sample_crop(slice2d: np.ndarray, box: CropBox, out_px: int, order: int = 1) -> np.ndarray:
    """Resample the box of a 2D slice (x, y) onto an out_px x out_px grid, rows = y.

    Crop and resize in one interpolation; outside the image is 0. Anisotropic pixels are honoured
    because the grid step is in mm.
    """
    step = box.side_mm / out_px
    offs = (np.arange(out_px) + 0.5 - out_px / 2.0) * step
    gx = box.center_xy[0] + offs / box.spacing_xy[0]
    gy = box.center_xy[1] + offs / box.spacing_xy[1]
    yy, xx = np.meshgrid(gy, gx, indexing="ij")  # rows follow y, columns follow x
    return ndimage.map_coordinates(np.asarray(slice2d, dtype=np.float32), [xx, yy], order=order,
                                   mode="constant", cval=0.0)


def box_to_voxel(box: CropBox, out_px: int, row: float, col: float) -> tuple[float, float]:
    """Voxel (x, y) of an output pixel centre; inverse of `sample_crop`'s grid (for tests/overlays)."""
    step = box.side_mm / out_px
    x = box.center_xy[0] + (col + 0.5 - out_px / 2.0) * step / box.spacing_xy[0]
    y = box.center_xy[1] + (row + 0.5 - out_px / 2.0) * step / box.spacing_xy[1]
    return x, y


def window_uint8(stack: np.ndarray, weight_mask: np.ndarray | None = None,
                 low_pct: float = 1.0, high_pct: float = 99.0) -> tuple[np.ndarray, dict[str, float]]:
    """Map intensities to 0..255 with one percentile window for the whole input (slices comparable)."""
    values = stack[weight_mask] if weight_mask is not None and weight_mask.any() else stack.reshape(-1)
    lo, hi = np.percentile(values, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((stack - lo) / (hi - lo), 0.0, 1.0) * 255.0
    return np.rint(out).astype(np.uint8), {"window_low": float(lo), "window_high": float(hi)}
