"""`cmrvl analyze` (the whole pipeline on the embedded local stack) and `cmrvl submit` (a RIS client)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def register(subparsers) -> None:
    analyze = subparsers.add_parser("analyze", help="analyze a DICOM study end to end on the embedded local stack")
    analyze.add_argument("dicom_dir", type=Path)
    analyze.add_argument("--out", type=Path, required=True)
    analyze.add_argument("--height-cm", type=float)
    analyze.add_argument("--weight-kg", type=float)
    analyze.add_argument("--keep-stack", action="store_true", help="leave the stack running afterwards")
    analyze.set_defaults(handler=_analyze)

    submit = subparsers.add_parser("submit", help="submit a DICOM folder to a gateway, like a RIS")
    submit.add_argument("dicom_dir", type=Path)
    submit.add_argument("--target", required=True, help="gateway HOST:PORT")
    submit.add_argument("--token", default=os.environ.get("CMRVL_TOKEN", ""), help="bearer token (default $CMRVL_TOKEN)")
    submit.add_argument("--request-id", help="client request id (idempotency key); default: new")
    submit.add_argument("--wait", action="store_true", help="watch progress and fetch the report")
    submit.add_argument("--out", type=Path, help="where --wait writes report.json, report.txt, report.pdf, the "
                        "figures and the DICOM objects")
    submit.set_defaults(handler=_submit)


def _progress(events, stream=sys.stderr) -> None:
    """Print a one-line progress bar, updated in place for every event."""
    for event in events:
        bar = "#" * int(event.percent / 5)
        stream.write(f"\r[{bar:<20}] {event.percent:5.1f}%  {event.message[:70]:<70}")
        stream.flush()
    stream.write("\n")


def _write_report(report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.report_json)
    (out / "report.txt").write_text(report.report_text)


def _review_keys(report_json: str) -> list[str]:
    """Store keys of report.pdf, contours.png, volumes.png and pdf.dcm (those the report has)."""
    document = json.loads(report_json)
    keys = list(document.get("review", {}).values())
    if "pdf" in document.get("dicom", {}):
        keys.append(document["dicom"]["pdf"])
    return keys


def _summary(report_json: str) -> str:
    report = json.loads(report_json)
    m = report["measurements"]
    parts = [f"status {report['status']}"]
    for key, label in (("lv_edv_ml", "LV EDV"), ("lv_esv_ml", "LV ESV"), ("lv_ef_pct", "LV EF"), ("lv_mass_g", "LV mass")):
        if m.get(key) is not None:
            parts.append(f"{label} {m[key]:.1f}")
    parts.append(f"{len(report['findings'])} findings")
    return ", ".join(parts)


def _fetch_report(client, study_id: str):
    import grpc

    from services.cli import CommandError

    try:
        return client.get_report(study_id)
    except grpc.RpcError as exc:
        raise CommandError(f"no report: {exc.details()}") from None


def _submit(args) -> int:
    import grpc

    from services.cli import CommandError
    from services.gateway.client import StudyClient

    client = StudyClient(args.target, args.token)
    try:
        study = client.submit_folder(args.dicom_dir, args.request_id)
        print(f"study {study.study_id} submitted ({study.study_instance_uid})")
        if args.wait:
            _progress(client.watch(study.study_id))
            report = _fetch_report(client, study.study_id)
            if args.out:
                _write_report(report, args.out)
                for ref in [report.sr, *report.segs]:  # DICOM SR/SEG through the gateway, not the store
                    if ref.key:
                        name = ref.key.rsplit("/", 1)[1]
                        (args.out / name).write_bytes(client.get_report_object(study.study_id, name))
                for key in _review_keys(report.report_json):  # the PDF, its figures, the PDF in DICOM
                    name = key.rsplit("/", 1)[1]
                    (args.out / name).write_bytes(client.get_report_object(study.study_id, name))
            print(_summary(report.report_json))
    except grpc.RpcError as exc:
        raise CommandError(f"{exc.code().name}: {exc.details()}") from None
    except TimeoutError as exc:  # the gateway kept ending the watch: the study itself goes on there
        again = (f"; `cmrvl submit --wait --request-id {args.request_id}` again watches it" if args.request_id
                 else "")
        raise CommandError(f"{exc}{again}") from None
    finally:
        client.close()
    return 0


def _analyze(args) -> int:
    import grpc

    from services.cli import CommandError
    from services.gateway.client import StudyClient
    from services.runtime.settings import Settings
    from services.runtime.stack import Stack, free_base_port
    from services.runtime.storage import ObjectStore

    if not args.dicom_dir.is_dir():
        raise CommandError(f"{args.dicom_dir} is not a folder")
    stack_dir = Path(tempfile.mkdtemp(prefix="cmrvl-analyze-"))
    stack = Stack(stack_dir)
    print(f"starting the local stack in {stack_dir} ...", file=sys.stderr)
    info = stack.up(base_port=free_base_port())
    try:
        client = StudyClient(info.target("gateway"), info.ris_token)
        try:
            study = client.submit_folder(
                args.dicom_dir, height_m=args.height_cm / 100 if args.height_cm else None, weight_kg=args.weight_kg)
            _progress(client.watch(study.study_id))
            report = _fetch_report(client, study.study_id)  # a failed study ends here, exit 1
        except grpc.RpcError as exc:
            raise CommandError(f"{exc.code().name}: {exc.details()}") from None
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
        finally:
            client.close()
        _write_report(report, args.out)
        store = ObjectStore(Settings(s3_endpoint=info.s3_endpoint, s3_access_key=info.access_key,
                                     s3_secret_key=info.secret_key))
        for ref in [report.sr, *report.segs]:
            if ref.key:
                store.get_file(ref.bucket, ref.key, args.out / ref.key.rsplit("/", 1)[1])
        for key in _review_keys(report.report_json):  # report.pdf, contours.png, volumes.png, pdf.dcm
            store.get_file(report.json.bucket, key, args.out / key.rsplit("/", 1)[1])
        print(f"{_summary(report.report_json)}; written to {args.out}")
    finally:
        if not args.keep_stack:
            stack.down()
            shutil.rmtree(stack_dir, ignore_errors=True)  # the stack's data and logs were for this call only
    return 0
