"""DICOM SR measurement report (TID 1500, Comprehensive 3D SR) of the cardiac function (issue 6).

    segs = build_segs(dicom_dir, manifest, labels, model, measurements=measurements)   # {phase: SEG}
    sr = build_sr(segs, dicom_dir, report)        # report: the cmrvl.report/v1 JSON
    read_sr_measurements(sr) == {k: v for k, v in report["measurements"].items() if k in SR_KEYS and v is not None}

Layout of the report (highdicom templates):
- One volumetric ROI group (TID 1411) per measured structure and phase, referencing its SEG
  segment: LV cavity at ED (EDV), LV cavity at ES (ESV), LV myocardium at ED (mass), RV cavity
  at ED / ES. Volumes of a segmented structure are what TID 1411 is for.
- Source studies with invalid UIDs (leading zeros: Sunnybrook, many real studies): TID 1411
  must name the SEG's source images or series in the content tree, and DCMTK (dsrdump, dsr2xml,
  DCMTK-based viewers) refuses to read an SR whose content items hold an invalid UID. Those
  groups are then TID 1501 groups with the same tracking identifier, finding site and values,
  whose source image is the SEG instance with the segment number (ReferencedSegmentNumber): the
  content tree holds only the platform's own UIDs. The real source UIDs stay referenced,
  unchanged, in CurrentRequestedProcedureEvidenceSequence and in the SEG; validators report
  them there as the source's own errors (the report's quality section says so).
- One group (TID 1501) per ventricle for what derives from both phases (SV, EF), with the ED
  and ES SEG instances as its source images and the ventricle as finding site.
- BSA-indexed values sit next to their absolute value, with the same concept name, a /m2 unit
  and Measurement Method = LN 8277-6 "BSA" (CID 3455 Index Method); that pair (concept, method)
  is what `read_sr_measurements` maps back to a key. BSA itself is not written.
- Null values are left out; a group without values is left out.
- Values measured but doubted by a quality flag (the flag's "doubts"; report.txt prints them
  "doubtful (code)"): their group carries one Qualitative Evaluation per such flag, concept
  DCM 111052 "Quality Finding", value the flag's code in the private scheme 99CMRVL (named in
  CodingSchemeIdentificationSequence). A group holds one structure and phase, so the mark names
  the flag and the structure; which of the group's values it doubts is in the report JSON.
  `read_sr_doubts` reads them back.
- Observer context: the segmentation model as the device observer (TID 1004, its UID is the
  SEG's DeviceSerialNumber); each group and measurement also names it as algorithm.
- Patient/study attributes are the source's, element for element (`copy_study_attributes`);
  ContributingEquipmentSequence names the scanner as acquisition equipment (DCM 109101), as in
  the SEG; the SR's own equipment (Manufacturer) is the platform.
- UIDs are derived like the SEG's: series from run + study + model, instance also from the SEG
  instances and the values written. The same run retried gives the same UIDs; each run (the
  gateway's study_id) has its own series. A run that replaces an earlier SR of the study names
  it in PredecessorDocumentsSequence (`predecessors`).

Codes (all from pydicom 3.0's code dictionary, which is generated from DICOM PS3.16; CID =
context group there):
- LN 8821-1 "Left Ventricular ED Volume", LN 8823-7 "Left Ventricular ES Volume",
  LN 8822-9 "Right Ventricular ED Volume", LN 8824-5 "Right Ventricular ES Volume":
  CID 3835 Cardiac Volume Measurement (also CID 3468 ED Volume / CID 3469 ES Volume).
- SCT 90096001 "Stroke Volume": CID 3835 (LV stroke volume, finding site left ventricle).
- SCT 429483009 "RV Stroke Volume": CID 12204 Echocardiography Right Ventricle Measurement (the
  only RV-specific stroke volume concept in PS3.16).
- LN 8811-2 "Left ventricular ejection fraction by MR", LN 8818-7 "Right ventricular ejection
  fraction by MR": CID 3833 Cardiac Ejection Fraction.
- LN 18087-7 "Left Ventricle Mass": CID 12203 Left Ventricle Other Measurement (and CID 12200).
- LN 8277-6 "BSA": CID 3455 Index Method.
- SCT 241620005 "Cardiac MRI" (procedure reported): CID 3206 / 3820.
- DCM 121007 "Device" (observer type): CID 270.
- Units, UCUM: ml, g, %, ml/m2, g/m2.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from services.preprocess.reader import quiet_pydicom
from services.segmentation.dicom_seg import (MANUFACTURER, _repaired, copy_study_attributes, derived_uid,
                                             device_uid, lo, read_source_headers, segment_codes)
from services.segmentation.function import flags_doubting

SR_SERIES_NUMBER = 9002


@dataclass(frozen=True)
class _Group:
    label: str  # tracking identifier text
    segment: int | None  # SEG segment number for a volumetric ROI group; None: ventricle group
    phase: str | None  # "ed"/"es": which SEG instance the segment is in
    site: int  # segment whose property type is the finding site


GROUPS = {
    "lv_cavity_ed": _Group("LV cavity at ED", 1, "ed", 1),
    "lv_cavity_es": _Group("LV cavity at ES", 1, "es", 1),
    "lv_myocardium_ed": _Group("LV myocardium at ED", 2, "ed", 2),
    "rv_cavity_ed": _Group("RV cavity at ED", 3, "ed", 3),
    "rv_cavity_es": _Group("RV cavity at ES", 3, "es", 3),
    "lv_function": _Group("LV function", None, None, 1),
    "rv_function": _Group("RV function", None, None, 3),
}

# Concepts: (coding scheme, code value, code meaning) exactly as in pydicom's dictionary.
_LV_EDV = ("LN", "8821-1", "Left Ventricular ED Volume")  # CID 3835 / 3468
_LV_ESV = ("LN", "8823-7", "Left Ventricular ES Volume")  # CID 3835 / 3469
_RV_EDV = ("LN", "8822-9", "Right Ventricular ED Volume")  # CID 3835 / 3468
_RV_ESV = ("LN", "8824-5", "Right Ventricular ES Volume")  # CID 3835 / 3469
_LV_SV = ("SCT", "90096001", "Stroke Volume")  # CID 3835
_RV_SV = ("SCT", "429483009", "RV Stroke Volume")  # CID 12204
_LV_EF = ("LN", "8811-2", "Left ventricular ejection fraction by MR")  # CID 3833
_RV_EF = ("LN", "8818-7", "Right ventricular ejection fraction by MR")  # CID 3833
_LV_MASS = ("LN", "18087-7", "Left Ventricle Mass")  # CID 12203 / 12200
BSA_INDEX = ("LN", "8277-6", "BSA")  # CID 3455 Index Method
QUALITY_FINDING = ("DCM", "111052", "Quality Finding")
FLAG_SCHEME = "99CMRVL"  # private coding scheme: the segmentation's quality flag codes
_UNITS = {"ml": "milliliter", "g": "gram", "%": "percent", "ml/m2": "milliliter per square meter",
          "g/m2": "gram per square meter"}

# Report key -> (group, concept, UCUM unit, BSA-indexed)
MEASURES: dict[str, tuple[str, tuple[str, str, str], str, bool]] = {
    "lv_edv_ml": ("lv_cavity_ed", _LV_EDV, "ml", False),
    "lv_edvi_ml_m2": ("lv_cavity_ed", _LV_EDV, "ml/m2", True),
    "lv_esv_ml": ("lv_cavity_es", _LV_ESV, "ml", False),
    "lv_esvi_ml_m2": ("lv_cavity_es", _LV_ESV, "ml/m2", True),
    "lv_mass_g": ("lv_myocardium_ed", _LV_MASS, "g", False),
    "lv_massi_g_m2": ("lv_myocardium_ed", _LV_MASS, "g/m2", True),
    "lv_sv_ml": ("lv_function", _LV_SV, "ml", False),
    "lv_svi_ml_m2": ("lv_function", _LV_SV, "ml/m2", True),
    "lv_ef_pct": ("lv_function", _LV_EF, "%", False),
    "rv_edv_ml": ("rv_cavity_ed", _RV_EDV, "ml", False),
    "rv_edvi_ml_m2": ("rv_cavity_ed", _RV_EDV, "ml/m2", True),
    "rv_esv_ml": ("rv_cavity_es", _RV_ESV, "ml", False),
    "rv_esvi_ml_m2": ("rv_cavity_es", _RV_ESV, "ml/m2", True),
    "rv_sv_ml": ("rv_function", _RV_SV, "ml", False),
    "rv_svi_ml_m2": ("rv_function", _RV_SV, "ml/m2", True),
    "rv_ef_pct": ("rv_function", _RV_EF, "%", False),
}
SR_KEYS = tuple(MEASURES)


def _code(concept: tuple[str, str, str]):
    from highdicom.sr import CodedConcept

    scheme, value, meaning = concept
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _unit(ucum: str):
    return _code(("UCUM", ucum, _UNITS[ucum]))


def _referenced_segment(seg: Dataset, number: int):
    """The SEG segment, with its source images; a segment without frames names the source series."""
    import highdicom as hd

    try:
        return hd.sr.ReferencedSegment.from_segmentation(seg, number)
    except (ValueError, AttributeError):
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID))


def seg_source_uids(segs: Iterable[Dataset]) -> set[str]:
    """SOP Instance UIDs of the source images the SEGs reference."""
    return {inst.ReferencedSOPInstanceUID for seg in segs for series in seg.ReferencedSeriesSequence
            for inst in series.ReferencedInstanceSequence}


def _sources_have_valid_uids(segs: Sequence[Dataset]) -> bool:
    """Whether every source series and image UID the SEGs reference is a valid UID."""
    from pydicom.uid import UID

    uids = seg_source_uids(segs) | {series.SeriesInstanceUID for seg in segs for series in seg.ReferencedSeriesSequence}
    return all(UID(str(uid)).is_valid for uid in uids)


def _seg_as_source(seg: Dataset, number: int):
    """TID 1501 source image: the SEG instance, narrowed to one segment."""
    import highdicom as hd

    item = hd.sr.SourceImageForMeasurementGroup(seg.SOPClassUID, seg.SOPInstanceUID)
    item.ReferencedSOPSequence[0].ReferencedSegmentNumber = number
    return item


@quiet_pydicom()  # the source's invalid UIDs are listed once (source_conformance), not warned per element
def build_sr(
    segs: Mapping[int, Dataset],
    sources: Path | str | Sequence[Dataset],
    report: Mapping,
    run: str = "",
    predecessors: Sequence[Dataset] = (),
) -> Dataset:
    """A highdicom Comprehensive3DSR (TID 1500) with the report's measurements.

    segs: {phase: SEG} from `build_segs` (must hold the report's ED and ES phases when any
    volume is written); sources: the cine's DICOM folder, or the source image headers the SEGs
    reference (they become evidence); report: the report JSON (or a bare measurements dict);
    run: the analysis run (the gateway's study_id); predecessors: earlier SRs of the study this
    one replaces (anything with Study/Series/SOP Instance UID and SOP Class UID).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    measurements = report.get("measurements", report)
    model = (report.get("models") or {}).get("segmentation") or measurements.get("model") or {}
    name, version = str(model.get("name") or "unknown"), str(model.get("version") or "0")
    values = {key: float(measurements[key]) for key in SR_KEYS if measurements.get(key) is not None}
    # The flags are the report's, or a bare measurements dict's.
    doubted_by = {key: [str(f["code"]) for f in flags]
                  for key, flags in flags_doubting(report.get("quality") or []).items()}
    phases = {"ed": measurements.get("ed_phase"), "es": measurements.get("es_phase")}
    if not segs:
        raise ValueError("no SEG given: the SR's measurement groups reference SEG segments")
    for phase_name, phase in phases.items():
        if any(GROUPS[MEASURES[k][0]].phase == phase_name for k in values) and phase not in segs:
            raise ValueError(f"no SEG for the {phase_name.upper()} phase {phase} (have {sorted(segs)})")

    seg_list = list({s.SOPInstanceUID: s for s in segs.values()}.values())  # ED == ES: one SEG
    if isinstance(sources, (str, Path)):
        evidence_sources = list(read_source_headers(Path(sources), seg_source_uids(seg_list)).values())
    else:
        evidence_sources = list(sources)
    if not evidence_sources:
        raise ValueError("no source image headers: the SR copies patient, study and scanner from them")
    study_uid = seg_list[0].StudyInstanceUID
    segment_refs_in_content = _sources_have_valid_uids(seg_list)
    algorithm = hd.sr.AlgorithmIdentification(name=lo(name), version=lo(version))
    types = segment_codes()

    groups = []
    for group_key, group in GROUPS.items():
        keys = [k for k, (g, *_rest) in MEASURES.items() if g == group_key and k in values]
        if not keys:
            continue
        site_code = types[group.site][1]
        items = []
        for key in keys:
            _g, concept, ucum, indexed = MEASURES[key]
            items.append(hd.sr.Measurement(
                name=_code(concept), value=values[key], unit=_unit(ucum),
                method=_code(BSA_INDEX) if indexed else None, algorithm_id=algorithm))
        tracking = hd.sr.TrackingIdentifier(
            uid=derived_uid("sr-track", study_uid, name, version, group_key), identifier=group.label)
        flags = sorted({code for key in keys for code in doubted_by.get(key, [])})
        doubts = [hd.sr.QualitativeEvaluation(_code(QUALITY_FINDING), _flag_code(code)) for code in flags]
        common = dict(tracking_identifier=tracking, finding_category=codes.cid7150.AnatomicalStructure,
                      finding_type=site_code, algorithm_id=algorithm,
                      finding_sites=[hd.sr.FindingSite(site_code)], measurements=items,
                      qualitative_evaluations=doubts or None)
        if group.segment is not None:
            seg = segs[phases[group.phase]]
            if group.segment not in {item.SegmentNumber for item in seg.SegmentSequence}:
                raise ValueError(f"{group.label}: the SEG of phase {phases[group.phase]} has no segment "
                                 f"{group.segment}, yet the report has values for it")
            if segment_refs_in_content:
                groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    referenced_segment=_referenced_segment(seg, group.segment), **common))
            else:
                groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                    source_images=[_seg_as_source(seg, group.segment)], **common))
        else:
            used = {segs[p].SOPInstanceUID: segs[p] for p in phases.values() if p in segs}
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                source_images=[hd.sr.SourceImageForMeasurementGroup(s.SOPClassUID, s.SOPInstanceUID)
                               for s in used.values()], **common))

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(name, version), name=lo(name), manufacturer_name=MANUFACTURER,
        model_name=lo(f"{name} {version}"))
    observation = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    content = hd.sr.MeasurementReport(
        observation_context=observation, procedure_reported=codes.SCT.CardiacMRI,
        imaging_measurements=groups or None)
    seg_uids = sorted(s.SOPInstanceUID for s in seg_list)
    # highdicom takes patient, study and acquisition equipment from evidence[0]: a source image,
    # in the copy its parser accepts; the exact source values are put back below.
    evidence = [_repaired(ds, None) for ds in evidence_sources] + seg_list
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=derived_uid("sr-series", run, study_uid, name, version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid("sr", run, study_uid, name, version, *seg_uids,
                                     json.dumps([values, doubted_by], sort_keys=True)),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=lo(f"CMR-VL measurements {name} {version}"),
        previous_versions=list(predecessors) or None,
    )
    copy_study_attributes(sr, evidence_sources[0])
    if doubted_by:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = FLAG_SCHEME
        scheme.CodingSchemeName = "CMR-VL segmentation quality flags"
        scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
        sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _flag_code(code: str):
    import highdicom as hd

    # Codes longer than 16 characters go to LongCodeValue (highdicom does that).
    return hd.sr.CodedConcept(code, FLAG_SCHEME, lo(code.replace("_", " ")))


def read_sr_measurements(sr: Dataset) -> dict[str, float]:
    """The report keys and values of a TID 1500 SR written by `build_sr`, parsed with highdicom."""
    import highdicom as hd

    # Parsed even when it is a freshly built Comprehensive3DSR: only a parsed one exposes its
    # content as a MeasurementReport with the measurement-group accessors.
    sr = hd.sr.Comprehensive3DSR.from_dataset(sr)
    lookup = {(concept[0], concept[1], indexed): (key, ucum)
              for key, (_g, concept, ucum, indexed) in MEASURES.items()}
    content = sr.content
    out: dict[str, float] = {}
    for group in [*content.get_volumetric_roi_measurement_groups(), *content.get_image_measurement_groups()]:
        for m in group.get_measurements():
            method = m.method
            indexed = method is not None and (method.scheme_designator, method.value) == BSA_INDEX[:2]
            found = lookup.get((m.name.scheme_designator, m.name.value, indexed))
            if found is None:
                continue  # a measurement this module does not write
            key, ucum = found
            if m.unit.value != ucum:
                raise ValueError(f"{key}: unit {m.unit.value!r}, expected {ucum!r}")
            if key in out:
                raise ValueError(f"{key} appears twice in the SR")
            out[key] = float(m.value)
    return out


def read_sr_doubts(sr: Dataset) -> dict[str, list[str]]:
    """{group tracking identifier (e.g. "RV cavity at ES"): flag codes that doubt its values}, from
    the groups' Quality Finding evaluations written by `build_sr`."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(sr)
    content = sr.content
    out: dict[str, list[str]] = {}
    for group in [*content.get_volumetric_roi_measurement_groups(), *content.get_image_measurement_groups()]:
        codes = [e.value.value for e in group.get_qualitative_evaluations()
                 if (e.name.scheme_designator, e.name.value) == QUALITY_FINDING[:2]
                 and e.value.scheme_designator == FLAG_SCHEME]
        if codes:
            out[group.tracking_identifier] = codes
    return out


__all__ = ["BSA_INDEX", "FLAG_SCHEME", "GROUPS", "MEASURES", "QUALITY_FINDING", "SR_KEYS", "SR_SERIES_NUMBER",
           "build_sr", "read_sr_doubts", "read_sr_measurements", "seg_source_uids"]
