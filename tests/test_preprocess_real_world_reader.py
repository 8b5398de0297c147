"""Real-world DICOM the reader meets (issue 14): each gives the right volume (every image in its
cell, values equal to the stored pixels after rescale, affine exact) or a documented one-line
refusal. Cases are built from the Sunnybrook study with DCMTK (dcmconv, dcmcjpeg), from the public
test files bundled with pydicom, and from tests/dicom_factory.py:

- Explicit VR Big Endian and JPEG Lossless (.70 SV1, .57 process 14) copies of Sunnybrook;
  Deflated and GE's private big-endian-pixel syntax (refused) on a few of its files;
- pydicom's MR_small in seven transfer syntaxes (LE, implicit, two big endian, RLE, JPEG-LS,
  JPEG 2000);
- a JPEG syntax whose decoder plugin is absent (blocked in a subprocess) and one pydicom has no
  decoder for; a damaged JPEG next to a .nii.gz;
- Siemens XA enhanced multi-frame LGE with a single-valued InversionTimes, beside a good cine;
- a named pipe, a 6 GiB sparse video and a 6 GiB sparse "DICOM" in the study folder;
- file names that are not UTF-8.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

import dicom_factory as factory
from services.preprocess.reader import Rejected, read_folder, rejection_summary
from services.preprocess.study import preprocess_study

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
    """pylibjpeg and imagecodecs are really installed, so their absence is simulated by
    blocking their import in a fresh process (nothing else is faked); then also a syntax pydicom
    has no decoder for."""
    _transcode(STUDY, tmp_path / "jpeg", "dcmcjpeg", "+e1", names=["1.dcm"])
    _undecodable_file(tmp_path / "jpeg" / "video.dcm", "1.2.840.10008.1.2.4.102")  # MPEG-4
    code = ("import sys, json; sys.modules['pylibjpeg'] = sys.modules['imagecodecs'] = None\n"
            "from pathlib import Path\nfrom services.preprocess.reader import read_folder\n"
            "r = read_folder(Path(sys.argv[1]))\n"
            "print(json.dumps({x.file: x.reason for x in r.rejected}))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "jpeg")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reasons = json.loads(proc.stdout)
    jpeg = reasons["1.dcm"]
    assert jpeg == ("pixel data unusable: no decoder installed for JPEGLosslessSV1 "
                    "(1.2.840.10008.1.2.4.70) (plugins: gdcm needs gdcm>=3.0.10; pylibjpeg "
                    "needs pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1; imagecodecs needs "
                    "imagecodecs>=2024.1)")
    video = reasons["video.dcm"]
    assert video == ("pixel data unusable: no decoder exists in pydicom for MPEG4HP41 "
                     "(1.2.840.10008.1.2.4.102)")
    # GE's private "implicit little endian with big endian pixel data" (old GE PACS).
    _transcode(STUDY, tmp_path / "ge", "dcmconv", "+tg", names=["1.dcm"])
    (ge,) = read_folder(tmp_path / "ge").rejected
    assert ge.reason == ("pixel data unusable: transfer syntax 1.2.840.113619.5.2 is private or "
                         "unknown, pydicom cannot decode it")
    # With the plugin importable (this process) the same JPEG file decodes.
    read = read_folder(tmp_path / "jpeg")
    assert [f.file for f in read.frames] == ["1.dcm"]
    assert [r.file for r in read.rejected] == ["video.dcm"]


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
        assert "SOI marker missing" in reasons[name]
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


_PEAK_MEMORY = """
import json, resource, sys
from pathlib import Path
from services.preprocess.reader import read_folder
read = read_folder(Path(sys.argv[1]))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
    """services.preprocess.jpeg_lossless (libjpeg-turbo via imagecodecs) is the first JPEG
    Lossless decoder, gives the same pixels as pydicom's pylibjpeg plugin, and without
    imagecodecs (blocked in a fresh process) pydicom's plugins decode the same file."""
    from pydicom.pixels import get_decoder

    jpeg = _transcode(STUDY, tmp_path / "jpeg", "dcmcjpeg", *args, names=["7.dcm"]) / "7.dcm"
    ds = pydicom.dcmread(jpeg)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    assert list(decoder._available)[0] == "imagecodecs"  # pydicom tries plugins in this order
    truth = pydicom.dcmread(STUDY / "7.dcm").pixel_array
    for plugin in ("imagecodecs", "pylibjpeg"):
        assert np.array_equal(decoder.as_array(ds, decoding_plugin=plugin)[0], truth), plugin
    code = ("import sys; sys.modules['imagecodecs'] = None\n"
            "from pathlib import Path\nimport numpy as np\n"
            "from services.preprocess.reader import read_folder\n"
            "(frame,) = read_folder(Path(sys.argv[1])).frames\n"
            "np.save(sys.argv[2], frame.pixels)")
    subprocess.run([sys.executable, "-c", code, str(jpeg.parent), str(tmp_path / "p.npy")],
                   cwd=REPO, check=True, timeout=120)
    assert np.array_equal(np.load(tmp_path / "p.npy"), truth)
