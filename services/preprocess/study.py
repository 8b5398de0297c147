"""Turn a cardiac MRI DICOM study folder into NIfTI volumes and a manifest.

    manifest = preprocess_study(Path("dicom"), Path("out"))   # writes out/manifest.json + volumes

Each series is classified as `cine_sax`, `cine_lax`, `lge_sax`, `t2_sax` or `other` from its
geometry, number of phases and sequence tags; SeriesDescription is only a hint because real data
often leaves it empty. Raises `NoUsableCine` when no short-axis cine can be built.
Volume axes and the RAS+ affine convention are described in `services.preprocess.geometry`.

Manifest (manifest.json; the first keys are the command-line contract of issue 3):
  study_instance_uid, patient {height_m, weight_kg} (null when absent),
  series: [{series_instance_uid, kind, n_slices, n_phases, volume (relative .nii.gz path or null),
            trigger_times_ms (per phase, median over slices; [] without TriggerTime),
            series_number, description, classification (why this kind), n_files, rows, columns,
            affine (4x4 RAS+), pixel_spacing_mm ([between rows, between columns], as DICOM),
            voxel_size_mm ([x, y, z]), slice_thickness_mm, slice_spacing_mm,
            image_orientation_patient, slice_normal_lps, frame_of_reference_uid, echo_time_ms,
            repetition_time_ms, inversion_time_ms, scanning_sequence,
            sop_instance_uids and frame_numbers ([slice][phase]; null where the cell is empty,
            frame_numbers null for single-frame files), issues [{type, detail, ...}],
            merged_series_instance_uids (only for a cine assembled from one-slice series)}],
  rejected: [{file, reason}] (relative paths; bytes of a name that are not UTF-8 appear as
            \\xNN escapes, see reader.display_name),
  study {study_date, study_time, accession_number, patient_id, patient_sex, patient_age, ...},
  issues (study level), primary {kind: series_instance_uid of the series to use},
  conventions (axes and units in words).
Issue types: missing_slice, missing_phase, inconsistent_geometry, inconsistent_pixel_spacing,
inconsistent_matrix, irregular_slice_spacing, missing_geometry, duplicate_image,
ambiguous_order, unplaced_image (a trigger time no phase is near, or one that could be more
than one phase), incomplete_phase_axis (no slice has every phase), missing_trigger_time (placed
by InstanceNumber, or left out), repeated_slice and multiple_frames_of_reference (cines merged
from one-slice series), invalid_uid, patient_height_unit; study level also other_study (files
of another StudyInstanceUID, rejected: the study with a short-axis cine is kept).
Images that are left out are named in the issue's `excluded`; their cells stay null / zeros.
LGE and T2 stacks need cardiac evidence: the cine's short axis, or without a cine an ECG trigger
or BodyPartExamined HEART (brain MPRAGE and T2 stacks are `other`).
Volumes: integer data with identity rescale keeps its stored dtype; whole-number slope and
intercept give int32; anything else float32. Missing cells hold zeros.
A run builds its output in a fresh folder beside OUT and then replaces OUT's manifest.json and
series/ with it, also when it fails (NoUsableCine): no volume of an earlier run is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from services.preprocess import geometry
from services.preprocess.reader import (Frame, ReadResult, SeriesInfo, is_valid_uid, read_folder,
                                        rejection_summary)
from services.preprocess.stack import (POSITION_TOL_MM, Grid, build_grid, median, same_geometry,
                                       volume)

KINDS = ("cine_sax", "cine_lax", "lge_sax", "t2_sax", "other")
MANIFEST_NAME = "manifest.json"
MIN_CINE_PHASES = 5  # fewer trigger times than this is not a cine loop
MIN_STACK_SLICES = 3  # a short-axis stack covers the ventricles with several parallel slices

_LAX_HINTS = ("2ch", "3ch", "4ch", "2 ch", "3 ch", "4 ch", "lax", "long ax", "lvot", "hla", "vla")
_SAX_HINTS = ("sax", "short ax", "sa_", "_sa", " sa ")
_LGE_HINTS = ("lge", "late", "delay", "psir", "mde", "viab", "de_", "_de ")
_T2_HINTS = ("t2", "stir", "edema", "oedema")
_LOCALIZER_HINTS = ("localizer", "localiser", "scout", "survey", "tri-pilot", "3-plane", "3pl")


class NoUsableCine(ValueError):
    """No short-axis cine could be built from the study; str() says why in one line."""

    def __init__(self, reason: str, manifest: dict | None = None):
        super().__init__(reason)
        self.manifest = manifest


def _has(text: str, hints: tuple[str, ...]) -> bool:
    return any(h in text for h in hints)


def classify(info: SeriesInfo, grid: Grid | None) -> tuple[str, str]:
    """(kind, reason) for one series from geometry, phases and sequence tags."""
    if grid is None:
        return "other", "no image has usable position/orientation"
    text = f" {info.description} {info.protocol_name} {info.sequence_name} ".lower()
    if "LOCALIZER" in [t.upper() for t in info.image_type] or _has(text, _LOCALIZER_HINTS):
        return "other", "localizer"
    n_phases = len(grid.trigger_times_ms)
    stack = grid.n_slices >= MIN_STACK_SLICES
    shape = f"{grid.n_slices} slice(s) x {grid.n_phases} phase(s)"
    if n_phases >= MIN_CINE_PHASES:
        if _has(text, _LAX_HINTS) and not _has(text, _SAX_HINTS):
            return "cine_lax", f"cine, {shape}, long-axis name"
        if stack:
            return "cine_sax", f"cine stack of parallel slices, {shape}"
        return "cine_lax", f"cine with {shape}: a long-axis view"
    scanning = {s.upper() for s in info.scanning_sequence}
    inversion = (info.inversion_time_ms or 0) > 0 or "IR" in scanning
    spin_echo = "SE" in scanning
    te = info.echo_time_ms
    t2 = _has(text, _T2_HINTS) or (spin_echo and te is not None and te >= 40)
    lge = _has(text, _LGE_HINTS) or (inversion and not spin_echo and (te is None or te < 10))
    if t2:
        return ("t2_sax", f"T2-weighted stack, {shape}") if stack else \
            ("other", f"T2-weighted but not a stack ({shape})")
    if lge:
        return ("lge_sax", f"inversion-recovery gradient echo stack, {shape}") if stack else \
            ("other", f"LGE-like but not a stack ({shape})")
    return "other", f"no cine, LGE or T2 signature ({shape})"


def _refine_with_cine_axis(entries: list[dict]) -> None:
    """Short-axis stacks share the cine's slice normal; anything far from it is not short-axis."""
    cines = [e for e in entries if e["kind"] == "cine_sax"]
    if not cines:
        return
    axis = max(cines, key=lambda e: e["_grid"].n_slices * e["_grid"].n_phases)["_grid"].normal
    for e in entries:
        grid = e["_grid"]
        if grid is None or e["kind"] == "other":
            continue
        cos = abs(float(np.dot(grid.normal, axis)))
        if e["kind"] in ("lge_sax", "t2_sax") and cos < 0.8:
            e["kind"] = "other"
            e["classification"] += "; slice normal is not the short axis of the cine"
        elif e["kind"] == "cine_lax" and cos > 0.95:
            e["kind"] = "other"
            e["classification"] += "; parallel to the short-axis cine (a lone short-axis slice)"


try:  # ISA-L deflate (package `isal`): the same gzip, about 4x faster than zlib at equal size.
    from isal import isal_zlib
except ImportError:  # optional: zlib does the same job, slower
    isal_zlib = None
DEFLATE = "isal" if isal_zlib is not None else "zlib"


def _gzip_member(chunk) -> bytes:
    """One gzip member (wbits 31) of chunk. Both libraries release the GIL while compressing."""
    if isal_zlib is not None:
        comp = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    else:  # level 1 with run-length matching: as small as level 6 on MR images, much faster
        comp = zlib.compressobj(1, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    return comp.compress(chunk) + comp.flush()


def nifti_header(shape: tuple[int, ...], dtype, affine: np.ndarray,
                 time_step_ms: float | None = None) -> bytes:
    """NIfTI-1 single-file header (352 bytes incl. the empty extension flag) from nibabel."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(affine, code=1)  # 1 = scanner coordinates; also sets the voxel sizes
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "msec")
    if len(shape) == 4 and time_step_ms:
        hdr.set_zooms(hdr.get_zooms()[:3] + (float(time_step_ms),))
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\x00\x00\x00\x00"


def _write_members(path: Path, header: bytes, members) -> None:
    """The .nii.gz as consecutive gzip members: header first, then the data in file order.

    Several members form one valid gzip file (RFC 1952) that nibabel, ITK, FSL and gzip -d
    read as one stream; it lets the data be compressed in parallel pieces."""
    with open(path, "wb") as fh:
        fh.write(_gzip_member(header))
        for member in members:
            fh.write(member)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray,
                time_step_ms: float | None = None) -> None:
    """Write data (x, y, z[, t]) with a RAS+ affine as .nii.gz (or .nii if so named).

    Pieces are compressed in threads (zlib releases the GIL)."""
    header = nifti_header(data.shape, data.dtype, affine, time_step_ms)
    body = memoryview(np.ascontiguousarray(data.T)).cast("B")  # Fortran order of data
    path = Path(path)
    if path.suffix != ".gz":
        path.write_bytes(header + bytes(body))
        return
    size = 4 << 20
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    with ThreadPoolExecutor(max(1, min(len(chunks), os.cpu_count() or 1, 8))) as pool:
        _write_members(path, header, pool.map(_gzip_member, chunks))


class _FramePacker:
    """Compresses each frame's stored pixels in worker threads while later files are read.

    When a volume's voxels are exactly the stored values (identity rescale, one dtype), its
    .nii.gz is then just the header plus these members in volume order: no second pass."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 4)))
        self.native = sys.byteorder == "little"

    def __call__(self, frame: Frame) -> None:
        pixels = frame.pixels
        if self.native and pixels.flags.c_contiguous and pixels.dtype.byteorder in "<=|":
            frame.packed = self.pool.submit(_gzip_member, memoryview(pixels).cast("B"))

    def members(self, grid: Grid):
        """Precompressed members of the grid in NIfTI order, or None if they cannot be used."""
        frames = grid.frames
        dtypes = {f.pixels.dtype for f in frames}
        if len(dtypes) != 1 or any(f.packed is None or f.slope != 1 or f.intercept != 0
                                   for f in frames):
            return None
        dtype = next(iter(dtypes))
        zero = None
        out = []
        for t in range(grid.n_phases):  # x fastest, then y, slice, phase
            for k in range(grid.n_slices):
                frame = grid.cells[k][t]
                if frame is None:
                    if zero is None:
                        zero = _gzip_member(bytes(grid.rows * grid.cols * dtype.itemsize))
                    out.append(zero)
                else:
                    out.append(frame.packed.result())
        return out, dtype

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def write_grid(path: Path, grid: Grid, packer: _FramePacker | None = None) -> None:
    """Write a grid's volume (x, y, slice[, phase]) as .nii.gz."""
    times = grid.trigger_times_ms
    step = float(median(np.diff(times))) if len(times) > 1 else None
    packed = packer.members(grid) if packer is not None else None
    if packed is None:
        write_nifti(path, volume(grid), grid.affine, step)
        return
    members, dtype = packed
    shape = (grid.cols, grid.rows, grid.n_slices) + ((grid.n_phases,) if grid.n_phases > 1 else ())
    _write_members(path, nifti_header(shape, dtype, grid.affine, step), members)


def _uids(grid: Grid) -> tuple[list, list]:
    sops = [[f.sop_instance_uid if f else None for f in row] for row in grid.cells]
    frames = [[f.frame_number if f else None for f in row] for row in grid.cells]
    return sops, frames


def _series_entry(info: SeriesInfo, frames: list[Frame], grid: Grid | None) -> dict:
    kind, why = classify(info, grid)
    entry: dict = {
        "series_instance_uid": info.series_instance_uid,
        "series_number": info.series_number,
        "description": info.description,
        "kind": kind,
        "classification": why,
        "n_files": len({f.file for f in frames}),
        "n_slices": grid.n_slices if grid else 0,
        "n_phases": grid.n_phases if grid else 0,
        "volume": None,
        "trigger_times_ms": grid.trigger_times_ms if grid else [],
        "issues": list(grid.issues) if grid else
        [{"type": "missing_geometry", "detail": "no frame can be placed in space"}],
        "_grid": grid,
    }
    if grid is None:
        return entry
    ref = grid.frames[0]
    entry.update({
        "rows": grid.rows,
        "columns": grid.cols,
        "affine": np.round(grid.affine, 6).tolist(),
        "pixel_spacing_mm": list(grid.pixel_spacing),  # DICOM order: [between rows, between cols]
        "voxel_size_mm": [float(grid.pixel_spacing[1]), float(grid.pixel_spacing[0]),
                          grid.slice_step_mm if grid.slice_step_mm else ref.slice_thickness],
        "slice_thickness_mm": ref.slice_thickness,
        "slice_spacing_mm": grid.slice_step_mm,
        "image_orientation_patient": list(grid.iop),
        "slice_normal_lps": np.round(grid.normal, 6).tolist(),
        "frame_of_reference_uid": info.frame_of_reference_uid,
        "echo_time_ms": info.echo_time_ms,
        "repetition_time_ms": info.repetition_time_ms,
        "inversion_time_ms": info.inversion_time_ms,
        "scanning_sequence": info.scanning_sequence,
    })
    entry["sop_instance_uids"], entry["frame_numbers"] = _uids(grid)
    expected = info.cardiac_number_of_images
    if len(grid.trigger_times_ms) >= MIN_CINE_PHASES and expected and expected > grid.n_phases:
        entry["issues"].append({"type": "missing_phase",
                                "detail": f"CardiacNumberOfImages is {expected} but every slice "
                                          f"has at most {grid.n_phases} phases"})
    if not is_valid_uid(info.series_instance_uid):
        entry["issues"].append({"type": "invalid_uid",
                                "detail": "SeriesInstanceUID is not a valid DICOM UID"})
    return entry


def _single_slice_cine(frames: list[Frame]) -> bool:
    """One slice position and one geometry, with at least MIN_CINE_PHASES trigger times."""
    f0 = frames[0]
    if not (f0.ipp and f0.iop and f0.pixel_spacing):
        return False
    if any(not (f.ipp and f.iop and f.pixel_spacing and same_geometry(f, f0)) or
           abs(geometry.position_along_normal(f.ipp, f0.iop) -
               geometry.position_along_normal(f0.ipp, f0.iop)) > POSITION_TOL_MM for f in frames):
        return False
    return len({f.trigger_time_ms for f in frames if f.trigger_time_ms is not None}) >= \
        MIN_CINE_PHASES


def _in_stack(f: Frame, f0: Frame) -> bool:
    """f's plane is parallel to f0's, on the same in-plane grid, shifted only along the normal
    (within half a pixel), so both can be slices of one volume."""
    if not same_geometry(f, f0):
        return False
    offset = np.subtract(f.ipp, f0.ipp)
    normal = geometry.slice_normal(f0.iop)
    in_plane = offset - np.dot(offset, normal) * normal
    return float(np.linalg.norm(in_plane)) <= 0.5 * min(f0.pixel_spacing)


def _merge_single_slice_cines(by_series: dict[str, list[Frame]],
                              series_info: dict[str, SeriesInfo]
                              ) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """Many scanners export a short-axis cine as one series per slice (often each with its own
    FrameOfReferenceUID). Single-slice cines of the study that fit one stack by geometry (same
    orientation and in-plane grid, positions along one normal), at >= MIN_STACK_SLICES
    positions, are merged in place into the first one's entry; a position acquired twice keeps
    its fuller, later repeat and the other stays a series of its own. Phase counts may differ
    (the grid reports the missing phases). Returns ({kept uid: merged uids}, {kept uid: issues})."""
    groups: list[list[str]] = []
    for uid, frames in by_series.items():
        if not _single_slice_cine(frames):
            continue
        group = next((g for g in groups if _in_stack(frames[0], by_series[g[0]][0])), None)
        if group is None:
            groups.append([uid])
        else:
            group.append(uid)
    merged, issues = {}, {}
    for uids in groups:
        iop = by_series[uids[0]][0].iop

        def position(u):
            return geometry.position_along_normal(by_series[u][0].ipp, iop)

        def rank(u):  # fuller first, then the later acquisition (higher SeriesNumber)
            return (len({f.trigger_time_ms for f in by_series[u]}), len(by_series[u]),
                    series_info[u].series_number or 0, u)

        uids.sort(key=position)
        slices: list[list[str]] = []
        for u in uids:
            if slices and position(u) - position(slices[-1][0]) <= POSITION_TOL_MM:
                slices[-1].append(u)
            else:
                slices.append([u])
        if len(slices) < MIN_STACK_SLICES:
            continue
        found: list[dict] = []
        chosen = []
        for repeats in slices:
            best = max(repeats, key=rank)
            chosen.append(best)
            for other in repeats:
                if other != best:
                    found.append({
                        "type": "repeated_slice", "series_instance_uid": other,
                        "detail": f"series {series_info[other].series_number} repeats the slice "
                                  f"at {position(best):.2f} mm of series "
                                  f"{series_info[best].series_number}; the fuller, later one is "
                                  "merged, this one is kept as a separate series"})
        frames_of_reference = {series_info[u].frame_of_reference_uid for u in chosen}
        if len(frames_of_reference) > 1:
            found.append({
                "type": "multiple_frames_of_reference",
                "detail": f"the {len(chosen)} merged single-slice series have "
                          f"{len(frames_of_reference)} FrameOfReferenceUIDs; merged by geometry "
                          "as one session of this study (same orientation, in-plane grid and "
                          "slice normal), assuming the patient did not move between them"})
        chosen.sort(key=lambda u: (series_info[u].series_number or 0, u))
        keep = chosen[0]
        for uid in chosen[1:]:
            by_series[keep].extend(by_series.pop(uid))
        merged[keep] = chosen
        issues[keep] = found
    return merged, issues


def _patient(study: dict, issues: list[dict]) -> dict:
    height = study.get("patient_size")
    if height is not None and height > 3:  # some sites store centimetres
        issues.append({"type": "patient_height_unit",
                       "detail": f"PatientSize {height} read as centimetres"})
        height = height / 100
    weight = study.get("patient_weight")
    return {"height_m": height if height and height > 0 else None,
            "weight_kg": weight if weight and weight > 0 else None}


def _failure_reason(folder: Path, read: ReadResult, entries: list[dict]) -> str:
    if read.n_files == 0:
        return f"no files in {folder}"
    if not entries:
        # Most frequent causes first: 240 undecodable images, not the stray .nii.gz beside them.
        return (f"none of the {read.n_files} file(s) is a usable DICOM image "
                f"({len(read.rejected)} rejected: {rejection_summary(read.rejected, 2)})")
    found = "; ".join(
        f"series {e['series_number'] if e['series_number'] is not None else '?'}"
        f"{' ' + repr(e['description']) if e['description'] else ''}: {e['kind']} "
        f"({e['classification']})" for e in entries[:4])
    more = f"; and {len(entries) - 4} more" if len(entries) > 4 else ""
    return (f"none of {len(entries)} series is a stack of >= {MIN_STACK_SLICES} parallel "
            f"slices with >= {MIN_CINE_PHASES} trigger times: {found}{more}")


def _public(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if not k.startswith("_")}


def preprocess_study(dicom_dir: Path, out_dir: Path) -> dict:
    """Read dicom_dir, write out_dir/manifest.json and one NIfTI volume per placeable series.

    Returns the manifest. Raises NoUsableCine (after writing the manifest, without volumes)
    when the study has no short-axis cine; FileNotFoundError when dicom_dir is not a folder.
    The output is built in a fresh folder next to out_dir and then replaces out_dir's
    manifest.json and series/ (see `_publish`), so no volume of an earlier run survives."""
    dicom_dir, out_dir = Path(dicom_dir), Path(out_dir).resolve()  # a link: replace its target
    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"not a folder: {dicom_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output is not a folder: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial")
    stage.mkdir()
    packer = _FramePacker()
    try:
        manifest = _preprocess(dicom_dir, stage, packer)
    except NoUsableCine:
        _publish(stage, out_dir)
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        packer.close()
    _publish(stage, out_dir)
    return manifest


_OUTPUTS = (MANIFEST_NAME, "series")  # what a run writes into out_dir


def _publish(stage: Path, out_dir: Path) -> None:
    """Replace out_dir by the finished stage folder: one rename when out_dir is absent, empty or
    an earlier run's output; otherwise (a folder that also holds other files) only our entries
    are swapped, the manifest last, and the other files are left alone."""
    old = None
    if out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= set(_OUTPUTS):
        old = out_dir.with_name(stage.name.replace(".partial", ".old"))
        out_dir.rename(old)
    if not out_dir.exists():
        stage.rename(out_dir)
    else:
        for name in reversed(_OUTPUTS):  # series/ first: the manifest then names only new files
            target, new = out_dir / name, stage / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            if new.exists():
                new.rename(target)
        shutil.rmtree(stage)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _study_entries(frames: list[Frame], series: dict[str, SeriesInfo]) -> list[dict]:
    """Series entries (merged, classified, sorted by SeriesNumber) of one study's frames."""
    by_series: dict[str, list[Frame]] = {}
    for f in frames:
        by_series.setdefault(f.series_instance_uid, []).append(f)
    merged, merge_issues = _merge_single_slice_cines(by_series, series)
    entries = [_series_entry(series[uid], fs, build_grid(fs)) for uid, fs in by_series.items()]
    for entry in entries:
        uid = entry["series_instance_uid"]
        if uid in merged:
            entry["merged_series_instance_uids"] = merged[uid]
            entry["classification"] += f"; assembled from {len(merged[uid])} single-slice series"
            entry["issues"] += merge_issues[uid]
    entries.sort(key=lambda e: (e["series_number"] is None, e["series_number"] or 0,
                                e["series_instance_uid"]))
    _refine_with_cine_axis(entries)
    return entries


def _choose_study(frames: list[Frame], series: dict[str, SeriesInfo]
                  ) -> tuple[str | None, list[dict], dict[str, int]]:
    """(study uid, its entries, {other study uid: frame count}) of a folder's frames. With
    several studies the one with a short-axis cine wins (then the one with most frames): a
    stray DWI or another patient's scan must not push the cine out."""
    counts = Counter(f.study_instance_uid for f in frames)
    if len(counts) <= 1:
        uid = next(iter(counts), None)
        return uid, _study_entries(frames, series) if uid else [], {}
    candidates = []
    for uid, n in counts.items():
        entries = _study_entries([f for f in frames if f.study_instance_uid == uid], series)
        has_cine = any(e["kind"] == "cine_sax" for e in entries)
        candidates.append(((has_cine, n, uid), uid, entries))
    _, uid, entries = max(candidates, key=lambda c: c[0])
    return uid, entries, {u: n for u, n in counts.items() if u != uid}


def _cardiac_evidence(info: SeriesInfo, grid: Grid) -> str | None:
    """Why a series without a cine to compare with is cardiac (ECG triggering or the heart as
    body part), or None. Brain MPRAGE and T2 stacks otherwise look like LGE and T2 stacks."""
    if any(f.trigger_time_ms is not None for f in grid.frames):
        return "ECG-triggered (TriggerTime)"
    sync = info.cardiac_synchronization_technique.upper()
    if sync and sync != "NONE":
        return f"CardiacSynchronizationTechnique {sync}"
    if info.body_part_examined.upper() == "HEART":
        return "BodyPartExamined HEART"
    return None


def _refine_without_cine(entries: list[dict], series: dict[str, SeriesInfo]) -> None:
    """Without a short-axis cine there is no slice normal to check LGE/T2 stacks against: they
    keep their kind only with cardiac evidence in their headers."""
    if any(e["kind"] == "cine_sax" for e in entries):
        return
    for e in entries:
        if e["kind"] in ("lge_sax", "t2_sax"):
            why = _cardiac_evidence(series[e["series_instance_uid"]], e["_grid"])
            if why is None:
                e["kind"] = "other"
                e["classification"] += ("; no cardiac evidence (no cine to compare with, no ECG "
                                        "trigger, BodyPartExamined is not HEART)")
            else:
                e["classification"] += f"; cardiac: {why}"


def _preprocess(dicom_dir: Path, out_dir: Path, packer: _FramePacker) -> dict:
    read = read_folder(dicom_dir, on_frame=packer)
    study_issues: list[dict] = []
    rejected = [{"file": r.file, "reason": r.reason} for r in read.rejected]

    # One study per run: images of any other study are rejected, not mixed in.
    study_uid, entries, others = _choose_study(read.frames, dict(read.series))
    header = read.studies.get(study_uid, {})
    for uid, n in sorted(others.items()):
        files = sorted({f.file for f in read.frames if f.study_instance_uid == uid})
        rejected += [{"file": f, "reason": f"belongs to another StudyInstanceUID ({uid})"}
                     for f in files]
        study_issues.append({"type": "other_study", "study_instance_uid": uid,
                             "n_files": len(files),
                             "detail": f"{len(files)} file(s) ({n} image(s)) of study {uid} "
                                       "are rejected: one study per run, and the chosen one "
                                       "is the one with a short-axis cine (then most images)"})
    if study_uid and not is_valid_uid(study_uid):
        study_issues.append({"type": "invalid_uid",
                             "detail": "StudyInstanceUID is not a valid DICOM UID; kept as is"})
    _refine_without_cine(entries, read.series)

    study = {k: v for k, v in header.items() if k not in ("patient_size", "patient_weight")}
    study["study_instance_uid"] = study_uid
    manifest = {
        "study_instance_uid": study_uid,
        "patient": _patient(header, study_issues),
        "study": study,
        "series": entries,
        "rejected": sorted(rejected, key=lambda r: r["file"]),
        "issues": study_issues,
        "primary": {},
        "conventions": {
            "world": "RAS+ mm (affine maps voxel indices to RAS+)",
            "axes": "x = DICOM column, y = DICOM row, z = slice along the normal "
                    "(IOP row x column direction, ascending), t = phase by TriggerTime",
            "values": "stored pixel values after RescaleSlope/RescaleIntercept",
        },
    }
    for kind in ("cine_sax", "cine_lax", "lge_sax", "t2_sax"):
        candidates = [e for e in entries if e["kind"] == kind]
        if candidates:  # the fullest, least troubled series of each kind is the one to use
            best = max(candidates, key=lambda e: (e["n_slices"] * e["n_phases"] > 0,
                                                  -len(e["issues"]),
                                                  e["n_slices"] * e["n_phases"]))
            manifest["primary"][kind] = best["series_instance_uid"]

    if "cine_sax" not in manifest["primary"]:
        manifest["series"] = [_public(e) for e in entries]
        _write_manifest(out_dir, manifest)
        raise NoUsableCine(_failure_reason(dicom_dir, read, entries), manifest)

    (out_dir / "series").mkdir(exist_ok=True)
    for index, entry in enumerate(entries):
        grid = entry["_grid"]
        if grid is None:
            continue
        rel = f"series/{index:03d}_{entry['kind']}.nii.gz"
        write_grid(out_dir / rel, grid, packer)
        entry["volume"] = rel
    manifest["series"] = [_public(e) for e in entries]
    _write_manifest(out_dir, manifest)
    return manifest


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out_dir / MANIFEST_NAME)


def load_volume(out_dir: Path, entry: dict):
    """Convenience for later stages: (data, affine) of a manifest series entry."""
    import nibabel as nib

    img = nib.load(Path(out_dir) / entry["volume"])
    return np.asarray(img.dataobj), img.affine


__all__ = ["KINDS", "MANIFEST_NAME", "NoUsableCine", "classify", "load_volume",
           "nifti_header", "preprocess_study", "write_grid", "write_nifti"]


def primary_series(manifest: dict, kind: str) -> dict | None:
    """The manifest's series to use for `kind` (its `primary` choice), or None if the study has none."""
    uid = manifest.get("primary", {}).get(kind)
    candidates = [s for s in manifest.get("series", []) if s.get("kind") == kind and s.get("volume")]
    return next((s for s in candidates if s.get("series_instance_uid") == uid), candidates[0] if candidates else None)
