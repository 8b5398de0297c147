"""TEST STAND-IN for Triton's C++ ONNX Runtime backend.

A Triton *Python-based backend* registered under the backend name ``onnxruntime``
(infra/tools/install-triton.sh installs this file as ``<backends>/onnxruntime/model.py``).
It lets the PyPI ``nvidia-pytriton`` tritonserver, which ships only the Python backend, serve the
production model repository unchanged: ``config.pbtxt`` says ``backend: "onnxruntime"`` and the
network is ``<model>/<version>/model.onnx``. Triton itself still does the parts the tests care
about: gRPC, shape/dtype validation against config.pbtxt, dynamic batching, model versions.
It runs in the Triton venv (numpy<2), not in the project venv.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        threads = int(os.environ.get("CMRVL_ORT_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        # Dynamic batching hands us several requests at once: run them as ONE ONNX Runtime call.
        feeds = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            for name in self.input_names:
                feeds[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(feeds[self.input_names[0]][-1].shape[0])
        try:
            outputs = self.session.run(
                self.output_names, {k: np.concatenate(v, axis=0) for k, v in feeds.items()})
        except Exception as exc:  # report per request instead of killing the model
            error = pb_utils.TritonError(f"onnxruntime stand-in failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                       for name, out in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
