"""The exported model layout (services/segmentation/model_layout.py) on the tiny nnU-Net model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nnunet_fixtures import FOLD, MODEL_NAME, unseen_cine, tiny_model
from services.segmentation.model_layout import LayoutError, export_model, latest_version, resolve_model_dir


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_layout_has_triton_config_network_and_nnunet_files(model):
    model_dir = resolve_model_dir(model.layout)
    assert model_dir.name == MODEL_NAME and resolve_model_dir(model_dir) == model_dir
    version = latest_version(model_dir)
    for name in ("model.onnx", "plans.json", "dataset.json", "labels.json", "inference.json"):
        assert (model_dir / str(version) / name).is_file(), name
    info = json.loads((model_dir / str(version) / "inference.json").read_text())

    # config.pbtxt is what Triton parses: explicit tensors that match the network, dynamic batching.
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == MODEL_NAME and config.backend == "onnxruntime"
    assert config.max_batch_size == info["max_batch_size"] > 1
    assert config.HasField("dynamic_batching")
    (inp,), (out,) = config.input, config.output
    assert (inp.name, list(inp.dims)) == (info["input_name"], [info["in_channels"], *info["patch_size"]])
    assert (out.name, list(out.dims)) == (info["output_name"], [4, *info["patch_size"]])
    assert inp.data_type == out.data_type == model_config_pb2.TYPE_FP32

    labels = json.loads((model_dir / str(version) / "labels.json").read_text())
    assert labels["nnunet_to_cmrvl"] == {"0": 0, "1": 1, "2": 2, "3": 3}
    plans = json.loads((model_dir / str(version) / "plans.json").read_text())
    assert info["configuration"] in plans["configurations"]


def test_onnx_matches_pytorch_checkpoint_on_a_real_patch(model):
    """Independent of the exporter's own check: the network nnU-Net's predictor builds from the
    checkpoint vs ONNX Runtime, on patches of a preprocessed phantom cine."""
    import onnxruntime as ort
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model.results_folder), use_folds=(FOLD,))
    net = predictor.network.eval()
    image, _, affine = unseen_cine(n_phases=1)
    zyx = np.ascontiguousarray(image[..., 0].transpose(2, 1, 0), np.float32)[None]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[::-1].tolist()
    data, _, _ = predictor.configuration_manager.preprocessor_class().run_case_npy(
        zyx, None, {"spacing": spacing}, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    patch = predictor.configuration_manager.patch_size
    x = np.zeros((data.shape[1], 1, *patch), np.float32)  # every slice, padded to the 2D patch
    x[:, :, :min(patch[0], data.shape[2]), :min(patch[1], data.shape[3])] = \
        data[:, :, :patch[0], :patch[1]].transpose(1, 0, 2, 3)
    with torch.inference_mode():
        ref = net(torch.from_numpy(x)).numpy()
    version_dir = resolve_model_dir(model.layout) / str(latest_version(resolve_model_dir(model.layout)))
    got = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    max_abs_diff = float(np.abs(ref - got).max())
    print(f"ORT vs torch: max |diff| {max_abs_diff:.2e} over {x.shape[0]} patches, |logit| <= {np.abs(ref).max():.1f}")
    assert max_abs_diff < 1e-3
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.999


def test_label_map_remaps_model_labels(model, tmp_path):
    """An ACDC-ordered model (1 RV, 2 MYO, 3 LV) exported with its label map yields CMR-VL labels."""
    from services.segmentation.inference import load_segmenter

    acdc = {0: 0, 1: 3, 2: 2, 3: 1}
    export_model(model.results_folder, tmp_path, MODEL_NAME, 3, fold=FOLD, label_map=acdc)
    image, _, affine = unseen_cine(n_phases=1)
    plain = load_segmenter(model.layout).segment_cine(image, affine)
    remapped = load_segmenter(tmp_path).segment_cine(image, affine)
    lut = np.array([acdc[i] for i in range(4)], np.uint8)
    assert set(np.unique(plain)) >= {1, 3}
    np.testing.assert_array_equal(remapped, lut[plain])


def test_export_rejects_incomplete_label_map(model, tmp_path):
    with pytest.raises(LayoutError, match="label_map"):
        export_model(model.results_folder, tmp_path, MODEL_NAME, 1, fold=FOLD, label_map={0: 0, 1: 1})


def test_choices_recorded_in_inference_json_are_honoured(model, tmp_path):
    """record_inference_choices: mirroring off and largest-component post-processing, read back by
    load_segmenter (a copy of the layout; the fixture's own files stay as built)."""
    import shutil

    from scipy.ndimage import label as components

    from services.segmentation.inference import load_segmenter, postprocess
    from services.segmentation.model_layout import record_inference_choices

    shutil.copytree(model.layout, tmp_path / "repo")
    model_dir = resolve_model_dir(tmp_path / "repo")
    version_dir = model_dir / str(latest_version(model_dir))
    info = record_inference_choices(version_dir, use_mirroring=False, largest_component=[1, 3],
                                    evidence={"why": "test"})
    assert info["use_mirroring"] is False and info["postprocessing"] == {"largest_component": [1, 3]}
    image, _, affine = unseen_cine(n_phases=1)
    chosen = load_segmenter(tmp_path / "repo")
    assert chosen.predictor.use_mirroring is False and chosen.largest_component == (1, 3)
    raw = load_segmenter(tmp_path / "repo", use_mirroring=False)
    raw.largest_component = ()
    plain, post = raw.segment_cine(image, affine)[..., 0], chosen.segment_cine(image, affine)[..., 0]
    np.testing.assert_array_equal(post, postprocess(plain, (1, 3)))
    for value in (1, 3):
        assert components(post == value)[1] <= 1
    with pytest.raises(LayoutError, match="not CMR-VL foreground"):
        record_inference_choices(version_dir, use_mirroring=True, largest_component=[0, 4])


def test_mirroring_on_one_axis_is_nnunets_predictor_mirroring_on_that_axis(model, tmp_path):
    """A recorded subset of mirroring axes (inference.json mirroring_axes) runs what nnU-Net's own
    predictor runs with allowed_mirroring_axes set to it, on the same weights."""
    import shutil

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from services.segmentation.inference import load_segmenter
    from services.segmentation.model_layout import record_inference_choices

    shutil.copytree(model.layout, tmp_path / "repo")
    model_dir = resolve_model_dir(tmp_path / "repo")
    version_dir = model_dir / str(latest_version(model_dir))
    allowed = json.loads((version_dir / "inference.json").read_text())["inference_allowed_mirroring_axes"]
    assert allowed == [0, 1]
    info = record_inference_choices(version_dir, use_mirroring=True, largest_component=[], mirroring_axes=[1])
    assert info["mirroring_axes"] == [1]
    for bad in ([], [2]):
        with pytest.raises(LayoutError, match="subset"):
            record_inference_choices(version_dir, use_mirroring=True, largest_component=[], mirroring_axes=bad)
    with pytest.raises(LayoutError, match="with mirroring on"):
        record_inference_choices(version_dir, use_mirroring=False, largest_component=[], mirroring_axes=[1])

    image, _, affine = unseen_cine(n_phases=1)
    ours = load_segmenter(tmp_path / "repo")
    assert ours.mirroring_axes == [1]
    labels = ours.segment_volume(image[..., 0], affine)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(str(model.results_folder), use_folds=(FOLD,))
    predictor.allowed_mirroring_axes = (1,)
    zyx = np.ascontiguousarray(image[..., 0].transpose(2, 1, 0), np.float32)[None]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[::-1].tolist()
    reference = predictor.predict_single_npy_array(zyx, {"spacing": spacing}).transpose(2, 1, 0)
    assert set(np.unique(reference)) >= {1, 3}
    assert np.mean(labels == reference) >= 0.999
    both = load_segmenter(tmp_path / "repo", mirroring_axes=(0, 1))
    assert both.mirroring_axes == [0, 1] and load_segmenter(tmp_path / "repo", use_mirroring=False).mirroring_axes == []
    with pytest.raises(ValueError, match="subset"):
        load_segmenter(tmp_path / "repo", mirroring_axes=(2,))


def test_postprocess_keeps_the_largest_component_of_the_chosen_labels():
    from services.segmentation.inference import postprocess

    labels = np.zeros((12, 12, 3), np.uint8)
    labels[1:6, 1:6, 1] = 1   # the LV cavity
    labels[9:11, 9:11, 1] = 1  # a stray island of "LV cavity"
    labels[8:10, 1:3, 2] = 3   # RV, one island: kept
    out = postprocess(labels, (1, 3))
    assert (out[9:11, 9:11, 1] == 0).all() and (out[1:6, 1:6, 1] == 1).all() and (out == 3).sum() == 4
    np.testing.assert_array_equal(postprocess(labels, ()), labels)


def test_postprocess_within_the_bounding_box_equals_nnunets_on_the_whole_volume():
    """postprocess works on each label's bounding box (for speed); nnU-Net's own function on the
    whole volume must give the very same labels, here on random blobs of every class."""
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation
    from scipy import ndimage

    from services.segmentation.inference import postprocess

    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.random((64, 64, 10)), 2)
    labels = np.digitize(noise, np.quantile(noise, [0.7, 0.8, 0.9])).astype(np.uint8)  # many islands per class
    expected = labels.copy()
    for value in (1, 2, 3):
        expected = remove_all_but_largest_component_from_segmentation(expected, value, background_label=0)
    assert (expected != labels).any()  # islands were removed, so the comparison means something
    before = labels.copy()
    np.testing.assert_array_equal(postprocess(labels, (1, 2, 3)), expected)
    np.testing.assert_array_equal(labels, before)  # the input is left as it was
