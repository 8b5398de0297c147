"""Benchmark: the same tiny nnU-Net model and cine through nnUNetv2_predict and through this service.

    .venv/bin/python tests/bench/bench_segmentation.py [--phases 20] [--shape 96 96 10] [--api]

Baseline (a): the stock ``nnUNetv2_predict`` command, all phases as cases of one call (process
start-up included, as a user runs it); with --api also nnU-Net's in-process ``nnUNetPredictor``
(torch, no start-up; slow on CPU, minutes). Candidate (b): ``Segmenter.segment_cine`` via a real Triton (tests/triton_server.py,
ONNX Runtime stand-in backend) and with in-process ONNX Runtime. Prints wall times, the ratio to
nnUNetv2_predict, voxel agreement and per-phase throughput. Needs infra/tools/install-triton.sh
for (b) via Triton. Everything shares this machine's CPU cores; no GPU is used.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (fixture modules)

from nnunet_fixtures import FOLD, nnunet_predict_reference, oblique_affine, phantom_cine, tiny_model  # noqa: E402
from triton_server import triton_missing_reason, triton_server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 10], metavar=("X", "Y", "SLICES"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.4, 1.4, 8.0])
    parser.add_argument("--api", action="store_true", help="also time nnUNetPredictor in-process (torch)")
    args = parser.parse_args()

    import torch
    from services.segmentation.inference import load_segmenter

    model = tiny_model()
    image, _, = phantom_cine(tuple(args.shape), args.phases, tuple(args.spacing), seed=11)
    affine = oblique_affine(tuple(args.spacing))
    n = args.phases
    print(f"cine {image.shape} (x, y, slice, phase), spacing {args.spacing} mm, model {model.root.name}", flush=True)
    rows = []

    # (a) baseline: nnUNetv2_predict, one call for all phases
    reference, t_cli = nnunet_predict_reference(model, image, affine, cache=False)
    rows.append(("nnUNetv2_predict (CLI, torch)", t_cli, reference))
    print(f"nnUNetv2_predict: {t_cli:.1f} s", flush=True)

    # (a') nnU-Net's predictor in this process (torch), phase by phase as its Python API does it
    if args.api:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model.results_folder), use_folds=(FOLD,))
        spacing_zyx = list(np.linalg.norm(affine[:3, :3], axis=0)[::-1])
        start = time.perf_counter()
        api = np.stack([predictor.predict_single_npy_array(
            np.ascontiguousarray(image[..., t].transpose(2, 1, 0), np.float32)[None], {"spacing": spacing_zyx}
        ).transpose(2, 1, 0) for t in range(n)], -1)
        rows.append(("nnUNetPredictor (in-process, torch)", time.perf_counter() - start, api))
        print(f"nnUNetPredictor: {rows[-1][1]:.1f} s", flush=True)

    # (b) this service, in-process ONNX Runtime
    seg = load_segmenter(model.layout, backend="onnxruntime")
    seg.segment_volume(image[..., 0], affine)  # warm-up (session, Gaussian cache)
    start = time.perf_counter()
    labels = seg.segment_cine(image, affine)
    rows.append(("service, ONNX Runtime in-process", time.perf_counter() - start, labels))
    seg.close()
    print(f"service, ONNX Runtime: {rows[-1][1]:.1f} s", flush=True)

    # (b) this service via Triton gRPC (batched requests)
    reason = triton_missing_reason()
    if reason:
        print(f"skipping Triton: {reason}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            with triton_server(model.layout, Path(tmp) / "tritonserver.log") as url:
                t_start = time.perf_counter() - start
                seg = load_segmenter(model.layout, backend="triton", triton_url=url)
                seg.segment_volume(image[..., 0], affine)  # warm-up
                seg.predictor.backend.attempts = 0
                start = time.perf_counter()
                labels = seg.segment_cine(image, affine)
                rows.append(("service, Triton gRPC (ORT stand-in)", time.perf_counter() - start, labels))
                requests = seg.predictor.backend.attempts
                seg.close()
            print(f"Triton start-up {t_start:.1f} s (not counted); {requests} gRPC requests for the cine")

    print(f"\n{'path':40s} {'wall s':>8s} {'ratio':>7s} {'phases/s':>9s} {'agree vs CLI':>13s}")
    for name, seconds, labels in rows:
        print(f"{name:40s} {seconds:8.2f} {seconds / t_cli:7.2f} {n / seconds:9.2f} "
              f"{np.mean(labels == reference):13.4%}")
    print("\nratio = wall time / nnUNetv2_predict wall time (lower is faster); target agreement >= 99.9 %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
