"""`cmrvl preprocess DICOM_DIR --out OUT_DIR`: DICOM study folder -> NIfTI volumes + manifest."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="turn a cardiac MRI DICOM folder into NIfTI volumes and manifest.json",
        description="Group, classify and stack a DICOM study; write OUT_DIR/manifest.json and "
                    "RAS+ NIfTI volumes (the cine short-axis series as x, y, slice, phase).")
    parser.add_argument("dicom_dir", metavar="DICOM_DIR", type=Path,
                        help="folder with the study's DICOM files (searched recursively)")
    parser.add_argument("--out", required=True, type=Path, metavar="OUT_DIR",
                        help="output folder (created if missing)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    # Imported here so that `cmrvl --help` does not pay for numpy/pydicom.
    from services.cli import CommandError
    from services.preprocess.study import NoUsableCine, preprocess_study

    if not args.dicom_dir.is_dir():
        raise CommandError(f"not a folder: {args.dicom_dir}")
    try:
        manifest = preprocess_study(args.dicom_dir, args.out)
    except NoUsableCine as exc:
        raise CommandError(f"no usable cine: {exc}") from None
    except OSError as exc:
        raise CommandError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
    cine = manifest["primary"]["cine_sax"]
    entry = next(s for s in manifest["series"] if s["series_instance_uid"] == cine)
    n_issues = sum(len(s["issues"]) for s in manifest["series"]) + len(manifest["issues"])
    print(f"{len(manifest['series'])} series, cine_sax {entry['n_slices']} slices x "
          f"{entry['n_phases']} phases, {len(manifest['rejected'])} rejected, "
          f"{n_issues} issue(s) -> {args.out / 'manifest.json'}")
    return 0
