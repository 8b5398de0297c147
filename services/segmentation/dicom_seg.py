"""DICOM Segmentation (SEG) objects of the cine label maps, for a PACS (issues 4 and 6).

    segs = build_segs(dicom_dir, manifest, labels_4d, model, measurements=measurements)
    segs[ed_phase].save_as("seg_ed.dcm")       # one SEG per cardiac phase: {phase: Dataset}

Choices (each one is why the code looks as it does):
- One SEG instance per cardiac phase, all in one series. A SEG built by highdicom is a 3D object:
  it refuses two frames at the same ImagePositionPatient, and ED and ES images of a slice share
  their position. Viewers generally load a SEG as one 3D label volume over its source series,
  so a per-phase SEG is also what they display as intended.
- BINARY, not LABELMAP: Label Map Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.7) is a 2024
  addition that many PACS do not yet negotiate; Segmentation Storage (…66.4) is accepted
  everywhere. Bit-packed frames keep it small (8 KiB per 256x256 frame).
- Default phases: ED and ES when `measurements` are given (what the SR's volumes are measured
  on), otherwise every phase that holds a label (an ED/ES-only label map gives ED and ES).
- Segments always carry the platform labels as numbers: 1 LV cavity, 2 LV myocardium,
  3 RV cavity. A BINARY SEG numbers its segments 1..n without gaps, so the SEG describes labels
  1 up to the highest label present anywhere in the label map: an LV-only model gives no RV
  segment. A described segment with no voxels in a phase has no frames there (highdicom omits
  empty frames), so numbers never shift; a phase without any label keeps all its frames
  (highdicom cannot write a SEG without frames).
- Every slice image of the phase is a source image (ReferencedSeriesSequence lists them all);
  frames exist only where a segment has voxels, each pointing at its source image.
- UIDs are derived (`derived_uid`: "2.25." + a name-based UUID): the series from the run
  (the gateway's study_id: one submission) + study + segmented series + model, each instance
  also from its phase and a digest of its labels. A retried report stage of the same run gives
  the same UIDs (a PACS sees a re-send of the same instance); another run (a re-submission, a
  new model) gets a series of its own, and different labels never reuse a UID. Creation
  timestamps are those of the run.
- Equipment: the SEG's Manufacturer is the platform, its model name and software version the
  segmentation model's, its DeviceSerialNumber the model's device UID (`device_uid`, the same
  UID the SR names as its observer device); the scanner is the ContributingEquipment with
  purpose DCM 109101 "Acquisition Equipment" (highdicom copies it from the first source image).
- Patient and study attributes are the source's, element for element, even when odd
  (`copy_study_attributes`): a PACS files derived objects by them, so a blanked date or a
  missing accession number would split the study. One the source lacks is absent here too.
- Real-data quirks: highdicom reads repaired copies of the source headers - unparseable dates
  (Sunnybrook: PatientBirthDate 00000000, StudyDate 20120000) emptied for highdicom's parser
  only, and when images of one series disagree on FrameOfReferenceUID (Sunnybrook gives every
  image its own) all take the series' one from the manifest; orientations that differ by
  rounding (`geometry.IOP_TOLERANCE`) take the series' one. Invalid UIDs (leading zeros) are
  referenced as they are: they are the source's identity. `source_conformance` lists what in
  the source is not conformant, for the report's quality section.

Codes (pydicom 3.0 code dictionary = DICOM PS3.16 context groups):
- Segmented Property Category: SCT 91723000 "Anatomical Structure" (CID 7150).
- LV cavity: SCT 87878005 "Left ventricle" (CID 7152 Cardiac Structure Segmentation Type; the
  DICOM dictionaries have no "cavity of left ventricle" concept, SegmentLabel says "LV cavity").
- LV myocardium: SCT 49848007 "Left Ventricle Myocardium" (CID 12305 Basic Echo Anatomic Site).
- RV cavity: SCT 53085002 "Right ventricle" (CID 7152).
- Algorithm family: DCM 123110 "Artificial Intelligence" (CID 7162).
"""

from __future__ import annotations

import hashlib
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from services.preprocess.geometry import IOP_TOLERANCE, orientation_deviation
from services.preprocess.reader import quiet_pydicom
from services.segmentation.function import CLASS_NAMES

SEG_SERIES_NUMBER = 9001  # far from scanner series numbers; the SR uses 9002
MANUFACTURER = "CMR-VL"


def segment_codes() -> dict[int, tuple[str, object]]:
    """{segment number (= platform label): (segment label, SNOMED property type Code)}."""
    from pydicom.sr.codedict import codes

    return {
        1: (CLASS_NAMES[1], codes.SCT.LeftVentricle),  # 87878005, CID 7152
        2: (CLASS_NAMES[2], codes.SCT.LeftVentricleMyocardium),  # 49848007, CID 12305
        3: (CLASS_NAMES[3], codes.SCT.RightVentricle),  # 53085002, CID 7152
    }


# Namespace of the name-based UUIDs behind every UID this project derives.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cmrvl:dicom-uid")


def derived_uid(*parts: object) -> str:
    """A deterministic UID from its parts: "2.25." + a name-based (version 5) UUID as an integer,
    the UUID-derived form of DICOM PS3.5 B.2 (no organisation root needed)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


def device_uid(name: str, version: str) -> str:
    """UID of the segmentation model as a device: SEG DeviceSerialNumber and SR observer UID."""
    return derived_uid("device", name, version)


def lo(text: str) -> str:
    """A value that fits a DICOM LO element (64 characters)."""
    return text[:64]


def cine_entry(manifest: dict, series_instance_uid: str | None = None) -> dict:
    """The manifest entry of the segmented cine: the primary cine_sax unless a UID is given."""
    uid = series_instance_uid or manifest.get("primary", {}).get("cine_sax")
    for entry in manifest.get("series", []):
        if entry["series_instance_uid"] == uid:
            return entry
    raise ValueError(f"manifest has no series {uid!r} (primary cine_sax missing?)")


def read_source_headers(source_dir: Path, sop_instance_uids: Iterable[str]) -> dict[str, Dataset]:
    """Headers (no pixel data) of the files in source_dir holding the given SOP instances.

    The manifest names instances, not files, so every file's SOPInstanceUID is read first (only
    that tag: fast); files that are not DICOM are skipped."""
    from services.preprocess.reader import list_files

    wanted = set(sop_instance_uids)
    found: dict[str, Dataset] = {}
    with quiet_pydicom():
        for path in list_files(Path(source_dir)):
            try:
                uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get(
                    "SOPInstanceUID")
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            if uid in wanted and uid not in found:
                found[uid] = pydicom.dcmread(path, stop_before_pixels=True)
    missing = wanted - set(found)
    if missing:
        raise FileNotFoundError(f"{len(missing)} source instance(s) not found in {source_dir}, "
                                f"e.g. {sorted(missing)[0]}")
    return found


# Patient/study attributes highdicom copies into derived objects: Type 2 (must be present, may be
# empty) there, but often absent from real and anonymised images.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


# Patient, General Study and Patient Study module attributes: copied into every derived object
# exactly as the source has them.
STUDY_ATTRIBUTES = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                    "AccessionNumber", "StudyDescription", "PatientAge", "PatientSize", "PatientWeight")


def copy_study_attributes(target: Dataset, source: Dataset) -> None:
    """Give target the source's patient/study attributes element for element: odd values as they
    are, and one the source lacks is absent (even a Type 2 one: an empty element where the source
    has none is a mismatch to dcentvfy and some PACS; the missing attribute is the source's error)."""
    import copy

    for keyword in STUDY_ATTRIBUTES:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
        elif keyword in target:
            delattr(target, keyword)


def _unparseable(elem) -> bool:
    from pydicom.valuerep import DA, TM

    if elem.VR not in ("DA", "TM") or elem.value in (None, "") or elem.VM != 1:
        return False
    try:
        (DA if elem.VR == "DA" else TM)(str(elem.value))
    except ValueError:
        return True
    return False


def _repaired(ds: Dataset, frame_of_reference_uid: str | None, iop: Sequence[float] | None = None) -> Dataset:
    """A copy highdicom accepts: unparseable DA/TM emptied, absent Type 2 patient/study attributes
    present and empty, one FrameOfReferenceUID and one orientation per series. (The patient/study
    attributes are put back as the source has them once highdicom is done.)"""
    import copy

    out = copy.deepcopy(ds)  # Dataset.copy() shares the elements: emptying one would blank the source
    for keyword in _TYPE2_COPIED:
        if keyword not in out:
            setattr(out, keyword, "")
    for elem in list(out):
        if _unparseable(elem):
            elem.value = ""
    if frame_of_reference_uid:
        out.FrameOfReferenceUID = frame_of_reference_uid
    if iop is not None:
        out.ImageOrientationPatient = list(iop)
    return out


_SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def source_conformance(headers: Iterable[Dataset]) -> list[dict]:
    """Quality entries (code, message, source "report") for what in the source images is not
    conformant and is carried into SR/SEG as it is: invalid UIDs (they are the references), odd
    patient/study values (copied so the PACS files the objects into the same study), absent Type 2
    patient/study attributes (written empty). Empty when the source is clean."""
    from pydicom.uid import UID

    bad_uids: dict[str, set[str]] = {}
    odd_values: dict[str, set[str]] = {}
    absent: set[str] = set()
    for ds in headers:
        for keyword in _SOURCE_UIDS:
            value = str(ds.get(keyword) or "")
            if value and not UID(value).is_valid:
                bad_uids.setdefault(keyword, set()).add(value)
        for keyword in STUDY_ATTRIBUTES:
            if keyword in ds and _unparseable(ds[keyword]):
                odd_values.setdefault(keyword, set()).add(str(ds[keyword].value))
        absent |= {k for k in _TYPE2_COPIED if k not in ds}
    issues = []
    if bad_uids:
        counts = ", ".join(f"{len(v)} {k}" for k, v in bad_uids.items())
        example = sorted(next(iter(bad_uids.values())))[0]
        issues.append({"code": "source_invalid_uids", "source": "report", "message": (
            f"the source images carry invalid UIDs ({counts}, e.g. {example}: a component with a leading "
            "zero or a bad character); SR and SEG reference them unchanged, so DICOM validators report "
            "them in those objects too")})
    if odd_values:
        listed = ", ".join(f"{k} {sorted(v)}" for k, v in odd_values.items())
        issues.append({"code": "source_invalid_values", "source": "report", "message": (
            f"the source's patient/study attributes hold values that are not valid DICOM dates/times "
            f"({listed}); SR and SEG copy them unchanged so that the PACS files them into the same study")})
    if absent:
        issues.append({"code": "source_missing_type2", "source": "report", "message": (
            f"the source images lack required (Type 2) attributes {sorted(absent)}; SR and SEG "
            "mirror the source and lack them too")})
    return issues


def _label_digest(labels_3d: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels_3d, dtype=np.uint8).tobytes()).hexdigest()[:32]


def _check_labels(labels_4d: np.ndarray, entry: dict) -> np.ndarray:
    labels = np.asarray(labels_4d)
    if labels.ndim == 3:
        labels = labels[..., np.newaxis]
    expected = (entry["columns"], entry["rows"], entry["n_slices"], entry["n_phases"])
    if labels.shape != expected:
        raise ValueError(f"label map shape {labels.shape} does not match the cine grid "
                         f"(columns, rows, slices, phases) = {expected}")
    labels = np.rint(labels).astype(np.uint8) if labels.dtype.kind == "f" else labels.astype(np.uint8)
    unknown = sorted(set(np.unique(labels).tolist()) - {0, *CLASS_NAMES})
    if unknown:
        raise ValueError(f"unexpected label values {unknown}; expected 0..3")
    return labels


def default_phases(labels: np.ndarray, measurements: Mapping | None = None) -> list[int]:
    """ED and ES from the measurements (ED alone when ES could not be measured: the report says
    why), else every phase that holds a label (in order)."""
    if measurements and measurements.get("ed_phase") is not None:
        chosen = [measurements["ed_phase"], measurements.get("es_phase")]
        return list(dict.fromkeys(int(t) for t in chosen if t is not None))
    return [int(t) for t in np.flatnonzero(labels.reshape(-1, labels.shape[-1]).any(axis=0))]


def _phase_label(phase: int, measurements: Mapping | None) -> str:
    names = [n for n, key in (("ED", "ed_phase"), ("ES", "es_phase"))
             if measurements and measurements.get(key) == phase]
    return "_".join(names) if names else f"PHASE_{phase:02d}"


@quiet_pydicom()  # the source's invalid UIDs are listed once (source_conformance), not warned per element
def build_segs(
    source_dir: Path,
    manifest: dict,
    labels_4d: np.ndarray,
    model: Mapping,
    phases: Sequence[int] | None = None,
    measurements: Mapping | None = None,
    run: str = "",
) -> dict[int, Dataset]:
    """One highdicom BINARY Segmentation per phase of the cine's label map: {phase: SEG}.

    labels_4d is (x = DICOM column, y = DICOM row, z = slice, t = phase) in the manifest's cine
    grid; labels[x, y, z, t] becomes pixel (row y, column x) of the frame derived from the image
    at manifest `sop_instance_uids[z][t]`. model is {"name", "version"[, "backend"]}. run names
    the analysis run (the gateway's study_id): each run writes its own series.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    entry = cine_entry(manifest)
    if any(n is not None for row in entry.get("frame_numbers", []) for n in row):
        raise NotImplementedError("SEG for enhanced multi-frame cine sources is not supported yet")
    labels = _check_labels(labels_4d, entry)
    phases = list(dict.fromkeys(int(p) for p in phases)) if phases is not None else \
        default_phases(labels, measurements)
    if not phases:
        raise ValueError("no phase to segment: the label map is empty and no phases were given")
    for t in phases:
        if not 0 <= t < entry["n_phases"]:
            raise ValueError(f"phase {t} is outside 0..{entry['n_phases'] - 1}")

    sops = entry["sop_instance_uids"]
    slices_of = {}
    for t in phases:
        present = [z for z in range(entry["n_slices"]) if sops[z][t]]
        stray = [z for z in range(entry["n_slices"]) if not sops[z][t] and labels[:, :, z, t].any()]
        if stray:
            raise ValueError(f"phase {t}: labels on slice(s) {stray} that have no source image")
        slices_of[t] = present
    headers = read_source_headers(source_dir, (sops[z][t] for t in phases for z in slices_of[t]))

    name, version = str(model.get("name") or "unknown"), str(model.get("version") or "0")
    study_uid = manifest.get("study_instance_uid") or next(iter(headers.values())).StudyInstanceUID
    # One plane orientation for the SEG: the first image's, as written (DS strings), within
    # rounding of every other image's.
    iop = list(next(iter(headers.values())).ImageOrientationPatient)
    deviation = orientation_deviation([h.ImageOrientationPatient for h in headers.values()], iop)
    if deviation > IOP_TOLERANCE:
        raise ValueError(f"the segmented images differ in ImageOrientationPatient by up to {deviation:.2g} "
                         f"(more than rounding, {IOP_TOLERANCE:g}): one SEG needs one plane orientation")
    n_segments = int(labels.max())  # BINARY segments are numbered 1..n: labels up to the highest present
    if n_segments == 0:
        n_segments = len(CLASS_NAMES)  # an empty map still says what was looked for
    algorithm = hd.AlgorithmIdentificationSequence(
        name=lo(name), family=codes.cid7162.ArtificialIntelligence, version=lo(version), source=MANUFACTURER)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.cid7150.AnatomicalStructure,  # SCT 91723000
            segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_id=label,
            tracking_uid=derived_uid("seg-track", study_uid, entry["series_instance_uid"], name, version, number))
        for number, (label, code) in segment_codes().items() if number <= n_segments
    ]
    series_uid = derived_uid("seg-series", run, study_uid, entry["series_instance_uid"], name, version)

    segs: dict[int, Dataset] = {}
    for index, t in enumerate(phases):
        zs = slices_of[t]
        sources = [_repaired(headers[sops[z][t]], entry.get("frame_of_reference_uid"), iop) for z in zs]
        # (x, y, z) -> (frames = z, rows = y, columns = x)
        pixels = np.ascontiguousarray(np.transpose(labels[:, :, zs, t], (2, 1, 0)))
        sop_uid = derived_uid("seg", run, study_uid, entry["series_instance_uid"], name, version, t,
                              _label_digest(pixels))
        label = _phase_label(t, measurements)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*omit_empty_frames.*")
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=SEG_SERIES_NUMBER,
                sop_instance_uid=sop_uid,
                instance_number=index + 1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=lo(name),
                software_versions=lo(version),
                device_serial_number=device_uid(name, version),
                content_label=label,
                content_description=f"LV/RV segmentation, cardiac phase {t} ({label})",
                series_description=lo(f"CMR-VL segmentation {name} {version}"),
            )
        copy_study_attributes(seg, headers[sops[zs[0]][t]])
        segs[t] = seg
    return segs


def build_seg(
    source_dir: Path,
    manifest: dict,
    labels_4d: np.ndarray,
    model: Mapping,
    phase: int,
    measurements: Mapping | None = None,
    run: str = "",
) -> Dataset:
    """The SEG of one phase (see `build_segs`)."""
    return build_segs(source_dir, manifest, labels_4d, model, [phase], measurements, run)[phase]


def seg_labels(seg: Dataset, source_sop_instance_uid: str) -> np.ndarray:
    """Label image (rows, columns) of one source image, read back from a SEG with highdicom."""
    import highdicom as hd

    if not isinstance(seg, hd.seg.Segmentation):
        seg = hd.seg.Segmentation.from_dataset(seg, copy=False)
    array = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[source_sop_instance_uid], combine_segments=True,
        skip_overlap_checks=True)
    return np.asarray(array[0])


__all__ = ["SEG_SERIES_NUMBER", "STUDY_ATTRIBUTES", "build_seg", "build_segs", "cine_entry",
           "copy_study_attributes", "default_phases", "derived_uid", "device_uid", "read_source_headers",
           "seg_labels", "segment_codes", "source_conformance"]
