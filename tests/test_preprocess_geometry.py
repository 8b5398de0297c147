"""LPS <-> RAS and DICOM plane -> NIfTI affine conversion (services.preprocess.geometry)."""

from __future__ import annotations

import numpy as np

from services.preprocess import geometry


def _random_plane(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return np.concatenate([q[:, 0], q[:, 1]])


def test_lps_ras_flip_x_and_y_only():
    p = np.array([[10.0, -20.0, 30.0], [-1.5, 2.5, -3.5]])
    assert np.allclose(geometry.lps_to_ras(p), [[-10, 20, 30], [1.5, -2.5, -3.5]])
    assert np.allclose(geometry.ras_to_lps(geometry.lps_to_ras(p)), p)


def test_affine_matches_dicom_pixel_formula_for_oblique_planes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        iop = _random_plane(rng)
        ipp = rng.uniform(-200, 200, size=3)
        spacing = rng.uniform(0.5, 3.0, size=2)
        step = geometry.slice_normal(iop) * rng.uniform(1, 12)
        affine = geometry.nifti_affine(ipp, iop, spacing, step)
        col, row, k = rng.integers(0, 256), rng.integers(0, 256), rng.integers(0, 20)
        # DICOM PS3.3 C.7.6.2.1.1, written out independently of the module.
        lps = ipp + iop[:3] * spacing[1] * col + iop[3:] * spacing[0] * row + step * k
        ras = affine @ [col, row, k, 1]
        assert np.allclose(ras[:3], [-lps[0], -lps[1], lps[2]])
        assert np.allclose(geometry.voxel_to_ras(affine, [col, row, k]), ras[:3])
        assert np.allclose(geometry.lps_to_ras(geometry.pixel_to_lps(ipp, iop, spacing, col, row)),
                           (affine @ [col, row, 0, 1])[:3])


def test_slice_order_key_and_stack_affine():
    iop = [0, 1, 0, 0, 0, -1]  # sagittal: normal = row x col = (-1, 0, 0)
    assert np.allclose(geometry.slice_normal(iop), [-1, 0, 0])
    positions = np.array([[5.0, 0, 0], [0.0, 0, 0], [-5.0, 0, 0]])
    keys = [geometry.position_along_normal(p, iop) for p in positions]
    assert keys == sorted(keys)
    affine = geometry.affine_from_positions(positions, iop, [2.0, 1.0])
    assert np.allclose(affine @ [0, 0, 2, 1], [5.0, 0, 0, 1])  # LPS (-5,0,0) is RAS (5,0,0)
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.0, 2.0, 5.0])
