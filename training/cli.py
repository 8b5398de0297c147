"""`cmrvl train ...`: the training subcommand group.

To add `cmrvl train <name>`, write `register_train(train_subparsers)` in your module (add a parser,
`set_defaults(handler=...)`) and append the module to TRAIN_SUBCOMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import json

from services.cli import CommandError

# Modules that contribute `cmrvl train` subcommands (each defines `register_train(train_subparsers)`).
TRAIN_SUBCOMMAND_MODULES = [
    "training.cli",  # nnunet-dataset (below)
    "training.nnunet.train",  # nnunet
    "training.vlm.cli",  # vqa-dataset
]


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="training data and model jobs (nnU-Net, VLM)",
                                  description="Training data preparation and training jobs.")
    train_subparsers = train.add_subparsers(dest="train_command", required=True, metavar="TRAIN_COMMAND")
    for name in TRAIN_SUBCOMMAND_MODULES:
        importlib.import_module(name).register_train(train_subparsers)


def register_train(train_subparsers) -> None:
    parser = train_subparsers.add_parser(
        "nnunet-dataset",
        help="ACDC (NIfTI or HDF5) / M&Ms / Sunnybrook -> one nnU-Net raw dataset",
        description="Write NNUNET_RAW_DIR/DatasetNNN_<name>/ with imagesTr, labelsTr (ED and ES of every "
        "subject, platform labels 1 LV cavity, 2 LV myocardium, 3 RV), dataset.json and a "
        "patient-grouped splits_final.json.",
    )
    parser.add_argument("--acdc", metavar="ACDC_TRAINING_DIR", help="ACDC training/ folder (patientXXX/ with Info.cfg)")
    parser.add_argument("--acdc-h5", metavar="DIR", help="ACDC as HDF5 (patientNNN_frameFF.h5 with image/label; "
                        "no spacing stored: 1.5625 x 1.5625 x 10 mm is assumed and written into dataset.json)")
    parser.add_argument("--mnms", metavar="MNMS_LABELED_DIR", help="M&Ms folder of subject codes (<code>/<code>_sa[_gt].nii.gz)")
    parser.add_argument("--mnms-csv", metavar="CSV", help="M&Ms metadata CSV (columns External code, ED, ES; 0-based)")
    parser.add_argument("--sunnybrook", metavar="DIR", help="Sunnybrook folder with link.csv, study folders and contours/")
    parser.add_argument("--out", required=True, metavar="NNUNET_RAW_DIR", help="nnU-Net raw data folder")
    parser.add_argument("--dataset-id", required=True, type=int, metavar="N", help="nnU-Net dataset id (1-999)")
    parser.add_argument("--name", default="CMRVL", help="dataset name (default: CMRVL)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the patient-level splits (default: 12345)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder's cases")
    parser.set_defaults(handler=_nnunet_dataset)


def _nnunet_dataset(args: argparse.Namespace) -> int:
    from training.nnunet.convert import build_dataset

    if args.acdc is None and args.acdc_h5 is None and args.mnms is None and args.sunnybrook is None:
        raise CommandError("give at least one of --acdc, --acdc-h5, --mnms (with --mnms-csv), --sunnybrook")
    if (args.mnms is None) != (args.mnms_csv is None):
        raise CommandError("--mnms and --mnms-csv go together")
    try:
        summary = build_dataset(
            args.out, args.dataset_id, name=args.name, acdc=args.acdc, mnms=args.mnms, mnms_csv=args.mnms_csv,
            sunnybrook=args.sunnybrook, seed=args.seed, overwrite=args.overwrite, acdc_h5=args.acdc_h5,
        )
    except FileNotFoundError as exc:
        raise CommandError(f"no such file or folder: {exc.filename or exc}") from None
    except ValueError as exc:
        raise CommandError(str(exc).splitlines()[0]) from None
    print(json.dumps(summary, indent=2))
    return 0
