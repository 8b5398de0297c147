"""Make the PyPI (CUDA) torchvision importable beside CPU torch in the vLLM venv.

torchvision's compiled ops fail to load against torch+cpu, and its import then dies registering fake
kernels for `torchvision::nms` / `torchvision::qnms` (the only two it registers without checking) ("operator ... does not exist"). vLLM only
needs torchvision's pure-Python transforms, so we declare those two op schemas (no kernels) just
before torchvision is first imported, in every process of this venv (vLLM spawns workers).
Installed by infra/tools/install-vllm.sh together with a .pth file that imports it.
"""
import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        schemas = {
            "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        }
        for op, schema in schemas.items():
            try:
                torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
            except RuntimeError:  # not defined: the compiled ops did not load
                torch.library.define(f"torchvision::{op}", schema)
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
