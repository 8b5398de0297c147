"""Cardiac function from phase-wise label maps (issue 4).

Plain numpy/nibabel logic, no gRPC: volumes from voxel counts times the voxel volume of the
affine, ED/ES selection, EDV/ESV/SV/EF, LV mass, BSA-indexed values, quality flags and adult
normal reference ranges. Labels follow the platform convention: 1 LV cavity, 2 LV myocardium,
3 RV cavity.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

LV_CAVITY, LV_MYOCARDIUM, RV_CAVITY = 1, 2, 3
CLASS_NAMES = {LV_CAVITY: "LV cavity", LV_MYOCARDIUM: "LV myocardium", RV_CAVITY: "RV cavity"}
MYOCARDIAL_DENSITY_G_PER_ML = 1.05

# Keys always present in the result of `measure_labels` (None where not measurable).
MEASUREMENT_KEYS = (
    "lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "lv_mass_g",
    "rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct",
)
INDEXED_KEYS = {
    "lv_edvi_ml_m2": "lv_edv_ml", "lv_esvi_ml_m2": "lv_esv_ml", "lv_svi_ml_m2": "lv_sv_ml",
    "lv_massi_g_m2": "lv_mass_g",
    "rv_edvi_ml_m2": "rv_edv_ml", "rv_esvi_ml_m2": "rv_esv_ml", "rv_svi_ml_m2": "rv_sv_ml",
}


def voxel_volume_ml(affine) -> float:
    """Volume of one voxel in ml: |det| of the affine's 3x3 part is mm^3 per voxel."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def bsa_mosteller_m2(height_m: float, weight_kg: float) -> float:
    """Body-surface area, Mosteller: sqrt(height_cm * weight_kg / 3600)."""
    if height_m <= 0 or weight_kg <= 0:
        raise ValueError("height and weight must be positive")
    return math.sqrt(height_m * 100.0 * weight_kg / 3600.0)


def keep_largest_components(labels_3d: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Keep the largest 3D connected component of each class (26-connectivity).

    Returns the cleaned map and, per class, how many voxels were removed (only classes with removals).
    """
    from scipy import ndimage  # scipy comes with nnunetv2

    cleaned = labels_3d.copy()
    removed: dict[int, int] = {}
    structure = ndimage.generate_binary_structure(3, 3)
    for cls in CLASS_NAMES:
        components, n = ndimage.label(labels_3d == cls, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(components.ravel())[1:]
        drop = (components > 0) & (components != int(np.argmax(sizes)) + 1)
        cleaned[drop] = 0
        removed[cls] = int(drop.sum())
    return cleaned, removed


def _flag(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def _ventricle(curve: np.ndarray, ed: int, es: int) -> tuple[float, float, float, float | None]:
    edv, esv = float(curve[ed]), float(curve[es])
    sv = edv - esv
    ef = 100.0 * sv / edv if edv > 0 else None
    return edv, esv, sv, ef


def measure_labels(
    labels_4d: np.ndarray,
    affine,
    ed_phase: int | None = None,
    es_phase: int | None = None,
    height_m: float | None = None,
    weight_kg: float | None = None,
    clean: bool = True,
) -> dict[str, Any]:
    """Measure cardiac function from label maps of shape (x, y, z, phases) (a 3D map is one phase).

    ED is the phase of maximal LV cavity volume and ES that of minimal LV cavity volume among the
    phases where the LV cavity is labelled, unless the caller gives them (0-based). With no LV the
    RV curve picks them. Phases with no labels at all are skipped (label maps drawn at ED/ES only).
    """
    labels = np.asarray(labels_4d)
    if labels.ndim == 3:
        labels = labels[..., np.newaxis]
    if labels.ndim != 4:
        raise ValueError(f"expected a 3D or 4D label map, got shape {labels.shape}")
    labels = np.rint(labels).astype(np.int16) if labels.dtype.kind == "f" else labels.astype(np.int16)
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *CLASS_NAMES})
    if unknown:
        raise ValueError(f"unexpected label values {unknown}; expected 0..3")
    n_phases = labels.shape[3]
    for name, phase in (("ed_phase", ed_phase), ("es_phase", es_phase)):
        if phase is not None and not 0 <= phase < n_phases:
            raise ValueError(f"{name}={phase} is outside 0..{n_phases - 1}")

    quality: list[dict[str, str]] = []
    if clean:
        phases, removed_by_class = [], {}
        for t in range(n_phases):
            cleaned, removed = keep_largest_components(labels[..., t])
            phases.append(cleaned)
            for cls, n in removed.items():
                removed_by_class.setdefault(cls, {})[t] = n
        labels = np.stack(phases, axis=-1)
        # One flag per class, so that a cine of many phases does not bury the report in them.
        for cls, by_phase in sorted(removed_by_class.items()):
            worst = max(by_phase, key=by_phase.get)
            quality.append(_flag(
                "components_removed",
                f"removed {CLASS_NAMES[cls]} voxels outside its largest connected component in "
                f"{len(by_phase)} of {n_phases} phase(s), at most {by_phase[worst]} voxels (phase {worst})",
            ))

    vox_ml = voxel_volume_ml(affine)
    counts = {cls: (labels == cls).sum(axis=(0, 1, 2)) for cls in CLASS_NAMES}
    lv_curve = counts[LV_CAVITY] * vox_ml
    rv_curve = counts[RV_CAVITY] * vox_ml
    myo_curve = counts[LV_MYOCARDIUM] * vox_ml
    has_lv, has_rv = bool(lv_curve.any()), bool(rv_curve.any())

    # Choose ED/ES among labelled phases of the reference ventricle.
    ref_curve = lv_curve if has_lv else rv_curve
    labelled = np.flatnonzero(ref_curve > 0)
    if ed_phase is None or es_phase is None:
        if labelled.size == 0:
            quality.append(_flag("empty_class", "no LV or RV cavity labelled in any phase"))
        else:
            if not has_lv:
                quality.append(_flag("ed_es_from_rv", "no LV cavity labelled: ED/ES chosen from the RV curve"))
            if ed_phase is None:
                ed_phase = int(labelled[np.argmax(ref_curve[labelled])])
            if es_phase is None:
                es_phase = int(labelled[np.argmin(ref_curve[labelled])])
    if ed_phase is not None and ed_phase == es_phase and n_phases > 1:
        quality.append(_flag("ed_equals_es", f"ED and ES are the same phase ({ed_phase})"))

    result: dict[str, Any] = {key: None for key in MEASUREMENT_KEYS}
    result.update({
        "ed_phase": ed_phase,
        "es_phase": es_phase,
        "n_phases": n_phases,
        "voxel_volume_ml": vox_ml,
        "lv_volume_curve_ml": [float(v) for v in lv_curve],
        "rv_volume_curve_ml": [float(v) for v in rv_curve],
    })

    if ed_phase is not None and es_phase is not None:
        for prefix, curve, present, cls in (("lv", lv_curve, has_lv, LV_CAVITY), ("rv", rv_curve, has_rv, RV_CAVITY)):
            if not present:
                quality.append(_flag("empty_class", f"{CLASS_NAMES[cls]} is not labelled in any phase"))
                continue
            for phase_name, phase in (("ED", ed_phase), ("ES", es_phase)):
                if curve[phase] == 0:
                    quality.append(_flag("empty_class", f"{CLASS_NAMES[cls]} is empty at {phase_name} (phase {phase})"))
            edv, esv, sv, ef = _ventricle(curve, ed_phase, es_phase)
            result.update({f"{prefix}_edv_ml": edv, f"{prefix}_esv_ml": esv, f"{prefix}_sv_ml": sv, f"{prefix}_ef_pct": ef})
            if ef is not None and not 0.0 <= ef <= 100.0:
                quality.append(_flag("ef_out_of_range", f"{prefix.upper()} EF {ef:.1f}% is outside 0-100%"))
        if myo_curve[ed_phase] > 0:
            result["lv_mass_g"] = float(myo_curve[ed_phase]) * MYOCARDIAL_DENSITY_G_PER_ML
        elif has_lv:
            quality.append(_flag("empty_class", f"LV myocardium is empty at ED (phase {ed_phase})"))

    bsa = None
    if height_m is not None and weight_kg is not None:
        bsa = bsa_mosteller_m2(height_m, weight_kg)
    result["bsa_m2"] = bsa
    for key, source in INDEXED_KEYS.items():
        result[key] = result[source] / bsa if bsa and result[source] is not None else None
    result["quality"] = quality
    return result


def load_labels(
    labels_4d: str | Path | None = None,
    ed: str | Path | None = None,
    es: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, int | None, int | None]:
    """Load label maps from NIfTI: one 4D file, or an ED and an ES 3D file (stacked as phases 0 and 1).

    Returns (labels (x, y, z, t), affine, ed_phase, es_phase); the phases are None for a 4D file.
    """
    import nibabel as nib

    if labels_4d is not None:
        img = nib.load(str(labels_4d))
        data = np.asanyarray(img.dataobj)
        if data.ndim not in (3, 4):
            raise ValueError(f"{labels_4d}: expected a 3D or 4D label map, got shape {data.shape}")
        return data, img.affine, None, None
    if ed is None or es is None:
        raise ValueError("give either a 4D label map or both ED and ES label maps")
    ed_img, es_img = nib.load(str(ed)), nib.load(str(es))
    ed_data, es_data = np.asanyarray(ed_img.dataobj), np.asanyarray(es_img.dataobj)
    ed_data, es_data = (np.squeeze(d) for d in (ed_data, es_data))
    if ed_data.shape != es_data.shape or ed_data.ndim != 3:
        raise ValueError(f"ED {ed_data.shape} and ES {es_data.shape} must be 3D maps of the same shape")
    if not np.allclose(ed_img.affine, es_img.affine, atol=1e-3):
        raise ValueError("ED and ES label maps have different affines")
    return np.stack([ed_data, es_data], axis=-1), ed_img.affine, 0, 1


def measure_files(
    labels_4d: str | Path | None = None,
    ed: str | Path | None = None,
    es: str | Path | None = None,
    ed_phase: int | None = None,
    es_phase: int | None = None,
    height_m: float | None = None,
    weight_kg: float | None = None,
) -> dict[str, Any]:
    """`measure_labels` on NIfTI files (see `load_labels`); explicit phases apply to a 4D file."""
    data, affine, ed_default, es_default = load_labels(labels_4d, ed, es)
    if labels_4d is None:
        ed_phase, es_phase = ed_default, es_default
    return measure_labels(data, affine, ed_phase, es_phase, height_m, weight_kg)


# --- Normal adult reference ranges ------------------------------------------------------------
# LV: Kawel-Boehm N, et al. "Normal values for cardiovascular magnetic resonance in adults and
# children." J Cardiovasc Magn Reson 2015;17:29, SSFP, mean +- 2 SD, transcribed from the
# mean +- SD columns for that review in Table 3 of Cardiovasc Diagn Ther 2020;10(6):1918 (PMC7758747).
# The 2020 update (Kawel-Boehm et al., JCMR 2020;22:87) gives per-study tables (papillary muscles
# in mass or in volume); switch to its values once they are checked against the paper.
# RV: values recalled from the 2015 review's SSFP RV table and NOT checked against the paper
# ("verified": False): a report should show them as indicative only.
_LV_SOURCE = "Kawel-Boehm et al., JCMR 2015;17:29 (SSFP, mean +- 2 SD)"
_RV_SOURCE = "Kawel-Boehm et al., JCMR 2015;17:29 (SSFP RV, unverified transcription)"


def _mean_2sd(mean: float, sd: float) -> tuple[float, float]:
    return (round(mean - 2 * sd, 1), round(mean + 2 * sd, 1))


NORMAL_RANGES: dict[str, dict[str, Any]] = {
    "lv_edv_ml": {"unit": "ml", "male": _mean_2sd(160, 27), "female": _mean_2sd(132, 23), "source": _LV_SOURCE, "verified": True},
    "lv_edvi_ml_m2": {"unit": "ml/m2", "male": _mean_2sd(81, 12), "female": _mean_2sd(76, 10), "source": _LV_SOURCE, "verified": True},
    "lv_esv_ml": {"unit": "ml", "male": _mean_2sd(54, 14), "female": _mean_2sd(44, 11), "source": _LV_SOURCE, "verified": True},
    "lv_esvi_ml_m2": {"unit": "ml/m2", "male": _mean_2sd(26, 6), "female": _mean_2sd(24, 5), "source": _LV_SOURCE, "verified": True},
    "lv_sv_ml": {"unit": "ml", "male": _mean_2sd(108, 18), "female": _mean_2sd(87, 15), "source": _LV_SOURCE, "verified": True},
    "lv_ef_pct": {"unit": "%", "male": _mean_2sd(67, 5), "female": _mean_2sd(67, 5), "source": _LV_SOURCE, "verified": True},
    "lv_mass_g": {"unit": "g", "male": _mean_2sd(134, 21), "female": _mean_2sd(98, 21), "source": _LV_SOURCE, "verified": True},
    "lv_massi_g_m2": {"unit": "g/m2", "male": _mean_2sd(67, 9), "female": _mean_2sd(61, 10), "source": _LV_SOURCE, "verified": True},
    "rv_edv_ml": {"unit": "ml", "male": _mean_2sd(190, 33), "female": _mean_2sd(148, 35), "source": _RV_SOURCE, "verified": False},
    "rv_esv_ml": {"unit": "ml", "male": _mean_2sd(78, 20), "female": _mean_2sd(56, 18), "source": _RV_SOURCE, "verified": False},
    "rv_ef_pct": {"unit": "%", "male": _mean_2sd(59, 6), "female": _mean_2sd(63, 5), "source": _RV_SOURCE, "verified": False},
}


def normal_range(key: str, sex: str | None = None) -> dict[str, Any] | None:
    """Reference range for a measurement key: {"unit", "low", "high", "sex", "source", "verified"}.

    `sex` is "male"/"female" (also "m"/"f"); without it the range spans both sexes. None for keys
    without a reference range.
    """
    entry = NORMAL_RANGES.get(key)
    if entry is None:
        return None
    sex_key = {"m": "male", "male": "male", "f": "female", "female": "female"}.get((sex or "").lower())
    if sex_key is not None:
        low, high = entry[sex_key]
    else:
        low, high = min(entry["male"][0], entry["female"][0]), max(entry["male"][1], entry["female"][1])
    return {"unit": entry["unit"], "low": low, "high": high, "sex": sex_key,
            "source": entry["source"], "verified": entry["verified"]}


def classify(key: str, value: float | None, sex: str | None = None) -> str | None:
    """"low", "normal" or "high" against `normal_range`; None where no range or no value."""
    rng = normal_range(key, sex)
    if rng is None or value is None:
        return None
    return "low" if value < rng["low"] else "high" if value > rng["high"] else "normal"
