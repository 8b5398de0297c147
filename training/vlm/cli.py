"""`cmrvl train vqa-dataset`: annotated studies -> LLaMA-Factory VQA dataset (training/vlm/dataset.py)."""

from __future__ import annotations

import argparse
import json

from services.cli import CommandError


def register_train(train_subparsers) -> None:
    parser = train_subparsers.add_parser(
        "vqa-dataset",
        help="annotated studies -> LLaMA-Factory VQA dataset (cmr_{train,val,test}.json)",
        description="Build the findings VQA dataset in LLaMA-Factory's sharegpt format from annotated "
        "studies. A study folder holds the preprocessing output (manifest.json + series/), the cine "
        "labels (labels.nii.gz) and annotations.json ({\"patient_id\": ..., \"answers\": {task_id: "
        "answer}}); STUDIES may also be folders of such folders or a JSON index of studies. Visual "
        "inputs are made by the findings service's own code; splits are by patient.",
    )
    parser.add_argument("studies", nargs="+", metavar="STUDIES",
                        help="study folder, folder of study folders, or JSON index")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset folder (LLaMA-Factory dataset_dir)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the patient-level splits (default: 12345)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of patients in val (default: 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of patients in test (default: 0.1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.set_defaults(handler=_vqa_dataset)


def _vqa_dataset(args: argparse.Namespace) -> int:
    from training.vlm.dataset import DatasetError, build_dataset, format_summary

    try:
        summary = build_dataset(args.studies, args.out, seed=args.seed, val_fraction=args.val_fraction,
                                test_fraction=args.test_fraction, overwrite=args.overwrite)
    except DatasetError as exc:
        raise CommandError(str(exc)) from None
    except (FileExistsError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(format_summary(summary))
    print(json.dumps({k: summary[k] for k in ("n_patients", "n_studies", "seed", "catalog_version")}))
    return 0
