"""`cmrvl segment IMAGE --out LABELS [--model DIR]` (services/segmentation/cli.py): real ONNX Runtime
on the tiny test model (tests/nnunet_fixtures.py), real NIfTI files. The model is not accurate;
these tests check the contract: the label map lies on exactly the input's grid, whatever the axis
order, and bad inputs get one line and exit 1."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from nnunet_fixtures import tiny_model, unseen_cine
from services.cli import main
from services.segmentation.inference import load_segmenter


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cine():
    image, _, affine = unseen_cine(n_phases=2)
    return image, affine


@pytest.fixture(scope="module")
def canonical(model, cine):
    """Labels of the cine in the layout the service uses (x, y, slice, phase)."""
    image, affine = cine
    seg = load_segmenter(model.layout, backend="onnxruntime")
    try:
        return seg.segment_cine(image, affine)
    finally:
        seg.close()


def permuted(image: np.ndarray, affine: np.ndarray, order: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels with the spatial axes in another order (another NIfTI orientation of one scan)."""
    out = affine.copy()
    out[:3, :3] = affine[:3, order]
    return np.transpose(image, order + list(range(3, image.ndim))), out


def segment(tmp_path, image, affine, model, name="image") -> tuple[int, nib.Nifti1Image]:
    src, dst = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_labels.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), src)
    code = main(["segment", str(src), "--out", str(dst), "--model", str(model.layout)])
    return code, nib.load(dst) if code == 0 else None


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1]], ids=["slices-last", "slices-first"])
@pytest.mark.parametrize("phases", [None, 2], ids=["3d", "4d"])
def test_labels_lie_on_the_input_grid_in_any_axis_order(model, cine, canonical, tmp_path, capsys, order, phases):
    image, affine = cine
    expected = canonical if phases else canonical[..., 0]
    image = image if phases else image[..., 0]
    moved, moved_affine = permuted(image, affine, order)
    code, labels = segment(tmp_path, moved, moved_affine, model)
    assert code == 0, capsys.readouterr().err
    assert labels.shape == moved.shape and labels.get_data_dtype() == np.uint8
    np.testing.assert_allclose(labels.affine, nib.load(tmp_path / "image.nii.gz").affine, atol=1e-6)
    back = np.transpose(np.asarray(labels.dataobj), np.argsort(order).tolist() + list(range(3, moved.ndim)))
    assert set(np.unique(back)) <= {0, 1, 2, 3} and len(np.unique(back)) > 1
    agreement = float(np.mean(back == expected))
    print(f"axes {order}, {moved.shape}: {agreement:.4%} equal to the service's layout")
    assert agreement >= 0.999


@pytest.mark.parametrize("mirroring", ["on", "off"])
def test_mirroring_can_be_chosen_for_one_run(model, cine, tmp_path, mirroring):
    """--mirroring on/off runs what the service's segmenter runs with/without test-time mirroring."""
    image, affine = cine
    expected = {}
    for use in (True, False):
        seg = load_segmenter(model.layout, backend="onnxruntime", use_mirroring=use)
        try:
            expected[use] = seg.segment_cine(image, affine)
        finally:
            seg.close()
    assert not np.array_equal(expected[True], expected[False])  # so that the choice shows
    src, dst = tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), src)
    assert main(["segment", str(src), "--out", str(dst), "--model", str(model.layout), "--mirroring", mirroring]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(dst).dataobj), expected[mirroring == "on"])


def test_bad_inputs_get_one_line_and_exit_1(model, tmp_path, capsys):
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), flat)
    five = tmp_path / "five.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2, 2, 2), np.float32), np.eye(4)), five)
    for path, message in ((tmp_path / "missing.nii.gz", "no such file"), (text, "not a NIfTI image"),
                          (flat, "got 2D"), (five, "got 5D")):
        out = tmp_path / "labels.nii.gz"
        assert main(["segment", str(path), "--out", str(out), "--model", str(model.layout)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("cmrvl segment: error:") and message in err and err.count("\n") == 1, err
        assert not out.exists()
    assert main(["segment", str(flat), "--out", str(tmp_path / "x.nii.gz"), "--model", str(tmp_path)]) == 1
    assert "got 2D" in capsys.readouterr().err  # the input is checked before the model is loaded
