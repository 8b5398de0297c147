"""Cine segmentation with nnU-Net's own pre/post-processing around a pluggable network backend.

What is nnU-Net's (reused, not re-implemented): preprocessing (transpose, crop to non-zero,
resampling to the plans' spacing, normalisation) via the plans' preprocessor; sliding-window tiles
(``compute_steps_for_sliding_window`` through ``_internal_get_sliding_window_slicers``), padding,
Gaussian importance weighting, tile step, test-time mirroring axes from the checkpoint; and the
resampling of logits back to the original geometry. What is ours: the network forward pass goes
to a backend (backends.py) in batches of tiles - tiles from all slices and all cine phases, all
mirrored variants of a tile in the same batch - instead of one patch per call.

    seg = load_segmenter("models/triton", backend="triton", triton_url="triton:8001")
    labels_4d = seg.segment_cine(image_4d, affine)   # (x, y, slice, phase), uint8 0..3

``segment_image`` (what `cmrvl segment` runs) takes a 3D or 4D short-axis image in any axis order:
the slice axis is the spatial axis with the largest spacing, moved last for the 2D network and back.
Post-processing (keep the largest connected component of a label in each 3D volume, nnU-Net's
``remove_all_but_largest_component``) is applied where the model's inference.json asks for it
(``postprocessing.largest_component``: chosen on validation by training/nnunet/evaluate.py).
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from services.segmentation.backends import (Backend, BackendTimeout, BackendUnavailable, FallbackBackend,
                                            InvalidInput, OnnxRuntimeBackend, SegmentationError, TritonBackend)
from services.segmentation.model_layout import (MODEL_NAME, checked_mirroring_axes, label_lut, latest_version,
                                                read_layout, resolve_model_dir)

__all__ = ["Segmenter", "BackendPredictor", "load_segmenter", "labels_nifti", "SegmentationError", "BackendUnavailable",
           "BackendTimeout", "InvalidInput"]


class _BackendNetwork(torch.nn.Module):
    """Stands where nnU-Net expects its network (no parameters; forward goes to the backend)."""

    def __init__(self, backend: Backend):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.backend.infer(x.detach().cpu().numpy()))


class BackendPredictor(nnUNetPredictor):
    """nnUNetPredictor whose sliding window sends batches of tiles to a backend.

    Everything else is the stock predictor, so ``predict_single_npy_array`` and
    ``predict_from_files`` work unchanged on top of the backend.
    """

    def __init__(self, backend: Backend, layout: dict, *, tile_step_size: float = 0.5,
                 use_gaussian: bool = True, use_mirroring: bool = True, tiles_per_call: int | None = None,
                 mirroring_axes: tuple[int, ...] | None = None):
        """``mirroring_axes``: the axes test-time mirroring flips, a subset of the checkpoint's allowed
        ones (nnU-Net's predictor with ``allowed_mirroring_axes`` set to them); None: as the version's
        inference.json chose (``mirroring_axes``), else every allowed axis."""
        super().__init__(tile_step_size=tile_step_size, use_gaussian=use_gaussian, use_mirroring=use_mirroring,
                         perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                         verbose_preprocessing=False, allow_tqdm=False)
        info = layout["inference"]
        plans_manager = PlansManager(layout["plans"])
        mirror = info.get("inference_allowed_mirroring_axes")
        chosen = mirroring_axes if mirroring_axes is not None else info.get("mirroring_axes")
        if chosen is not None and mirror is not None:
            mirror = checked_mirroring_axes(chosen, mirror)
        self.manual_initialization(_BackendNetwork(backend), plans_manager,
                                   plans_manager.get_configuration(info["configuration"]), [{}],
                                   layout["dataset"], info["source"].get("trainer_name") or "nnUNetTrainer",
                                   tuple(mirror) if mirror is not None else None)
        self.backend = backend
        n_variants = len(self._mirror_combinations()) + 1
        self.tiles_per_call = tiles_per_call or max(1, 4 * backend.max_batch_size // n_variants)
        self.last_tile_count = 0

    def _mirror_combinations(self) -> list[tuple[int, ...]]:
        # Same axis combinations, same order as nnUNetPredictor._internal_maybe_mirror_and_predict.
        if not self.use_mirroring or self.allowed_mirroring_axes is None:
            return []
        axes = [m + 2 for m in self.allowed_mirroring_axes]
        return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]

    @torch.inference_mode()
    def _mirror_and_predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Batched _internal_maybe_mirror_and_predict: all mirrored copies in the same backend call."""
        combos = self._mirror_combinations()
        stacked = torch.cat([x, *[torch.flip(x, axes) for axes in combos]], 0)
        out = torch.from_numpy(self.backend.infer(stacked.numpy())).split(len(x), 0)
        prediction = out[0].clone()
        for axes, o in zip(combos, out[1:]):
            prediction += torch.flip(o, axes)
        if combos:
            prediction /= (len(combos) + 1)
        return prediction

    @torch.inference_mode()
    def predict_logits_many(self, volumes: list[torch.Tensor]) -> list[torch.Tensor]:
        """predict_sliding_window_return_logits for several preprocessed volumes [c, *spatial] at once:
        their tiles share backend batches. Accumulation follows nnU-Net (Gaussian weights), but in float32:
        nnU-Net sums in fp16 to save GPU memory, which a CPU emulates slowly (a third of a cine's time)."""
        patch = self.configuration_manager.patch_size
        n_heads = self.label_manager.num_segmentation_heads
        jobs = []
        for volume in volumes:
            if volume.ndim != 4:
                raise InvalidInput(f"preprocessed volume must be [c, x, y, z], got {tuple(volume.shape)}")
            data, revert = pad_nd_image(volume, patch, "constant", {"value": 0}, True, None)
            jobs.append(dict(data=data, revert=revert, slicers=self._internal_get_sliding_window_slicers(data.shape[1:]),
                             logits=torch.zeros((n_heads, *data.shape[1:]), dtype=torch.float32),
                             n=torch.zeros(data.shape[1:], dtype=torch.float32)))
        gaussian = compute_gaussian(tuple(patch), sigma_scale=1. / 8, value_scaling_factor=10,
                                    device=torch.device("cpu")) if self.use_gaussian else 1
        tiles = [(job, sl) for job in jobs for sl in job["slicers"]]
        self.last_tile_count = len(tiles)  # for logs and metrics: tiles of the last call
        for start in range(0, len(tiles), self.tiles_per_call):
            chunk = tiles[start:start + self.tiles_per_call]
            x = torch.stack([job["data"][sl] for job, sl in chunk]).float().contiguous()
            predictions = self._mirror_and_predict_batch(x)
            for (job, sl), prediction in zip(chunk, predictions):
                if self.use_gaussian:
                    prediction *= gaussian
                job["logits"][sl] += prediction
                job["n"][sl[1:]] += gaussian
        results = []
        for job in jobs:
            logits = torch.div(job["logits"], job["n"], out=job["logits"])
            if torch.any(torch.isinf(logits)):
                raise SegmentationError("inf in the accumulated logits")
            results.append(logits[(slice(None), *job["revert"][1:])])
        return results

    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        return self.predict_logits_many([input_image])[0]


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along the array axes: the column norms of the affine."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidInput(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InvalidInput(f"affine has a zero-length axis: spacing {spacing.tolist()}")
    return spacing


class _DiscardedMaskNotResampled:
    """nnU-Net's configuration, except that the nonzero mask its preprocessor builds beside the image
    (the ``seg`` of run_case_npy; normalisation has used it before this point) is not resampled:
    inference discards it, and resampling it label by label was about a third of a cine's
    preprocessing time. The image itself goes through nnU-Net's own resampling unchanged."""

    def __init__(self, configuration_manager):
        self._cm = configuration_manager

    def __getattr__(self, name):
        return getattr(self._cm, name)

    @staticmethod
    def resampling_fn_seg(seg, new_shape, *args, **kwargs):
        return np.zeros((seg.shape[0], *new_shape), np.int8)


class Segmenter:
    """Segments cine volumes (x = DICOM column, y = row, z = slice, t = phase) into CMR-VL labels."""

    def __init__(self, predictor: BackendPredictor, lut: np.ndarray, model_dir: Path, version: int,
                 largest_component: tuple[int, ...] = (), workers: int | None = None):
        self.predictor, self.lut, self.model_dir, self.version = predictor, lut, model_dir, version
        self.largest_component = tuple(int(v) for v in largest_component)  # CMR-VL labels
        self._preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        # Threads for the per-phase work around the network (resampling, cropping, components): the
        # scipy/skimage code releases the GIL, and each phase is independent.
        self.workers = max(1, workers or len(os.sched_getaffinity(0)))

    @property
    def mirroring_axes(self) -> list[int]:
        """The patch axes test-time mirroring flips ([] when it is off)."""
        p = self.predictor
        return [int(a) for a in p.allowed_mirroring_axes or ()] if p.use_mirroring else []

    def segment_volume(self, image_3d: np.ndarray, affine) -> np.ndarray:
        return self.segment_cine(np.asarray(image_3d)[..., None], affine)[..., 0]

    def segment_cine(self, image_4d: np.ndarray, affine) -> np.ndarray:
        """Labels (uint8, same shape as ``image_4d``) for every phase; the affine is unchanged."""
        image = np.asarray(image_4d)
        if image.ndim == 3:
            image = image[..., None]
        if image.ndim != 4 or min(image.shape) < 1:
            raise InvalidInput(f"expected an image (x, y, slice, phase), got shape {np.shape(image_4d)}")
        if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
            raise InvalidInput(f"expected a real-valued image, got dtype {image.dtype}")
        if not np.all(np.isfinite(image)):
            raise InvalidInput("image contains NaN or inf")
        sx, sy, sz = spacing_from_affine(affine)
        p = self.predictor
        # nnU-Net works in SimpleITK's (z, y, x) order; this is exactly what nnUNetv2_predict sees when
        # it reads the same volume from a NIfTI file.
        configuration = _DiscardedMaskNotResampled(p.configuration_manager)

        def preprocess(t: int):
            zyx = np.ascontiguousarray(image[..., t].transpose(2, 1, 0), dtype=np.float32)[None]
            data, _, props = self._preprocessor.run_case_npy(zyx, None, {"spacing": [sz, sy, sx]}, p.plans_manager,
                                                             configuration, p.dataset_json)
            return torch.from_numpy(data), props

        def to_labels(logits: torch.Tensor, props: dict) -> np.ndarray:
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits.numpy(), p.plans_manager, p.configuration_manager, p.label_manager, props, num_threads_torch=1)
            return postprocess(self.lut[seg.transpose(2, 1, 0)], self.largest_component)

        torch_threads = torch.get_num_threads()  # nnU-Net's conversion sets and resets it, racing across threads
        try:
            with ThreadPoolExecutor(min(self.workers, image.shape[3])) as pool:
                volumes, properties = zip(*pool.map(preprocess, range(image.shape[3])))
                logits = p.predict_logits_many(list(volumes))
                per_phase = list(pool.map(to_labels, logits, properties))
        finally:
            torch.set_num_threads(torch_threads)
        return np.stack(per_phase, axis=-1)

    def close(self) -> None:
        self.predictor.backend.close()


def postprocess(labels_3d: np.ndarray, largest_component: tuple[int, ...]) -> np.ndarray:
    """Keep only the largest 3D connected component of each label in ``largest_component``."""
    if not largest_component:
        return labels_3d
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    labels_3d = labels_3d.copy()  # the caller's labels stay as they are, as with nnU-Net's function
    for value in largest_component:  # one label at a time: a list would be treated as one union mask
        mask = labels_3d == value
        if not mask.any():
            continue
        # Within the label's bounding box: the same components, in a fraction of the volume.
        box = tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in
                    (np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                     for axis in range(mask.ndim)))
        labels_3d[box] = remove_all_but_largest_component_from_segmentation(labels_3d[box], int(value),
                                                                            background_label=0)
    return labels_3d


def slice_axis(affine, shape: tuple[int, ...]) -> int:
    """The spatial axis the short-axis slices are stacked along: the largest voxel spacing (slices are
    thicker and further apart than pixels); ties go to the axis with the fewest voxels, then the last."""
    spacing = spacing_from_affine(affine)
    return max(range(3), key=lambda a: (round(float(spacing[a]), 3), -shape[a], a))


def segment_image(segmenter: "Segmenter", image: np.ndarray, affine) -> np.ndarray:
    """Labels (uint8, exactly ``image``'s shape) of a 3D (x, y, slices) or 4D (..., phases) short-axis
    image whose slice axis may be any of the three spatial axes."""
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise InvalidInput(f"expected a 3D (x, y, slices) or 4D (x, y, slices, phases) image, got {image.ndim}D "
                           f"of shape {image.shape}")
    affine = np.asarray(affine, np.float64)
    axis = slice_axis(affine, image.shape)
    order = [a for a in range(3) if a != axis] + [axis]  # slices last, in-plane order kept
    moved = np.transpose(image, order + list(range(3, image.ndim)))
    moved_affine = affine.copy()
    moved_affine[:3, :3] = affine[:3, order]
    labels = segmenter.segment_cine(moved, moved_affine)
    if image.ndim == 3:
        labels = labels[..., 0]
    return np.ascontiguousarray(np.transpose(labels, np.argsort(order).tolist() + list(range(3, image.ndim))))


def labels_nifti(labels: np.ndarray, affine) -> "nibabel.Nifti1Image":
    """The label map as NIfTI in the source geometry (same affine), uint8, NIFTI_INTENT_LABEL."""
    import nibabel

    image = nibabel.Nifti1Image(np.asarray(labels, np.uint8), np.asarray(affine, np.float64))
    image.header.set_intent("label")
    image.header.set_xyzt_units("mm", "sec")
    return image


def load_segmenter(model_dir_or_layout: str | Path, backend: str = "onnxruntime", *, triton_url: str | None = None,
                   model_name: str = MODEL_NAME, version: int | None = None, timeout_s: float = 60.0,
                   max_attempts: int = 4, fallback: bool = False, use_mirroring: bool | None = None,
                   mirroring_axes: tuple[int, ...] | None = None, threads: int | None = None) -> Segmenter:
    """Segmenter for the model layout at ``model_dir_or_layout`` (repository or model folder).

    backend "onnxruntime": the version's model.onnx in this process. backend "triton": the same
    model on Triton at ``triton_url`` (host:grpc_port), which must serve this layout; only the
    version's JSON files are read locally, unless ``fallback=True``: then the local model.onnx runs
    in-process whenever Triton stays unavailable after its retries.
    ``use_mirroring`` None: as the version's inference.json chose on validation (``use_mirroring``,
    True where it says nothing: nnU-Net's default); ``mirroring_axes`` None: its ``mirroring_axes``,
    else every axis the checkpoint allows.
    """
    model_dir = resolve_model_dir(model_dir_or_layout, model_name)
    version = int(version) if version is not None else latest_version(model_dir)
    version_dir = model_dir / str(version)
    layout = read_layout(version_dir)
    info = layout["inference"]
    if backend == "onnxruntime":
        net = OnnxRuntimeBackend(version_dir / "model.onnx", info["input_name"], info["output_name"],
                                 info.get("max_batch_size", 32), threads=threads)
    elif backend == "triton":
        if not triton_url:
            raise ValueError("backend 'triton' needs triton_url (host:port of Triton's gRPC endpoint)")
        net = TritonBackend(triton_url, model_name, str(version), info["input_name"], info["output_name"],
                            info.get("max_batch_size", 32), timeout_s=timeout_s, max_attempts=max_attempts)
        if fallback:
            net = FallbackBackend(net, OnnxRuntimeBackend(version_dir / "model.onnx", info["input_name"],
                                                          info["output_name"], info.get("max_batch_size", 32),
                                                          threads=threads))
    else:
        raise ValueError(f"unknown backend {backend!r} (onnxruntime or triton)")
    if use_mirroring is None:
        use_mirroring = bool(info.get("use_mirroring", True))
    predictor = BackendPredictor(net, layout, use_mirroring=use_mirroring, mirroring_axes=mirroring_axes)
    post = (info.get("postprocessing") or {}).get("largest_component") or ()
    return Segmenter(predictor, label_lut(layout["labels"]), model_dir, version, largest_component=post,
                     workers=threads)
