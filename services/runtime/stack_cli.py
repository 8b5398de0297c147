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
    up.set_defaults(handler=_up)

    down = subparsers.add_parser("down", help="stop the local stack")
    down.add_argument("--stack-dir")
    down.set_defaults(handler=_down)

    serve = subparsers.add_parser("serve", help="run one gRPC service in the foreground")
    serve.add_argument("stage", choices=sorted(SERVICE_MODULES))
    serve.set_defaults(handler=_serve)


# What starting or stopping processes can run into: printed as one line, not a traceback.
STACK_ERRORS = (RuntimeError, TimeoutError, OSError, ValueError)


def _up(args) -> int:
    from services.cli import CommandError
    from services.runtime.stack import Stack

    stack = Stack(args.stack_dir)
    try:
        info = stack.up(base_port=args.base_port)
    except STACK_ERRORS as exc:
        raise CommandError(str(exc) or type(exc).__name__) from None
    print(f"stack up in {stack.dir}")
    print(f"  gateway  {info.target('gateway')}  (token in {stack.info_file})")
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
