"""Real GE study (Sunnybrook SCD0000101: 12 slices x 20 phases, empty SeriesDescription, invalid
UID, oblique): every voxel lands at its DICOM patient coordinate, whatever the file order."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from services.cli import main as cmrvl
from services.preprocess.study import preprocess_study

STUDY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook" / "SCD0000101"
pytestmark = pytest.mark.skipif(not STUDY.is_dir(), reason=f"sample data absent: {STUDY}")


def _headers(folder: Path) -> dict[str, pydicom.Dataset]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, sorted(folder.glob("*.dcm")))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sunnybrook")
    assert cmrvl(["preprocess", str(STUDY), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    return out, manifest


def _cine(out: Path, manifest: dict):
    entry = next(s for s in manifest["series"] if s["kind"] == "cine_sax")
    img = nib.load(out / entry["volume"])
    return entry, np.asarray(img.dataobj), img.affine


def test_manifest_contract(converted):
    out, manifest = converted
    assert manifest["study_instance_uid"] == "2.16.124.113543.6006.99.08980635789900778171"
    assert manifest["patient"] == {"height_m": None, "weight_kg": None}
    assert manifest["rejected"] == []
    (entry,) = manifest["series"]
    assert entry["kind"] == "cine_sax" and entry["description"] == ""
    assert (entry["n_slices"], entry["n_phases"]) == (12, 20)
    assert entry["trigger_times_ms"] == sorted(entry["trigger_times_ms"])
    assert np.array(entry["sop_instance_uids"]).shape == (12, 20)
    assert {i["type"] for i in manifest["issues"]} == {"invalid_uid"}  # leading-zero component
    assert not [i for i in entry["issues"] if i["type"].startswith("missing")]


def test_every_voxel_at_its_dicom_patient_coordinate(converted):
    out, manifest = converted
    entry, data, affine = _cine(out, manifest)
    assert data.shape == (256, 256, 12, 20)
    assert np.allclose(affine, entry["affine"], atol=1e-4)
    headers = _headers(STUDY)
    normal = None
    last_position = -np.inf
    rng = np.random.default_rng(0)
    for k in range(12):
        times = []
        for t in range(20):
            ds = headers[entry["sop_instance_uids"][k][t]]
            ipp = np.array(ds.ImagePositionPatient, float)
            iop = np.array(ds.ImageOrientationPatient, float)
            dr, dc = (float(v) for v in ds.PixelSpacing)
            slope = float(ds.get("RescaleSlope", 1))
            intercept = float(ds.get("RescaleIntercept", 0))
            # Voxel values: the whole frame, transposed (x = column, y = row), after rescale.
            assert np.array_equal(data[:, :, k, t], ds.pixel_array.T * slope + intercept)
            # Positions: corners and random pixels, DICOM formula vs the NIfTI affine.
            cols = np.r_[0, 255, 0, 255, rng.integers(0, 256, 6)]
            rows = np.r_[0, 0, 255, 255, rng.integers(0, 256, 6)]
            lps = ipp + np.outer(cols * dc, iop[:3]) + np.outer(rows * dr, iop[3:])
            ras = lps * [-1, -1, 1]
            vox = np.c_[cols, rows, np.full(len(cols), k), np.ones(len(cols))]
            assert np.allclose((vox @ affine.T)[:, :3], ras, atol=1e-3)
            times.append(float(ds.TriggerTime))
            normal = np.cross(iop[:3], iop[3:])
        assert times == sorted(times) and len(set(times)) == 20
        position = float(np.dot(np.array(headers[entry["sop_instance_uids"][k][0]]
                                         .ImagePositionPatient, float), normal))
        assert position > last_position  # slices ascend along the normal
        last_position = position


def test_shuffled_names_and_instance_numbers_give_identical_volume(converted, tmp_path):
    out, manifest = converted
    _, data, affine = _cine(out, manifest)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(STUDY.glob("*.dcm"))
    rnd = random.Random(42)
    numbers = list(range(1, len(files) + 1))
    rnd.shuffle(numbers)
    names = [f"x{n:04d}" for n in rnd.sample(range(10000), len(files))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, number, name in zip(files, numbers, names):
            ds = pydicom.dcmread(path)
            ds.InstanceNumber = number
            ds.save_as(shuffled / name)
    manifest2 = preprocess_study(shuffled, tmp_path / "out")
    entry2, data2, affine2 = _cine(tmp_path / "out", manifest2)
    assert np.array_equal(data2, data)
    assert np.array_equal(affine2, affine)
    assert entry2["sop_instance_uids"] == manifest["series"][0]["sop_instance_uids"]


def test_cli_rejects_missing_folder(tmp_path, capsys):
    assert cmrvl(["preprocess", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]
