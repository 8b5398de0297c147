"""Cardiac function from phase-wise label maps (issue 4).

Plain numpy/nibabel logic, no gRPC: volumes from voxel counts times the voxel volume of the
affine, ED/ES selection, EDV/ESV/SV/EF, LV mass, BSA-indexed values, quality flags and adult
normal reference ranges. Labels follow the platform convention: 1 LV cavity, 2 LV myocardium,
3 RV cavity.

Gaps (issue 14): preprocessing leaves zeros where a (slice, phase) cell has no image. Zeros are not
images, so `measure_labels` takes a `present` mask [slice, phase] (`present_cells` derives it from
the manifest's cine entry): labels in absent cells are ignored, a phase with an absent cell (on a
slice acquired at other phases) is incomplete - a gap (null) in the volume curves and never ED or
ES - and every gap is a quality flag. Values that no complete phase can support are null, and the
flag that says why lists them under "keys".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from services.preprocess.geometry import apex_at_high_index

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
# The values each of ED and ES is needed for (plus their indexed forms, see `_with_indexed`).
NEEDS_ED = ("lv_edv_ml", "lv_sv_ml", "lv_ef_pct", "lv_mass_g", "rv_edv_ml", "rv_sv_ml", "rv_ef_pct")
NEEDS_ES = ("lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct")

# Cavity volumes outside these are not a human ventricle but a segmentation error: neonatal LV
# EDV is ~10 ml, ESV of a small hyperdynamic heart a few ml, and even severely dilated
# cardiomyopathies stay below ~500 ml (LV) / ~600 ml (RV).
PLAUSIBLE_CAVITY_ML = {"lv": (5.0, 500.0), "rv": (5.0, 600.0)}
# A cine covers one cardiac cycle, so its first and last phases are both near end-diastole; a
# prospectively triggered cine may miss the atrial kick (~20-30 % of the stroke volume) but no more.
NON_CYCLIC_FRACTION_OF_SV = 0.3
# A ventricle is largest at ED, slice by slice too (short-axis slices keep their place while the
# base moves toward them). Expert contours of ACDC's 80 training patients make the ES cavity larger
# than the ED one by at most 3.9 % of the EDV, summed over the slices where it is larger; a model
# that does so by more than this has missed part of the ED ventricle or labelled another structure
# at ES (the left atrium as RV, say).
ES_EXCESS_FRACTION_OF_EDV = 0.10
# A stack that covers the heart ends near the apex, where the ventricle is small: in ACDC's 80
# training patients' expert contours the most apical slice holds at most 36 % (LV) / 34 % (RV) of
# the ventricle's largest slice at ED. Half or more says the stack stops short of the apex.
APICAL_SLICE_FRACTION = 0.5


def _es_excess_by_slice(labels: np.ndarray, cls: int, ed_phase: int, es_phase: int) -> np.ndarray:
    """Voxels of the class per slice by which ES exceeds ED (0 where ED is as large or larger)."""
    ed, es = ((labels[..., phase] == cls).sum(axis=(0, 1)) for phase in (ed_phase, es_phase))
    return np.clip(es.astype(np.int64) - ed, 0, None)


def _apex_not_covered(ed_labels: np.ndarray, affine, acquired: np.ndarray, ventricles) -> list[dict[str, Any]]:
    """A flag per ventricle still large on the stack's most apical acquired slice at ED."""
    if acquired.size < 2:
        return []
    apex_high, rule = apex_at_high_index(affine, np.isin(ed_labels, [LV_CAVITY, LV_MYOCARDIUM]))
    apical = int(acquired[-1] if apex_high else acquired[0])
    flags = []
    for prefix, cls in ventricles:
        area = (ed_labels == cls).sum(axis=(0, 1))
        if area.max() > 0 and area[apical] >= APICAL_SLICE_FRACTION * area.max():
            flags.append(_flag(
                "apex_not_covered", f"{CLASS_NAMES[cls]} at ED is {100 * area[apical] / area.max():.0f}% of its "
                f"largest slice on the most apical slice ({apical}; apex side from the {rule['apex_rule'].replace('_', ' ')}):"
                f" the stack likely stops short of the apex, so {prefix.upper()} volumes are too small",
                doubts=_ventricle_values(prefix) + (["lv_mass_g"] if prefix == "lv" else []), slice=apical))
    return flags


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


def _flag(code: str, message: str, keys=None, doubts=None, **extra) -> dict[str, Any]:
    """A quality entry; `keys` names the measurements it leaves null, `doubts` those it makes
    doubtful but leaves measured (both with their indexed forms), so that the report can mark them."""
    flag: dict[str, Any] = {"code": code, "message": message}
    if keys:
        flag["keys"] = _with_indexed(keys)
    if doubts:
        flag["doubts"] = _with_indexed(doubts)
    flag.update(extra)
    return flag


def flags_doubting(quality) -> dict[str, list[dict[str, Any]]]:
    """{measurement key: the quality flags that leave it measured but doubtful (their "doubts")},
    in the flags' order: what the report's text, PDF and SR mark next to the value."""
    out: dict[str, list[dict[str, Any]]] = {}
    for flag in quality:
        for key in flag.get("doubts", []):
            out.setdefault(key, []).append(flag)
    return out


def _ventricle_values(prefix: str, needs=NEEDS_ED + NEEDS_ES) -> list[str]:
    """The values of one ventricle ("lv"/"rv") among ``needs``, LV mass left out."""
    return [k for k in dict.fromkeys(needs) if k.startswith(prefix) and k != "lv_mass_g"]


def _with_indexed(keys) -> list[str]:
    keys = list(dict.fromkeys(keys))
    return keys + [k for k, source in INDEXED_KEYS.items() if source in keys and k not in keys]


def compact_ranges(values) -> str:
    """[1, 2, 3, 5] -> "1-3, 5": compact, but every value is there."""
    values, parts = sorted(values), []
    for v in values:
        if parts and v == parts[-1][1] + 1:
            parts[-1][1] = v
        else:
            parts.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def describe_cells(cells) -> str:
    """(slice, phase) pairs in words, grouped by phases that lack the same slices:
    "slices 6-11 at phases 1, 3, 5" (every cell is named)."""
    by_phase: dict[int, list[int]] = {}
    for z, t in cells:
        by_phase.setdefault(int(t), []).append(int(z))
    groups: dict[tuple[int, ...], list[int]] = {}
    for t, zs in sorted(by_phase.items()):
        groups.setdefault(tuple(sorted(set(zs))), []).append(t)
    return "; ".join(f"slice{'s' if len(zs) > 1 else ''} {compact_ranges(zs)} at phase{'s' if len(ts) > 1 else ''} "
                     f"{compact_ranges(ts)}" for zs, ts in groups.items())


def present_cells(series: dict, n_slices: int, n_phases: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Which (slice, phase) cells of a cine hold an image, from its manifest entry.

    The manifest's `sop_instance_uids` [slice][phase] is null where preprocessing found no image
    (the volume holds zeros there). Returns (present bool [slice, phase], quality flags); a
    manifest without that grid counts every cell as present and says so.
    """
    uids = series.get("sop_instance_uids")
    if uids is None:
        return np.ones((n_slices, n_phases), bool), [_flag(
            "presence_unknown", "the manifest does not list which slice/phase cells hold an image; "
            "every cell was measured as acquired")]
    if len(uids) != n_slices or any(len(row) != n_phases for row in uids):
        sizes = sorted({len(row) for row in uids})
        raise ValueError(f"manifest grid of {len(uids)} slices x {sizes} phases does not match the "
                         f"volume's {n_slices} slices x {n_phases} phases")
    return np.array([[uid is not None for uid in row] for row in uids], dtype=bool).reshape(n_slices, n_phases), []


def _stack_holes(mask: np.ndarray, present: np.ndarray) -> dict[int, list[int]]:
    """Per phase, the acquired slices without the structure between slices that have it.

    mask: bool (x, y, slice, phase) of one class; present: bool [slice, phase]. Absent cells are no
    evidence either way and are skipped. A gap counts only when the structure on both sides of it
    overlaps in-plane (one ventricle, interrupted): a stray blob elsewhere is not a hole."""
    has = mask.any(axis=(0, 1))
    holes = {}
    for t in range(mask.shape[3]):
        slices = np.flatnonzero(present[:, t])
        with_it = slices[has[slices, t]]
        missing = []
        for below, above in zip(with_it[:-1], with_it[1:]):
            between = [int(z) for z in slices if below < z < above]
            if between and (mask[:, :, below, t] & mask[:, :, above, t]).any():
                missing += between
        if missing:
            holes[t] = missing
    return holes


def measure_labels(
    labels_4d: np.ndarray,
    affine,
    ed_phase: int | None = None,
    es_phase: int | None = None,
    height_m: float | None = None,
    weight_kg: float | None = None,
    clean: bool = True,
    present: np.ndarray | None = None,
    predicted_classes=None,
) -> dict[str, Any]:
    """Measure cardiac function from label maps of shape (x, y, z, phases) (a 3D map is one phase).

    ED is the phase of maximal LV cavity volume and ES that of minimal LV cavity volume among the
    complete phases where the LV cavity is labelled, unless the caller gives them (0-based). With
    no LV the RV curve picks them. Phases with no labels at all are skipped (label maps drawn at
    ED/ES only). `present` (bool [slice, phase], see `present_cells`) says which cells hold an
    image; None counts every cell as present. `predicted_classes`: the labels the model can output
    (default all three); a class it never outputs is reported as not segmented, not as missing.
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
    n_slices, n_phases = labels.shape[2], labels.shape[3]
    for name, phase in (("ed_phase", ed_phase), ("es_phase", es_phase)):
        if phase is not None and not 0 <= phase < n_phases:
            raise ValueError(f"{name}={phase} is outside 0..{n_phases - 1}")
    present = np.ones((n_slices, n_phases), bool) if present is None else np.asarray(present, dtype=bool)
    if present.shape != (n_slices, n_phases):
        raise ValueError(f"present mask of shape {present.shape} does not match {n_slices} slices x {n_phases} phases")
    predicted = set(CLASS_NAMES if predicted_classes is None else predicted_classes)

    quality: list[dict[str, Any]] = []
    # Zeros are not images: whatever a model labelled in an absent cell does not count.
    labels[:, :, ~present] = 0
    # A slice without an image in any phase (missing_slice) is left out of every phase alike, so
    # phases stay comparable; a cell missing in some phases only makes those phases incomplete.
    acquired = present.any(axis=1)
    complete = present[acquired].all(axis=0) if acquired.any() else np.zeros(n_phases, bool)
    incomplete = np.flatnonzero(~complete)
    gaps = [(int(z), int(t)) for z, t in np.argwhere(~present) if acquired[z]]
    if acquired.any() and not acquired.all():
        quality.append(_flag(
            "missing_slices", f"slice(s) {compact_ranges(np.flatnonzero(~acquired))} of {n_slices} have no image in any "
            "phase: every volume leaves them out and is too small if the heart extends there"))
    if gaps:
        quality.append(_flag(
            "incomplete_phases", f"{len(incomplete)} of {n_phases} phase(s) lack images ({len(gaps)} cell(s): "
            f"{describe_cells(gaps)}); they are gaps (null) in the volume curves and never ED or ES",
            cells=[list(c) for c in gaps]))

    # Holes are looked for before cleaning: dropping the smaller side of a hole would hide it.
    holes = {cls: _stack_holes(labels == cls, present) for cls in (LV_CAVITY, RV_CAVITY)}
    if clean:
        phases, removed_by_class = [], {}
        for t in range(n_phases):
            # Components over the acquired slices only: a slice without an image must not split a
            # ventricle in two and have its smaller side removed.
            acquired_at_t = np.flatnonzero(present[:, t])
            cleaned = labels[..., t].copy()
            cleaned[:, :, acquired_at_t], removed = keep_largest_components(labels[:, :, acquired_at_t, t])
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

    # Choose ED/ES among the complete, labelled phases of the reference ventricle.
    ref_name, ref_curve = ("LV cavity", lv_curve) if has_lv else ("RV cavity", rv_curve)
    needs_ed, needs_es = ([k for k in keys if (has_lv and k.startswith("lv")) or (has_rv and k.startswith("rv"))]
                          for keys in (NEEDS_ED, NEEDS_ES))
    candidates = np.flatnonzero(complete & (ref_curve > 0))
    if ed_phase is None or es_phase is None:
        if not (has_lv or has_rv):
            quality.append(_flag("empty_class", "no LV or RV cavity labelled in any phase"))
        elif candidates.size == 0:
            quality.append(_flag(
                "no_complete_phase", f"no complete phase has the {ref_name} labelled: ED and ES cannot be "
                "chosen and nothing is measured", keys=needs_ed + needs_es))
        else:
            if not has_lv:
                quality.append(_flag("ed_es_from_rv", "no LV cavity labelled: ED/ES chosen from the RV curve"))
            if ed_phase is None:
                ed_phase = int(candidates[np.argmax(ref_curve[candidates])])
            if es_phase is None:
                if candidates.size == 1 and gaps:  # the other labelled phases all have gaps
                    quality.append(_flag(
                        "es_not_measurable", f"phase {candidates[0]} is the only complete phase with the "
                        f"{ref_name} labelled, so ES cannot be chosen (incomplete phase(s): {compact_ranges(incomplete)})",
                        keys=needs_es))
                else:
                    es_phase = int(candidates[np.argmin(ref_curve[candidates])])
            if gaps:
                chosen = "ED/ES were" if es_phase is not None else "ED was"
                quality.append(_flag(
                    "ed_es_from_complete_phases", f"{chosen} chosen among the {candidates.size} complete "
                    f"labelled phase(s) of {n_phases}; the true ED or ES may lie in the incomplete phase(s) "
                    f"{compact_ranges(incomplete)}"))
    # A phase the caller gave can still have gaps: its values would count zeros as cavity.
    if ed_phase is not None and not complete[ed_phase]:
        quality.append(_flag("phase_incomplete", f"ED phase {ed_phase} lacks images on slice(s) "
                             f"{compact_ranges(z for z, t in gaps if t == ed_phase)}: ED values not measured", keys=needs_ed))
        ed_phase = None
    if es_phase is not None and not complete[es_phase]:
        quality.append(_flag("phase_incomplete", f"ES phase {es_phase} lacks images on slice(s) "
                             f"{compact_ranges(z for z, t in gaps if t == es_phase)}: ES values not measured", keys=needs_es))
        es_phase = None
    if ed_phase is not None and ed_phase == es_phase and n_phases > 1:
        quality.append(_flag("ed_equals_es", f"ED and ES are the same phase ({ed_phase})"))

    result: dict[str, Any] = {key: None for key in MEASUREMENT_KEYS}
    result.update({
        "ed_phase": ed_phase,
        "es_phase": es_phase,
        "n_phases": n_phases,
        "voxel_volume_ml": vox_ml,
        "lv_volume_curve_ml": [float(v) if complete[t] else None for t, v in enumerate(lv_curve)],
        "rv_volume_curve_ml": [float(v) if complete[t] else None for t, v in enumerate(rv_curve)],
    })

    ventricles = (("lv", lv_curve, has_lv, LV_CAVITY), ("rv", rv_curve, has_rv, RV_CAVITY))
    if has_lv or has_rv:
        for prefix, _curve, labelled, cls in ventricles:
            keys = [k for k in MEASUREMENT_KEYS if k.startswith(prefix) and k != "lv_mass_g"]
            if labelled:
                continue
            if cls not in predicted:
                quality.append(_flag("class_not_segmented", f"the segmentation model does not label the "
                                     f"{CLASS_NAMES[cls]}: {prefix.upper()} values not measured", keys=keys))
            else:
                quality.append(_flag("empty_class", f"{CLASS_NAMES[cls]} is not labelled in any phase", keys=keys))
    if ed_phase is not None or es_phase is not None:
        for prefix, curve, labelled, cls in ventricles:
            if not labelled:
                continue
            for phase_name, phase in (("ED", ed_phase), ("ES", es_phase)):
                if phase is None:
                    continue
                volume = float(curve[phase])
                result[f"{prefix}_{phase_name.lower()}v_ml"] = volume
                low, high = PLAUSIBLE_CAVITY_ML[prefix]
                needs = _ventricle_values(prefix, NEEDS_ED if phase_name == "ED" else NEEDS_ES)
                if volume == 0:
                    quality.append(_flag("empty_class", f"{CLASS_NAMES[cls]} is empty at {phase_name} (phase {phase})",
                                         doubts=needs))
                elif not low <= volume <= high:
                    quality.append(_flag(
                        "implausible_volume", f"{prefix.upper()} {phase_name}V {volume:.1f} ml is outside "
                        f"{low:g}-{high:g} ml, the range of a human {CLASS_NAMES[cls]}: likely a segmentation error",
                        doubts=needs))
            if ed_phase is not None and es_phase is not None:
                edv, esv = result[f"{prefix}_edv_ml"], result[f"{prefix}_esv_ml"]
                result[f"{prefix}_sv_ml"] = edv - esv
                ef = result[f"{prefix}_ef_pct"] = 100.0 * (edv - esv) / edv if edv > 0 else None
                if ef is not None and not 0.0 <= ef <= 100.0:
                    quality.append(_flag("ef_out_of_range", f"{prefix.upper()} EF {ef:.1f}% is outside 0-100%",
                                         doubts=[f"{prefix}_ef_pct"]))
                excess = _es_excess_by_slice(labels, cls, ed_phase, es_phase) * vox_ml
                if edv > 0 and excess.sum() > ES_EXCESS_FRACTION_OF_EDV * edv:
                    quality.append(_flag(
                        "es_larger_than_ed_on_slices", f"{CLASS_NAMES[cls]} is larger at ES (phase {es_phase}) than "
                        f"at ED (phase {ed_phase}) on slice(s) {compact_ranges(np.flatnonzero(excess > 0))}, by "
                        f"{excess.sum():.1f} ml in all ({100 * excess.sum() / edv:.0f}% of the EDV): a ventricle is "
                        "largest at ED, so the contours there are likely wrong (part of the ED ventricle missed, or "
                        f"another structure labelled at ES); {prefix.upper()} EDV, ESV and EF are unreliable",
                        doubts=_ventricle_values(prefix), slices=[int(z) for z in np.flatnonzero(excess > 0)]))
                sv = edv - esv
                first, last = float(curve[0]), float(curve[-1])
                if n_phases >= 3 and sv > 0 and complete[0] and complete[-1] and first > 0 and last > 0 \
                        and abs(first - last) > NON_CYCLIC_FRACTION_OF_SV * sv:
                    quality.append(_flag(
                        "non_cyclic_curve", f"{prefix.upper()} volume is {first:.1f} ml at the first phase and "
                        f"{last:.1f} ml at the last, {100 * abs(first - last) / sv:.0f}% of the stroke volume: the "
                        "cine may not cover one whole cardiac cycle, or the segmentation is inconsistent",
                        doubts=_ventricle_values(prefix)))
        if ed_phase is not None:
            quality += _apex_not_covered(labels[..., ed_phase], affine, np.flatnonzero(present[:, ed_phase]),
                                         [(prefix, cls) for prefix, _curve, labelled, cls in ventricles if labelled])
            if myo_curve[ed_phase] > 0:
                result["lv_mass_g"] = float(myo_curve[ed_phase]) * MYOCARDIAL_DENSITY_G_PER_ML
            elif has_lv and LV_MYOCARDIUM not in predicted:
                quality.append(_flag("class_not_segmented", "the segmentation model does not label the LV "
                                     "myocardium: LV mass not measured", keys=["lv_mass_g"]))
            elif has_lv:
                quality.append(_flag("empty_class", f"LV myocardium is empty at ED (phase {ed_phase})",
                                     keys=["lv_mass_g"]))

    # A ventricle missing on a slice between slices that have it is a segmentation hole.
    for cls, by_phase in holes.items():
        if by_phase:
            cells = describe_cells((z, t) for t, zs in by_phase.items() for z in zs)
            quality.append(_flag(
                "stack_hole", f"{CLASS_NAMES[cls]} is missing inside the stack, where slices above and below have "
                f"it, in {len(by_phase)} of {n_phases} phase(s) ({cells}): its volume there is likely too small",
                doubts=_ventricle_values("lv" if cls == LV_CAVITY else "rv")))

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
    manifest: str | Path | None = None,
) -> dict[str, Any]:
    """`measure_labels` on NIfTI files (see `load_labels`); explicit phases apply to a 4D file.

    `manifest` (preprocessing's manifest.json, 4D file only): its short-axis cine entry says which
    cells hold an image (`present_cells`). Without it every cell counts as present.
    """
    data, affine, ed_default, es_default = load_labels(labels_4d, ed, es)
    if labels_4d is None:
        ed_phase, es_phase = ed_default, es_default
    present, flags = None, []
    if manifest is not None:
        import json

        from services.preprocess.study import primary_series

        series = primary_series(json.loads(Path(manifest).read_text()), "cine_sax")
        if series is None:
            raise ValueError(f"{manifest}: no short-axis cine series")
        shape = data.shape + (1,) * (4 - data.ndim)
        present, flags = present_cells(series, shape[2], shape[3])
    result = measure_labels(data, affine, ed_phase, es_phase, height_m, weight_kg, present=present)
    result["quality"][:0] = flags
    return result


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
