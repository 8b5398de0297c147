"""The ACDC HDF5 importer (`cmrvl train nnunet-dataset --acdc-h5`, training/nnunet/convert.py) on real
files of the shared WSL4MIS copy of ACDC, and the held-out fifth stratified over ACDC's groups."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.cli import main
from training.nnunet.convert import ACDC_H5_ASSUMED_SPACING_MM, build_dataset, make_splits

H5_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "acdc-wsl4mis"
PATIENTS = ("patient001", "patient090")  # patient090: ED is frame 04, not 01


@pytest.fixture(scope="module")
def h5_subset(tmp_path_factory):
    if not (H5_DIR / "patient001_frame01.h5").is_file():
        pytest.skip(f"shared ACDC HDF5 data not present: {H5_DIR}")
    folder = tmp_path_factory.mktemp("acdc-h5")
    for patient in PATIENTS:
        for path in H5_DIR.glob(f"{patient}_frame*.h5"):
            shutil.copy(path, folder / path.name)
    return folder


def test_h5_cases_are_remapped_and_the_spacing_recorded(h5_subset, tmp_path, capsys):
    import h5py

    out = tmp_path / "raw"
    assert main(["train", "nnunet-dataset", "--acdc-h5", str(h5_subset), "--out", str(out),
                 "--dataset-id", "31", "--name", "ACDCh5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cases_per_source"] == {"ACDC-h5": 4} and summary["patients"] == 2
    folder = out / "Dataset031_ACDCh5"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["assumed_spacing"]["spacing_mm_xyz"] == list(ACDC_H5_ASSUMED_SPACING_MM)
    assert meta["labels"] == {"background": 0, "LV cavity": 1, "LV myocardium": 2, "RV": 3}

    frames = {"patient001": {"ed": 1, "es": 12}, "patient090": {"ed": 4, "es": 11}}
    for patient, phases in frames.items():
        for phase, frame in phases.items():
            with h5py.File(h5_subset / f"{patient}_frame{frame:02d}.h5") as f:
                src_image, src_label = np.asarray(f["image"]), np.asarray(f["label"])
            image = nib.load(folder / "imagesTr" / f"acdc_{patient}_{phase}_0000.nii.gz")
            label = nib.load(folder / "labelsTr" / f"acdc_{patient}_{phase}.nii.gz")
            # (slices, rows, columns) -> (x = column, y = row, z = slice)
            np.testing.assert_array_equal(np.asarray(image.dataobj), src_image.transpose(2, 1, 0))
            got = np.asarray(label.dataobj).transpose(2, 1, 0)
            for acdc, platform in ((1, 3), (2, 2), (3, 1), (0, 0)):  # ACDC 1 RV, 3 LV -> 3 RV, 1 LV
                assert np.array_equal(got == platform, src_label == acdc), (patient, phase, acdc)
            assert label.get_data_dtype() == np.uint8
            np.testing.assert_allclose(image.header.get_zooms(), ACDC_H5_ASSUMED_SPACING_MM)
            np.testing.assert_allclose(label.affine, image.affine)


def test_h5_and_nifti_acdc_of_the_same_patients_are_refused_together(h5_subset, tmp_path):
    nifti = tmp_path / "training" / "patient001"
    nifti.mkdir(parents=True)
    (nifti / "Info.cfg").write_text("ED: 1\nES: 12\n")
    for suffix in ("", "_gt"):
        for frame in (1, 12):
            data = np.zeros((8, 8, 2), np.uint8)
            data[1:3, 1:3, :], data[3:5, 3:5, :], data[5:7, 5:7, :] = 1, 2, 3
            nib.save(nib.Nifti1Image(data, np.eye(4)), nifti / f"patient001_frame{frame:02d}{suffix}.nii.gz")
    with pytest.raises(ValueError, match="appears twice"):
        build_dataset(tmp_path / "raw", 32, acdc=tmp_path / "training", acdc_h5=h5_subset)


def test_bad_h5_folders_get_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "patient007_frame01.h5").write_bytes(b"")
    for folder, message in ((empty, "no patientNNN_frameFF.h5"), (lonely, "expected 2 (ED and ES)")):
        assert main(["train", "nnunet-dataset", "--acdc-h5", str(folder), "--out", str(tmp_path / "raw"),
                     "--dataset-id", "33"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_held_out_fifth_is_stratified_over_the_acdc_groups():
    """Fold 0's validation (the shipped model's held-out set) has 4 patients of every ACDC group
    (blocks of 20 patient numbers), and the split does not depend on the other sources present."""
    acdc = {f"acdc_patient{i:03d}_{ph}": f"acdc_patient{i:03d}" for i in range(1, 101) for ph in ("ed", "es")}
    splits = make_splits(acdc)
    for fold in splits:
        groups = Counter((int(c.split("_")[1][7:]) - 1) // 20 for c in fold["val"] if c.endswith("_ed"))
        assert groups == {g: 4 for g in range(5)}, groups
    mixed = dict(acdc, **{f"mnms_A{i}_{ph}": f"mnms_A{i}" for i in range(7) for ph in ("ed", "es")})
    held_out = lambda s: sorted(c for c in s[0]["val"] if c.startswith("acdc"))  # noqa: E731
    assert held_out(make_splits(mixed)) == held_out(splits)
