"""Segmentation through a REAL Triton Inference Server (tritonserver from the PyPI package
nvidia-pytriton, installed by infra/tools/install-triton.sh into its own venv).

Triton serves the exported model repository unchanged (config.pbtxt says backend "onnxruntime").
That pip-installed Triton ships only the Python backend, so a small Python backend registered
under the backend name `onnxruntime` (tests/triton/onnxruntime_backend/model.py), which runs
model.onnx with ONNX Runtime, is the TEST STAND-IN for Triton's C++ ONNX Runtime backend.
Triton itself does gRPC, shape validation against config.pbtxt, dynamic batching and versions.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from nnunet_fixtures import nnunet_predict_reference, unseen_cine, tiny_model
from services.segmentation.backends import BackendTimeout, BackendUnavailable, FallbackBackend, InvalidInput, TritonBackend
from services.segmentation.inference import load_segmenter
from triton_server import _free_port, triton_missing_reason, triton_server

pytestmark = pytest.mark.skipif(triton_missing_reason() is not None, reason=str(triton_missing_reason()))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def triton_url(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    with triton_server(model.layout, log, ort_threads=1) as url:
        yield url


@pytest.fixture(scope="module")
def cine():
    return unseen_cine(n_phases=3)


def test_triton_stand_in_labels_equal_nnunetv2_predict_and_onnxruntime(model, triton_url, cine):
    image, _, affine = cine
    reference, _ = nnunet_predict_reference(model, image, affine)
    seg = load_segmenter(model.layout, backend="triton", triton_url=triton_url)
    try:
        labels = seg.segment_cine(image, affine)
        backend = seg.predictor.backend
        # Tiles of all slices and phases went in batches of max_batch_size (mirrored copies
        # included), not one request per patch.
        n_forward = seg.predictor.last_tile_count * (len(seg.predictor._mirror_combinations()) + 1)
        assert seg.predictor.last_tile_count >= image.shape[2] * image.shape[3]
        assert backend.attempts <= math.ceil(n_forward / backend.max_batch_size) + 1
        assert backend.attempts < seg.predictor.last_tile_count
    finally:
        seg.close()
    ort = load_segmenter(model.layout, backend="onnxruntime")
    ort_labels = ort.segment_cine(image, affine)
    assert set(np.unique(reference)) == {0, 1, 2, 3}
    agreement = float(np.mean(labels == reference))
    print(f"Triton vs nnUNetv2_predict: {agreement:.6%}; Triton vs ORT: {np.mean(labels == ort_labels):.6%}")
    assert agreement >= 0.999
    assert np.mean(labels == ort_labels) >= 0.9999


def test_wrong_shaped_patch_is_invalid_argument(triton_url):
    backend = TritonBackend(triton_url, max_attempts=3)
    try:
        with pytest.raises(InvalidInput, match="INVALID_ARG|unexpected shape|shape"):
            backend.infer(np.zeros((2, 1, 17, 23), np.float32))
        assert backend.attempts == 1  # not retried
    finally:
        backend.close()


def test_slow_triton_is_deadline_exceeded_without_retry(triton_url, model):
    import json

    info = json.loads(next(model.layout.glob("*/1/inference.json")).read_text())
    backend = TritonBackend(triton_url, timeout_s=0.001, max_attempts=3)
    try:
        with pytest.raises(BackendTimeout, match="did not answer within"):
            backend.infer(np.zeros((16, info["in_channels"], *info["patch_size"]), np.float32))
        assert backend.attempts == 1
    finally:
        backend.close()


def test_triton_down_is_unavailable_after_retries_with_backoff():
    backend = TritonBackend(f"127.0.0.1:{_free_port()}", max_attempts=3, backoff_s=0.1, timeout_s=5)
    start = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable, match="unavailable after 3 attempt"):
            backend.infer(np.zeros((1, 1, 64, 64), np.float32))
    finally:
        backend.close()
    assert backend.attempts == 3
    assert time.monotonic() - start >= 0.1 + 0.2  # backoff between the attempts


def test_fallback_to_onnxruntime_when_triton_is_down(model):
    image, _, affine = unseen_cine(n_phases=1)
    seg = load_segmenter(model.layout, backend="triton", triton_url=f"127.0.0.1:{_free_port()}",
                         max_attempts=2, fallback=True)
    try:
        labels = seg.segment_cine(image, affine)
        assert isinstance(seg.predictor.backend, FallbackBackend) and seg.predictor.backend.fallbacks >= 1
    finally:
        seg.close()
    np.testing.assert_array_equal(labels, load_segmenter(model.layout).segment_cine(image, affine))
