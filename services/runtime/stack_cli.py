"""`cmrvl up`, `cmrvl down`, `cmrvl serve STAGE`."""

from __future__ import annotations

import importlib

from services.runtime.stack import DEFAULT_BASE, STAGES

# Each stage's module exposes `service_spec(settings) -> ServiceSpec`.
SERVICE_MODULES = {stage: f"services.{stage}.service" for stage in STAGES}


def register(subparsers) -> None:
    up = subparsers.add_parser("up", help="start the local stack (S3 server + the four services)")
    up.add_argument("--base-port", type=int, default=DEFAULT_BASE)
    up.add_argument("--stack-dir", help="state folder (default ~/.cmrvl/stack or $CMRVL_STACK_DIR)")
    up.add_argument("--replicas", action="append", metavar="STAGE=N",
                    help="run N processes of a stage, e.g. segmentation=2 (repeatable or comma-separated); "
                         "the gateway spreads its calls over them")
    up.set_defaults(handler=_up)

    down = subparsers.add_parser("down", help="stop the local stack")
    down.add_argument("--stack-dir")
    down.set_defaults(handler=_down)

    serve = subparsers.add_parser("serve", help="run one gRPC service in the foreground")
    serve.add_argument("stage", choices=sorted(SERVICE_MODULES))
    serve.set_defaults(handler=_serve)


# What starting or stopping processes can run into: printed as one line, not a traceback.
STACK_ERRORS = (RuntimeError, TimeoutError, OSError, ValueError)


def parse_replicas(values: list[str] | None) -> dict[str, int] | None:
    """`["segmentation=2", "findings=2,preprocess=3"]` -> {stage: count}; None when not given."""
    if not values:
        return None
    replicas = {}
    for item in (part.strip() for value in values for part in value.split(",")):
        stage, _, count = item.partition("=")
        if not stage or not count.strip().isdigit():
            raise ValueError(f"--replicas {item!r}: expected STAGE=N, e.g. segmentation=2")
        replicas[stage.strip()] = int(count)
    return replicas


def _up(args) -> int:
    from services.cli import CommandError
    from services.runtime.stack import Stack

    stack = Stack(args.stack_dir)
    try:
        info = stack.up(base_port=args.base_port, replicas=parse_replicas(args.replicas))
    except STACK_ERRORS as exc:
        raise CommandError(str(exc) or type(exc).__name__) from None
    print(f"stack up in {stack.dir}")
    print(f"  gateway  {info.target('gateway')}  (token in {stack.info_file})")
    for stage, count in info.replicas.items():
        print(f"  {stage:<8} {count} replicas: {info.target(stage)}")
    print(f"  s3       {info.s3_endpoint}")
    return 0


def _down(args) -> int:
    from services.cli import CommandError
    from services.runtime.stack import Stack

    try:
        Stack(args.stack_dir).down()
    except STACK_ERRORS as exc:
        raise CommandError(str(exc) or type(exc).__name__) from None
    print("stack down")
    return 0


def _serve(args) -> int:
    from services.cli import CommandError
    from services.runtime.server import configure_logging, serve_forever
    from services.runtime.settings import SettingsError, load_settings

    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        spec = importlib.import_module(SERVICE_MODULES[args.stage]).service_spec(settings)
    except SettingsError as exc:
        raise CommandError(str(exc)) from None
    serve_forever(spec, settings)
    return 0
