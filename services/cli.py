"""CMR-VL: cardiac MRI study in, radiology draft report out.

Each subcommand lives in its own module as `register(subparsers)`; heavy libraries are imported
inside the handlers so that `cmrvl --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands (each defines `register(subparsers)`).
SUBCOMMAND_MODULES = [
    "services.runtime.stack_cli",
    "services.gateway.cli",
    "services.gateway.dicom_ingest",
    "services.preprocess.cli",
    "services.segmentation.cli",
    "training.cli",
    "services.findings.models_cli",
]


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmrvl", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"cmrvl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
