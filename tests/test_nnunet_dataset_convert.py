"""nnU-Net dataset converters on synthetic folders in the exact ACDC and M&Ms layouts
(training/nnunet/convert.py, `cmrvl train nnunet-dataset`)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.cli import main
from training.nnunet.convert import build_dataset, make_splits

SHAPE = (20, 18, 4)
SUNNYBROOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook"


def phantom_labels(rv: int, myo: int, lv: int) -> np.ndarray:
    """A small heart in the given source label values: LV square, myocardial frame, RV block."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:11, 3:11, 1:3] = myo
    labels[5:9, 5:9, 1:3] = lv
    labels[12:17, 4:10, 1:3] = rv
    return labels


def affine_for(index: int) -> np.ndarray:
    affine = np.diag([1.4 + 0.1 * index, 1.4 + 0.1 * index, 8.0, 1.0])
    affine[:3, 3] = (-10.0 * index, 5.0, 30.0)
    return affine


def make_acdc(root: Path, n_patients: int = 3) -> dict[str, tuple[int, int]]:
    """ACDC `training/`: patientXXX/Info.cfg, patientXXX_frameNN.nii.gz and _gt (ED/ES 1-based)."""
    frames = {}
    for i in range(1, n_patients + 1):
        name = f"patient{i:03d}"
        folder = root / name
        folder.mkdir(parents=True)
        ed, es = 1, 5 + i
        frames[name] = (ed, es)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
        for frame in range(1, 12):
            image = np.full(SHAPE, 100 * i + frame, dtype=np.int16)  # the frame number is readable back
            nib.save(nib.Nifti1Image(image, affine_for(i)), str(folder / f"{name}_frame{frame:02d}.nii.gz"))
        for frame in (ed, es):
            gt = phantom_labels(rv=1, myo=2, lv=3)  # ACDC order
            nib.save(nib.Nifti1Image(gt, affine_for(i)), str(folder / f"{name}_frame{frame:02d}_gt.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros(SHAPE + (11,), np.int16), affine_for(i)), str(folder / f"{name}_4d.nii.gz"))
    return frames


def make_mnms(root: Path, csv_path: Path, codes=("A0S9V9", "B2F4K5", "C8Q1Z3")) -> dict[str, tuple[int, int]]:
    """M&Ms labelled folder: <code>/<code>_sa.nii.gz + _sa_gt.nii.gz (4D), CSV with 0-based ED/ES."""
    frames = {}
    rows = ["External code,VendorName,Vendor,Centre,ED,ES"]
    for k, code in enumerate(codes):
        folder = root / code
        folder.mkdir(parents=True)
        ed, es = k, 7 + k
        frames[code] = (ed, es)
        rows.append(f"{code},Siemens,A,1,{ed},{es}")
        image = np.stack([np.full(SHAPE, 1000 * (k + 1) + t, np.int16) for t in range(12)], axis=-1)
        gt = np.zeros(SHAPE + (12,), np.uint8)
        gt[..., ed] = gt[..., es] = phantom_labels(rv=3, myo=2, lv=1)  # M&Ms order
        nib.save(nib.Nifti1Image(image, affine_for(10 + k)), str(folder / f"{code}_sa.nii.gz"))
        nib.save(nib.Nifti1Image(gt, affine_for(10 + k)), str(folder / f"{code}_sa_gt.nii.gz"))
    rows.append("Z9Z9Z9,Philips,B,2,0,9")  # a subject without labels in this folder (e.g. test split)
    csv_path.write_text("\n".join(rows) + "\n")
    return frames


@pytest.fixture()
def sources(tmp_path):
    acdc, mnms, csv_path = tmp_path / "acdc" / "training", tmp_path / "mnms" / "Labeled", tmp_path / "mnms.csv"
    return {
        "acdc": acdc, "acdc_frames": make_acdc(acdc),
        "mnms": mnms, "mnms_csv": csv_path, "mnms_frames": make_mnms(mnms, csv_path),
    }


def run_train(argv: list[str]) -> int:
    """The real `cmrvl` entry point (services.cli.main)."""
    return main(argv)


def test_acdc_and_mnms_to_nnunet(sources, tmp_path, capsys):
    out = tmp_path / "nnUNet_raw"
    assert run_train(["train", "nnunet-dataset", "--acdc", str(sources["acdc"]), "--mnms", str(sources["mnms"]),
                      "--mnms-csv", str(sources["mnms_csv"]), "--out", str(out), "--dataset-id", "7"]) == 0
    summary = json.loads(capsys.readouterr().out)
    folder = out / "Dataset007_CMRVL"
    assert summary["dataset_dir"] == str(folder)
    assert summary["cases_per_source"] == {"ACDC": 6, "M&Ms": 6}

    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "LV cavity": 1, "LV myocardium": 2, "RV": 3}
    assert meta["numTraining"] == 12 and meta["file_ending"] == ".nii.gz"
    assert len(list((folder / "imagesTr").glob("*_0000.nii.gz"))) == 12
    assert len(list((folder / "labelsTr").glob("*.nii.gz"))) == 12

    platform = phantom_labels(rv=3, myo=2, lv=1)
    for i, (name, (ed, es)) in enumerate(sources["acdc_frames"].items(), start=1):
        for phase, frame in (("ed", ed), ("es", es)):
            image = nib.load(str(folder / "imagesTr" / f"acdc_{name}_{phase}_0000.nii.gz"))
            label = nib.load(str(folder / "labelsTr" / f"acdc_{name}_{phase}.nii.gz"))
            assert np.all(np.asanyarray(image.dataobj) == 100 * i + frame)  # Info.cfg frames are 1-based
            np.testing.assert_array_equal(np.asanyarray(label.dataobj), platform)  # ACDC 1 RV / 3 LV swapped
            np.testing.assert_allclose(image.affine, affine_for(i))
            np.testing.assert_allclose(label.affine, affine_for(i))
    for k, (code, (ed, es)) in enumerate(sources["mnms_frames"].items()):
        for phase, frame in (("ed", ed), ("es", es)):
            image = nib.load(str(folder / "imagesTr" / f"mnms_{code}_{phase}_0000.nii.gz"))
            label = nib.load(str(folder / "labelsTr" / f"mnms_{code}_{phase}.nii.gz"))
            assert image.shape == SHAPE and np.all(np.asanyarray(image.dataobj) == 1000 * (k + 1) + frame)  # 0-based
            np.testing.assert_array_equal(np.asanyarray(label.dataobj), platform)
            np.testing.assert_allclose(label.affine, affine_for(10 + k))

    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == 5
    all_cases = {p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").iterdir()}
    val_cases = [c for fold in splits for c in fold["val"]]
    assert sorted(val_cases) == sorted(all_cases)  # every case validated exactly once
    for fold in splits:
        assert set(fold["train"]) | set(fold["val"]) == all_cases and not set(fold["train"]) & set(fold["val"])
        patients = lambda cases: {c.rsplit("_", 1)[0] for c in cases}  # noqa: E731
        assert not patients(fold["train"]) & patients(fold["val"])  # no patient in two folds


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about Sunnybrook's invalid UID
def test_nnunet_accepts_the_dataset(sources, tmp_path):
    """nnU-Net's own checker: dataset.json keys, case count, label values, image/label grids."""
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    sunnybrook = SUNNYBROOK if (SUNNYBROOK / "link.csv").is_file() else None  # all three sources when present
    summary = build_dataset(tmp_path / "raw", 8, acdc=sources["acdc"], mnms=sources["mnms"],
                            mnms_csv=sources["mnms_csv"], sunnybrook=sunnybrook)
    assert summary["num_training"] == 12 + (2 if sunnybrook else 0)
    verify.verify_dataset_integrity(summary["dataset_dir"], num_processes=1)


def test_splits_are_deterministic_and_grouped():
    patient_of_case = {f"src_p{i:02d}_{ph}": f"src_p{i:02d}" for i in range(13) for ph in ("ed", "es")}
    a, b = make_splits(patient_of_case, seed=3), make_splits(patient_of_case, seed=3)
    assert a == b
    assert make_splits(patient_of_case, seed=4) != a
    sizes = sorted(len(fold["val"]) for fold in a)
    assert sizes == [4, 4, 6, 6, 6]  # 13 patients dealt over 5 folds, 2 cases each
    for fold in a:
        for case in fold["val"]:
            assert case.replace("_ed", "_es") in fold["val"] or case.replace("_es", "_ed") in fold["val"]


def test_wrong_label_sets_are_rejected(sources, tmp_path):
    name = next(iter(sources["acdc_frames"]))
    ed = sources["acdc_frames"][name][0]
    gt_path = sources["acdc"] / name / f"{name}_frame{ed:02d}_gt.nii.gz"
    gt = phantom_labels(rv=1, myo=2, lv=3)
    gt[gt == 1] = 0  # RV missing: ACDC promises all three structures
    nib.save(nib.Nifti1Image(gt, affine_for(1)), str(gt_path))
    with pytest.raises(ValueError, match="promises"):
        build_dataset(tmp_path / "raw", 9, acdc=sources["acdc"])
    gt[0, 0, 0] = 4  # a value outside the ACDC label set
    nib.save(nib.Nifti1Image(gt, affine_for(1)), str(gt_path))
    with pytest.raises(ValueError, match="unexpected label values"):
        build_dataset(tmp_path / "raw", 9, acdc=sources["acdc"], overwrite=True)


def test_cli_errors(sources, tmp_path, capsys):
    out = tmp_path / "raw"
    (out / "Dataset003_Other").mkdir(parents=True)
    base = ["train", "nnunet-dataset", "--out", str(out), "--dataset-id"]
    for argv, message in [
        (base + ["4"], "at least one"),
        (base + ["4", "--mnms", str(sources["mnms"])], "--mnms-csv"),
        (base + ["4", "--acdc", str(tmp_path)], "no patientXXX"),
        (base + ["3", "--acdc", str(sources["acdc"])], "already used by Dataset003_Other"),
    ]:
        assert run_train(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("cmrvl train: error:") and message in err and err.count("\n") == 1
