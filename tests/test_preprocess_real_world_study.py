"""Real-world study layouts built from the real Sunnybrook study (SCD0000101, 12 slices x 20
phases, each slice with its own trigger-time spacing) by editing copies with pydicom: missing,
extra and mistimed images, a missing TriggerTime, another study's files, one series per slice
(each with its own FrameOfReferenceUID), a repeated slice, a slice with a phase fewer, a slice
off the stack's grid, a failed run into an old output folder, brain stacks (synthetic, like the
enhanced-MR case at the end). Each gives the right volume (every image in its cell, values equal
to the stored pixels after rescale, the clean study's affine) or the documented refusal, and the
problem in the manifest's issues."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import dicom_factory as factory
from services.preprocess.study import NoUsableCine, preprocess_study

STUDY = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook" / "SCD0000101"
pytestmark = [pytest.mark.skipif(not STUDY.is_dir(), reason=f"sample data absent: {STUDY}"),
              pytest.mark.filterwarnings("ignore:Invalid value for VR UI")]  # the study's UIDs


class Sunnybrook:
    """The study's headers and the truth: each SOP instance's (slice, phase) cell, from
    ImagePositionPatient along the normal and the TriggerTime rank within its slice."""

    def __init__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.datasets = {p.name: pydicom.dcmread(p) for p in sorted(STUDY.glob("*.dcm"))}
        ds0 = next(iter(self.datasets.values()))
        iop = np.array(ds0.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        position = {n: float(np.dot(np.array(ds.ImagePositionPatient, float), normal))
                    for n, ds in self.datasets.items()}
        slices = sorted({round(p, 2) for p in position.values()})
        self.cell: dict[str, tuple[int, int]] = {}  # file name -> (slice, phase)
        for k, pos in enumerate(slices):
            names = sorted((n for n in self.datasets if round(position[n], 2) == pos),
                           key=lambda n: float(self.datasets[n].TriggerTime))
            for t, n in enumerate(names):
                self.cell[n] = (k, t)
        self.name_at = {c: n for n, c in self.cell.items()}

    def pixels(self, ds) -> np.ndarray:
        return ds.pixel_array.T * float(ds.get("RescaleSlope", 1)) + \
            float(ds.get("RescaleIntercept", 0))


@pytest.fixture(scope="module")
def sunny() -> Sunnybrook:
    return Sunnybrook()


@pytest.fixture(scope="module")
def clean_affine(tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("clean")
    manifest = preprocess_study(STUDY, out)
    return nib.load(out / manifest["series"][0]["volume"]).affine


def write_copy(sunny: Sunnybrook, folder: Path, edit=None, skip=(), path_of=None) -> dict:
    """Save the study into folder; edit(name, ds) may change a copy of each dataset (the
    original stays intact), path_of(name, ds) names its file. Returns {SOP UID: dataset}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, original in sunny.datasets.items():
        if name in skip:
            continue
        ds = pydicom.dcmread(STUDY / name) if edit else original
        if edit:
            edit(name, ds)
        path = folder / (path_of(name, ds) if path_of else name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path)
        written[str(ds.SOPInstanceUID)] = ds
    return written


def cine_of(manifest: dict) -> dict:
    uid = manifest["primary"]["cine_sax"]
    return next(s for s in manifest["series"] if s["series_instance_uid"] == uid)


def issues_of(entry: dict, kind: str) -> list[dict]:
    return [i for i in entry["issues"] if i["type"] == kind]


def assert_cells(out: Path, entry: dict, sunny: Sunnybrook, written: dict, affine: np.ndarray,
                 empty=frozenset(), cell_of=None) -> None:
    """Every non-empty cell holds the image that belongs there, with its pixels after rescale;
    every empty cell is null in sop_instance_uids, zeros in the volume and a missing_phase issue;
    the affine is the clean study's."""
    cell_of = cell_of or (lambda ds: sunny.cell[sunny_name(sunny, ds)])
    img = nib.load(out / entry["volume"])
    data = np.asarray(img.dataobj)
    assert data.shape == (256, 256, 12, 20) and (entry["n_slices"], entry["n_phases"]) == (12, 20)
    assert np.array_equal(img.affine, affine)
    missing = {(i["slice"], i["phase"]) for i in issues_of(entry, "missing_phase")}
    assert missing == set(empty)
    for k in range(12):
        for t in range(20):
            uid = entry["sop_instance_uids"][k][t]
            if (k, t) in empty:
                assert uid is None and not data[:, :, k, t].any()
                continue
            ds = written[uid]
            assert cell_of(ds) == (k, t)
            assert np.array_equal(data[:, :, k, t], sunny.pixels(ds))


def sunny_name(sunny: Sunnybrook, ds) -> str:
    """The original file of a (possibly re-identified) copy: by its InstanceNumber, which runs
    1..240 in file-name order in this study (README of the sample data)."""
    return f"{int(ds.InstanceNumber)}.dcm"


def test_missing_images_leave_their_cells_empty_and_shift_nothing(sunny, clean_affine, tmp_path):
    # A middle, a first and a last phase, each of another slice (slices differ in RR, so a
    # slice's late images sit nearer the next phase of the median grid than their own).
    gone = {sunny.name_at[c] for c in [(2, 12), (5, 0), (9, 19)]}
    written = write_copy(sunny, tmp_path / "dicom", skip=gone)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine,
                 empty={(2, 12), (5, 0), (9, 19)})
    assert not issues_of(entry, "unplaced_image")


def _random_gaps(seed: int = 14) -> set[tuple[int, int]]:
    """Half the images of 8 slices, at random (fixed seed); 4 slices stay complete."""
    rnd = random.Random(seed)
    return {(k, t) for k in rnd.sample(range(12), 8) for t in range(20) if rnd.random() < 0.5}


# Deletion patterns on the real study (slice, phase): its slices' RR differs by up to 9 %
# (slice 10: 36.6 ms steps, slice 0: 40 ms), so a slice's own cycle must place its images.
GAP_PATTERNS = {
    # The issue's study: the odd phases of slices 6-11. Slice 10's median gap is a double step.
    "every_other_phase_on_slices_6_to_11": {(k, t) for k in range(6, 12) for t in range(1, 20, 2)},
    "phases_3_to_5_on_4_slices": {(k, t) for k in (0, 6, 10, 11) for t in (3, 4, 5)},
    # Gaps of one and two steps in turn: the median gap is 1.5 steps, no step at all.
    "every_third_phase_on_4_slices": {(k, t) for k in (0, 6, 10, 11) for t in range(1, 20, 3)},
    "random_half_of_8_slices": _random_gaps(),
}


@pytest.mark.parametrize("pattern", GAP_PATTERNS)
def test_gaps_in_slices_with_their_own_heart_rate_shift_nothing(sunny, clean_affine, tmp_path,
                                                               pattern):
    """Every image left sits at its true phase (its TriggerTime rank in the untouched study),
    every deleted one's cell is null with a missing_phase issue, none is left out."""
    gone = GAP_PATTERNS[pattern]
    written = write_copy(sunny, tmp_path / "dicom", skip={sunny.name_at[c] for c in gone})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine, empty=gone)
    assert not issues_of(entry, "unplaced_image")
    assert not issues_of(entry, "incomplete_phase_axis")


def test_no_slice_with_every_phase_still_gives_the_whole_phase_axis(sunny, clean_affine,
                                                                    tmp_path):
    """Three phases (not the first or last) gone from every slice, at random (fixed seed): the
    fullest slices have 17 of 20 images, with gaps in other places. The phase axis is still the
    20 phases, each image at its true one, and the manifest says how the axis was found."""
    rnd = random.Random(14)
    gone = {(k, t) for k in range(12) for t in rnd.sample(range(1, 19), 3)}
    written = write_copy(sunny, tmp_path / "dicom", skip={sunny.name_at[c] for c in gone})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine, empty=gone)
    assert not issues_of(entry, "unplaced_image")
    (issue,) = issues_of(entry, "incomplete_phase_axis")
    assert "17 images" in issue["detail"] and "20 whole steps" in issue["detail"]


def test_image_that_fits_more_than_one_phase_is_left_out(sunny, clean_affine, tmp_path):
    """A slice with one image late in its cycle (phase 15 of slice 10) does not say how long
    its cycle is: at the series' median step it would sit at phase 14. It is left out, named."""
    lone = sunny.name_at[(10, 15)]
    gone = {(10, t) for t in range(20) if t != 15}
    written = write_copy(sunny, tmp_path / "dicom", skip={sunny.name_at[c] for c in gone})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine, empty=gone | {(10, 15)})
    (issue,) = issues_of(entry, "unplaced_image")
    assert issue["excluded"] == [lone] and issue["slice"] == 10
    assert "more than one phase" in issue["detail"]


def test_slice_whose_cycle_fits_no_plausible_heart_rate_is_left_out(sunny, clean_affine,
                                                                    tmp_path):
    """Slice 10 with every other phase and its trigger times at 0.7x (a cycle 30 % shorter than
    the series' median, outside the range a breath-hold's RR may differ by): no step of the
    range fits its images, so none is placed rather than each at a wrong phase."""
    gone = {(10, t) for t in range(1, 20, 2)}
    kept = sorted(sunny.name_at[(10, t)] for t in range(0, 20, 2))

    def edit(n, ds):
        if n in kept:
            ds.TriggerTime = ds.NominalCardiacTriggerDelayTime = 0.7 * float(ds.TriggerTime)

    written = write_copy(sunny, tmp_path / "dicom", edit=edit,
                         skip={sunny.name_at[c] for c in gone})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine,
                 empty={(10, t) for t in range(20)})
    (issue,) = issues_of(entry, "unplaced_image")
    assert issue["excluded"] == kept and "no free phase" in issue["detail"]


@pytest.mark.parametrize("tilt, flagged", [(5e-5, False), (5e-4, True)])
def test_orientation_drift_beyond_rounding_is_reported(sunny, clean_affine, tmp_path, tilt,
                                                       flagged):
    """Direction cosines of slice 3 off by rounding (5e-5) are one orientation; off by 5e-4
    (0.03 deg, still one stack) the manifest says the orientation varies: the same limit,
    geometry.IOP_TOLERANCE, as the DICOM SR/SEG writers use."""
    def edit(n, ds):
        if sunny.cell[n][0] == 3:
            iop = [float(v) for v in ds.ImageOrientationPatient]
            iop[0] += tilt
            ds.ImageOrientationPatient = iop

    written = write_copy(sunny, tmp_path / "dicom", edit=edit)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine)
    varies = [i for i in issues_of(entry, "inconsistent_geometry")
              if "orientation varies" in i["detail"]]
    assert bool(varies) == flagged


def test_image_whose_trigger_time_fits_no_phase_is_left_out(sunny, clean_affine, tmp_path):
    """In a slice with a gap, an image 2 s into a 0.8 s cycle is not pushed into the gap."""
    odd = sunny.name_at[(4, 7)]

    def edit(n, ds):
        if n == odd:
            ds.TriggerTime = ds.NominalCardiacTriggerDelayTime = 2000.0

    written = write_copy(sunny, tmp_path / "dicom", edit=edit, skip={sunny.name_at[(4, 12)]})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine, empty={(4, 7), (4, 12)})
    (issue,) = issues_of(entry, "unplaced_image")
    assert issue["excluded"] == [odd]


def test_extra_image_does_not_fill_another_slices_gap(sunny, clean_affine, tmp_path):
    """A slice with an extra image (a second one at 500 ms) and a missing one (phase 3) still
    has 20 images: the extra one must not shift phases 4-12 down into the gap."""
    extra = pydicom.dcmread(STUDY / sunny.name_at[(4, 12)])
    extra.TriggerTime = extra.NominalCardiacTriggerDelayTime = \
        float(extra.TriggerTime) + 6.0
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    written = write_copy(sunny, tmp_path / "dicom", skip={sunny.name_at[(4, 3)]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra.save_as(tmp_path / "dicom" / "extra.dcm")
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine, empty={(4, 3)})
    (issue,) = issues_of(entry, "unplaced_image")
    assert issue["excluded"] == ["extra.dcm"]


def test_image_without_trigger_time_is_placed_by_instance_number(sunny, clean_affine, tmp_path):
    name = sunny.name_at[(6, 9)]

    def edit(n, ds):
        if n == name:
            del ds.TriggerTime
            del ds.NominalCardiacTriggerDelayTime

    written = write_copy(sunny, tmp_path / "dicom", edit=edit)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine)
    (issue,) = issues_of(entry, "missing_trigger_time")
    assert (issue["slice"], issue["phase"]) == (6, 9) and name in issue["detail"]


def test_trigger_time_falls_back_to_nominal_trigger_delay(sunny, clean_affine, tmp_path):
    name = sunny.name_at[(3, 4)]

    def edit(n, ds):
        if n == name:
            del ds.TriggerTime

    written = write_copy(sunny, tmp_path / "dicom", edit=edit)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine)
    assert not issues_of(entry, "missing_trigger_time")


def test_untimed_image_with_contradicting_instance_numbers_is_left_out(sunny, clean_affine,
                                                                        tmp_path):
    """InstanceNumbers that do not rise with TriggerTime within the slice cannot place an image
    without a trigger time: it is left out and named, its cell is empty."""
    name = sunny.name_at[(6, 9)]
    numbers = {sunny.name_at[(6, t)]: 1000 - t for t in range(20)}  # falling with phase

    def edit(n, ds):
        if n in numbers:
            ds.InstanceNumber = numbers[n]
        if n == name:
            del ds.TriggerTime
            del ds.NominalCardiacTriggerDelayTime

    written = write_copy(sunny, tmp_path / "dicom", edit=edit)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    cells = {str(ds.SOPInstanceUID): sunny.cell[n] for n, ds in
             zip(sunny.datasets, written.values())}
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine, empty={(6, 9)},
                 cell_of=lambda ds: cells[str(ds.SOPInstanceUID)])
    (issue,) = issues_of(entry, "missing_trigger_time")
    assert issue["excluded"] == [name]


def test_other_study_with_more_images_does_not_push_the_cine_out(sunny, clean_affine, tmp_path):
    dicom = tmp_path / "dicom"
    written = write_copy(sunny, dicom)
    dwi = factory.write_series(dicom / "other", study_uid=generate_uid(), n_slices=26,
                               n_phases=12, cine=False, description="ep2d_diff b0-1000",
                               name_prefix="dwi")
    manifest = preprocess_study(dicom, tmp_path / "out")
    assert manifest["study_instance_uid"] == str(sunny.datasets["1.dcm"].StudyInstanceUID)
    assert sorted(r["file"] for r in manifest["rejected"]) == \
        sorted(f"other/{p.name}" for p in dwi.files)
    assert all(dwi.study_instance_uid in r["reason"] for r in manifest["rejected"])
    (issue,) = [i for i in manifest["issues"] if i["type"] == "other_study"]
    assert issue["study_instance_uid"] == dwi.study_instance_uid and issue["n_files"] == 312
    assert_cells(tmp_path / "out", cine_of(manifest), sunny, written, clean_affine)


def per_slice_series(sunny: Sunnybrook, series_number=lambda k: 300 + k):
    """edit and path_of for the export of many scanners: one series per slice in sax_N/, each
    with its own SeriesInstanceUID, SeriesNumber and FrameOfReferenceUID."""
    series = {k: generate_uid() for k in range(12)}
    frames = {k: generate_uid() for k in range(12)}

    def edit(n, ds):
        k = sunny.cell[n][0]
        ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series[k], frames[k]
        ds.SeriesNumber = series_number(k)

    def path_of(n, ds):
        return f"sax_{sunny.cell[n][0]}/IM-{int(ds.InstanceNumber):04d}.dcm"

    return edit, path_of, series


def test_one_series_per_slice_with_own_frames_of_reference_is_merged(sunny, clean_affine,
                                                                     tmp_path):
    edit, path_of, series = per_slice_series(sunny)
    written = write_copy(sunny, tmp_path / "dicom", edit=edit, path_of=path_of)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    assert entry["kind"] == "cine_sax"
    assert sorted(entry["merged_series_instance_uids"]) == sorted(series.values())
    assert len(issues_of(entry, "multiple_frames_of_reference")) == 1
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine)


def test_slice_series_with_a_phase_fewer_is_merged_with_the_gap(sunny, clean_affine, tmp_path):
    edit, path_of, series = per_slice_series(sunny)
    written = write_copy(sunny, tmp_path / "dicom", edit=edit, path_of=path_of,
                         skip={sunny.name_at[(7, 15)]})
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    assert len(entry["merged_series_instance_uids"]) == 12
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine, empty={(7, 15)})


def test_slice_series_shifted_in_plane_is_not_merged(sunny, clean_affine, tmp_path):
    """A single-slice cine parallel to the others but 20 mm off their in-plane grid cannot be a
    slice of the same volume: it stays its own series and the stack shows the gap."""
    edit, path_of, series = per_slice_series(sunny)

    def shifted(n, ds):
        edit(n, ds)
        if sunny.cell[n][0] == 5:
            row = np.array(ds.ImageOrientationPatient[:3], float)
            ds.ImagePositionPatient = [round(float(v), 4) for v in
                                       np.array(ds.ImagePositionPatient, float) + 20 * row]

    written = write_copy(sunny, tmp_path / "dicom", edit=shifted, path_of=path_of)
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    entry = cine_of(manifest)
    assert series[5] not in entry["merged_series_instance_uids"]
    assert len(entry["merged_series_instance_uids"]) == 11
    assert [(i["type"], i["slice"]) for i in issues_of(entry, "missing_slice")] == \
        [("missing_slice", 5)]
    assert not issues_of(entry, "inconsistent_geometry")
    assert {s["series_instance_uid"] for s in manifest["series"]} == \
        {entry["series_instance_uid"], series[5]}
    img = nib.load(tmp_path / "out" / entry["volume"])
    data = np.asarray(img.dataobj)
    assert np.array_equal(img.affine, clean_affine)
    for k in set(range(12)) - {5}:
        for t in range(20):
            ds = written[entry["sop_instance_uids"][k][t]]
            assert sunny.cell[sunny_name(sunny, ds)] == (k, t)
            assert np.array_equal(data[:, :, k, t], sunny.pixels(ds))
    assert entry["sop_instance_uids"][5] == [None] * 20 and not data[:, :, 5].any()


@pytest.mark.parametrize("repeat_phases, kept", [(20, "repeat"), (14, "first")])
def test_repeated_slice_keeps_the_fuller_later_one(sunny, clean_affine, tmp_path,
                                                   repeat_phases, kept):
    """Slice 4 acquired again as series 400 (other pixels): a complete repeat replaces the
    first acquisition, an aborted one (14 phases) does not; the other stays its own series."""
    edit, path_of, series = per_slice_series(sunny)
    dicom = tmp_path / "dicom"
    written = write_copy(sunny, dicom, edit=edit, path_of=path_of)
    repeat_uid = generate_uid()
    repeat = {}
    for t in range(repeat_phases):
        ds = pydicom.dcmread(STUDY / sunny.name_at[(4, t)])
        ds.SeriesInstanceUID, ds.SeriesNumber = repeat_uid, 400
        ds.FrameOfReferenceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
        (dicom / "sax_4_again").mkdir(exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(dicom / "sax_4_again" / f"IM-{t:04d}.dcm")
        repeat[str(ds.SOPInstanceUID)] = ds
    manifest = preprocess_study(dicom, tmp_path / "out")
    entry = cine_of(manifest)
    first_uid = series[4]
    dropped = first_uid if kept == "repeat" else repeat_uid
    (issue,) = issues_of(entry, "repeated_slice")
    assert issue["series_instance_uid"] == dropped
    assert dropped not in entry["merged_series_instance_uids"]
    assert {s["series_instance_uid"] for s in manifest["series"]} == {entry["series_instance_uid"],
                                                                      dropped}
    if kept == "repeat":
        written = {u: ds for u, ds in written.items() if ds.SeriesInstanceUID != first_uid}
        written.update(repeat)
    assert_cells(tmp_path / "out", entry, sunny, written, clean_affine,
                 cell_of=lambda ds: sunny.cell[sunny_name(sunny, ds)])


def test_failed_run_leaves_no_volume_of_the_previous_study(sunny, tmp_path):
    out = tmp_path / "out"
    preprocess_study(STUDY, out)
    assert list((out / "series").glob("*.nii.gz"))
    brain = tmp_path / "brain"
    factory.write_brain_stack(brain, study_uid="1.2.3.9")
    with pytest.raises(NoUsableCine):
        preprocess_study(brain, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["study_instance_uid"] == "1.2.3.9"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brain", "out"]  # no staging left
    # A folder that also holds the user's own files keeps them; only our outputs are replaced.
    (out / "notes.txt").write_text("mine")
    preprocess_study(STUDY, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "series"]
    with pytest.raises(NoUsableCine):
        preprocess_study(brain, out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt"]


def test_brain_stacks_need_cardiac_evidence(tmp_path):
    dicom = tmp_path / "dicom"
    mprage = factory.write_brain_stack(dicom, study_uid="1.2.3.7", weighting="t1_ir")
    t2 = factory.write_brain_stack(dicom, study_uid="1.2.3.7", weighting="t2", series_number=61)
    with pytest.raises(NoUsableCine) as info:
        preprocess_study(dicom, tmp_path / "out")
    kinds = {s["series_instance_uid"]: s for s in info.value.manifest["series"]}
    for spec in (mprage, t2):
        assert kinds[spec.series_instance_uid]["kind"] == "other"
        assert "no cardiac evidence" in kinds[spec.series_instance_uid]["classification"]
    # The same stacks, ECG-triggered or of the heart, are LGE and T2 stacks.
    heart = tmp_path / "heart"
    lge = factory.write_brain_stack(heart, study_uid="1.2.3.8", weighting="t1_ir",
                                    body_part_examined="HEART")
    t2w = factory.write_brain_stack(heart, study_uid="1.2.3.8", weighting="t2",
                                    series_number=61, body_part_examined="CHEST")
    for path in t2w.files:
        ds = pydicom.dcmread(path)
        ds.TriggerTime = 450.0
        ds.save_as(path)
    with pytest.raises(NoUsableCine) as info:
        preprocess_study(heart, tmp_path / "out2")
    kinds = {s["series_instance_uid"]: s["kind"] for s in info.value.manifest["series"]}
    assert kinds == {lge.series_instance_uid: "lge_sax", t2w.series_instance_uid: "t2_sax"}


def test_brain_stack_beside_a_cine_is_not_short_axis(sunny, clean_affine, tmp_path):
    dicom = tmp_path / "dicom"
    written = write_copy(sunny, dicom)
    study_uid = str(sunny.datasets["1.dcm"].StudyInstanceUID)
    brain = factory.write_brain_stack(dicom / "brain", study_uid=study_uid,
                                      body_part_examined="HEART")
    manifest = preprocess_study(dicom, tmp_path / "out")
    kinds = {s["series_instance_uid"]: s["kind"] for s in manifest["series"]}
    assert kinds[brain.series_instance_uid] == "other"
    assert_cells(tmp_path / "out", cine_of(manifest), sunny, written, clean_affine)


def test_enhanced_frame_without_trigger_delay_is_placed_by_temporal_index(tmp_path):
    """Frames of one enhanced MR file share an InstanceNumber; TemporalPositionIndex orders a
    frame whose NominalCardiacTriggerDelayTime is missing."""
    spec = factory.write_enhanced_cine(tmp_path / "dicom" / "cine.dcm")
    ds = pydicom.dcmread(spec.files[0])
    frame = ds.PerFrameFunctionalGroupsSequence[4]
    del frame.CardiacSynchronizationSequence[0].NominalCardiacTriggerDelayTime
    ds.save_as(spec.files[0])
    manifest = preprocess_study(tmp_path / "dicom", tmp_path / "out")
    (entry,) = manifest["series"]
    data = np.asarray(nib.load(tmp_path / "out" / entry["volume"]).dataobj)
    assert np.array_equal(data, spec.expected)
    (issue,) = issues_of(entry, "missing_trigger_time")
    assert entry["frame_numbers"][issue["slice"]][issue["phase"]] == 5
    assert not issues_of(entry, "missing_phase")
