"""Candidate regions of enhancement (LGE) or high T2 signal (edema) inside the myocardium.

Two standard, documented signal-threshold rules (see the SCMR post-processing recommendations,
Schulz-Menger et al., JCMR 2020, and Flett et al., JACC Imaging 2011 for LGE; Bondarenko et al.,
JCMR 2005 for n-SD):

* "n_sd": signal > mean + n x SD of remote (normal) myocardium. Remote myocardium is found
  automatically: the myocardium is split into `remote_sectors` equal angular sectors around the
  LV centre of each slice, pooled over slices, and the sector with the lowest mean signal is
  remote. SCMR suggests n = 2 for T2 edema; n = 5 tracks visual LGE size in acute infarction.
* "fwhm": signal >= 50% of the maximum myocardial signal (full width at half maximum).

Before thresholding, the myocardium mask loses a rim of `erode_mm` at both borders (partial
volume and cine-to-LGE misregistration would otherwise put blood pool into it). Connected
regions smaller than `min_area_px` (in-plane, per slice) are dropped as noise. The
"core" mask marks non-enhanced myocardium enclosed by enhancement within a slice (the dark core
of microvascular obstruction); the CMR-VL demo LGE figures show such cores in a second colour.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), dtype=bool)


def sector_index(myo3d: np.ndarray, lv3d: np.ndarray, spacing_xy: tuple[float, float], n_sectors: int) -> np.ndarray:
    """Angular sector (0..n-1) of each myocardial voxel around its slice's LV centre; -1 elsewhere."""
    sectors = np.full(myo3d.shape, -1, dtype=np.int16)
    for z in range(myo3d.shape[2]):
        if not myo3d[..., z].any():
            continue
        cx, cy = ndimage.center_of_mass(lv3d[..., z])
        xs, ys = np.nonzero(myo3d[..., z])
        angle = np.arctan2((ys - cy) * spacing_xy[1], (xs - cx) * spacing_xy[0])
        sectors[xs, ys, z] = np.floor((angle + np.pi) / (2 * np.pi / n_sectors)).astype(int) % n_sectors
    return sectors


def remote_reference(image3d: np.ndarray, myo3d: np.ndarray, lv3d: np.ndarray,
                     spacing_xy: tuple[float, float], n_sectors: int = 6,
                     min_pixels: int = 10) -> dict[str, Any]:
    """Mean and SD of the darkest myocardial sector (the remote myocardium)."""
    sectors = sector_index(myo3d, lv3d, spacing_xy, n_sectors)
    best = None
    for k in range(n_sectors):
        vals = image3d[sectors == k]
        if vals.size < min_pixels:
            continue
        mean = float(vals.mean())
        if best is None or mean < best["remote_mean"]:
            best = {"remote_sector": k, "remote_mean": mean, "remote_sd": float(vals.std()),
                    "remote_pixels": int(vals.size)}
    if best is None:
        vals = image3d[myo3d]
        if vals.size == 0:
            raise ValueError("no myocardium in this volume: cannot define remote myocardium")
        best = {"remote_sector": -1, "remote_mean": float(vals.mean()), "remote_sd": float(vals.std()),
                "remote_pixels": int(vals.size)}
    return best


def enhancement_masks(image3d: np.ndarray, labels3d: np.ndarray, spacing_xy: tuple[float, float],
                      rule: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(enhanced, core, meta): boolean masks inside the myocardium (label 2) of `labels3d`."""
    image3d = np.asarray(image3d, dtype=np.float64)
    myo = labels3d == 2
    erode_mm = float(rule.get("erode_mm", 0.0))
    if erode_mm > 0:
        # Masks carried over from the cine never sit exactly on the LGE/T2 myocardium (through-
        # plane mismatch, breath-hold shifts): drop the rim within erode_mm of either border so
        # that bright blood pool does not pass for enhancement or inflate the remote SD.
        for z in range(myo.shape[2]):
            if myo[..., z].any():
                depth = ndimage.distance_transform_edt(myo[..., z], sampling=spacing_xy)
                myo[..., z] = depth > erode_mm
    lv = np.isin(labels3d, [1, 2])
    method = rule["method"]
    if method == "n_sd":
        ref = remote_reference(image3d, myo, lv, spacing_xy, int(rule.get("remote_sectors", 6)))
        threshold = ref["remote_mean"] + float(rule["n_sd"]) * ref["remote_sd"]
        meta: dict[str, Any] = {"rule": f"{rule['n_sd']:g} SD above remote myocardium", **ref}
        enhanced = myo & (image3d > threshold)
    elif method == "fwhm":
        if not myo.any():
            raise ValueError("no myocardium in this volume")
        peak = float(image3d[myo].max())
        threshold = 0.5 * peak
        meta = {"rule": "full width at half maximum of myocardial signal", "peak": peak}
        enhanced = myo & (image3d >= threshold)
    else:
        raise ValueError(f"unknown enhancement rule {method!r}")
    min_area = int(rule.get("min_area_px", 0))
    core = np.zeros_like(enhanced)
    for z in range(enhanced.shape[2]):
        sl = enhanced[..., z]
        if not sl.any():
            continue
        lab, n = ndimage.label(sl, structure=_EIGHT)
        sizes = ndimage.sum_labels(sl, lab, index=np.arange(1, n + 1))
        keep = np.isin(lab, 1 + np.flatnonzero(sizes >= max(min_area, 1)))
        enhanced[..., z] = keep
        core[..., z] = ndimage.binary_fill_holes(keep) & ~keep & myo[..., z]
    meta.update(threshold=float(threshold), enhanced_voxels=int(enhanced.sum()), core_voxels=int(core.sum()))
    return enhanced, core, meta
