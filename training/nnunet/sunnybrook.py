"""Sunnybrook Cardiac Data: expert contours -> label maps in the DICOM image grid.

Layout (as in ../shared/data/sunnybrook): `<root>/link.csv` maps a study id (`SCD0000101`, a folder of
DICOM files) to its original case id (`SC-HF-I-1`), whose contours live in
`<root>/contours/<case>/{i,o}-contours/IM-0001-NNNN-{i,o}contour-manual.txt`; NNNN is the
InstanceNumber of the annotated image and each line is `x y` in pixel coordinates (x = column,
y = row). i-contours (endocardium) are drawn at ED and ES, o-contours (epicardium) at ED only, so
the phase that has o-contours is ED and the other contoured phase is ES.

Label maps follow the platform convention: 1 LV cavity (inside the i-contour), 2 LV myocardium
(inside the o-contour, outside the i-contour). The RV is not annotated.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CONTOUR_NAME = re.compile(r"IM-\d+-(\d+)-([io])contour-manual\.txt$")


@dataclass
class CineStudy:
    """A short-axis cine series as arrays: image (x=column, y=row, z=slice, t=phase)."""

    image: np.ndarray
    affine: np.ndarray  # voxel index -> RAS+ mm
    position_of_instance: dict[int, tuple[int, int]]  # InstanceNumber -> (slice, phase)
    pixel_spacing_mm: tuple[float, float]  # (between columns = x step, between rows = y step)
    slice_spacing_mm: float


@dataclass
class SunnybrookCase:
    study_id: str
    case_id: str
    study: CineStudy
    ed_phase: int
    es_phase: int
    labels: dict[str, np.ndarray]  # "ed"/"es" -> (x, y, z) uint8 label map
    contoured_slices: dict[str, list[int]] = field(default_factory=dict)


def read_cine_dicom(dicom_dir: str | Path) -> CineStudy:
    """Read a single-series short-axis cine folder with the preprocessing stage's reader, so that
    training volumes have exactly the geometry that inference inputs get (services/preprocess:
    x = DICOM column, y = row, z = slices along the normal, t = phases by TriggerTime, RAS+ affine).
    """
    from services.preprocess.reader import read_folder
    from services.preprocess.stack import build_grid, volume

    read = read_folder(Path(dicom_dir))
    series = {f.series_instance_uid for f in read.frames}
    if len(series) != 1:
        raise ValueError(f"{dicom_dir}: expected one image series, found {len(series)}")
    grid = build_grid(read.frames)
    if grid is None or grid.n_phases < 2:
        raise ValueError(f"{dicom_dir}: no cine stack (slices x phases) could be built")
    position_of_instance: dict[int, tuple[int, int]] = {}
    for z, row in enumerate(grid.cells):
        for t, frame in enumerate(row):
            if frame is None:
                raise ValueError(f"{dicom_dir}: slice {z} has no image at phase {t}")
            if frame.instance_number is None or frame.instance_number in position_of_instance:
                raise ValueError(f"{dicom_dir}: InstanceNumber missing or repeated ({frame.file})")
            position_of_instance[frame.instance_number] = (z, t)
    row_mm, col_mm = grid.pixel_spacing  # DICOM PixelSpacing: between rows, between columns
    return CineStudy(volume(grid), grid.affine, position_of_instance, (float(col_mm), float(row_mm)),
                     float(grid.slice_step_mm))


def read_contour(path: str | Path) -> np.ndarray:
    """Contour points as an (N, 2) array of (x = column, y = row) pixel coordinates."""
    points = np.loadtxt(path, dtype=float, ndmin=2)
    if points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"{path}: expected at least 3 lines of 'x y'")
    return points


def contour_files(contour_dir: str | Path) -> dict[str, dict[int, Path]]:
    """{"i": {instance: path}, "o": {instance: path}} for a case's contour folder."""
    found: dict[str, dict[int, Path]] = {"i": {}, "o": {}}
    for path in Path(contour_dir).rglob("*contour-manual.txt"):
        match = CONTOUR_NAME.search(path.name)
        if match:
            found[match.group(2)][int(match.group(1))] = path
    return found


def rasterize(points_xy: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
    """Boolean (x, y) mask of the pixels whose centres lie inside the polygon."""
    from skimage.draw import polygon  # scikit-image comes with nnunetv2

    mask = np.zeros(shape_xy, dtype=bool)
    xs, ys = polygon(points_xy[:, 0], points_xy[:, 1], shape=shape_xy)
    mask[xs, ys] = True
    return mask


def polygon_area_px(points_xy: np.ndarray) -> float:
    """Shoelace area of a closed polygon in pixel units."""
    x, y = points_xy[:, 0], points_xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def load_case(dicom_dir: str | Path, contour_dir: str | Path, study_id: str = "", case_id: str = "") -> SunnybrookCase:
    """Rasterize a Sunnybrook case's expert contours into ED and ES label maps."""
    study = read_cine_dicom(dicom_dir)
    files = contour_files(contour_dir)
    if not files["i"]:
        raise ValueError(f"{contour_dir}: no i-contour files")

    def where(instance: int) -> tuple[int, int]:
        if instance not in study.position_of_instance:
            raise ValueError(f"{contour_dir}: contour for InstanceNumber {instance} has no image in {dicom_dir}")
        return study.position_of_instance[instance]

    i_phases = {where(n)[1] for n in files["i"]}
    o_phases = {where(n)[1] for n in files["o"]}
    if len(i_phases) != 2 or len(o_phases) > 1 or not o_phases <= i_phases:
        raise ValueError(
            f"{contour_dir}: expected endocardium at two phases and epicardium at one of them, "
            f"got i-contour phases {sorted(i_phases)} and o-contour phases {sorted(o_phases)}"
        )
    shape_xy = study.image.shape[:2]
    masks = {kind: {where(n): rasterize(read_contour(p), shape_xy) for n, p in files[kind].items()} for kind in "io"}
    if o_phases:
        ed_phase = o_phases.pop()
    else:  # no epicardium: the larger cavity is ED
        ed_phase = max(i_phases, key=lambda t: sum(m.sum() for (z, tt), m in masks["i"].items() if tt == t))
    (es_phase,) = i_phases - {ed_phase}

    labels, contoured = {}, {}
    for name, phase in (("ed", ed_phase), ("es", es_phase)):
        volume = np.zeros(study.image.shape[:3], dtype=np.uint8)
        for (z, t), mask in masks["o"].items():
            if t == phase:
                volume[:, :, z][mask] = 2
        for (z, t), mask in masks["i"].items():
            if t == phase:
                volume[:, :, z][mask] = 1
        labels[name] = volume
        contoured[name] = sorted(z for (z, t) in masks["i"] if t == phase)
    return SunnybrookCase(study_id, case_id, study, ed_phase, es_phase, labels, contoured)


def find_cases(root: str | Path) -> list[tuple[str, str, Path, Path]]:
    """(study_id, case_id, dicom_dir, contour_dir) for each study listed in `<root>/link.csv`."""
    root = Path(root)
    link = root / "link.csv"
    if not link.is_file():
        raise ValueError(f"{root}: no link.csv")
    cases = []
    with link.open(newline="") as handle:
        for row in csv.DictReader(handle):
            study_id, case_id = row["patient_id"].strip(), row["original_id"].strip()
            dicom_dir, contour_dir = root / study_id, root / "contours" / case_id
            if not dicom_dir.is_dir() or not contour_dir.is_dir():
                raise ValueError(f"{root}: missing {dicom_dir.name}/ or contours/{case_id}/ for {study_id}")
            cases.append((study_id, case_id, dicom_dir, contour_dir))
    if not cases:
        raise ValueError(f"{link}: no studies listed")
    return cases
