"""Visual inputs of the findings questions, built from the study volumes and the cine masks.

Every size and count comes from the task's `visual` spec in the catalog (tasks_v1.json), so the
training dataset builder and the findings service produce identical inputs. The builders take
nibabel images (or (array, affine) pairs) and return a `VisualInput` (PIL images or MP4 bytes and
a small metadata dict saying what was cropped where); they write nothing. `write_inputs` stores
one input under a directory with stable names and returns the relative paths.

What each input looks like (after the CMR-VL Demo_Figures):
* cine_sax_images (pericardial effusion): end-diastolic short-axis crops around the whole heart,
  margin wide enough to keep the pericardium, slices spread evenly over the heart, apex first.
* cine_sax_video (wall motion): the same crop for `slices` slices, each playing one whole
  cardiac cycle resampled to `frames_per_cycle` frames, slices one after another apex to base,
  H.264 at `fps` = LLaMA-Factory's `video_fps` (4), so its sampler (duration x video_fps frames,
  capped at video_maxlen 128) takes every frame we wrote: the model sees whole cycles.
* enhancement_images (LGE, T2 edema): crops of the LGE/T2 stack with red outlines of candidate
  regions inside the myocardium (rule in enhancement.py); cores enclosed by enhancement in blue.
  The cine ED masks are carried into the LGE/T2 grid through patient coordinates.
* lv_masked_images (thrombus): LGE crops with everything outside the LV (cavity + myocardium,
  as in the demo figures, so wall-adherent thrombus labelled as either stays visible) set to 0.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from services.findings import short_axis as sax
from services.findings.catalog import Task, get_task, load_catalog
from services.findings.enhancement import enhancement_masks


class MissingInput(ValueError):
    """The study lacks what a question needs (e.g. no LGE series); the finding is not assessable."""


@dataclass
class VisualInput:
    task_id: str
    kind: str
    images: list[Image.Image] = field(default_factory=list)
    video: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_visuals(self) -> int:
        return 1 if self.video is not None else len(self.images)


def _task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def _slice_order() -> str:
    return load_catalog().defaults.get("slice_order", "apex_to_base")


def _cine_phase_and_labels(cine: sax.Volume, labels: sax.Volume, phase: int | None) -> tuple[int, np.ndarray]:
    """Phase of the cine to show and the 3D labels for that phase (ED when labels are 4D)."""
    lab = sax.as_labels(labels.data)
    if lab.ndim == 4:
        p = sax.end_diastolic_phase(lab) if phase is None else phase
        return p, lab[..., p]
    return (0 if phase is None else phase), lab


def _check_same_grid(a: sax.Volume, b: sax.Volume) -> None:
    if a.data.shape[:3] != b.data.shape[:3] or not np.allclose(a.affine, b.affine, atol=1e-3):
        raise ValueError("cine labels must share the cine's grid (same shape and affine)")


def _to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _crop_mask(mask2d: np.ndarray, box: sax.CropBox, out_px: int) -> np.ndarray:
    # Linear interpolation of the 0/1 mask then 0.5: smooth outlines instead of voxel stairs.
    return sax.sample_crop(mask2d.astype(np.float32), box, out_px, order=1) >= 0.5


# --- builders ---------------------------------------------------------------------------------

def effusion_images(task: Task | str, cine: Any, cine_labels: Any, phase: int | None = None) -> VisualInput:
    task = _task(task)
    spec = task.visual
    vol, lab_vol = sax.as_volume(cine), sax.as_volume(cine_labels)
    _check_same_grid(vol, lab_vol)
    p, lab3 = _cine_phase_and_labels(vol, lab_vol, phase)
    img3 = vol.data[..., p] if vol.data.ndim == 4 else vol.data
    order, ometa = sax.ordered_slices(lab3, vol.affine, spec["extent_labels"], _slice_order())
    picked = sax.pick_evenly(order, int(spec["count"]))
    box = sax.heart_crop_box(lab3, vol.spacing_mm, spec["extent_labels"], float(spec["margin_mm"]))
    n = int(spec["size_px"])
    crops = np.stack([sax.sample_crop(img3[..., z], box, n) for z in picked])
    gray, wmeta = sax.window_uint8(crops)
    meta = {"phase": p, "slices": picked, **ometa, **box.as_meta(), **wmeta, "size_px": n}
    return VisualInput(task.id, spec["kind"], [_to_rgb(g) for g in gray], None, meta)


def motion_video(task: Task | str, cine: Any, cine_labels: Any) -> VisualInput:
    import av  # heavy; only the video task needs it

    task = _task(task)
    spec = task.visual
    vol, lab_vol = sax.as_volume(cine), sax.as_volume(cine_labels)
    _check_same_grid(vol, lab_vol)
    if vol.data.ndim != 4:
        raise MissingInput("wall motion needs a 4D cine (x, y, slice, phase)")
    lab = sax.as_labels(lab_vol.data)
    ed, lab_ed = _cine_phase_and_labels(vol, lab_vol, None)
    order, ometa = sax.ordered_slices(lab_ed, vol.affine, spec["extent_labels"], _slice_order())
    picked = sax.pick_evenly(order, int(spec["slices"]))
    n_phases = vol.data.shape[3]
    # One whole cycle per slice, starting at ED (phase 0 when the labels do not tell).
    steps = np.floor(np.linspace(0, n_phases, int(spec["frames_per_cycle"]), endpoint=False)).astype(int)
    phases = [int((ed + t) % n_phases) for t in steps]
    # One box for the whole video: the heart's extent over all slices and phases, so it never
    # leaves the frame and the zoom does not jump between slices.
    box = sax.heart_crop_box(lab, vol.spacing_mm, spec["extent_labels"], float(spec["margin_mm"]))
    n = int(spec["size_px"])
    frames = np.stack([sax.sample_crop(vol.data[..., z, t], box, n) for z in picked for t in phases])
    gray, wmeta = sax.window_uint8(frames)
    fps = int(spec["fps"])
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = n
        stream.pix_fmt = "yuv420p"
        # One thread and fixed settings: byte-identical output for identical input.
        stream.options = {"crf": str(spec.get("crf", 18)), "preset": "medium", "threads": "1"}
        for g in gray:
            frame = av.VideoFrame.from_ndarray(np.repeat(g[..., None], 3, axis=2), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    meta = {"slices": picked, "phases": phases, "n_frames": len(gray), "fps": fps,
            "duration_s": len(gray) / fps, **ometa, **box.as_meta(), **wmeta, "size_px": n}
    return VisualInput(task.id, spec["kind"], [], buf.getvalue(), meta)


def _target_labels(target: sax.Volume, cine_labels: Any, phase: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """Cine labels (ED phase) carried into the LGE/T2 grid through patient coordinates."""
    lab_vol = sax.as_volume(cine_labels)
    lab = sax.as_labels(lab_vol.data)
    if lab.ndim == 4:
        p = sax.end_diastolic_phase(lab) if phase is None else phase
        lab = lab[..., p]
    else:
        p = phase
    out = sax.resample_labels(sax.Volume(lab, lab_vol.affine), target.data.shape, target.affine)
    return out, {"label_phase": p, "labels_resampled": "nearest neighbour via RAS+ coordinates"}


def _target_stack(task: Task, target: Any, cine_labels: Any, phase: int | None):
    if target is None:
        raise MissingInput(f"task {task.id} needs a {task.visual.get('sequence', '').upper()} volume")
    vol = sax.as_volume(target)
    if vol.data.ndim == 4:  # a single-phase series stored 4D
        vol = sax.Volume(vol.data[..., 0], vol.affine)
    lab3, lmeta = _target_labels(vol, cine_labels, phase)
    spec = task.visual
    try:
        order, ometa = sax.ordered_slices(lab3, vol.affine, [sax.LV_CAVITY, sax.LV_MYO], _slice_order())
    except sax.EmptyMask as exc:
        raise MissingInput(f"the cine masks do not reach the {spec.get('sequence')} slices: {exc}") from exc
    picked = sax.pick_evenly(order, int(spec["count"]))
    box = sax.heart_crop_box(lab3, vol.spacing_mm, spec["extent_labels"], float(spec["margin_mm"]))
    return vol, lab3, picked, box, {**lmeta, **ometa, **box.as_meta(), "slices": picked}


def enhancement_images(task: Task | str, target: Any, cine_labels: Any, phase: int | None = None) -> VisualInput:
    task = _task(task)
    spec = task.visual
    vol, lab3, picked, box, meta = _target_stack(task, target, cine_labels, phase)
    spacing = (float(vol.spacing_mm[0]), float(vol.spacing_mm[1]))
    enhanced, core, emeta = enhancement_masks(vol.data, lab3, spacing, spec["rule"])
    n = int(spec["size_px"])
    crops = np.stack([sax.sample_crop(vol.data[..., z], box, n) for z in picked])
    gray, wmeta = sax.window_uint8(crops)
    images = []
    red = np.array(spec["contour_rgb"], dtype=np.uint8)
    blue = None if spec.get("core_contour_rgb") is None else np.array(spec["core_contour_rgb"], dtype=np.uint8)
    for g, z in zip(gray, picked):
        rgb = np.repeat(g[..., None], 3, axis=2)
        rgb[_outline(_crop_mask(enhanced[..., z], box, n))] = red
        if blue is not None:
            rgb[_outline(_crop_mask(core[..., z], box, n))] = blue
        images.append(Image.fromarray(rgb, mode="RGB"))
    meta.update(emeta)
    meta.update(wmeta, size_px=n, enhanced_voxels_per_slice=[int(enhanced[..., z].sum()) for z in picked])
    return VisualInput(task.id, spec["kind"], images, None, meta)


def thrombus_images(task: Task | str, target: Any, cine_labels: Any, phase: int | None = None) -> VisualInput:
    task = _task(task)
    spec = task.visual
    vol, lab3, picked, box, meta = _target_stack(task, target, cine_labels, phase)
    n = int(spec["size_px"])
    keep = np.isin(lab3, spec["keep_labels"])
    crops = np.stack([sax.sample_crop(vol.data[..., z], box, n) for z in picked])
    masks = np.stack([_crop_mask(keep[..., z], box, n) for z in picked])
    gray, wmeta = sax.window_uint8(crops, weight_mask=masks)  # window on the kept LV only
    gray[~masks] = 0
    meta.update(wmeta)
    meta.update(size_px=n, keep_labels=list(spec["keep_labels"]))
    return VisualInput(task.id, spec["kind"], [_to_rgb(g) for g in gray], None, meta)


def build_visual_input(task: Task | str, *, cine: Any = None, cine_labels: Any = None, lge: Any = None,
                       t2: Any = None, phase: int | None = None) -> VisualInput:
    """Dispatch on the task's visual kind; raises MissingInput when the study lacks a series.

    `cine_labels` is 4D (one map per phase; ED = largest LV cavity is used) or 3D; for 3D labels
    pass `phase`, the cine phase they belong to (normally ED)."""
    task = _task(task)
    if cine_labels is None:
        raise MissingInput("findings inputs need the cine segmentation")
    try:
        return _build(task, task.visual["kind"], cine, cine_labels, lge, t2, phase)
    except sax.EmptyMask as exc:
        raise MissingInput(f"task {task.id}: {exc}") from exc


def _build(task: Task, kind: str, cine: Any, cine_labels: Any, lge: Any, t2: Any, phase: int | None) -> VisualInput:
    if kind in ("cine_sax_images", "cine_sax_video") and cine is None:
        raise MissingInput(f"task {task.id} needs the short-axis cine")
    if kind == "cine_sax_images":
        return effusion_images(task, cine, cine_labels, phase)
    if kind == "cine_sax_video":
        return motion_video(task, cine, cine_labels)
    target = {"lge": lge, "t2": t2}[task.visual["sequence"]]
    if kind == "enhancement_images":
        return enhancement_images(task, target, cine_labels, phase)
    return thrombus_images(task, target, cine_labels, phase)


def write_inputs(out_dir: str | Path, visual: VisualInput) -> list[str]:
    """Write one input under `out_dir/<task_id>/` and return the media paths relative to out_dir,
    in placeholder order. A `meta.json` beside them records what was cropped where."""
    out_dir = Path(out_dir)
    sub = out_dir / visual.task_id
    sub.mkdir(parents=True, exist_ok=True)
    rel: list[str] = []
    if visual.video is not None:
        name = f"{visual.task_id}/{visual.task_id}.mp4"
        (out_dir / name).write_bytes(visual.video)
        rel.append(name)
    for i, image in enumerate(visual.images):
        name = f"{visual.task_id}/{visual.task_id}_{i}.png"
        image.save(out_dir / name, format="PNG")
        rel.append(name)
    cat = load_catalog()
    record = {"task_id": visual.task_id, "kind": visual.kind, "files": rel, "catalog_version": cat.version,
              "catalog_fingerprint": cat.fingerprint, **visual.meta}
    (sub / "meta.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    return rel
