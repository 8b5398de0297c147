"""Read a folder of DICOM files into per-frame records (one file is read exactly once).

Classic single-frame MR and enhanced multi-frame MR both become `Frame`s: one 2D image with its
own position, orientation, spacing, trigger time and rescale, pixels in native byte order
whatever the transfer syntax (little or big endian, JPEG / JPEG-LS / JPEG 2000 / RLE through
pydicom's decoders). Anything that cannot become a frame (not a regular file, not DICOM, too
large, truncated, no pixel data, undecodable) is returned as a `Rejected` with a one-line reason
that names the cause. A file's header (132 bytes) is checked before the rest is read.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _import_pydicom_lean():
    """Import pydicom without `requests` and `tqdm`, which it loads only to download its own
    test files: a third of its import time, paid by every `cmrvl preprocess`. The block is
    lifted right after, so a later `import requests` elsewhere works as usual."""
    blocked = [name for name in ("requests", "tqdm") if name not in sys.modules]
    if "pydicom" not in sys.modules:
        sys.modules.update(dict.fromkeys(blocked))  # None in sys.modules = ImportError
    try:
        import pydicom
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return pydicom


pydicom = _import_pydicom_lean()
from pydicom.errors import InvalidDicomError  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402

from services.preprocess import jpeg_decoders  # noqa: E402

jpeg_decoders.register()  # libjpeg-turbo first for JPEG: several times faster, 12-bit too

# Uncompressed little-endian pixel data is viewed directly; everything else goes through pydicom.
_NATIVE_DTYPES = {(8, 0): "u1", (8, 1): "i1", (16, 0): "<u2", (16, 1): "<i2",
                  (32, 0): "<u4", (32, 1): "<i4"}
# Tags read on the hot path (by number: faster than keyword lookup).
_SOP_INSTANCE_UID, _STUDY_UID, _SERIES_UID = 0x00080018, 0x0020000D, 0x0020000E
_IPP, _IOP, _INSTANCE_NUMBER = 0x00200032, 0x00200037, 0x00200013
_SLICE_THICKNESS, _SLICE_SPACING, _TRIGGER_TIME = 0x00180050, 0x00180088, 0x00181060
_SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES = 0x00280002, 0x00280008
_ROWS, _COLUMNS = 0x00280010, 0x00280011
_PIXEL_SPACING, _BITS_ALLOCATED, _BITS_STORED = 0x00280030, 0x00280100, 0x00280101
_PIXEL_REPRESENTATION, _RESCALE_INTERCEPT, _RESCALE_SLOPE = 0x00280103, 0x00281052, 0x00281053
_PIXEL_DATA, _SHARED_GROUPS = 0x7FE00010, 0x52009229
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# A study's files are read whole (the frames keep views of the bytes). Above this size a DICOM
# file is refused unread: memory stays bounded, and no cardiac cine or LGE object comes near it
# (a 12 x 30-phase 512x512 cine is 190 MB); it matches the 2 GiB default upload limit.
MAX_FILE_BYTES = 2 << 30
_HEADER_BYTES = 132  # 128-byte preamble + "DICM"


class _Refused(Exception):
    """A file that cannot become frames; str() is the one-line reason for `Rejected`."""


@dataclass
class Rejected:
    file: str  # path relative to the study folder
    reason: str


@dataclass
class SeriesInfo:
    """Series-level header values, taken from the first image file of the series."""
    series_instance_uid: str
    series_number: int | None = None
    description: str = ""
    protocol_name: str = ""
    sequence_name: str = ""
    modality: str = ""
    scanning_sequence: list[str] = field(default_factory=list)
    sequence_variant: list[str] = field(default_factory=list)
    image_type: list[str] = field(default_factory=list)
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    inversion_time_ms: float | None = None
    cardiac_number_of_images: int | None = None
    frame_of_reference_uid: str = ""
    sop_class_uid: str = ""
    body_part_examined: str = ""  # as stored (e.g. "HEART"); enhanced MR: the frame anatomy
    cardiac_synchronization_technique: str = ""  # NONE, REALTIME, PROSPECTIVE, RETROSPECTIVE...


@dataclass(eq=False)  # frames are compared by identity (they hold pixel arrays)
class Frame:
    """One 2D image: its geometry, timing and stored pixels (rows x cols, before rescale)."""
    file: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based frame in a multi-frame file, None for single-frame
    series_instance_uid: str
    study_instance_uid: str
    rows: int
    cols: int
    pixels: np.ndarray
    ipp: tuple[float, float, float] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    trigger_time_ms: float | None
    instance_number: int | None
    slope: float = 1.0
    intercept: float = 0.0
    temporal_index: int | None = None
    packed: object = None  # whatever read_folder's on_frame hook attached (e.g. a future)


@dataclass
class ReadResult:
    frames: list[Frame]
    series: dict[str, SeriesInfo]
    rejected: list[Rejected]
    studies: dict[str, dict]  # StudyInstanceUID -> study/patient header values (first image)
    n_files: int


_quiet_lock = threading.Lock()
_quiet_state: dict = {"depth": 0}


@contextmanager
def quiet_pydicom():
    """Real data has invalid UIDs and odd VRs: read them as they are, without warnings. pydicom
    also logs a traceback for every decoder plugin that fails on a frame (even when the next
    one decodes it); a file that no plugin decodes is rejected with the reason instead.

    pydicom's settings, its log level and the warning filters are process-wide, so concurrent
    and nested uses share one quiet period: the first to enter saves and silences, the last to
    leave restores (per-use save/restore across threads could leave pydicom silenced for good)."""
    with _quiet_lock:
        if _quiet_state["depth"] == 0:
            log = logging.getLogger("pydicom")  # its modules log through child loggers
            caught = warnings.catch_warnings()
            caught.__enter__()
            warnings.simplefilter("ignore")
            _quiet_state.update(mode=pydicom.config.settings.reading_validation_mode,
                                level=log.level, caught=caught)
            pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
            log.setLevel(logging.CRITICAL)
        _quiet_state["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                pydicom.config.settings.reading_validation_mode = _quiet_state["mode"]
                logging.getLogger("pydicom").setLevel(_quiet_state["level"])
                _quiet_state.pop("caught").__exit__(None, None, None)


def is_valid_uid(uid: str) -> bool:
    return bool(uid) and len(uid) <= 64 and bool(_UID_RE.match(uid))


def display_name(path: Path, folder: Path) -> str:
    """path relative to folder, as text that is always valid UTF-8 (manifest.json must be).

    Linux file names are bytes; bytes that are not UTF-8 are written as backslash escapes
    (os.fsencode, then decode with "backslashreplace"): the file named b"caf\\xe9.dcm" is shown
    as "caf\\xe9.dcm" (a backslash, "xe9"). Reversible: replace each "\\xNN" by byte NN and
    os.fsdecode the result (ambiguous only for a name that itself contains a literal "\\xNN")."""
    return os.fsencode(path.relative_to(folder).as_posix()).decode("utf-8", "backslashreplace")


def _special_kind(path: str) -> str:
    """What a directory entry that is not a regular file is, in words."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a regular file is read as one
    except OSError as exc:
        return f"broken link or unreadable entry ({exc.strerror})"
    for test, kind in ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "link to a folder, not followed")):
        if test(mode):
            return kind
    return "special file"


def _scan(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for every regular file below folder and (path, reason) for every other
    entry (pipes, sockets, devices, links to folders), in a stable order: a folder's entries
    by name, then its subfolders (names carry no meaning to us)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield Path(folder), f"folder cannot be listed ({exc.strerror}): its files are not read"
        return
    subfolders = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subfolders.append(entry.path)
        elif entry.is_file():  # d_type from the directory listing: no extra system call
            yield Path(entry.path), None
        else:
            yield Path(entry.path), f"not a regular file: {_special_kind(entry.path)}; skipped"
    for sub in subfolders:
        yield from _scan(Path(sub))


def list_files(folder: Path) -> list[Path]:
    """Every regular file below folder, in a stable order (pipes and other special files are
    left out: opening a FIFO blocks until someone writes to it)."""
    return [path for path, problem in _scan(Path(folder)) if problem is None]


def _values(value) -> list:
    """Any element value as a list. pydicom returns a lone value for one value and a MultiValue
    for several, whatever the attribute's VM allows (a single InversionTimes is a float): this is
    the one place that difference is handled."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _float(value) -> float | None:
    """The first value as a float (an attribute meant to hold one may hold several)."""
    values = _values(value)
    try:
        return float(values[0]) if values and values[0] != "" else None
    except (TypeError, ValueError):
        return None


def _int(value) -> int | None:
    values = _values(value)
    try:
        return int(values[0]) if values and values[0] != "" else None
    except (TypeError, ValueError):
        return None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in _values(value))
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _strings(value) -> list[str]:
    return [str(v) for v in _values(value)]


def _one_line(text) -> str:
    """Library messages span lines; a rejection reason is one line."""
    return " ".join(str(text).split())


def _item(seq_parent, keyword: str):
    """First item of a functional-group sequence in a (per-frame or shared) group, or None."""
    if seq_parent is None:
        return None
    seq = seq_parent.get(keyword)
    return seq[0] if seq else None


class _FrameGroups:
    """Look up a frame's attribute: per-frame functional group, then shared, then top level."""

    def __init__(self, ds):
        self.per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
        shared = ds.get("SharedFunctionalGroupsSequence")
        self.shared = shared[0] if shared else None
        self.ds = ds

    def get(self, index: int, sequence: str, keyword: str):
        per = self.per_frame[index] if index < len(self.per_frame) else None
        for group in (per, self.shared):
            item = _item(group, sequence)
            if item is not None and keyword in item:
                return item.get(keyword)
        return self.ds.get(keyword)


def _raw_value(ds, tag: int):
    """An element's value without pydicom's value conversion, which dominates read time.

    Returns the raw bytes for elements not yet converted, the converted value otherwise."""
    elem = ds.get_item(tag)
    return None if elem is None else elem.value


def _raw_numbers(ds, tag: int) -> list[float] | None:
    """DS/IS element (backslash-separated decimal strings) as floats, parsed directly."""
    value = _raw_value(ds, tag)
    if value is None:
        return None
    try:
        if isinstance(value, bytes):
            text = value.decode("ascii", "replace").strip(" \x00")
            return [float(v) for v in text.split("\\")] if text else None
        if isinstance(value, (str, int, float)):
            return [float(value)] if str(value).strip() else None
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _raw_number(ds, tag: int) -> float | None:
    values = _raw_numbers(ds, tag)
    return values[0] if values else None


def _raw_text(ds, tag: int) -> str:
    value = _raw_value(ds, tag)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    return "" if value is None else str(value)


def _raw_us(ds, tag: int) -> int | None:
    """An unsigned short (US) element such as Rows or BitsAllocated."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem.value, bytes):
        if len(elem.value) < 2:
            return None
        return int.from_bytes(elem.value[:2], "little" if elem.is_little_endian else "big")
    return int(elem.value)


def _pixels(ds, n_frames: int, rows: int, cols: int) -> np.ndarray:
    """Stored pixel values as (frames, rows, cols) in native byte order; raises _Refused when
    truncated or undecodable."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None and not ts.is_transfer_syntax:
        raise _Refused(f"pixel data unusable: transfer syntax {ts} is private or unknown, "
                       f"pydicom cannot decode it")
    key = (_raw_us(ds, _BITS_ALLOCATED) or 0, _raw_us(ds, _PIXEL_REPRESENTATION) or 0)
    native = (ts is not None and not ts.is_compressed and ts.is_little_endian
              and key in _NATIVE_DTYPES and _raw_us(ds, _BITS_STORED) == key[0]
              and (_raw_us(ds, _SAMPLES_PER_PIXEL) or 1) == 1)
    if native:
        dtype = np.dtype(_NATIVE_DTYPES[key])
        data = _raw_value(ds, _PIXEL_DATA)
        need = n_frames * rows * cols * dtype.itemsize
        if data is None or len(data) < need:
            raise _Refused(f"pixel data unusable: truncated pixel data: "
                           f"{0 if data is None else len(data)} of {need} bytes")
        return np.frombuffer(data, dtype=dtype, count=n_frames * rows * cols).reshape(
            n_frames, rows, cols)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise _Refused("pixel data unusable: colour images are not supported")
    try:
        decoder = _decoder(ts) if ts is not None else None
        # The decoder directly: ds.pixel_array adds its cache bookkeeping (~30 % of JPEG time).
        pixels = decoder.as_array(ds)[0] if decoder is not None else np.asarray(ds.pixel_array)
    except _Refused:
        raise
    except Exception as exc:  # decoders raise many types on damaged streams
        what = f"{_syntax(ts)} pixel data" if ts is not None else "pixel data"
        raise _Refused(f"pixel data unusable: decoding {what} failed: "
                       f"{type(exc).__name__}: {_one_line(exc)}") from None
    if not pixels.dtype.isnative:  # big endian syntax: values right, bytes in the wrong order
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))  # for NIfTI writers and packer
    try:
        return pixels.reshape(n_frames, rows, cols)
    except ValueError:
        raise _Refused(f"pixel data unusable: decoded shape {pixels.shape} is not "
                       f"{n_frames} frame(s) of {rows}x{cols}") from None


def _syntax(ts) -> str:
    return f"{ts.keyword or ts.name} ({ts})"  # keyword: the full names run to 90 characters


def _decoder(ts):
    """pydicom's decoder for ts; refused in one line, naming what to install, when no
    installed plugin decodes it."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise _Refused(f"pixel data unusable: no decoder exists in pydicom for "
                       f"{_syntax(ts)}") from None
    if not decoder.is_available:
        what = f"pixel data unusable: no decoder installed for {_syntax(ts)}"
        # cmrvl's own decoder packages: pydicom's list also names GPL-3.0 pylibjpeg-libjpeg.
        if ts in jpeg_decoders.INSTALLED_DECODERS:
            needs = " and ".join(jpeg_decoders.INSTALLED_DECODERS[ts])
            raise _Refused(f"{what}: install {needs} (a cmrvl dependency)")
        plugins = "; ".join(m.replace(" - requires ", " needs ")
                            for m in decoder.missing_dependencies) or "none known"
        raise _Refused(f"{what} (plugins: {plugins})")
    return decoder


def _looks_like_dicom(head: bytes) -> bool:
    # "DICM" after the preamble, or an old file without preamble that starts with a
    # group 0002 (meta) or 0008 (identifying) tag.
    return head[128:132] == b"DICM" or head.startswith((b"\x02\x00", b"\x08\x00"))


def _read_file(path: Path, max_bytes: int) -> bytes:
    """The whole file, after its header says DICOM and its size is within max_bytes."""
    # O_NONBLOCK: a regular file reads as usual, a FIFO put there after the folder was listed
    # returns no bytes (not DICOM) instead of blocking the read forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", buffering=0) as fh:
        size = os.fstat(fd).st_size
        head = fh.read(_HEADER_BYTES)
        if not _looks_like_dicom(head):
            raise _Refused("not a DICOM file (no 'DICM' marker after a 128-byte preamble and no "
                           "DICOM tag at the start)")
        if size > max_bytes:
            raise _Refused(f"DICOM file of {size / 2**30:.1f} GiB is above the "
                           f"{max_bytes / 2**30:.1f} GiB per-file limit: not read")
        fh.seek(0)
        return fh.read()


def _read_dataset(content: bytes):
    # Parsed from memory: pydicom calls tell() on the file for every element, and on a real file
    # each is a seek system call that also hands the GIL to the compression threads (~40 % of
    # read time on the Sunnybrook study).
    preamble = content[128:132] == b"DICM"
    return pydicom.dcmread(io.BytesIO(content), force=not preamble)


def _series_info(ds, uid: str) -> SeriesInfo:
    info = SeriesInfo(
        series_instance_uid=uid,
        series_number=_int(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "") or ""),
        protocol_name=str(ds.get("ProtocolName", "") or ""),
        sequence_name=str(ds.get("SequenceName", "") or ds.get("PulseSequenceName", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        scanning_sequence=_strings(ds.get("ScanningSequence")),
        sequence_variant=_strings(ds.get("SequenceVariant")),
        image_type=_strings(ds.get("ImageType")),
        echo_time_ms=_float(ds.get("EchoTime")),
        repetition_time_ms=_float(ds.get("RepetitionTime")),
        inversion_time_ms=_float(ds.get("InversionTime")),
        cardiac_number_of_images=_int(ds.get("CardiacNumberOfImages")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        sop_class_uid=str(ds.get("SOPClassUID", "") or ""),
        body_part_examined=str(ds.get("BodyPartExamined", "") or "").strip(),
        # Top level in enhanced MR too (its Cardiac Synchronization module).
        cardiac_synchronization_technique=str(
            ds.get("CardiacSynchronizationTechnique", "") or "").strip(),
    )
    if "SharedFunctionalGroupsSequence" in ds:  # enhanced MR keeps these in functional groups
        groups = _FrameGroups(ds)
        if info.echo_time_ms is None:
            info.echo_time_ms = _float(groups.get(0, "MREchoSequence", "EffectiveEchoTime"))
        if info.repetition_time_ms is None:
            info.repetition_time_ms = _float(groups.get(
                0, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
        if info.inversion_time_ms is None:
            info.inversion_time_ms = _float(groups.get(0, "MRModifierSequence", "InversionTimes"))
        if not info.scanning_sequence:
            pulse = str(ds.get("EchoPulseSequence", "") or "")
            info.scanning_sequence = {"GRADIENT": ["GR"], "SPIN": ["SE"],
                                      "BOTH": ["SE", "GR"]}.get(pulse, [])
            if groups.get(0, "MRModifierSequence", "InversionRecovery") == "YES":
                info.scanning_sequence.append("IR")
        if not info.image_type:
            info.image_type = _strings(ds.get("ImageType"))
        if not info.body_part_examined:
            # Enhanced MR codes it per frame (FrameAnatomySequence > AnatomicRegionSequence);
            # the code meaning upper-cased is the BodyPartExamined term ("Heart": HEART).
            regions = groups.get(0, "FrameAnatomySequence", "AnatomicRegionSequence")
            if regions:
                info.body_part_examined = str(regions[0].get("CodeMeaning", "") or "").upper()
    return info


def _study_info(ds) -> dict:
    def text(keyword):
        value = ds.get(keyword)
        return str(value).strip() if value not in (None, "") else None
    return {
        "study_instance_uid": text("StudyInstanceUID"),
        "study_date": text("StudyDate"),
        "study_time": text("StudyTime"),
        "study_description": text("StudyDescription"),
        "accession_number": text("AccessionNumber"),
        "patient_id": text("PatientID"),
        "patient_sex": text("PatientSex"),
        "patient_age": text("PatientAge"),
        "patient_size": _float(ds.get("PatientSize")),
        "patient_weight": _float(ds.get("PatientWeight")),
        "manufacturer": text("Manufacturer"),
        "magnetic_field_strength_t": _float(ds.get("MagneticFieldStrength")),
    }


def _single_frame(ds, rel: str, pixels: np.ndarray) -> Frame:
    """Classic single-frame image: every value read raw from the top-level dataset."""
    def tup(tag, n):
        values = _raw_numbers(ds, tag)
        return tuple(values) if values and len(values) == n else None

    trigger = _raw_number(ds, _TRIGGER_TIME)
    if trigger is None:
        trigger = _float(ds.get("NominalCardiacTriggerDelayTime"))
    instance = _raw_number(ds, _INSTANCE_NUMBER)
    return Frame(
        file=rel, sop_instance_uid=_raw_text(ds, _SOP_INSTANCE_UID), frame_number=None,
        series_instance_uid=_raw_text(ds, _SERIES_UID),
        study_instance_uid=_raw_text(ds, _STUDY_UID),
        rows=pixels.shape[1], cols=pixels.shape[2], pixels=pixels[0],
        ipp=tup(_IPP, 3), iop=tup(_IOP, 6), pixel_spacing=tup(_PIXEL_SPACING, 2),
        slice_thickness=_raw_number(ds, _SLICE_THICKNESS),
        spacing_between_slices=_raw_number(ds, _SLICE_SPACING),
        trigger_time_ms=trigger,
        instance_number=None if instance is None else int(instance),
        slope=_raw_number(ds, _RESCALE_SLOPE) or 1.0,
        intercept=_raw_number(ds, _RESCALE_INTERCEPT) or 0.0,
    )


def _frames_of(ds, rel: str) -> list[Frame]:
    rows, cols = _raw_us(ds, _ROWS), _raw_us(ds, _COLUMNS)
    n_frames = int(_raw_number(ds, _NUMBER_OF_FRAMES) or 1)
    pixels = _pixels(ds, n_frames, rows, cols)
    if n_frames == 1 and ds.get_item(_SHARED_GROUPS) is None:
        return [_single_frame(ds, rel, pixels)]
    # Enhanced multi-frame: per-frame values live in functional groups.
    groups = _FrameGroups(ds)
    sop = str(ds.get("SOPInstanceUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    study_uid = str(ds.get("StudyInstanceUID", ""))
    instance = _int(ds.get("InstanceNumber"))
    frames = []
    for i in range(n_frames):
        trigger = _float(groups.get(i, "CardiacSynchronizationSequence",
                                    "NominalCardiacTriggerDelayTime"))
        if trigger is None:
            trigger = _float(ds.get("TriggerTime"))
        frames.append(Frame(
            file=rel, sop_instance_uid=sop, frame_number=i + 1,
            series_instance_uid=series_uid, study_instance_uid=study_uid,
            rows=rows, cols=cols, pixels=pixels[i],
            ipp=_floats(groups.get(i, "PlanePositionSequence", "ImagePositionPatient"), 3),
            iop=_floats(groups.get(i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_floats(groups.get(i, "PixelMeasuresSequence", "PixelSpacing"), 2),
            slice_thickness=_float(groups.get(i, "PixelMeasuresSequence", "SliceThickness")),
            spacing_between_slices=_float(
                groups.get(i, "PixelMeasuresSequence", "SpacingBetweenSlices")),
            trigger_time_ms=trigger,
            instance_number=instance,
            slope=_float(groups.get(i, "PixelValueTransformationSequence", "RescaleSlope")) or 1.0,
            intercept=_float(groups.get(i, "PixelValueTransformationSequence",
                                        "RescaleIntercept")) or 0.0,
            temporal_index=_int(groups.get(i, "FrameContentSequence", "TemporalPositionIndex")),
        ))
    return frames


def _read_one(path: Path, rel: str, max_bytes: int):
    """(dataset, frames) of one file; raises _Refused with the reason it cannot be used."""
    try:
        ds = _read_dataset(_read_file(path, max_bytes))
    except _Refused:
        raise
    except InvalidDicomError as exc:
        raise _Refused(f"not a DICOM file: {_one_line(exc)}") from None
    except OSError as exc:
        raise _Refused(f"file cannot be read: {exc.strerror or _one_line(exc)}") from None
    except Exception as exc:  # pydicom raises many types on damaged files
        raise _Refused(f"unreadable DICOM: {type(exc).__name__}: {_one_line(exc)}") from None
    if ds.get_item(_PIXEL_DATA) is None:
        what = str(ds.get("SOPClassUID", "")) or "unknown SOP class"
        if getattr(getattr(ds, "SOPClassUID", None), "name", None):
            what = ds.SOPClassUID.name
        raise _Refused(f"no pixel data (not an image or truncated): {what}")
    if ds.get_item(_ROWS) is None or ds.get_item(_COLUMNS) is None:
        raise _Refused("image without Rows/Columns")
    try:
        return ds, _frames_of(ds, rel)
    except _Refused:
        raise
    except Exception as exc:  # odd frame headers must not stop the rest of the study
        raise _Refused(f"image unusable: {type(exc).__name__}: {_one_line(exc)}") from None


def rejection_summary(rejected: list[Rejected], examples: int = 3) -> str:
    """One line: the most frequent causes first, with a count and an example file each
    (so 240 undecodable images are not summed up by the one stray .nii.gz beside them)."""
    causes = Counter(r.reason for r in rejected)
    first = {}
    for r in rejected:
        first.setdefault(r.reason, r.file)
    parts = [f"{n} x {reason} (e.g. {first[reason]})" for reason, n in causes.most_common(examples)]
    if len(causes) > examples:
        parts.append(f"{len(causes) - examples} other reason(s)")
    return "; ".join(parts)


def read_folder(folder: Path, on_frame: Callable[[Frame], None] | None = None,
                max_file_bytes: int = MAX_FILE_BYTES) -> ReadResult:
    """Read every file below folder once; images become frames, the rest is rejected.

    on_frame is called with each frame as soon as it is read (to start work on it early).
    Files are named as `display_name` gives them (valid UTF-8 whatever the file system holds)."""
    folder = Path(folder)
    frames: list[Frame] = []
    series: dict[str, SeriesInfo] = {}
    rejected: list[Rejected] = []
    studies: dict[str, dict] = {}
    n_files = 0
    with quiet_pydicom():
        for path, problem in _scan(folder):
            n_files += 1
            rel = display_name(path, folder)
            try:
                if problem is not None:
                    raise _Refused(problem)
                ds, file_frames = _read_one(path, rel, max_file_bytes)
                uid = file_frames[0].series_instance_uid
                info = series.get(uid) or _series_info(ds, uid)
                study_uid = file_frames[0].study_instance_uid
                study = studies.get(study_uid) or _study_info(ds)
            except _Refused as exc:
                rejected.append(Rejected(rel, str(exc)))
                continue
            except Exception as exc:  # an odd header must not stop the rest of the study
                rejected.append(Rejected(rel, f"header unusable: {type(exc).__name__}: "
                                              f"{_one_line(exc)}"))
                continue
            series[uid], studies[study_uid] = info, study
            frames.extend(file_frames)
            if on_frame is not None:
                for frame in file_frames:
                    on_frame(frame)
    return ReadResult(frames=frames, series=series, rejected=rejected, studies=studies,
                      n_files=n_files)
