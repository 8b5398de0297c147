"""Real-world DICOM the reader meets (issue 14): each gives the right volume (every image in its
cell, values equal to the stored pixels after rescale, affine exact) or a documented one-line
refusal. Cases are built from the Sunnybrook study with DCMTK (dcmconv, dcmcjpeg), from the public
test files bundled with pydicom, and from tests/dicom_factory.py:

- Explicit VR Big Endian and JPEG Lossless (.70 SV1, .57 process 14) copies of Sunnybrook;
  Deflated and GE's private big-endian-pixel syntax (refused) on a few of its files;
- lossy JPEG (8-bit baseline, 12-bit extended) and JPEG-LS (lossless, near-lossless) copies,
  against DCMTK's own decoders and the uncompressed originals;
- pydicom's MR_small in seven transfer syntaxes (LE, implicit, two big endian, RLE, JPEG-LS,
  JPEG 2000) and its 12-bit JPEG Extended files;
- syntaxes whose decoder packages are absent (blocked in a subprocess) and one pydicom has no
  decoder for; the decoder packages are those of pyproject.toml, none GPL; a damaged JPEG next
  to a .nii.gz;
- Siemens XA enhanced multi-frame LGE with a single-valued InversionTimes, beside a good cine;
- a named pipe, a 6 GiB sparse video and a 6 GiB sparse "DICOM" in the study folder;
- file names that are not UTF-8.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

import dicom_factory as factory
from services.preprocess import jpeg_decoders
from services.preprocess.reader import Rejected, read_folder, rejection_summary
from services.preprocess.study import NoUsableCine, preprocess_study

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / ".." / "shared" / "data" / "sunnybrook" / "SCD0000101"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CMRVL = "import sys; from services.cli import main; sys.exit(main())"
needs_study = pytest.mark.skipif(not STUDY.is_dir(), reason=f"sample data absent: {STUDY}")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # CI installs DCMTK; a missing tool is a broken setup, not a reason to skip
        pytest.fail(f"DCMTK {name} missing: run infra/tools/install-dicom-tools.sh")
    return path


def _transcode(src: Path, dest: Path, tool: str, *args: str, names=None) -> Path:
    """Every file of src through a DCMTK tool (`tool [args] in out`), two at a time."""
    dest.mkdir(parents=True)
    files = sorted(src.glob("*.dcm")) if names is None else [src / n for n in names]
    cmd = [_tool(tool), *args]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda f: subprocess.run([*cmd, str(f), str(dest / f.name)], check=True,
                                               capture_output=True), files))
    return dest


def _cine(out: Path, manifest: dict):
    entry = next(s for s in manifest["series"] if s["kind"] == "cine_sax")
    img = nib.load(out / entry["volume"])
    return entry, np.asarray(img.dataobj), img.affine


def _reasons_are_one_line(rejected: list[Rejected]) -> None:
    for r in rejected:
        assert r.reason and "\n" not in r.reason and "Traceback" not in r.reason, r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uncompressed little-endian Sunnybrook study, as tests/test_preprocess_sunnybrook.py
    checks it voxel by voxel against pydicom."""
    if not STUDY.is_dir():
        pytest.skip(f"sample data absent: {STUDY}")
    out = tmp_path_factory.mktemp("reference")
    manifest = preprocess_study(STUDY, out)
    return manifest, *_cine(out, manifest)


@needs_study
@pytest.mark.parametrize("label, tool, args, syntax", [
    ("big-endian", "dcmconv", ("+tb",), "1.2.840.10008.1.2.2"),
    ("jpeg-lossless-sv1", "dcmcjpeg", ("+e1",), "1.2.840.10008.1.2.4.70"),
    ("jpeg-lossless-p14", "dcmcjpeg", ("+el",), "1.2.840.10008.1.2.4.57"),
])
def test_transcoded_sunnybrook_gives_the_identical_volume(reference, tmp_path, label, tool,
                                                         args, syntax):
    ref_manifest, ref_entry, ref_data, ref_affine = reference
    dicom = _transcode(STUDY, tmp_path / label, tool, *args)
    written = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
               for f in dicom.iterdir()}
    assert written == {syntax}
    manifest = preprocess_study(dicom, tmp_path / "out")
    assert manifest["rejected"] == []
    entry, data, affine = _cine(tmp_path / "out", manifest)
    assert entry["sop_instance_uids"] == ref_entry["sop_instance_uids"]  # every image, its cell
    assert data.dtype == ref_data.dtype and np.array_equal(data, ref_data)
    assert np.array_equal(affine, ref_affine)
    assert entry["issues"] == ref_entry["issues"]


def test_pydicom_public_test_files_decode_to_the_same_pixels(tmp_path):
    """MR_small.dcm saved in seven transfer syntaxes (pydicom's bundled test collection)."""
    names = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
             "MR_small_expb.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
             "MR_small_jp2klossless.dcm"]
    for name in names:
        shutil.copy(PYDICOM_FILES / name, tmp_path / name)
    truth = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    read = read_folder(tmp_path)
    assert read.rejected == [] and sorted(f.file for f in read.frames) == sorted(names)
    for frame in read.frames:
        assert frame.pixels.dtype.isnative, frame.file  # big endian bytes are swapped once
        assert frame.pixels.dtype == np.int16, frame.file
        assert np.array_equal(frame.pixels, truth.pixel_array), frame.file
        assert frame.ipp == tuple(float(v) for v in truth.ImagePositionPatient), frame.file


@needs_study
def test_deflated_sunnybrook_files_read_as_stored(tmp_path):
    names = ["1.dcm", "2.dcm", "100.dcm"]
    _transcode(STUDY, tmp_path / "deflated", "dcmconv", "+td", names=names)
    read = read_folder(tmp_path / "deflated")
    assert read.rejected == [] and sorted(f.file for f in read.frames) == sorted(names)
    for frame in read.frames:
        truth = pydicom.dcmread(STUDY / frame.file)
        assert np.array_equal(frame.pixels, truth.pixel_array), frame.file
        assert frame.ipp == tuple(float(v) for v in truth.ImagePositionPatient)
        assert frame.trigger_time_ms == float(truth.TriggerTime)


def _undecodable_file(path: Path, syntax: str) -> None:
    """An MR image whose pixel data claims a compressed syntax (contents are not decoded)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = factory.MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = factory.base_dataset(study_uid=generate_uid(), series_uid=generate_uid(),
                              sop_uid=meta.MediaStorageSOPInstanceUID,
                              sop_class=factory.MR_IMAGE_STORAGE, series_number=1)
    ds.file_meta = meta
    ds.Rows = ds.Columns = 8
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


@needs_study
def test_missing_decoder_is_refused_in_one_line_naming_the_package_blocked_plugin(tmp_path):
    """The decoder packages are really installed, so their absence is simulated by blocking
    their import in a fresh process (nothing else is faked); then also a syntax pydicom has no
    decoder for. The refusal names the package cmrvl installs for the syntax."""
    _transcode(STUDY, tmp_path / "jpeg", "dcmcjpeg", "+e1", names=["1.dcm"])
    shutil.copy(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm", tmp_path / "jpeg" / "jls.dcm")
    _undecodable_file(tmp_path / "jpeg" / "video.dcm", "1.2.840.10008.1.2.4.102")  # MPEG-4
    blocked = ["imagecodecs", "jpeg_ls", "pylibjpeg", "libjpeg"]  # libjpeg: if a site adds it
    code = (f"import sys, json; sys.modules.update(dict.fromkeys({blocked!r}))\n"
            "from pathlib import Path\nfrom services.preprocess.reader import read_folder\n"
            "r = read_folder(Path(sys.argv[1]))\n"
            "print(json.dumps({x.file: x.reason for x in r.rejected}))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "jpeg")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reasons = json.loads(proc.stdout)
    assert reasons["1.dcm"] == ("pixel data unusable: no decoder installed for JPEGLosslessSV1 "
                                "(1.2.840.10008.1.2.4.70): install imagecodecs>=2024.1 (a cmrvl "
                                "dependency)")
    assert reasons["jls.dcm"] == ("pixel data unusable: no decoder installed for JPEGLSLossless "
                                  "(1.2.840.10008.1.2.4.80): install pyjpegls>=1.2 (a cmrvl "
                                  "dependency)")
    video = reasons["video.dcm"]
    assert video == ("pixel data unusable: no decoder exists in pydicom for MPEG4HP41 "
                     "(1.2.840.10008.1.2.4.102)")
    # GE's private "implicit little endian with big endian pixel data" (old GE PACS).
    _transcode(STUDY, tmp_path / "ge", "dcmconv", "+tg", names=["1.dcm"])
    (ge,) = read_folder(tmp_path / "ge").rejected
    assert ge.reason == ("pixel data unusable: transfer syntax 1.2.840.113619.5.2 is private or "
                         "unknown, pydicom cannot decode it")
    # With the packages importable (this process) the same files decode.
    read = read_folder(tmp_path / "jpeg")
    assert sorted(f.file for f in read.frames) == ["1.dcm", "jls.dcm"]
    assert [r.file for r in read.rejected] == ["video.dcm"]


def test_decoder_packages_are_pyproject_dependencies_without_gpl():
    """What the refusal tells to install is what pyproject.toml installs, and no decoder of it
    is GPL (pylibjpeg-libjpeg was: hospitals ship this platform inside their products)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"]
    named = {r for needs in jpeg_decoders.INSTALLED_DECODERS.values() for r in needs}
    assert named == {"imagecodecs>=2024.1", "pyjpegls>=1.2", "pylibjpeg>=2.0",
                     "pylibjpeg-openjpeg>=2.3"}
    assert named <= set(dependencies)
    assert not [d for d in dependencies if d.startswith(("pylibjpeg-libjpeg", "gdcm"))]
    for name in ("pydicom", "pillow", *(re.split("[<>=]", r)[0] for r in named)):
        meta = importlib.metadata.metadata(name)
        licence = " ".join([meta.get("License") or "", meta.get("License-Expression") or "",
                            *(meta.get_all("Classifier") or [])])
        assert "GPL" not in licence.upper(), (name, licence)


@needs_study
def test_damaged_jpeg_is_a_decode_failure_and_the_nifti_beside_it_not_dicom(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    dicom = _transcode(STUDY, tmp_path / "jpeg", "dcmcjpeg", "+e1",
                       names=["1.dcm", "2.dcm", "3.dcm"])
    for name in ("1.dcm", "2.dcm"):  # the JPEG stream's start (SOI marker) overwritten
        raw = (dicom / name).read_bytes()
        at = raw.index(b"\xff\xd8", raw.index(b"\xe0\x7f\x10\x00"))
        (dicom / name).write_bytes(raw[:at] + bytes(64) + raw[at + 64:])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), dicom / "00_seg.nii.gz")
    read = read_folder(dicom)
    reasons = {r.file: r.reason for r in read.rejected}
    assert [f.file for f in read.frames] == ["3.dcm"]
    assert set(reasons) == {"1.dcm", "2.dcm", "00_seg.nii.gz"}
    for name in ("1.dcm", "2.dcm"):
        assert reasons[name].startswith("pixel data unusable: decoding JPEGLosslessSV1 "
                                        "(1.2.840.10008.1.2.4.70) pixel data failed: "
                                        "RuntimeError:"), reasons[name]
        assert "imagecodecs: Not a JPEG file: starts with 0x00 0x00" in reasons[name]
    assert reasons["00_seg.nii.gz"].startswith("not a DICOM file")
    _reasons_are_one_line(read.rejected)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]  # no tracebacks
    summary = rejection_summary(read.rejected)
    assert summary.startswith("2 x pixel data unusable: decoding JPEG") and "(e.g. 1.dcm)" in summary
    assert "1 x not a DICOM file" in summary and "\n" not in summary
    many = [Rejected(f"{i}.dcm", f"reason {i % 5}") for i in range(20)]
    assert rejection_summary(many).endswith("; 2 other reason(s)")


@pytest.mark.parametrize("inversion_times", [(300.0,), (300.0, 320.0)],
                         ids=["single-valued", "multi-valued"])
def test_siemens_xa_enhanced_lge_with_single_inversion_time(tmp_path, inversion_times):
    dicom = tmp_path / "dicom"
    cine = factory.write_cine_study(dicom)
    lge = factory.write_enhanced_ir_stack(dicom / "lge_xa.dcm", study_uid=cine.study_instance_uid,
                                          inversion_times_ms=inversion_times)
    stored = pydicom.dcmread(lge.files[0]).SharedFunctionalGroupsSequence[0] \
        .MRModifierSequence[0].InversionTimes
    assert stored == 300.0 if len(inversion_times) == 1 else list(stored) == [300.0, 320.0]
    manifest = preprocess_study(dicom, tmp_path / "out")
    assert manifest["rejected"] == []
    assert manifest["primary"]["cine_sax"] == cine.series_instance_uid
    entry = next(s for s in manifest["series"] if s["series_instance_uid"] == lge.series_instance_uid)
    assert entry["kind"] == "lge_sax", entry["classification"]
    assert entry["inversion_time_ms"] == 300.0 and entry["echo_time_ms"] == 1.9
    assert entry["repetition_time_ms"] == 650.0 and "IR" in entry["scanning_sequence"]
    img = nib.load(tmp_path / "out" / entry["volume"])
    assert np.array_equal(np.asarray(img.dataobj), lge.expected[..., 0])
    dr, dc = lge.pixel_spacing
    for k in range(lge.n_slices):
        for col, row in [(0, 0), (5, 2), (19, 23)]:
            lps = (np.array(lge.positions[k]) + col * dc * np.array(lge.iop[:3])
                   + row * dr * np.array(lge.iop[3:]))
            assert np.allclose((img.affine @ [col, row, k, 1])[:3], lps * [-1, -1, 1], atol=1e-3)


def test_named_pipe_in_the_study_is_skipped_not_waited_on(tmp_path):
    dicom = tmp_path / "dicom"
    cine = factory.write_cine_study(dicom)
    os.mkfifo(dicom / "pipe")
    (dicom / "sub").mkdir()
    os.mkfifo(dicom / "sub" / "another pipe")
    (dicom / "broken.dcm").symlink_to(tmp_path / "gone.dcm")
    outside = tmp_path / cine.files[0].name  # an image reached through a link is read
    cine.files[0].rename(outside)
    (dicom / "linked.dcm").symlink_to(outside)
    # A subprocess, so that a regression (a read blocking on the pipe) fails here, not hangs.
    proc = subprocess.run([sys.executable, "-c", CMRVL, "preprocess", str(dicom), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reason = "not a regular file: named pipe (FIFO); skipped"
    assert manifest["rejected"] == [
        {"file": "broken.dcm", "reason": "not a regular file: broken link or unreadable entry "
                                         "(No such file or directory); skipped"},
        {"file": "pipe", "reason": reason}, {"file": "sub/another pipe", "reason": reason}]
    entry, data, _ = _cine(tmp_path / "out", manifest)
    assert np.array_equal(data, cine.expected)


# Peak memory is the child's own VmHWM (per address space): getrusage's ru_maxrss survives fork
# and exec, so late in the suite it reports the pytest parent's RSS (about 2 GiB), not the reader's.
_PEAK_MEMORY = """
import json, sys
from pathlib import Path
from services.preprocess.reader import read_folder
read = read_folder(Path(sys.argv[1]))
hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mib": hwm_kib / 1024,
                  "frames": len(read.frames),
                  "rejected": {r.file: r.reason for r in read.rejected}}))
"""


def test_huge_files_are_refused_from_their_header_with_bounded_memory(tmp_path):
    dicom = tmp_path / "dicom"
    cine = factory.write_cine_study(dicom)
    size = 6 << 30  # sparse: no disk space, but a whole-file read would need 6 GiB of memory
    with open(dicom / "echo.mp4", "wb") as fh:
        fh.write(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00")  # an MP4 header
        fh.truncate(size)
    with open(dicom / "huge.dcm", "wb") as fh:
        fh.write(bytes(128) + b"DICM")
        fh.truncate(size)
    if os.stat(dicom / "echo.mp4").st_blocks * 512 > 1 << 20:
        pytest.skip("the temporary folder's file system has no sparse files")
    proc = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(dicom)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["frames"] == len(cine.files)
    assert result["rejected"]["echo.mp4"].startswith("not a DICOM file (no 'DICM' marker")
    assert result["rejected"]["huge.dcm"] == ("DICOM file of 6.0 GiB is above the 2.0 GiB "
                                              "per-file limit: not read")
    assert result["peak_rss_mib"] < 400, result  # imports and a small study: about 150 MiB


def _unescape(name: str) -> bytes:
    """The inverse of reader.display_name: each \\xNN back to byte NN."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), name.encode())


def test_file_names_that_are_not_utf8_stay_valid_utf8_in_the_manifest(tmp_path):
    dicom = tmp_path / "dicom"
    cine = factory.write_cine_study(dicom, shuffle=False)
    moved = os.path.join(os.fsencode(dicom), b"img\xff\xfe.dcm")
    os.rename(cine.files[0], moved)  # an image of the cine under a Latin-1 / binary name
    (dicom / "sub").mkdir()
    with open(os.path.join(os.fsencode(dicom / "sub"), b"caf\xe9 notes.txt"), "wb") as fh:
        fh.write(b"not an image")
    manifest = preprocess_study(dicom, tmp_path / "out")
    raw = (tmp_path / "out" / "manifest.json").read_bytes()
    text = raw.decode("utf-8")  # strict
    for s in re.findall(r'"((?:[^"\\]|\\.)*)"', text):
        json.loads(f'"{s}"').encode("utf-8")  # no lone surrogates behind \\udcxx escapes
    assert manifest["rejected"][0]["file"] == "sub/caf\\xe9 notes.txt"
    assert manifest["rejected"][0]["reason"].startswith("not a DICOM file")
    assert os.path.exists(os.fsencode(dicom) + b"/" + _unescape(manifest["rejected"][0]["file"]))
    entry, data, _ = _cine(tmp_path / "out", manifest)
    assert entry["n_files"] == len(cine.files) and np.array_equal(data, cine.expected)
    read = read_folder(dicom)
    assert "img\\xff\\xfe.dcm" in {f.file for f in read.frames}
    assert os.path.exists(os.fsencode(dicom) + b"/" + _unescape("img\\xff\\xfe.dcm"))


@needs_study
@pytest.mark.parametrize("args", [("+e1",), ("+el",)], ids=["sv1", "p14"])
def test_libjpeg_turbo_plugin_decodes_first_and_pydicom_plugins_remain(tmp_path, args):
    """services.preprocess.jpeg_decoders (libjpeg-turbo via imagecodecs) is the first decoder
    of every JPEG syntax and gives the stored pixels; pydicom's plugins stay listed after it
    (Pillow, available, for colour; the others decode where a site installs them)."""
    jpeg = _transcode(STUDY, tmp_path / "jpeg", "dcmcjpeg", *args, names=["7.dcm"]) / "7.dcm"
    ds = pydicom.dcmread(jpeg)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    truth = pydicom.dcmread(STUDY / "7.dcm").pixel_array
    assert np.array_equal(decoder.as_array(ds, decoding_plugin="imagecodecs")[0], truth)
    for syntax in jpeg_decoders.SYNTAXES:
        decoder = get_decoder(syntax)
        assert list(decoder._available)[0] == "imagecodecs", syntax  # pydicom's try order
        assert {"gdcm", "pylibjpeg"} <= set(decoder._available) | set(decoder._unavailable)
    assert list(get_decoder(pydicom.uid.JPEGBaseline8Bit)._available) == ["imagecodecs", "pillow"]


def _eight_bit_copy(names: list[str], dest: Path) -> Path:
    """Sunnybrook images as 8-bit unsigned greyscale (what JPEG baseline holds), uncompressed."""
    dest.mkdir()
    for name in names:
        ds = pydicom.dcmread(STUDY / name)
        pixels = ds.pixel_array.astype(np.int32)
        ds.PixelData = (pixels * 255 // max(int(pixels.max()), 1)).astype(np.uint8).tobytes()
        ds["PixelData"].VR = "OB"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):  # were SS
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(dest / name)
    return dest


@needs_study
@pytest.mark.parametrize("label, encode, decode, syntax, error", [
    ("baseline-8bit", ("dcmcjpeg", "+eb"), "dcmdjpeg", "1.2.840.10008.1.2.4.50", "lossy"),
    ("extended-12bit", ("dcmcjpeg", "+ee"), "dcmdjpeg", "1.2.840.10008.1.2.4.51", "lossy"),
    ("jpeg-ls-lossless", ("dcmcjpls",), "dcmdjpls", "1.2.840.10008.1.2.4.80", 0),
    ("jpeg-ls-near-8bit", ("dcmcjpls", "+en"), "dcmdjpls", "1.2.840.10008.1.2.4.81", 2),
])
def test_lossy_jpeg_and_jpeg_ls_decode_like_dcmtk(tmp_path, label, encode, decode, syntax,
                                                  error):
    """DCMTK-compressed Sunnybrook images decode to DCMTK's own decode of them (its IJG and
    CharLS-derived decoders, another implementation) and to the uncompressed originals within
    what the codec allows: exactly for lossless, NEAR (2, DCMTK's default) for near-lossless
    JPEG-LS, quality-90 rounding for lossy JPEG. 8-bit cases start from an 8-bit copy (baseline
    holds 8 bits; the 16-bit originals fit extended's 12 bits unscaled)."""
    names = ["7.dcm", "100.dcm", "200.dcm"]
    eight_bit = label.endswith("8bit")
    source = _eight_bit_copy(names, tmp_path / "source") if eight_bit else STUDY
    dicom = _transcode(source, tmp_path / label, *encode, names=names)
    reference = _transcode(dicom, tmp_path / "dcmtk", decode)
    read = read_folder(dicom)
    assert read.rejected == [] and sorted(f.file for f in read.frames) == sorted(names)
    for frame in read.frames:
        ds = pydicom.dcmread(dicom / frame.file)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert frame.pixels.dtype == (np.uint8 if eight_bit else ds.pixel_array.dtype)
        ours = frame.pixels.astype(np.int32)
        original = pydicom.dcmread(source / frame.file).pixel_array.astype(np.int32)
        dcmtk = pydicom.dcmread(reference / frame.file).pixel_array
        if error == "lossy":
            # IDCT rounding may differ by one in a few pixels between JPEG libraries;
            # measured: identical.
            assert np.abs(ours - dcmtk).max() <= 1 and (ours != dcmtk).mean() < 0.01, frame.file
            assert np.abs(ours - original).mean() < 2 and np.abs(ours - original).max() < 32
            if eight_bit:  # and pydicom's Pillow plugin, the other decoder installed for it
                pillow = get_decoder(syntax).as_array(ds, decoding_plugin="pillow")[0]
                assert np.abs(ours - pillow).max() <= 1 and (ours != pillow).mean() < 0.01
        else:
            assert np.array_equal(ours, dcmtk), frame.file
            assert np.abs(ours - original).max() <= error, frame.file


def test_pydicom_12_bit_jpeg_extended_files_decode_like_dcmtk(tmp_path):
    """pydicom's 12-bit JPEG Extended test files; pylibjpeg-libjpeg (the GPL decoder this
    replaced) refused JPEG-lossy.dcm, Pillow decodes neither."""
    names = ["JPEG-lossy.dcm", "JPGExtended.dcm"]
    reference = _transcode(PYDICOM_FILES, tmp_path / "dcmtk", "dcmdjpeg", names=names)
    (tmp_path / "jpeg").mkdir()
    for name in names:
        shutil.copy(PYDICOM_FILES / name, tmp_path / "jpeg" / name)
    read = read_folder(tmp_path / "jpeg")
    assert read.rejected == [] and sorted(f.file for f in read.frames) == names
    for frame in read.frames:
        dcmtk = pydicom.dcmread(reference / frame.file).pixel_array
        assert frame.pixels.dtype == np.uint16 and frame.pixels.shape == (1024, 256)
        ours = frame.pixels.astype(np.int32)
        assert np.abs(ours - dcmtk).max() <= 1 and (ours != dcmtk).mean() < 0.01, frame.file


def _heart_anatomy(ds: Dataset) -> None:
    """Enhanced MR's per-frame anatomy (Frame Anatomy functional group), heart, in the shared
    groups, as scanners that leave the top-level BodyPartExamined empty write it."""
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "80891009", "SCT", "Heart"
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = Sequence([region])
    anatomy.FrameLaterality = "U"
    ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = Sequence([anatomy])


def test_series_info_has_body_part_and_cardiac_synchronization(tmp_path):
    """Read once with the series header, classic and enhanced MR; without a cine they are the
    cardiac evidence that keeps an untriggered LGE stack an LGE stack."""
    dicom = tmp_path / "dicom"
    classic = factory.write_brain_stack(dicom, study_uid="1.2.3.11", body_part_examined="CHEST")
    for path in classic.files:  # prospectively gated, yet no TriggerTime: the evidence is the tag
        ds = pydicom.dcmread(path)
        ds.CardiacSynchronizationTechnique = "PROSPECTIVE"
        ds.save_as(path)
    enhanced = factory.write_enhanced_ir_stack(dicom / "lge_xa.dcm", study_uid="1.2.3.11")
    ds = pydicom.dcmread(enhanced.files[0])
    for item in ds.PerFrameFunctionalGroupsSequence:  # untriggered, no BodyPartExamined
        del item.CardiacSynchronizationSequence
    _heart_anatomy(ds)
    ds.save_as(enhanced.files[0])
    series = read_folder(dicom).series
    assert series[classic.series_instance_uid].body_part_examined == "CHEST"
    assert series[classic.series_instance_uid].cardiac_synchronization_technique == "PROSPECTIVE"
    assert series[enhanced.series_instance_uid].body_part_examined == "HEART"
    assert series[enhanced.series_instance_uid].cardiac_synchronization_technique == ""
    with pytest.raises(NoUsableCine) as info:
        preprocess_study(dicom, tmp_path / "out")
    kinds = {s["series_instance_uid"]: s for s in info.value.manifest["series"]}
    assert kinds[classic.series_instance_uid]["kind"] == "lge_sax"
    assert kinds[classic.series_instance_uid]["classification"].endswith(
        "; cardiac: CardiacSynchronizationTechnique PROSPECTIVE")
    assert kinds[enhanced.series_instance_uid]["kind"] == "lge_sax"
    assert kinds[enhanced.series_instance_uid]["classification"].endswith(
        "; cardiac: BodyPartExamined HEART")


def test_no_usable_image_names_the_most_frequent_rejection_first(tmp_path):
    """Undecodable images (a PACS export: 240 of them) beside a stray .nii.gz: the failure
    names their cause first, not the .nii.gz that comes first by name."""
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), dicom / "00_seg.nii.gz")
    for i in range(5):
        _undecodable_file(dicom / f"im{i}.dcm", pydicom.uid.JPEGLosslessSV1)
    with pytest.raises(NoUsableCine) as info:
        preprocess_study(dicom, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(
        "none of the 6 file(s) is a usable DICOM image (6 rejected: 5 x pixel data unusable: "
        "decoding JPEGLosslessSV1 (1.2.840.10008.1.2.4.70) pixel data failed: "), message
    assert message.endswith(" (e.g. im0.dcm); 1 x not a DICOM file (no 'DICM' marker after a "
                            "128-byte preamble and no DICOM tag at the start) (e.g. "
                            "00_seg.nii.gz))"), message
    assert "\n" not in message
