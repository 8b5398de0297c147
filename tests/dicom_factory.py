"""Small synthetic cardiac MRI DICOM studies for tests (pydicom only, no sample data needed).

    study = write_cine_study(tmp_path / "dicom")          # 4 slices x 5 phases x 32x32 cine
    study.expected                                        # (cols, rows, slices, phases) volume

Every image gets random pixel values seeded by its (series, slice, phase), so a misplaced or
transposed frame is always detected. Geometry is oblique on purpose. `expected` is in the axis
convention of services.preprocess.geometry: volume[col, row, slice, phase] = pixel[row, col].
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


# An oblique short-axis plane (row and column directions, LPS) and a long-axis plane.
_SAX_ROW = _unit([0.6, 0.7, -0.3])
_SAX_COL = _unit(np.cross(_unit([0.5, -0.6, -0.6]), _SAX_ROW))
SAX_IOP = tuple(np.round(np.concatenate([_SAX_ROW, _SAX_COL]), 6))
_LAX_ROW = _unit([0.5, -0.6, -0.6])
_LAX_COL = _unit(np.cross(_SAX_ROW, _LAX_ROW))
LAX_IOP = tuple(np.round(np.concatenate([_LAX_ROW, _LAX_COL]), 6))


def slice_normal(iop) -> np.ndarray:
    return np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))


@dataclass
class SeriesSpec:
    """What a test needs to know about a written series."""
    series_instance_uid: str
    study_instance_uid: str
    n_slices: int
    n_phases: int
    expected: np.ndarray  # (cols, rows, slices, phases) after rescale, zeros where skipped
    positions: list  # IPP (LPS) per slice, in slice order
    iop: tuple
    pixel_spacing: tuple
    trigger_times_ms: list
    files: list[Path] = field(default_factory=list)
    sop_instance_uids: list = field(default_factory=list)  # [slice][phase]


def pixel_block(seed: int, rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=(rows, cols), dtype=np.int16)


def base_dataset(*, study_uid: str, series_uid: str, sop_uid: str, sop_class: str,
                 series_number: int, description: str = "", height_m: float | None = 1.75,
                 weight_kg: float | None = 70.0, scanning_sequence: str | list = "GR",
                 echo_time_ms: float = 1.5, repetition_time_ms: float = 3.2,
                 inversion_time_ms: float | None = None,
                 body_part_examined: str | None = None) -> Dataset:
    """Patient, study, series and MR acquisition attributes shared by every image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame-of-reference"])
    ds.Modality = "MR"
    ds.Manufacturer = "CMRVL test factory"
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN001"
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    if height_m is not None:
        ds.PatientSize = height_m
    if weight_kg is not None:
        ds.PatientWeight = weight_kg
    ds.StudyDate = "20240131"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC123"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.ScanningSequence = scanning_sequence
    ds.SequenceVariant = "SS"
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = echo_time_ms
    ds.RepetitionTime = repetition_time_ms
    if inversion_time_ms is not None:
        ds.InversionTime = inversion_time_ms
    if body_part_examined is not None:
        ds.BodyPartExamined = body_part_examined
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def write_series(folder: Path, *, n_slices: int = 4, n_phases: int = 5, rows: int = 32,
                 cols: int = 32, iop=SAX_IOP, origin=(-20.0, 30.0, 40.0),
                 pixel_spacing=(1.5, 1.25), slice_gap_mm: float = 8.0, rr_ms: float = 800.0,
                 study_uid: str | None = None, series_number: int = 5, description: str = "",
                 cine: bool = True, skip: set[tuple[int, int]] = frozenset(),
                 slope: float = 1.0, intercept: float = 0.0, shuffle: bool = True,
                 seed: int = 0, iop_override: dict[int, tuple] | None = None,
                 name_prefix: str = "", **dataset_kwargs) -> SeriesSpec:
    """One classic single-frame series: n_slices parallel slices x n_phases trigger times.

    skip: (slice, phase) cells not written. shuffle: file names and InstanceNumbers in random
    order. iop_override: slice index -> another orientation (a second geometry in the series)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    normal = slice_normal(iop)
    positions = [np.asarray(origin, float) + k * slice_gap_mm * normal for k in range(n_slices)]
    times = [round(p * rr_ms / n_phases, 2) for p in range(n_phases)] if cine else []
    expected = np.zeros((cols, rows, n_slices, n_phases), dtype=np.float64)
    cells = [(k, p) for k in range(n_slices) for p in range(n_phases)]
    order = list(range(len(cells)))
    rnd = random.Random(seed)
    if shuffle:
        rnd.shuffle(order)
    spec = SeriesSpec(series_uid, study_uid, n_slices, n_phases, expected,
                      [tuple(p) for p in positions], tuple(iop), tuple(pixel_spacing), times)
    spec.sop_instance_uids = [[None] * n_phases for _ in range(n_slices)]
    for number, index in enumerate(order, start=1):
        k, p = cells[index]
        if (k, p) in skip:
            continue
        sop = generate_uid()
        ds = base_dataset(study_uid=study_uid, series_uid=series_uid, sop_uid=sop,
                          sop_class=MR_IMAGE_STORAGE, series_number=series_number,
                          description=description, **dataset_kwargs)
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions[k]]
        ds.ImageOrientationPatient = list((iop_override or {}).get(k, iop))
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_gap_mm
        ds.SpacingBetweenSlices = slice_gap_mm
        ds.Rows, ds.Columns = rows, cols
        if cine:
            ds.TriggerTime = times[p]
            ds.CardiacNumberOfImages = n_phases
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
        pixels = pixel_block(seed * 100003 + k * 1009 + p, rows, cols)
        ds.PixelData = pixels.tobytes()
        expected[:, :, k, p] = pixels.T * slope + intercept
        path = folder / f"{name_prefix}{rnd.randrange(10**9):09d}.dcm" if shuffle else \
            folder / f"{name_prefix}{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        spec.files.append(path)
        spec.sop_instance_uids[k][p] = sop
    spec.positions = [tuple(float(v) for v in np.round(p, 4)) for p in positions]
    return spec


def write_cine_study(folder: Path, *, n_slices: int = 4, n_phases: int = 5, rows: int = 32,
                     cols: int = 32, height_m: float | None = 1.75,
                     weight_kg: float | None = 70.0, **kwargs) -> SeriesSpec:
    """A minimal usable study: one short-axis cine series (empty SeriesDescription, as real
    scanners often leave it) with PatientSize/PatientWeight set."""
    return write_series(folder, n_slices=n_slices, n_phases=n_phases, rows=rows, cols=cols,
                        height_m=height_m, weight_kg=weight_kg, **kwargs)


def write_lge_stack(folder: Path, *, study_uid: str, series_number: int = 20,
                    n_slices: int = 6, **kwargs) -> SeriesSpec:
    """Single-phase inversion-recovery gradient echo short-axis stack (no description),
    BodyPartExamined HEART (its cardiac evidence when the study has no cine)."""
    kwargs.setdefault("body_part_examined", "HEART")
    return write_series(folder, study_uid=study_uid, series_number=series_number,
                        n_slices=n_slices, n_phases=1, cine=False,
                        scanning_sequence=["GR", "IR"], inversion_time_ms=300.0,
                        echo_time_ms=3.1, name_prefix=f"s{series_number}_", **kwargs)


def write_t2_stack(folder: Path, *, study_uid: str, series_number: int = 30,
                   n_slices: int = 5, **kwargs) -> SeriesSpec:
    """Single-phase spin-echo short-axis stack with a long echo time (T2 weighted),
    BodyPartExamined HEART."""
    kwargs.setdefault("body_part_examined", "HEART")
    return write_series(folder, study_uid=study_uid, series_number=series_number,
                        n_slices=n_slices, n_phases=1, cine=False, scanning_sequence="SE",
                        echo_time_ms=80.0, repetition_time_ms=1600.0,
                        name_prefix=f"s{series_number}_", **kwargs)


def write_lax_cine(folder: Path, *, study_uid: str, series_number: int = 10,
                   n_phases: int = 5, **kwargs) -> SeriesSpec:
    """One long-axis cine slice (4-chamber-like plane, perpendicular to the short axis)."""
    return write_series(folder, study_uid=study_uid, series_number=series_number, n_slices=1,
                        n_phases=n_phases, iop=LAX_IOP, name_prefix=f"s{series_number}_",
                        **kwargs)


def _enhanced_mr(*, study_uid: str, series_uid: str, sop: str, series_number: int, rows: int, cols: int,
                 n_frames: int, iop, pixel_spacing, slice_gap_mm: float, echo_time_ms: float) -> tuple[Dataset, Dataset]:
    """An enhanced MR image's dataset and its shared functional group (pixel measures,
    orientation, echo time), for the writers below to add their own groups and frames to."""
    ds = base_dataset(study_uid=study_uid, series_uid=series_uid, sop_uid=sop,
                      sop_class=ENHANCED_MR_IMAGE_STORAGE, series_number=series_number,
                      description="", scanning_sequence="GR")
    for keyword in ("ScanningSequence", "SequenceVariant", "EchoTime", "RepetitionTime"):
        delattr(ds, keyword)  # enhanced MR moves these into functional groups
    ds.EchoPulseSequence = "GRADIENT"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = n_frames
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = slice_gap_mm
    shared.PixelMeasuresSequence = Sequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(iop)
    shared.PlaneOrientationSequence = Sequence([orientation])
    echo = Dataset()
    echo.EffectiveEchoTime = echo_time_ms
    shared.MREchoSequence = Sequence([echo])
    return ds, shared


def _frame_group(position_lps, trigger_ms: float, temporal_index: int, in_stack: int | None = None) -> Dataset:
    """One frame's functional group: its position, trigger delay and frame content."""
    item = Dataset()
    position = Dataset()
    position.ImagePositionPatient = [round(float(v), 4) for v in position_lps]
    item.PlanePositionSequence = Sequence([position])
    cardiac = Dataset()
    cardiac.NominalCardiacTriggerDelayTime = trigger_ms
    item.CardiacSynchronizationSequence = Sequence([cardiac])
    content = Dataset()
    content.TemporalPositionIndex = temporal_index
    if in_stack is not None:
        content.InStackPositionNumber = in_stack
    item.FrameContentSequence = Sequence([content])
    return item


def write_enhanced_cine(path: Path, *, n_slices: int = 3, n_phases: int = 6, rows: int = 24,
                        cols: int = 20, iop=SAX_IOP, origin=(10.0, -5.0, 60.0),
                        pixel_spacing=(1.4, 1.6), slice_gap_mm: float = 7.0,
                        slope: float = 2.0, intercept: float = -100.0,
                        study_uid: str | None = None, seed: int = 7) -> SeriesSpec:
    """One enhanced multi-frame MR file holding a whole cine, frames in shuffled order,
    geometry and timing in functional groups, rescale per frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid, sop = generate_uid(), generate_uid()
    normal = slice_normal(iop)
    positions = [np.asarray(origin, float) + k * slice_gap_mm * normal for k in range(n_slices)]
    times = [round(p * 900.0 / n_phases, 2) for p in range(n_phases)]
    cells = [(k, p) for k in range(n_slices) for p in range(n_phases)]
    random.Random(seed).shuffle(cells)
    ds, shared = _enhanced_mr(study_uid=study_uid, series_uid=series_uid, sop=sop, series_number=7, rows=rows,
                              cols=cols, n_frames=len(cells), iop=iop, pixel_spacing=pixel_spacing,
                              slice_gap_mm=slice_gap_mm, echo_time_ms=1.4)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    expected = np.zeros((cols, rows, n_slices, n_phases))
    sops = [[sop] * n_phases for _ in range(n_slices)]
    per_frame, blocks = [], []
    for k, p in cells:
        item = _frame_group(positions[k], times[p], p + 1)
        rescale = Dataset()
        rescale.RescaleSlope = slope
        rescale.RescaleIntercept = intercept
        rescale.RescaleType = "US"
        item.PixelValueTransformationSequence = Sequence([rescale])
        per_frame.append(item)
        pixels = pixel_block(seed * 7919 + k * 101 + p, rows, cols)
        blocks.append(pixels)
        expected[:, :, k, p] = pixels.T * slope + intercept
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(blocks).tobytes()
    ds.save_as(path, enforce_file_format=True)
    spec = SeriesSpec(series_uid, study_uid, n_slices, n_phases, expected,
                      [tuple(float(v) for v in np.round(p, 4)) for p in positions], tuple(iop),
                      tuple(pixel_spacing), times, [path], sops)
    return spec


def write_enhanced_ir_stack(path: Path, *, study_uid: str, n_slices: int = 6, rows: int = 24,
                            cols: int = 20, iop=SAX_IOP, origin=(12.0, -4.0, 58.0),
                            pixel_spacing=(1.4, 1.6), slice_gap_mm: float = 8.0,
                            inversion_times_ms=(300.0,), trigger_delay_ms: float = 420.0,
                            series_number: int = 21, seed: int = 11) -> SeriesSpec:
    """LGE as Siemens XA scanners store it: one enhanced multi-frame MR file, one frame per
    short-axis slice, inversion recovery flagged in MRModifierSequence with InversionTimes (FD,
    VM 1-n) holding a single value, which pydicom then returns as a float, not a list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    series_uid, sop = generate_uid(), generate_uid()
    normal = slice_normal(iop)
    positions = [np.asarray(origin, float) + k * slice_gap_mm * normal for k in range(n_slices)]
    ds, shared = _enhanced_mr(study_uid=study_uid, series_uid=series_uid, sop=sop, series_number=series_number,
                              rows=rows, cols=cols, n_frames=n_slices, iop=iop, pixel_spacing=pixel_spacing,
                              slice_gap_mm=slice_gap_mm, echo_time_ms=1.9)
    timing = Dataset()
    timing.RepetitionTime = 650.0
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    modifier = Dataset()
    modifier.InversionRecovery = "YES"
    modifier.InversionTimes = list(inversion_times_ms) if len(inversion_times_ms) > 1 \
        else inversion_times_ms[0]
    shared.MRModifierSequence = Sequence([modifier])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    expected = np.zeros((cols, rows, n_slices, 1))
    per_frame, blocks = [], []
    for k in range(n_slices):
        per_frame.append(_frame_group(positions[k], trigger_delay_ms, 1, in_stack=k + 1))
        pixels = pixel_block(seed * 7919 + k * 101, rows, cols)
        blocks.append(pixels)
        expected[:, :, k, 0] = pixels.T
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(blocks).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return SeriesSpec(series_uid, study_uid, n_slices, 1, expected,
                      [tuple(float(v) for v in np.round(p, 4)) for p in positions], tuple(iop),
                      tuple(pixel_spacing), [trigger_delay_ms], [path],
                      [[sop] for _ in range(n_slices)])


AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_brain_stack(folder: Path, *, study_uid: str, weighting: str = "t1_ir",
                      series_number: int = 60, n_slices: int = 8, **kwargs) -> SeriesSpec:
    """A brain stack that looks like an LGE or T2 stack by its sequence tags alone: axial,
    untriggered, BodyPartExamined BRAIN. weighting "t1_ir" is an MPRAGE (inversion-recovery
    gradient echo, short TE), "t2" a T2 turbo spin echo (long TE)."""
    sequence = {"t1_ir": dict(scanning_sequence=["GR", "IR"], inversion_time_ms=900.0,
                              echo_time_ms=2.3, repetition_time_ms=2300.0),
                "t2": dict(scanning_sequence="SE", echo_time_ms=95.0,
                           repetition_time_ms=6000.0)}[weighting]
    kwargs.setdefault("body_part_examined", "BRAIN")
    return write_series(folder, study_uid=study_uid, series_number=series_number,
                        n_slices=n_slices, n_phases=1, cine=False, iop=AXIAL_IOP,
                        slice_gap_mm=5.0, name_prefix=f"brain{series_number}_",
                        **sequence, **kwargs)
