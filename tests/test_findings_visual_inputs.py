"""Findings visual inputs: sizes/counts from the catalog, heart-centred crops, apex-to-base order,
H.264 video that LLaMA-Factory's sampler reads frame for frame, enhancement rules on a phantom, and
cine masks carried into an LGE grid of different geometry through patient coordinates.

The phantom is analytic in patient (RAS+) mm, so every grid (cine, LGE) samples the same heart and
the expected answer is computed from the geometry, not from the code under test.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.findings import short_axis as sax
from services.findings import visual_inputs as vi
from services.findings.catalog import build_user_message, get_task, load_catalog
from services.findings.enhancement import enhancement_masks
from services.preprocess.geometry import APEX_DIRECTION_RAS

SUNNYBROOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook"

# --- analytic phantom ---------------------------------------------------------------------------

AXIS = APEX_DIRECTION_RAS  # LV long axis, base -> apex
CENTER = np.array([10.0, -20.0, 30.0])  # mid-ventricle, RAS+ mm
_U = np.cross(AXIS, [0.0, 0.0, 1.0]); _U /= np.linalg.norm(_U)
_V = np.cross(AXIS, _U)
SCAR_ANGLES = (0.0, np.pi / 3)  # a 60 degree wedge of myocardium
SCAR_H = (-20.0, 20.0)  # along the axis, mm from CENTER


def stack_affine(shape, spacing, slice_step, inplane_deg, shift=(0.0, 0.0, 0.0), toward_apex=True):
    """Affine of a short-axis stack centred on the phantom, slice normal along +/- AXIS."""
    n = AXIS if toward_apex else -AXIS
    t = np.deg2rad(inplane_deg)
    e1 = np.cos(t) * _U + np.sin(t) * _V
    e2 = np.cross(n, e1)
    rot = np.stack([e1, e2, n], axis=1)
    steps = np.array([spacing[0], spacing[1], slice_step])
    aff = np.eye(4)
    aff[:3, :3] = rot * steps
    aff[:3, 3] = CENTER + np.asarray(shift) - rot @ ((np.array(shape[:3]) - 1) / 2.0 * steps)
    return aff


def world_of(shape, affine):
    ijk = np.indices(shape[:3], dtype=float).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T  # (N, 3)


def phantom_labels(world, squeeze=1.0):
    """Labels of the analytic heart at world points; `squeeze` < 1 contracts the LV cavity (systole)."""
    d = world - CENTER
    h = d @ AXIS
    pu, pv = d @ _U, d @ _V
    r = np.hypot(pu, pv)
    inside = (h > -40) & (h < 40)
    r_epi = 30.0 * np.where(h > 0, 1 - 0.5 * h / 40.0, 1.0)  # tapers towards the apex
    r_endo = (r_epi - 10.0) * squeeze
    lab = np.zeros(len(world), np.uint8)
    rv = inside & (h < 20) & (np.hypot(pu + 38.0, pv) < 15.0)
    lab[rv] = 3
    lab[inside & (r < r_epi)] = 2
    lab[inside & (r < r_endo)] = 1
    angle = np.mod(np.arctan2(pv, pu), 2 * np.pi)
    scar = (lab == 2) & (angle >= SCAR_ANGLES[0]) & (angle < SCAR_ANGLES[1]) & (h > SCAR_H[0]) & (h < SCAR_H[1])
    return lab, scar, h


def phantom_image(lab, scar, seed, scar_value=250.0):
    rng = np.random.default_rng(seed)
    img = np.choose(lab, [30.0, 300.0, 100.0, 280.0]) + rng.normal(0, 5.0, lab.shape)
    img[scar] = scar_value + rng.normal(0, 5.0, int(scar.sum()))
    return img.astype(np.float32)


def make_cine(toward_apex=True, n_phases=12):
    shape = (100, 96, 12)
    aff = stack_affine(shape, (1.5, 1.5), 8.0, 20.0, toward_apex=toward_apex)
    world = world_of(shape, aff)
    imgs, labs = [], []
    for t in range(n_phases):
        squeeze = 1.0 - 0.3 * (1 - np.cos(2 * np.pi * t / n_phases)) / 2  # ED at t=0, ES at T/2
        lab, _, _ = phantom_labels(world, squeeze)
        labs.append(lab.reshape(shape))
        imgs.append(phantom_image(lab, np.zeros_like(lab, bool), seed=t).reshape(shape))
    return nib.Nifti1Image(np.stack(imgs, -1), aff), nib.Nifti1Image(np.stack(labs, -1), aff)


def make_lge(scar_value=250.0):
    """LGE grid unlike the cine: 1.0 x 1.2 mm pixels, 10 mm slices, rotated 65 deg, shifted."""
    shape = (150, 130, 9)
    aff = stack_affine(shape, (1.0, 1.2), 10.0, 65.0, shift=(3.0, -4.0, 2.5))
    lab, scar, _ = phantom_labels(world_of(shape, aff))
    img = phantom_image(lab, scar, seed=99, scar_value=scar_value)
    return nib.Nifti1Image(img.reshape(shape), aff), lab.reshape(shape), scar.reshape(shape)


@pytest.fixture(scope="module")
def cine():
    return make_cine()


@pytest.fixture(scope="module")
def lge():
    return make_lge()


# --- sizes, counts, crops, order ----------------------------------------------------------------

def test_every_task_has_catalog_sizes_and_counts(cine, lge):
    cine_img, cine_lab = cine
    for task in load_catalog().tasks:
        visual = vi.build_visual_input(task, cine=cine_img, cine_labels=cine_lab, lge=lge[0], t2=lge[0])
        assert visual.n_visuals == task.n_visuals == build_user_message(task).count(task.placeholder)
        for image in visual.images:
            assert image.size == (task.visual["size_px"],) * 2 and image.mode == "RGB"


def test_count_is_fixed_even_for_a_short_stack(cine):
    img, lab = cine
    short_img = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 4:7], img.affine)
    short_lab = nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, 4:7], img.affine)
    visual = vi.effusion_images("pericardial_effusion", short_img, short_lab)
    assert len(visual.images) == 10 and sorted(set(visual.meta["slices"])) == [0, 1, 2]


def test_crop_contains_the_heart_with_margin(cine):
    img, lab = cine
    task = get_task("pericardial_effusion")
    visual = vi.effusion_images(task, img, lab)
    n, margin = task.visual["size_px"], task.visual["margin_mm"]
    box = sax.CropBox(tuple(visual.meta["center_xy_vox"]), visual.meta["side_mm"],
                     tuple(visual.meta["spacing_xy_mm"]))
    lab_ed = np.asarray(lab.dataobj)[..., visual.meta["phase"]]
    step = box.side_mm / n
    for z in visual.meta["slices"]:
        heart = np.isin(lab_ed[..., z], [1, 2, 3])
        sampled = sax.sample_crop(heart.astype(np.float32), box, n, order=0) > 0.5
        # all of the heart is inside the crop: its area survives the resampling
        assert sampled.sum() * step**2 == pytest.approx(heart.sum() * 1.5 * 1.5, rel=0.06)
        rows, cols = np.nonzero(sampled)
        edge = min(rows.min(), cols.min(), n - 1 - rows.max(), n - 1 - cols.max())
        assert edge * step >= margin - 2 * step


def test_images_run_from_apex_to_base_whatever_the_slice_direction():
    for toward_apex in (True, False):
        img, lab = make_cine(toward_apex=toward_apex, n_phases=2)
        visual = vi.effusion_images("pericardial_effusion", img, lab)
        assert visual.meta["apex_rule"] == "slice_normal"
        centres = [img.affine[:3, :3] @ [49.5, 47.5, z] + img.affine[:3, 3] for z in visual.meta["slices"]]
        h = [(c - CENTER) @ AXIS for c in centres]  # distance towards the apex
        assert h[0] > h[-1] and all(a >= b for a, b in zip(h, h[1:]))


def test_flipped_stack_gives_identical_images():
    a = vi.effusion_images("pericardial_effusion", *make_cine(toward_apex=True, n_phases=2))
    img, lab = make_cine(toward_apex=True, n_phases=2)
    # same voxels, slice axis reversed, affine adjusted: the same patient geometry
    flip = np.diag([1.0, 1.0, -1.0, 1.0]); flip[2, 3] = img.shape[2] - 1
    img_f = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, ::-1], img.affine @ flip)
    lab_f = nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, ::-1], img.affine @ flip)
    b = vi.effusion_images("pericardial_effusion", img_f, lab_f)
    assert [np.array(x).tobytes() for x in a.images] == [np.array(x).tobytes() for x in b.images]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_real_cine_apex_first_and_heart_in_crop():
    """Sunnybrook SCD0000101 with its expert ED contours: the first image is the most apical
    contoured slice (smallest cavity) and the LV sits inside every crop."""
    if not (SUNNYBROOK / "link.csv").is_file():
        pytest.skip(f"sample data absent: {SUNNYBROOK}")
    from training.nnunet.sunnybrook import find_cases, load_case

    (study_id, case_id, dicom_dir, contour_dir), = find_cases(SUNNYBROOK)
    case = load_case(dicom_dir, contour_dir, study_id, case_id)
    cine = nib.Nifti1Image(case.study.image.astype(np.float32), case.study.affine)
    labels = nib.Nifti1Image(case.labels["ed"], case.study.affine)
    visual = vi.effusion_images("pericardial_effusion", cine, labels, phase=case.ed_phase)
    cavity = (case.labels["ed"] == 1).sum(axis=(0, 1))
    contoured = np.flatnonzero(cavity)
    assert visual.meta["apex_rule"] == "slice_normal" and abs(visual.meta["normal_cos_apex"]) > 0.5
    assert visual.meta["slices"][0] == contoured[np.argmin(cavity[contoured])]
    assert cavity[visual.meta["slices"][0]] < cavity[visual.meta["slices"][-1]]
    assert len(visual.images) == 10 and visual.images[0].size == (224, 224)


# --- wall-motion video -------------------------------------------------------------------------

def test_motion_video_is_h264_whole_cycles_at_training_fps(cine):
    import av

    img, lab = cine
    task = get_task("wall_motion")
    spec = task.visual
    visual = vi.motion_video(task, img, lab)
    n_frames = spec["slices"] * spec["frames_per_cycle"]
    with av.open(io.BytesIO(visual.video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (spec["size_px"], spec["size_px"])
        assert stream.average_rate == spec["fps"]
        assert stream.frames == n_frames
        duration_s = float(stream.duration * stream.time_base)
        # LLaMA-Factory samples floor(min(frames, video_maxlen=128, duration * video_fps)) frames
        # evenly: with fps == video_fps that is every frame we wrote.
        assert int(min(stream.frames, 128, duration_s * 4.0)) == n_frames
        frames = np.stack([f.to_ndarray(format="gray") for f in container.decode(stream)])
    assert len(frames) == n_frames
    # Each slice plays one whole cycle: the bright LV cavity is largest at ED (frame 0 of every
    # slice) and smallest half a cycle later.
    bright = (frames > 200).reshape(spec["slices"], spec["frames_per_cycle"], -1).sum(axis=2)
    mid = [s for s in range(spec["slices"]) if bright[s, 0] > 50]
    assert len(mid) >= spec["slices"] // 2
    half = spec["frames_per_cycle"] // 2
    for s in mid:
        assert bright[s, 0] >= 0.98 * bright[s].max() and bright[s, half] <= 1.02 * bright[s].min()
        assert bright[s, 0] > 1.3 * bright[s, half]


def test_video_cycles_start_at_end_diastole(cine):
    import av

    img, lab = cine
    shift = 5  # the acquisition starts mid-cycle: ED is phase 7 of 12
    rolled = [nib.Nifti1Image(np.roll(np.asarray(v.dataobj), shift, axis=3), v.affine) for v in (img, lab)]
    visual = vi.motion_video("wall_motion", *rolled)
    per = get_task("wall_motion").visual["frames_per_cycle"]
    assert visual.meta["phases"][0] == shift and len(set(visual.meta["phases"])) == per
    with av.open(io.BytesIO(visual.video)) as container:
        frames = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    bright = (frames > 200).reshape(-1, per, frames[0].size).sum(axis=2)
    for s in range(len(bright)):
        if bright[s, 0] > 50:
            assert bright[s, 0] >= 0.98 * bright[s].max()


def test_inputs_are_byte_reproducible(cine, tmp_path):
    img, lab = cine
    digests = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        paths = vi.write_inputs(out, vi.motion_video("wall_motion", img, lab))
        paths += vi.write_inputs(out, vi.effusion_images("pericardial_effusion", img, lab))
        digests.append([hashlib.sha256((out / p).read_bytes()).hexdigest() for p in paths])
        assert all(not Path(p).is_absolute() and (out / p).is_file() for p in paths)
        assert (out / "wall_motion" / "meta.json").is_file()
    assert digests[0] == digests[1] and len(digests[0]) == 11


# --- LGE / T2 geometry and enhancement ----------------------------------------------------------

def test_cine_mask_lands_at_the_right_patient_coordinates(cine, lge):
    lge_img, lge_truth, _ = lge
    _, cine_lab = cine
    lab4 = np.asarray(cine_lab.dataobj)
    ed = sax.end_diastolic_phase(lab4)
    carried = sax.resample_labels(sax.Volume(lab4[..., ed], cine_lab.affine), lge_img.shape, lge_img.affine)
    # copying pixel indices instead would put the LV elsewhere: the grids really differ
    assert not np.allclose(lge_img.affine, cine_lab.affine, atol=1.0)
    lv_true, lv_carried = np.isin(lge_truth, [1, 2]), np.isin(carried, [1, 2])
    dice = 2 * (lv_true & lv_carried).sum() / (lv_true.sum() + lv_carried.sum())
    assert dice > 0.9
    for z in range(lge_img.shape[2]):
        if lv_true[..., z].sum() < 200:
            continue
        c_true = np.argwhere(lv_true[..., z]).mean(axis=0)
        c_carried = np.argwhere(lv_carried[..., z]).mean(axis=0)
        w = lambda c: lge_img.affine[:3, :3] @ [c[0], c[1], z] + lge_img.affine[:3, 3]  # noqa: E731
        assert np.linalg.norm(w(c_true) - w(c_carried)) < 1.5  # mm, well under a cine pixel + slice shift


@pytest.mark.parametrize("rule", [{"method": "n_sd", "n_sd": 5.0, "remote_sectors": 6, "min_area_px": 3},
                                  {"method": "fwhm", "min_area_px": 3}])
def test_enhancement_rule_finds_the_known_bright_region(lge, rule):
    img, truth, scar = lge
    spacing = tuple(float(s) for s in sax.as_volume(img).spacing_mm[:2])
    enhanced, _core, meta = enhancement_masks(np.asarray(img.dataobj), truth, spacing, rule)
    dice = 2 * (enhanced & scar).sum() / (enhanced.sum() + scar.sum())
    assert dice > 0.95, meta
    assert not (enhanced & ~(truth == 2)).any()  # only ever inside the myocardium
    if rule["method"] == "n_sd":
        assert 95 < meta["remote_mean"] < 105  # the remote sector is normal myocardium


def test_no_enhancement_without_a_bright_region():
    img, truth, _ = make_lge(scar_value=100.0)  # "scar" as dark as normal myocardium
    spacing = tuple(float(s) for s in sax.as_volume(img).spacing_mm[:2])
    rule = get_task("lge").visual["rule"]
    enhanced, _, _ = enhancement_masks(np.asarray(img.dataobj), truth, spacing, rule)
    assert enhanced.sum() == 0


def test_catalog_rule_on_carried_cine_masks_finds_only_the_bright_region(cine, lge):
    """The served path: cine ED masks resampled into the LGE grid, the catalog's LGE rule."""
    img, _truth, scar = lge
    lab4 = np.asarray(cine[1].dataobj)
    carried = sax.resample_labels(sax.Volume(lab4[..., 0], cine[1].affine), img.shape, img.affine)
    rule = get_task("lge").visual["rule"]
    enhanced, _core, meta = enhancement_masks(np.asarray(img.dataobj), carried, (1.0, 1.2), rule)
    assert (enhanced & ~scar).sum() <= 0.01 * enhanced.sum()  # blood pool at the borders is not "enhancement"
    assert (enhanced & scar).sum() > 0.6 * scar.sum()  # the scar minus the eroded rim
    assert meta["remote_sd"] < 7  # remote statistics not inflated by blood (noise SD is 5)


def test_lge_images_outline_the_bright_region_in_red(cine, lge):
    lge_img, _, scar = lge
    task = get_task("lge")
    visual = vi.enhancement_images(task, lge_img, cine[1])
    box = sax.CropBox(tuple(visual.meta["center_xy_vox"]), visual.meta["side_mm"],
                     tuple(visual.meta["spacing_xy_mm"]))
    near_scar = scar | np.roll(scar, 3, 0) | np.roll(scar, -3, 0) | np.roll(scar, 3, 1) | np.roll(scar, -3, 1)
    n_red = 0
    for image, z in zip(visual.images, visual.meta["slices"]):
        rgb = np.array(image)
        red = (rgb == task.visual["contour_rgb"]).all(axis=2)
        n_red += int(red.sum())
        for row, col in np.argwhere(red):
            x, y = sax.box_to_voxel(box, task.visual["size_px"], row, col)
            assert near_scar[int(round(x)), int(round(y)), z]
    assert n_red > 50


def test_thrombus_images_keep_only_the_lv(cine, lge):
    lge_img = lge[0]
    task = get_task("lv_thrombus")
    visual = vi.thrombus_images(task, lge_img, cine[1])
    box = sax.CropBox(tuple(visual.meta["center_xy_vox"]), visual.meta["side_mm"],
                     tuple(visual.meta["spacing_xy_mm"]))
    lab = sax.resample_labels(sax.Volume(np.asarray(cine[1].dataobj)[..., 0], cine[1].affine),
                             lge_img.shape, lge_img.affine)
    for image, z in zip(visual.images, visual.meta["slices"]):
        gray = np.array(image)[..., 0]
        keep = sax.sample_crop(np.isin(lab[..., z], [1, 2]).astype(np.float32), box, task.visual["size_px"]) >= 0.5
        assert (gray[~keep] == 0).all() and (gray[keep] > 0).mean() > 0.9


def test_missing_series_or_empty_mask_is_reported_not_crashed(cine):
    with pytest.raises(vi.MissingInput, match="LGE"):
        vi.build_visual_input("lge", cine=cine[0], cine_labels=cine[1], lge=None)
    empty = nib.Nifti1Image(np.zeros(cine[1].shape, np.uint8), cine[1].affine)
    for task in load_catalog().tasks:
        with pytest.raises(vi.MissingInput):
            vi.build_visual_input(task, cine=cine[0], cine_labels=empty, lge=cine[0].slicer[..., 0],
                                  t2=cine[0].slicer[..., 0])
