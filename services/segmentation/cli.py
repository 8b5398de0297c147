"""`cmrvl measure`: cardiac function from label maps, printed as one JSON object.
`cmrvl segment`: a short-axis NIfTI image -> label map on the same grid (the default model or --model)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.cli import CommandError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "measure",
        help="LV/RV volumes, EF and LV mass from label maps (1 LV cavity, 2 LV myocardium, 3 RV)",
        description="Measure cardiac function from segmentation label maps and print one JSON object. "
        "Give either --ed and --es (3D maps) or --labels (4D map, one volume per phase). Every "
        "slice/phase cell counts as an image unless --manifest says otherwise.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", metavar="LABELS_4D.nii.gz", help="4D label map (x, y, z, phase)")
    source.add_argument("--ed", metavar="ED.nii.gz", help="end-diastolic 3D label map (with --es)")
    parser.add_argument("--es", metavar="ES.nii.gz", help="end-systolic 3D label map (with --ed)")
    parser.add_argument("--ed-phase", type=int, metavar="N", help="0-based ED phase of --labels (default: max LV volume)")
    parser.add_argument("--es-phase", type=int, metavar="N", help="0-based ES phase of --labels (default: min LV volume)")
    parser.add_argument("--manifest", metavar="MANIFEST.json",
                        help="preprocessing's manifest of the study (with --labels): cells it lists without an "
                        "image are gaps, never measured as empty (default: every cell holds an image)")
    parser.add_argument("--height-cm", type=float, metavar="H", help="height in cm (for BSA-indexed values)")
    parser.add_argument("--weight-kg", type=float, metavar="W", help="weight in kg (for BSA-indexed values)")
    parser.add_argument("--indent", type=int, default=None, help="pretty-print the JSON with this indent")
    parser.set_defaults(handler=_measure)
    register_segment(subparsers)


def _measure(args: argparse.Namespace) -> int:
    from services.segmentation.function import measure_files

    if args.ed is not None and args.es is None:
        raise CommandError("--ed needs --es")
    if args.labels is None and (args.ed_phase is not None or args.es_phase is not None):
        raise CommandError("--ed-phase/--es-phase apply to --labels only")
    if args.labels is None and args.manifest is not None:
        raise CommandError("--manifest applies to --labels only")
    if (args.height_cm is None) != (args.weight_kg is None):
        raise CommandError("give both --height-cm and --weight-kg, or neither")
    for value, name in ((args.height_cm, "--height-cm"), (args.weight_kg, "--weight-kg")):
        if value is not None and value <= 0:
            raise CommandError(f"{name} must be positive")
    for path in (args.labels, args.ed, args.es, args.manifest):
        if path is not None and not Path(path).is_file():
            raise CommandError(f"no such file: {path}")
    try:
        result = measure_files(
            labels_4d=args.labels, ed=args.ed, es=args.es,
            ed_phase=args.ed_phase, es_phase=args.es_phase,
            height_m=args.height_cm / 100.0 if args.height_cm is not None else None,
            weight_kg=args.weight_kg, manifest=args.manifest,
        )
    except FileNotFoundError as exc:
        raise CommandError(f"cannot read {exc.filename or exc}") from None
    except ValueError as exc:  # json.JSONDecodeError included
        raise CommandError(str(exc).splitlines()[0]) from None
    except Exception as exc:  # nibabel raises its own errors for unreadable files
        if type(exc).__module__.startswith("nibabel"):
            raise CommandError(f"cannot read label map: {exc}") from None
        raise
    print(json.dumps(result, indent=args.indent))
    return 0


# ------------------------------------------------------------------------------------- segment

def register_segment(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="short-axis NIfTI image -> label map (0 background, 1 LV cavity, 2 LV myocardium, 3 RV)",
        description="Segment a 3D (x, y, slices) or 4D (x, y, slices, phases) short-axis image in any orientation "
        "and spacing with the embedded ONNX Runtime path. Writes a uint8 label map on exactly the input's grid "
        "and affine (0 background, 1 LV cavity, 2 LV myocardium, 3 RV).")
    parser.add_argument("image", metavar="IMAGE.nii.gz", help="3D or 4D short-axis NIfTI image")
    parser.add_argument("--out", required=True, metavar="LABELS.nii.gz", help="label map to write")
    parser.add_argument("--model", metavar="MODEL_DIR",
                        help="model layout (repository or model folder; default: the shipped default model)")
    parser.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--mirroring", choices=("on", "off"),
                        help="test-time mirroring (on the axes the model's inference.json names, else on every axis "
                        "it allows): a little more accurate, two to four times slower (default: as inference.json "
                        "chose; its choices_evidence says why)")
    parser.set_defaults(handler=_segment)


def _segment(args: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from services.segmentation.model_layout import DEFAULT_MODEL_DIR, LayoutError

    path = Path(args.image)
    if not path.is_file():
        raise CommandError(f"no such file: {path}")
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel's ImageFileError and friends: not an image it can read
        raise CommandError(f"{path} is not a NIfTI image ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CommandError(f"{path} is a {type(image).__name__}, not a NIfTI image")
    if image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[3] < 1):
        raise CommandError(f"{path}: expected a 3D (x, y, slices) or 4D (x, y, slices, phases) image, "
                           f"got {image.ndim}D of shape {image.shape}")
    from services.segmentation.inference import InvalidInput, labels_nifti, load_segmenter, segment_image

    try:
        segmenter = load_segmenter(args.model or DEFAULT_MODEL_DIR, backend="onnxruntime", threads=args.threads,
                                   use_mirroring=None if args.mirroring is None else args.mirroring == "on")
    except (LayoutError, FileNotFoundError) as exc:
        raise CommandError(f"cannot load the model: {str(exc).splitlines()[0]}") from None
    try:
        labels = segment_image(segmenter, np.asanyarray(image.dataobj, dtype=np.float32), image.affine)
    except InvalidInput as exc:
        raise CommandError(f"{path}: {str(exc).splitlines()[0]}") from None
    finally:
        segmenter.close()
    out = labels_nifti(labels, image.affine)
    # the input's qform/sform codes too, so that viewers overlay the labels on the image exactly
    out.set_qform(image.get_qform(), code=int(image.header["qform_code"]))
    out.set_sform(image.get_sform(), code=int(image.header["sform_code"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, args.out)
    present = {name: int(np.count_nonzero(labels == value))
               for value, name in ((1, "lv_cavity"), (2, "lv_myocardium"), (3, "rv"))}
    print(json.dumps({"out": args.out, "shape": list(labels.shape), "voxels": present}))
    return 0
