"""Cine segmentation with the in-process ONNX Runtime backend vs the stock nnUNetv2_predict.

The tiny model is trained by tests/nnunet_fixtures.py (cached); it is not accurate, so the tests
prove agreement between execution paths on the same weights and input, not segmentation quality.
"""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_fixtures import nnunet_predict_reference, unseen_cine, tiny_model
from services.segmentation.inference import InvalidInput, labels_nifti, load_segmenter


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cine():
    return unseen_cine(n_phases=3)


@pytest.fixture(scope="module")
def reference(model, cine):
    image, _, affine = cine
    return nnunet_predict_reference(model, image, affine)[0]


@pytest.fixture(scope="module")
def segmenter(model):
    seg = load_segmenter(model.layout, backend="onnxruntime")
    yield seg
    seg.close()


def test_onnxruntime_labels_equal_nnunetv2_predict(segmenter, cine, reference):
    image, _, affine = cine
    affine_before = affine.copy()
    labels = segmenter.segment_cine(image, affine)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(affine, affine_before)
    # The reference must be a real segmentation, otherwise agreement proves little.
    assert set(np.unique(reference)) == {0, 1, 2, 3}, np.unique(reference)
    agreement = float(np.mean(labels == reference))
    print(f"ORT vs nnUNetv2_predict: {agreement:.6%} voxel agreement on {image.shape}")
    assert agreement >= 0.999


def test_label_nifti_keeps_the_source_geometry(segmenter, cine, tmp_path):
    import nibabel as nib

    image, _, affine = cine
    labels = segmenter.segment_cine(image[..., :1], affine)
    nib.save(labels_nifti(labels, affine), tmp_path / "labels.nii.gz")
    back = nib.load(tmp_path / "labels.nii.gz")
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    assert back.get_data_dtype() == np.uint8 and back.header.get_intent()[0] == "label"


def test_every_phase_is_segmented_like_a_single_volume(segmenter, cine):
    """Phases batched together give the labels each phase gets alone (no cross-talk, right order)."""
    image, _, affine = cine
    together = segmenter.segment_cine(image, affine)
    for t in (0, image.shape[3] - 1):
        np.testing.assert_array_equal(segmenter.segment_volume(image[..., t], affine), together[..., t])
    assert not np.array_equal(together[..., 0], together[..., 1])  # the phases differ (contraction)


def test_labels_follow_the_image_geometry(segmenter, cine):
    """Flipping the image columns flips the labels back: x/y/z handling and the affine are consistent."""
    image, _, affine = cine
    labels = segmenter.segment_volume(image[..., 0], affine)
    flipped = segmenter.segment_volume(image[::-1, :, :, 0].copy(), affine)
    assert np.mean(flipped[::-1] == labels) >= 0.99


@pytest.mark.parametrize("bad, affine, match", [
    (np.zeros((64, 64)), np.eye(4), "expected an image"),
    (np.full((32, 32, 4, 2), np.nan), np.eye(4), "NaN"),
    (np.zeros((32, 32, 4, 2)), np.eye(3), "affine"),
    (np.zeros((32, 32, 4, 2)), np.diag([1.0, 1.0, 0.0, 1.0]), "zero-length"),
])
def test_invalid_input_is_rejected(segmenter, bad, affine, match):
    with pytest.raises(InvalidInput, match=match):
        segmenter.segment_cine(bad, affine)


SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cinema-samples"


def test_real_acdc_volumes_agree_with_nnunetv2_predict(model, segmenter):
    """Real short-axis input (ACDC ED + ES, NIfTI from the shared sample data) as a 2-phase cine.
    The tiny phantom-trained model is not meant to segment it well: agreement is the point."""
    import nibabel as nib

    folder = SAMPLES / "acdc"
    if not (folder / "sax_ed.nii.gz").exists():
        pytest.skip(f"sample data not present: {folder}")
    ed, es = (nib.load(folder / f"sax_{p}.nii.gz") for p in ("ed", "es"))
    image = np.stack([np.asarray(ed.dataobj, np.float32), np.asarray(es.dataobj, np.float32)], -1)
    reference, _ = nnunet_predict_reference(model, image, ed.affine)
    labels = segmenter.segment_cine(image, ed.affine)
    agreement = float(np.mean(labels == reference))
    print(f"real ACDC {image.shape}: ORT vs nnUNetv2_predict {agreement:.6%}, labels {np.unique(reference)}")
    assert len(np.unique(reference)) > 1
    assert agreement >= 0.999
