"""The pictures a reader checks before signing (issue 16), checked in the rendered PNG itself.

A synthetic DICOM cine (tests/dicom_factory.py, anisotropic 1.5 x 1.25 mm pixels) goes through the
real preprocessing; phantom label maps with known LV cavity, myocardium and RV discs are drawn on
its grid. The contour colours in the PNG must lie on their mask's boundary voxels (within one
voxel) and cover every boundary voxel; the grey pixels must be the source image's own voxels,
windowed, the right way round; a marker pixel written into one DICOM file at (row, column) must
appear at that row and column of its tile.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ED, ES = 0, 2
MARKER_SLICE, MARKER_ROW, MARKER_COL = 1, 9, 41  # where the marker is in the DICOM image
EMPTY_SLICE = 3  # no labels there: marked "no contour"


def _disc(shape, cx, cy, r):
    x, y = np.ogrid[:shape[0], :shape[1]]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2


def phantom_labels(shape) -> np.ndarray:
    """(x, y, slice, phase): LV cavity disc, myocardium ring around it, RV disc beside it, at ED
    (larger) and ES, on every slice but EMPTY_SLICE."""
    labels = np.zeros(shape, np.uint8)
    for t, (r_cav, r_epi, r_rv) in ((ED, (6, 9, 5)), (ES, (4, 8, 3))):
        for z in range(shape[2]):
            if z == EMPTY_SLICE:
                continue
            plane = labels[:, :, z, t]
            plane[_disc(shape, 26, 26, r_epi)] = 2
            plane[_disc(shape, 26 + z % 2, 26, r_cav)] = 1  # not the same on every slice
            plane[_disc(shape, 11, 27, r_rv)] = 3
    return labels


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import nibabel as nib

    from dicom_factory import write_cine_study
    from services.preprocess.study import preprocess_study
    from services.segmentation.dicom_seg import cine_entry

    work = tmp_path_factory.mktemp("figures")
    spec = write_cine_study(work / "dicom", n_slices=5, n_phases=5, rows=48, cols=56)
    # The marker: the brightest pixel of the study, in one image at a known (row, column).
    target = spec.sop_instance_uids[MARKER_SLICE][ED]
    path = next(p for p in spec.files if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == target)
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.copy()
    pixels[MARKER_ROW, MARKER_COL] = pixels.max() * 4
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)

    manifest = preprocess_study(work / "dicom", work / "pre")
    entry = cine_entry(manifest)
    cine = np.asarray(nib.load(work / "pre" / entry["volume"]).dataobj).astype(np.float32)
    labels = phantom_labels(cine.shape)
    return SimpleNamespace(spec=spec, entry=entry, cine=cine, labels=labels, affine=np.array(entry["affine"]))


def render(study, **kwargs):
    from services.gateway.figures import contour_mosaic

    png, layout = contour_mosaic(study.cine, study.labels, study.affine, ED, ES,
                                 study.entry["trigger_times_ms"], **kwargs)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), layout


@pytest.fixture(scope="module")
def mosaic(study):
    return render(study)


def tile_pixels(rgb: np.ndarray, tile: dict) -> np.ndarray:
    x0, x1, y0, y1 = tile["box"]
    h, w = (y1 - y0) * tile["scale"][0], (x1 - x0) * tile["scale"][1]
    return rgb[tile["png_y"]:tile["png_y"] + h, tile["png_x"]:tile["png_x"] + w]


def voxel_of(tile: dict, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Volume (x, y) of tile pixels (row, column)."""
    x0, _x1, y0, _y1 = tile["box"]
    return x0 + cols // tile["scale"][1], y0 + rows // tile["scale"][0]


def boundary(mask: np.ndarray, connectivity: int) -> np.ndarray:
    structure = ndimage.generate_binary_structure(2, connectivity)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def test_each_contour_lies_on_its_masks_boundary_and_outlines_all_of_it(study, mosaic):
    from services.gateway.figures import CONTOUR_COLOURS, contour_masks

    rgb, layout = mosaic
    checked = 0
    for tile in layout["tiles"]:
        if tile["state"] != "ok":
            continue
        pixels = tile_pixels(rgb, tile)
        for name, mask in contour_masks(study.labels[:, :, tile["slice"], tile["phase"]]).items():
            rows, cols = np.nonzero(np.all(pixels == CONTOUR_COLOURS[name], axis=-1))
            assert rows.size, f"{name} not drawn on slice {tile['slice']} {tile['row']}"
            x, y = voxel_of(tile, rows, cols)
            # To one pixel: each coloured pixel is in a boundary voxel of the mask or next to one.
            near_boundary = ndimage.binary_dilation(boundary(mask, 2), ndimage.generate_binary_structure(2, 2))
            off = np.count_nonzero(~near_boundary[x, y])
            assert off == 0, f"{name}: {off} pixel(s) off the mask boundary"
            # And complete: every voxel of the mask with a background side holds some of its colour.
            drawn = np.zeros_like(mask)
            drawn[x, y] = True
            edge = boundary(mask, 1)
            assert (drawn | ~edge).all(), f"{name}: {np.count_nonzero(edge & ~drawn)} boundary voxel(s) not outlined"
            checked += 1
    assert checked == 3 * 2 * (study.cine.shape[2] - 1)  # three contours, two phases, every labelled slice


def test_grey_pixels_are_the_source_voxels_the_right_way_round(study, mosaic):
    rgb, layout = mosaic
    low, high = layout["window_low"], layout["window_high"]
    for tile in layout["tiles"]:
        pixels = tile_pixels(rgb, tile)
        grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
        rows, cols = np.nonzero(grey)
        x, y = voxel_of(tile, rows, cols)
        inside = (x >= 0) & (x < study.cine.shape[0]) & (y >= 0) & (y < study.cine.shape[1])
        source = study.cine[x[inside], y[inside], tile["slice"], tile["phase"]]
        expected = np.rint(np.clip((source - low) / (high - low), 0, 1) * 255)
        assert np.array_equal(pixels[rows[inside], cols[inside], 0], expected.astype(np.uint8)), tile
        assert (pixels[rows[~inside], cols[~inside], 0] == 0).all()  # outside the image: black padding


def test_a_marker_in_the_dicom_image_shows_at_its_row_and_column(study, mosaic):
    rgb, layout = mosaic
    tile = next(t for t in layout["tiles"] if (t["slice"], t["phase"]) == (MARKER_SLICE, ED))
    pixels = tile_pixels(rgb, tile)[..., 0].astype(int)
    x0, _x1, y0, _y1 = tile["box"]
    kr, kc = tile["scale"]
    r, c = (MARKER_ROW - y0) * kr, (MARKER_COL - x0) * kc  # DICOM row -> tile row, column -> tile column
    assert (pixels[r:r + kr, c:c + kc] == 255).all()
    # The brightest spot of the tile is there and only there (a flip or transpose would move it).
    blocks = pixels[:pixels.shape[0] // kr * kr, :pixels.shape[1] // kc * kc].reshape(
        pixels.shape[0] // kr, kr, pixels.shape[1] // kc, kc).min(axis=(1, 3))
    marker = study.cine[MARKER_COL, MARKER_ROW, MARKER_SLICE, ED]
    assert marker == study.cine[..., ED].max()
    assert np.argwhere(blocks == blocks.max()).tolist() == [[MARKER_ROW - y0, MARKER_COL - x0]] or \
        (blocks == 255).sum() < 0.02 * blocks.size  # other voxels may saturate at the 99th percentile
    assert blocks[MARKER_ROW - y0, MARKER_COL - x0] == 255


def test_rows_are_ed_then_es_base_to_apex_and_empty_slices_are_marked(study, mosaic):
    from services.gateway.figures import base_to_apex

    rgb, layout = mosaic
    order, _rule = base_to_apex(study.affine, study.labels[..., ED], study.cine.shape[2])
    tiles = layout["tiles"]
    assert [(t["row"], t["phase"]) for t in tiles] == [("ED", ED)] * len(order) + [("ES", ES)] * len(order)
    assert [t["slice"] for t in tiles] == order * 2
    # Base to apex in the patient: the apex lies left, anterior and inferior (RAS+ -x, +y, -z).
    centres = [study.affine @ [0, 0, z, 1] for z in order]
    towards_apex = [float(np.dot(c[:3], [-1, 1, -1])) for c in centres]
    assert towards_apex == sorted(towards_apex) and len(set(towards_apex)) == len(order)
    assert [t["png_x"] for t in tiles[:len(order)]] == sorted(t["png_x"] for t in tiles[:len(order)])
    assert {t["slice"] for t in tiles if t["state"] == "no_contour"} == {EMPTY_SLICE}
    # The frame that marks it is drawn just outside the tile (its own pixels stay the image's).
    tile = next(t for t in tiles if t["state"] == "no_contour")
    frame_row = rgb[tile["png_y"] - 3, tile["png_x"]:tile["png_x"] + 40]
    assert (frame_row[:, 0] > 150).any() and (frame_row[:, 0] > frame_row[:, 2] + 80).any()


def test_a_cell_without_an_image_is_a_flat_marked_tile(study):
    present = np.ones(study.cine.shape[2:], bool)
    present[2, ES] = False
    rgb, layout = render(study, present=present)
    tile = next(t for t in layout["tiles"] if (t["slice"], t["phase"]) == (2, ES))
    assert tile["state"] == "no_image"
    assert (tile_pixels(rgb, tile) == 40).all()  # no image, no contour drawn on it


def test_window_follows_the_images_own_statistics(study):
    brighter = SimpleNamespace(**{**vars(study), "cine": study.cine * 3 + 100})
    _rgb, layout = render(study)
    _rgb2, layout2 = render(brighter)
    assert layout2["window_low"] == pytest.approx(layout["window_low"] * 3 + 100, rel=1e-4)
    assert layout2["window_high"] == pytest.approx(layout["window_high"] * 3 + 100, rel=1e-4)


def _measurements(lv, rv=None, quality=()):
    return {"lv_volume_curve_ml": lv, "rv_volume_curve_ml": rv or [0.0] * len(lv), "ed_phase": 0,
            "es_phase": 2, "lv_ef_pct": 50.0, "quality": list(quality)}


def test_volume_curve_gap_is_a_gap_with_its_flag_on_it():
    from services.gateway.figures import GAP_COLOUR, curve_data, volume_curves

    times = [20.0, 60.0, 100.0, 140.0, 180.0]
    flag = {"code": "incomplete_phases", "message": "1 of 5 phase(s) lack images (1 cell(s): slice 2 at phase 3)"}
    other = {"code": "components_removed", "message": "x"}  # not about the curve
    gap = _measurements([120.0, 90.0, 60.0, None, 110.0], quality=[flag, other])
    data = curve_data(gap, times)
    assert data["gaps"] == [3] and np.isnan(data["values"]["LV"][3])
    assert data["values"]["LV"][[0, 1, 2, 4]].tolist() == [120.0, 90.0, 60.0, 110.0]
    assert data["notes"] == [f"incomplete_phases: {flag['message']}"]  # only the flags about the curve
    assert data["x"].tolist() == times

    def band_pixels(measurements):
        png = np.asarray(Image.open(io.BytesIO(volume_curves(measurements, times))).convert("RGB"))
        return np.count_nonzero(np.all(png == tuple(int(GAP_COLOUR[i:i + 2], 16) for i in (1, 3, 5)), axis=-1))

    assert band_pixels(gap) > 1000
    assert band_pixels(_measurements([120.0, 90.0, 60.0, 80.0, 110.0])) < 50  # at most anti-aliasing


def test_volume_curve_without_trigger_times_says_so_and_zero_volumes_are_not_drawn():
    from services.gateway.figures import curve_data

    data = curve_data(_measurements([0.0, 90.0, 60.0, 80.0]), [])
    assert data["x"].tolist() == [0, 1, 2, 3] and not data["have_times"]
    assert "no trigger times" in data["notes"][0]
    assert np.isnan(data["values"]["LV"][0]) and "LV: no contour at phase(s) 0" in data["notes"][-1]
    assert not np.nan_to_num(data["values"]["RV"]).any()  # an RV the model does not label: not segmented


def test_the_same_input_gives_the_same_png(study):
    from services.gateway.figures import contour_mosaic

    args = (study.cine, study.labels, study.affine, ED, ES, study.entry["trigger_times_ms"])
    assert contour_mosaic(*args)[0] == contour_mosaic(*args)[0]


def test_sunnybrook_study_is_cropped_around_the_heart(tmp_path):
    """The real study with its expert LV contours: tiles are a crop, not the whole 256 x 256 image."""
    from conftest import SUNNYBROOK_STUDY, require
    from services.gateway.figures import contour_mosaic
    from services.preprocess.study import preprocess_study
    from services.segmentation.dicom_seg import cine_entry
    from training.nnunet.sunnybrook import load_case

    import nibabel as nib

    require(SUNNYBROOK_STUDY)
    manifest = preprocess_study(SUNNYBROOK_STUDY, tmp_path / "pre")
    entry = cine_entry(manifest)
    cine = np.asarray(nib.load(tmp_path / "pre" / entry["volume"]).dataobj)
    case = load_case(SUNNYBROOK_STUDY, SUNNYBROOK_STUDY.parent / "contours" / "SC-HF-I-1")
    labels = np.zeros(cine.shape, np.uint8)
    labels[..., case.ed_phase], labels[..., case.es_phase] = case.labels["ed"], case.labels["es"]
    png, layout = contour_mosaic(cine, labels, np.array(entry["affine"]), case.ed_phase, case.es_phase,
                                 entry["trigger_times_ms"], image_orientation_lps=entry["image_orientation_patient"])
    x0, x1, y0, y1 = layout["tiles"][0]["box"]
    assert 40 < x1 - x0 < 140 and 40 < y1 - y0 < 140
    contoured = set(case.contoured_slices["ed"])
    assert {t["slice"] for t in layout["tiles"] if t["row"] == "ED" and t["state"] == "ok"} == contoured
    assert Image.open(io.BytesIO(png)).size == (layout["width"], layout["height"])
    Path(tmp_path / "contours.png").write_bytes(png)
