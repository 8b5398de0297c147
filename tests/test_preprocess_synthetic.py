"""Synthetic studies (tests/dicom_factory.py): several series, enhanced multi-frame, gaps,
mixed geometry, damaged and foreign files: each gets its documented manifest entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import dicom_factory as factory
from services.preprocess.study import NoUsableCine, preprocess_study

REPO = Path(__file__).resolve().parents[1]
CMRVL = "import sys; from services.cli import main; sys.exit(main())"


def _series(manifest: dict, uid: str) -> dict:
    return next(s for s in manifest["series"] if s["series_instance_uid"] == uid)


def _load(out: Path, entry: dict):
    img = nib.load(out / entry["volume"])
    return np.asarray(img.dataobj), img.affine


def _assert_geometry(affine: np.ndarray, spec: factory.SeriesSpec, slices: list[int]) -> None:
    """Voxel (col, row, k) must land where DICOM puts pixel (row, col) of slice k."""
    dr, dc = spec.pixel_spacing
    row_dir, col_dir = np.array(spec.iop[:3]), np.array(spec.iop[3:])
    for k in slices:
        for col, row in [(0, 0), (3, 1), (7, 11)]:
            lps = np.array(spec.positions[k]) + col * dc * row_dir + row * dr * col_dir
            assert np.allclose((affine @ [col, row, k, 1])[:3], lps * [-1, -1, 1], atol=1e-3)


def _types(entry: dict) -> list[str]:
    return [i["type"] for i in entry["issues"]]


def test_several_series_classified_without_descriptions(tmp_path):
    dicom = tmp_path / "dicom"
    cine = factory.write_cine_study(dicom, height_m=1.62, weight_kg=58.5)
    uid = cine.study_instance_uid
    lge = factory.write_lge_stack(dicom, study_uid=uid)
    t2 = factory.write_t2_stack(dicom, study_uid=uid)
    lax = factory.write_lax_cine(dicom, study_uid=uid)
    scout = factory.write_series(dicom, study_uid=uid, series_number=1, n_slices=3, n_phases=1,
                                 cine=False, description="3-plane localizer", name_prefix="loc")
    (dicom / "readme.txt").write_text("not an image")
    manifest = preprocess_study(dicom, tmp_path / "out")

    kinds = {s["series_instance_uid"]: s["kind"] for s in manifest["series"]}
    assert kinds == {cine.series_instance_uid: "cine_sax", lge.series_instance_uid: "lge_sax",
                     t2.series_instance_uid: "t2_sax", lax.series_instance_uid: "cine_lax",
                     scout.series_instance_uid: "other"}
    assert manifest["primary"]["cine_sax"] == cine.series_instance_uid
    assert manifest["patient"] == {"height_m": 1.62, "weight_kg": 58.5}
    assert manifest["study"]["accession_number"] == "ACC123"
    assert manifest["study"]["study_date"] == "20240131"
    assert manifest["study"]["patient_sex"] == "F" and manifest["study"]["patient_age"] == "054Y"
    assert manifest["rejected"] == [{"file": "readme.txt",
                                     "reason": manifest["rejected"][0]["reason"]}]
    assert "not a DICOM" in manifest["rejected"][0]["reason"]

    out = tmp_path / "out"
    entry = _series(manifest, cine.series_instance_uid)
    data, affine = _load(out, entry)
    assert data.shape == (32, 32, 4, 5) and np.array_equal(data, cine.expected)
    assert entry["trigger_times_ms"] == cine.trigger_times_ms
    assert entry["sop_instance_uids"] == cine.sop_instance_uids
    assert entry["issues"] == []
    _assert_geometry(affine, cine, range(4))
    for spec in (lge, t2):
        entry = _series(manifest, spec.series_instance_uid)
        data, affine = _load(out, entry)
        assert data.shape == (32, 32, spec.n_slices)
        assert np.array_equal(data, spec.expected[..., 0])
        _assert_geometry(affine, spec, range(spec.n_slices))
        assert entry["trigger_times_ms"] == []


def test_enhanced_multiframe_cine_with_rescale(tmp_path):
    spec = factory.write_enhanced_cine(tmp_path / "dicom" / "cine.dcm")
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    assert entry["kind"] == "cine_sax" and (entry["n_slices"], entry["n_phases"]) == (3, 6)
    data, affine = _load(tmp_path / "out", entry)
    # Whole-number slope 2 and intercept -100: exact integers, widened to int32.
    assert data.dtype == np.int32 and data.shape == (20, 24, 3, 6)
    assert np.array_equal(data, spec.expected)
    assert entry["trigger_times_ms"] == spec.trigger_times_ms
    _assert_geometry(affine, spec, range(3))
    # Frame numbers reference the right frame of the one SOP instance (for SEG/SR references).
    import pydicom

    ds = pydicom.dcmread(spec.files[0])
    for k in range(3):
        for t in range(6):
            frame = ds.PerFrameFunctionalGroupsSequence[entry["frame_numbers"][k][t] - 1]
            assert frame.CardiacSynchronizationSequence[0].NominalCardiacTriggerDelayTime == \
                spec.trigger_times_ms[t]


def test_missing_slice_is_a_zero_gap_with_exact_affine(tmp_path):
    spec = factory.write_cine_study(tmp_path / "dicom", n_slices=5,
                                    skip={(2, p) for p in range(5)})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    assert (entry["n_slices"], entry["n_phases"]) == (5, 5)
    assert [(i["type"], i.get("slice")) for i in entry["issues"]] == [("missing_slice", 2)]
    data, affine = _load(tmp_path / "out", entry)
    assert not data[:, :, 2].any()
    assert np.array_equal(data, spec.expected)
    assert entry["sop_instance_uids"][2] == [None] * 5
    _assert_geometry(affine, spec, [0, 1, 3, 4])


def test_missing_phase_is_reported_and_left_empty(tmp_path):
    spec = factory.write_cine_study(tmp_path / "dicom", skip={(1, 3)})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    assert (entry["n_slices"], entry["n_phases"]) == (4, 5)
    assert [(i["type"], i.get("slice"), i.get("phase")) for i in entry["issues"]] == \
        [("missing_phase", 1, 3)]
    data, _ = _load(tmp_path / "out", entry)
    assert np.array_equal(data, spec.expected) and not data[:, :, 1, 3].any()
    assert entry["trigger_times_ms"] == spec.trigger_times_ms


def test_two_geometries_in_one_series(tmp_path):
    spec = factory.write_cine_study(tmp_path / "dicom", n_slices=5,
                                    iop_override={4: factory.LAX_IOP})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    issue = next(i for i in entry["issues"] if i["type"] == "inconsistent_geometry")
    odd = {p.name for p in spec.files if _has_lax_orientation(p)}
    assert set(issue["excluded"]) == odd and len(odd) == 5
    assert entry["n_slices"] == 4
    data, affine = _load(tmp_path / "out", entry)
    assert np.array_equal(data, spec.expected[:, :, :4])
    _assert_geometry(affine, spec, range(4))


def _has_lax_orientation(path: Path) -> bool:
    import pydicom

    return list(pydicom.dcmread(path).ImageOrientationPatient) == list(factory.LAX_IOP)


def test_truncated_and_foreign_files_are_rejected_with_reasons(tmp_path):
    dicom = tmp_path / "dicom"
    spec = factory.write_cine_study(dicom)
    victim = spec.files[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 700])  # pixel data cut short
    header_cut = spec.files[1]
    header_cut.write_bytes(header_cut.read_bytes()[:200])  # cut inside the header
    (dicom / "sub").mkdir()
    (dicom / "sub" / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(64))
    manifest = preprocess_study(dicom, tmp_path / "out")
    reasons = {r["file"]: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {victim.name, header_cut.name, "sub/photo.jpg"}
    assert "truncated" in reasons[victim.name]
    assert "not a DICOM" in reasons["sub/photo.jpg"]
    (entry,) = manifest["series"]
    assert sorted(i["type"] for i in entry["issues"]) == ["missing_phase", "missing_phase"]


def test_no_usable_cine_raises_and_cli_prints_one_line(tmp_path):
    dicom = tmp_path / "dicom"
    factory.write_lge_stack(dicom, study_uid="1.2.3.4")
    (dicom / "junk.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(NoUsableCine) as info:
        preprocess_study(dicom, tmp_path / "out")
    assert "lge_sax" in str(info.value)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["series"][0]["kind"] == "lge_sax" and manifest["series"][0]["volume"] is None
    # As the `cmrvl` console script runs it (not `-m services.cli`, whose __main__ copy of
    # CommandError is a different class).
    proc = subprocess.run([sys.executable, "-c", CMRVL, "preprocess", str(dicom),
                           "--out", str(tmp_path / "out2")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable cine" in lines[0] and "Traceback" not in proc.stderr


def test_empty_and_non_dicom_folders_say_why(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoUsableCine, match="no files"):
        preprocess_study(tmp_path / "empty", tmp_path / "o1")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    with pytest.raises(NoUsableCine, match="not a DICOM"):
        preprocess_study(tmp_path / "text", tmp_path / "o2")


def test_classic_rescale_and_height_in_centimetres(tmp_path):
    spec = factory.write_cine_study(tmp_path / "dicom", slope=0.5, intercept=10.0, height_m=172)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    data, _ = _load(tmp_path / "out", manifest["series"][0])
    assert data.dtype == np.float32 and np.allclose(data, spec.expected)
    assert manifest["patient"]["height_m"] == pytest.approx(1.72)
    assert [i["type"] for i in manifest["issues"]] == ["patient_height_unit"]


def test_cine_stored_as_one_series_per_slice_is_merged(tmp_path):
    dicom = tmp_path / "dicom"
    normal = factory.slice_normal(factory.SAX_IOP)
    origin = np.array([-20.0, 30.0, 40.0])
    specs = [factory.write_series(dicom, study_uid="1.2.3", series_number=40 + k, n_slices=1,
                                  origin=origin + normal * 8.0 * k, seed=k,
                                  name_prefix=f"s{k}_")
             for k in (2, 0, 3, 1)]
    specs.sort(key=lambda s: s.positions[0][0] * normal[0] + s.positions[0][1] * normal[1]
               + s.positions[0][2] * normal[2])
    manifest = preprocess_study(dicom, tmp_path / "out")
    (entry,) = manifest["series"]
    assert entry["kind"] == "cine_sax" and (entry["n_slices"], entry["n_phases"]) == (4, 5)
    assert sorted(entry["merged_series_instance_uids"]) == \
        sorted(s.series_instance_uid for s in specs)
    data, _ = _load(tmp_path / "out", entry)
    for k, spec in enumerate(specs):
        assert np.array_equal(data[:, :, k], spec.expected[:, :, 0])


def test_image_without_position_is_left_out_and_reported(tmp_path):
    import pydicom

    spec = factory.write_cine_study(tmp_path / "dicom")
    ds = pydicom.dcmread(spec.files[3])
    del ds.ImagePositionPatient
    ds.save_as(spec.files[3])
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    issue = next(i for i in entry["issues"] if i["type"] == "missing_geometry")
    assert issue["excluded"] == [spec.files[3].name]
    assert "missing_phase" in _types(entry)  # its cell is now empty
    assert (entry["n_slices"], entry["n_phases"]) == (4, 5)


def test_images_of_another_study_are_rejected(tmp_path):
    dicom = tmp_path / "dicom"
    main = factory.write_cine_study(dicom, study_uid="1.2.3.100", height_m=1.8, weight_kg=80)
    stray = factory.write_series(dicom, study_uid="1.2.3.200", n_slices=1, n_phases=2, cine=False,
                                 name_prefix="stray", height_m=1.5)
    manifest = preprocess_study(dicom, tmp_path / "out")
    assert manifest["study_instance_uid"] == main.study_instance_uid
    assert manifest["patient"] == {"height_m": 1.8, "weight_kg": 80.0}
    assert sorted(r["file"] for r in manifest["rejected"]) == sorted(f.name for f in stray.files)
    assert [s["series_instance_uid"] for s in manifest["series"]] == [main.series_instance_uid]


def test_volume_files_read_the_same_in_gzip_and_itk(tmp_path):
    """The .nii.gz is written as several gzip members (compressed in parallel): every reader
    must see one stream."""
    import gzip

    spec = factory.write_cine_study(tmp_path / "dicom")
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    path = tmp_path / "out" / manifest["series"][0]["volume"]
    raw = gzip.decompress(path.read_bytes())
    assert len(raw) == 352 + spec.expected.size * 2
    assert np.array_equal(np.frombuffer(raw[352:], "<i2").reshape(spec.expected.shape, order="F"),
                          spec.expected)
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(image), spec.expected.T)
