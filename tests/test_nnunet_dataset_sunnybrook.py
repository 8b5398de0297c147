"""Sunnybrook converter on the shared study (../shared/data/sunnybrook): contours rasterized in the
DICOM grid, ED/ES from the contour instance numbers, geometry from the DICOM header."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SUNNYBROOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook"
pytestmark = [
    pytest.mark.skipif(not (SUNNYBROOK / "link.csv").is_file(), reason=f"sample data absent: {SUNNYBROOK}"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom warns about the study's invalid UID
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from training.nnunet.convert import build_dataset

    out = tmp_path_factory.mktemp("nnUNet_raw")
    return build_dataset(out, 101, name="Sunnybrook", sunnybrook=SUNNYBROOK)


def test_sunnybrook_cases_written(dataset):
    folder = Path(dataset["dataset_dir"])
    assert folder.name == "Dataset101_Sunnybrook"
    assert dataset["cases_per_source"] == {"Sunnybrook": 2}
    assert dataset["folds"] == 0 and not (folder / "splits_final.json").exists()  # one patient: no CV splits
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    ed = np.asanyarray(nib.load(str(folder / "labelsTr" / "sunnybrook_SCD0000101_ed.nii.gz")).dataobj)
    es = np.asanyarray(nib.load(str(folder / "labelsTr" / "sunnybrook_SCD0000101_es.nii.gz")).dataobj)
    assert set(np.unique(ed)) == {0, 1, 2} and set(np.unique(es)) == {0, 1}
    assert (es == 1).sum() < (ed == 1).sum()  # the cavity shrinks from ED to ES


@pytest.mark.parametrize("phase, kind", [("ed", "o"), ("es", "i")])
def test_contoured_image_lands_in_dicom_geometry(dataset, phase, kind):
    """For each annotated DICOM image: its pixels are a slice of the written image, at the right
    place in space, and the label slice is non-empty exactly there."""
    import pydicom

    from training.nnunet.sunnybrook import contour_files

    folder = Path(dataset["dataset_dir"])
    image = nib.load(str(folder / "imagesTr" / f"sunnybrook_SCD0000101_{phase}_0000.nii.gz"))
    label = np.asanyarray(nib.load(str(folder / "labelsTr" / f"sunnybrook_SCD0000101_{phase}.nii.gz")).dataobj)
    data = np.asanyarray(image.dataobj)
    files = contour_files(SUNNYBROOK / "contours" / "SC-HF-I-1")
    instances = set(files[kind]) if kind == "o" else set(files["i"]) - set(files["o"])
    by_instance = {}
    for path in (SUNNYBROOK / "SCD0000101").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if int(ds.InstanceNumber) in instances:
            by_instance[int(ds.InstanceNumber)] = path
    assert len(by_instance) == len(instances) > 0
    for instance, path in by_instance.items():
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.T  # (column, row)
        matches = [z for z in range(data.shape[2]) if np.array_equal(data[:, :, z], pixels)]
        assert len(matches) == 1, f"instance {instance} not found once in the {phase} image"
        z = matches[0]
        ipp_ras = np.array([-1, -1, 1]) * np.asarray(ds.ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(image.affine @ [0, 0, z, 1], [*ipp_ras, 1], atol=0.01)
        assert (label[:, :, z] == 1).any()
