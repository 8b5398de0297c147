"""Runs the peer model (myopari's ACDC Tiramisu, ONNX) in its own venv for bench_segmentation_peer.py.

    .venvs/peer/bin/python tests/bench/peer_myopari.py IN.npz OUT.npz

IN.npz holds volumes ``v0, v1, ...`` (x, y, slices) float32; OUT.npz gets ``v0, ...`` as uint8 in
myopari's own label values, plus ``seconds`` (per volume, its whole pre/post-processing included).
The CPU provider is used (myopari's RASBERRY_PI setting); nothing of it enters the shipped model."""
import sys
import time

import numpy as np


def main() -> int:
    import importlib.util
    import types

    import onnxruntime as ort

    ort.preload_dlls = lambda *a, **k: None  # CUDA libraries: not on this machine
    # myopari's package __init__ imports its napari/Qt widget; load only its processors package.
    spec = importlib.util.find_spec("myopari")
    package = types.ModuleType("myopari")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["myopari"] = package
    from myopari.processors.SEGProcessor import EdgeDevice, SEG_module

    seg = SEG_module()
    seg.edge_device = EdgeDevice.RASBERRY_PI.value
    volumes = np.load(sys.argv[1])
    out, seconds = {}, []
    for key in sorted(volumes.files, key=lambda k: int(k[1:])):
        start = time.perf_counter()
        out[key] = seg.segment(np.asarray(volumes[key], np.float32)).astype(np.uint8)
        seconds.append(time.perf_counter() - start)
    np.savez(sys.argv[2], seconds=np.asarray(seconds), **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
