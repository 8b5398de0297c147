"""The segmentation model artifact: one layout, in the object store and on disk.

Layout (a Triton model repository; in the cluster Triton loads it straight from the object store,
``--model-repository=s3://<endpoint>/<bucket>/models/triton``)::

    <repository>/                      e.g. s3://cmrvl/models/triton/
      cmr_seg/                         Triton model name (MODEL_NAME)
        config.pbtxt                   backend "onnxruntime", explicit input/output, dynamic batching
        1/                             one version (numbered folder)
          model.onnx                   the nnU-Net network, one file, dynamic batch axis, fixed patch
          plans.json                   nnU-Net plans (preprocessing, patch size, network), as trained
          dataset.json                 nnU-Net dataset.json (channels, labels, file ending), as trained
          labels.json                  label map: nnU-Net label value -> CMR-VL label, CMR-VL names
          inference.json               what the checkpoint adds: configuration, mirroring axes, tensor
                                       names, source checkpoint, ONNX-vs-PyTorch verification; and
                                       the choices made on validation (record_inference_choices):
                                       use_mirroring (mirroring_axes), postprocessing.largest_component

The JSON files sit beside model.onnx so that each version carries the preprocessing it was trained
with; Triton's ONNX backend reads only model.onnx and ignores them. The segmentation service reads
them to run nnU-Net's own preprocessing and sliding window around the network
(services/segmentation/inference.py). Triton (version_policy latest 1) and the service both take
the highest version unless told otherwise; config.pbtxt fixes the patch size for all versions.
The ONNX network takes ``input`` float32 [batch, channels, *patch] (nnU-Net-normalised, after
resampling to the plans' spacing) and returns ``logits`` float32 [batch, classes, *patch].

``export_model`` writes this layout from a trained nnU-Net results folder
(``nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "cmr_seg"
# The model shipped in the repository (MODEL_CARD.md there); what `cmrvl segment` uses by default.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_OPSET = 17
DEFAULT_MAX_BATCH_SIZE = 32
CMRVL_LABELS = {0: "background", 1: "LV cavity", 2: "LV myocardium", 3: "RV cavity"}


class LayoutError(ValueError):
    """The folder is not a model layout, or the exported network failed verification."""


# ---------------------------------------------------------------- reading the layout

def resolve_model_dir(path: str | Path, model_name: str = MODEL_NAME) -> Path:
    """Accept a model folder (with config.pbtxt) or the repository above it."""
    path = Path(path)
    for candidate in (path, path / model_name):
        if (candidate / "config.pbtxt").is_file():
            return candidate
    raise LayoutError(f"{path} holds no model layout for {model_name!r} "
                      "(expected <model>/config.pbtxt; see services/segmentation/model_layout.py)")


def latest_version(model_dir: Path) -> int:
    versions = sorted(int(p.name) for p in model_dir.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / "inference.json").is_file())
    if not versions:  # (model.onnx may be absent locally when only Triton runs the network)
        raise LayoutError(f"{model_dir} has no <version>/inference.json")
    return versions[-1]


def read_layout(version_dir: Path) -> dict[str, Any]:
    """plans, dataset, labels and inference metadata of one model version."""
    return {name: json.loads((version_dir / f"{name}.json").read_text())
            for name in ("plans", "dataset", "labels", "inference")}


def label_lut(labels: dict) -> np.ndarray:
    """Lookup table nnU-Net label value -> CMR-VL label value."""
    mapping = {int(k): int(v) for k, v in labels["nnunet_to_cmrvl"].items()}
    lut = np.zeros(max(mapping) + 1, np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut


# ---------------------------------------------------------------- writing the layout

def config_pbtxt(model_name: str, in_channels: int, n_classes: int, patch_size: list[int],
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> str:
    """Triton model configuration: explicit tensors (Triton validates shapes against them),
    dynamic batching so that concurrent patch batches share one execution. No instance_group:
    Triton then places one instance per GPU, or a CPU instance where there is none."""
    dims_in = ", ".join(str(d) for d in [in_channels, *patch_size])
    dims_out = ", ".join(str(d) for d in [n_classes, *patch_size])
    return f"""name: "{model_name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {dims_in} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {dims_out} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
version_policy: {{ latest: {{ num_versions: 1 }} }}
"""


def _sample_patch(sample_image, plans_manager, configuration_manager, dataset_json) -> np.ndarray:
    """Centre patch of a real image after nnU-Net's own preprocessing (as the network sees it)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, props = SimpleITKIO().read_images([str(sample_image)])
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case_npy(image, None, props, plans_manager, configuration_manager,
                                           dataset_json)
    patch = list(configuration_manager.patch_size)
    if len(patch) == data.ndim - 2:  # 2D network on a 3D volume: take the middle slice
        data = data[:, data.shape[1] // 2]
    padded = np.zeros((data.shape[0], *[max(s, p) for s, p in zip(data.shape[1:], patch)]), np.float32)
    padded[(slice(None), *[slice(0, s) for s in data.shape[1:]])] = data
    start = [(s - p) // 2 for s, p in zip(padded.shape[1:], patch)]
    return padded[(slice(None), *[slice(a, a + p) for a, p in zip(start, patch)])][None]


def export_model(nnunet_results_folder: str | Path, out_layout_dir: str | Path,
                 model_name: str = MODEL_NAME, version: int = 1, *, fold: int | str = 0,
                 checkpoint_name: str = "checkpoint_final.pth", label_map: dict[int, int] | None = None,
                 sample_image: str | Path | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 atol: float = 1e-3) -> dict[str, Any]:
    """Export a trained nnU-Net model to the layout above (``out_layout_dir`` is the repository).

    ``label_map`` maps the model's label values to CMR-VL's (default: identity; ACDC-trained
    models need {1: 3, 2: 2, 3: 1}). ``sample_image`` (a NIfTI the model could see) gives the real
    patch on which ONNX Runtime is checked against PyTorch; without it a standard-normal patch is
    used (the network's inputs are z-scored). Raises LayoutError when they disagree.
    Returns the contents of inference.json.
    """
    import onnxruntime as ort
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    src = Path(nnunet_results_folder)
    plans = json.loads((src / "plans.json").read_text())
    dataset_json = json.loads((src / "dataset.json").read_text())
    ckpt_path = src / f"fold_{fold}" / checkpoint_name
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    configuration = ckpt["init_args"]["configuration"]
    plans_manager = PlansManager(plans)
    cm = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    in_channels = determine_num_input_channels(plans_manager, cm, dataset_json)
    n_classes = label_manager.num_segmentation_heads
    if label_manager.has_regions:
        raise LayoutError("region-based nnU-Net models are not supported (the service expects softmax labels)")

    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, in_channels, n_classes,
                                     allow_init=False, deep_supervision=False)
    network.load_state_dict(ckpt["network_weights"])
    network.eval()

    model_values = [int(v) for v in label_manager.all_labels]
    label_map = {v: v for v in model_values} if label_map is None else {int(k): int(v) for k, v in label_map.items()}
    if sorted(label_map) != sorted(model_values) or not set(label_map.values()) <= set(CMRVL_LABELS):
        raise LayoutError(f"label_map {label_map} must map the model's labels {model_values} to {sorted(CMRVL_LABELS)}")

    model_dir = Path(out_layout_dir) / model_name
    version_dir = model_dir / str(int(version))
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    patch = [int(p) for p in cm.patch_size]
    example = torch.zeros((2, in_channels, *patch), dtype=torch.float32)
    # dynamo=False: the TorchScript exporter writes a single self-contained file.
    torch.onnx.export(network, (example,), str(onnx_path), input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET, dynamo=False,
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})

    # Verify on a real patch (and a batch of two, to exercise the dynamic batch axis).
    if sample_image is not None:
        x = _sample_patch(sample_image, plans_manager, cm, dataset_json)
        patch_source = str(sample_image)
    else:
        x = np.random.default_rng(0).standard_normal((1, in_channels, *patch)).astype(np.float32)
        patch_source = "standard normal"
    x = np.concatenate([x, np.flip(x, -1)], 0).copy()
    with torch.inference_mode():
        ref = network(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        [OUTPUT_NAME], {INPUT_NAME: x})[0]
    max_abs_diff = float(np.max(np.abs(ref - got)))
    argmax_agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
    verification = {"patch": patch_source, "max_abs_diff": max_abs_diff,
                    "max_abs_logit": float(np.max(np.abs(ref))), "argmax_agreement": argmax_agreement,
                    "atol": atol}
    if not (max_abs_diff <= atol and argmax_agreement >= 0.999):
        shutil.rmtree(version_dir)
        raise LayoutError(f"ONNX Runtime disagrees with PyTorch on {patch_source}: {verification}")

    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(model_name, in_channels, n_classes, patch, max_batch_size))
    (version_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (version_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (version_dir / "labels.json").write_text(json.dumps({
        "nnunet_labels": dataset_json["labels"],
        "nnunet_to_cmrvl": {str(k): v for k, v in sorted(label_map.items())},
        "cmrvl_labels": {str(k): v for k, v in CMRVL_LABELS.items()},
    }, indent=2))
    mirror = ckpt.get("inference_allowed_mirroring_axes")
    inference = {
        "model_name": model_name, "version": int(version), "configuration": configuration,
        "inference_allowed_mirroring_axes": list(mirror) if mirror is not None else None,
        "patch_size": patch, "in_channels": in_channels, "n_classes": n_classes,
        "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "onnx_opset": ONNX_OPSET,
        "max_batch_size": max_batch_size,
        "source": {"results_folder": str(src), "fold": fold, "checkpoint": checkpoint_name,
                   "trainer_name": ckpt.get("trainer_name")},
        "verification": verification,
    }
    (version_dir / "inference.json").write_text(json.dumps(inference, indent=2))
    return inference


def checked_mirroring_axes(axes, allowed) -> list[int]:
    """``axes`` sorted, if they are a non-empty subset of the checkpoint's allowed mirroring axes."""
    if not axes or not set(axes) <= set(allowed):
        raise LayoutError(f"mirroring axes {list(axes)} are not a non-empty subset of the checkpoint's allowed axes "
                          f"{list(allowed)}")
    return sorted(int(a) for a in axes)


def record_inference_choices(version_dir: str | Path, *, use_mirroring: bool, largest_component: list[int],
                             evidence: dict | None = None, mirroring_axes: list[int] | None = None) -> dict[str, Any]:
    """Write what validation chose into the version's inference.json: test-time mirroring on or off
    (and on which axes: ``mirroring_axes``, a subset of the checkpoint's allowed axes; None: all of
    them), and the CMR-VL labels whose largest 3D connected component alone is kept (nnU-Net-style
    post-processing), with the numbers that decided it. The segmentation service reads them."""
    path = Path(version_dir) / "inference.json"
    info = json.loads(path.read_text())
    unknown = sorted(set(map(int, largest_component)) - (set(CMRVL_LABELS) - {0}))
    if unknown:
        raise LayoutError(f"largest_component labels {unknown} are not CMR-VL foreground labels")
    if mirroring_axes is not None:
        if not use_mirroring:
            raise LayoutError(f"mirroring_axes {mirroring_axes} are recorded only with mirroring on")
        mirroring_axes = checked_mirroring_axes(mirroring_axes, info.get("inference_allowed_mirroring_axes") or [])
    info["use_mirroring"] = bool(use_mirroring)
    info.pop("mirroring_axes", None)
    if mirroring_axes is not None:
        info["mirroring_axes"] = mirroring_axes
    info["postprocessing"] = {"largest_component": sorted(int(v) for v in largest_component)}
    if evidence is not None:
        info["choices_evidence"] = evidence
    path.write_text(json.dumps(info, indent=2))
    return info
