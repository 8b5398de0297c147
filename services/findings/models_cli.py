"""`cmrvl models upload`: put VLM weights into the object store where KServe's `storageUri` expects them.

Layout: bucket `<prefix>models` (default `cmrvl-models`), key prefix `vlm/<name>/<version>/`, the
Hugging Face model folder copied file for file (config.json, *.safetensors, tokenizer and processor
files). The InferenceService then points at `storageUri: s3://cmrvl-models/vlm/<name>/<version>`
and KServe's storage initializer copies that prefix to /mnt/models. A manifest with each file's
sha256 goes BESIDE the prefix (`vlm/<name>/<version>.manifest.json`) so it is not served.
Versions are immutable: uploading an existing version needs --overwrite.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from services.cli import CommandError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def model_prefix(name: str, version: str) -> str:
    return f"vlm/{name}/{version}/"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="manage model weights in the object store",
        description="Manage vision-language model weights in the object store (KServe storageUri layout).",
    )
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    upload = sub.add_parser(
        "upload", help="upload a Hugging Face model folder (or a hub snapshot) as vlm/<name>/<version>/",
        description="Copy a Hugging Face model folder into the models bucket under vlm/<name>/<version>/ "
        "and print the storageUri for the InferenceService. Object store settings come from CMRVL_S3_*.",
    )
    upload.add_argument("local_dir", nargs="?", metavar="LOCAL_DIR", help="model folder with config.json")
    upload.add_argument("--from-hub", metavar="REPO_ID",
                        help="download this Hugging Face hub repository first (needs internet)")
    upload.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for --from-hub")
    upload.add_argument("--name", required=True, help="model name (e.g. cmr-vl)")
    upload.add_argument("--version", required=True, help="model version (e.g. 2025-06-01 or v1)")
    upload.add_argument("--overwrite", action="store_true", help="replace an existing version")
    upload.set_defaults(handler=_upload)


def _download_from_hub(repo_id: str, revision: str | None, target: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CommandError("--from-hub needs the huggingface_hub package") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=target))
    except Exception as exc:  # offline: LocalEntryNotFoundError / connection errors; bad repo: 404s
        raise CommandError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); without internet, copy the "
            "model folder to this machine and pass it as LOCAL_DIR"
        ) from None


def upload_model(store, folder: Path, name: str, version: str, *, overwrite: bool = False,
                 source: str = "") -> dict:
    """Upload `folder` to vlm/<name>/<version>/ and write the manifest; returns the manifest."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CommandError(f"{folder} is not a Hugging Face model folder (no config.json)")
    bucket, prefix = store.bucket("models"), model_prefix(name, version)
    store.ensure_buckets()
    if next(iter(store.list_keys(bucket, prefix)), None) is not None:
        if not overwrite:
            raise CommandError(f"s3://{bucket}/{prefix} already exists; versions are immutable "
                               "(pick a new --version or pass --overwrite)")
        store.delete_prefix(bucket, prefix)
    # The hub's local_dir keeps download metadata under .cache/: not part of the model.
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    refs = {}
    for path in files:
        relative = path.relative_to(folder).as_posix()
        refs[relative] = store.put_file(bucket, prefix + relative, path)
    manifest = {
        "name": name, "version": version, "source": source or str(folder.resolve()),
        "storage_uri": f"s3://{bucket}/{prefix.rstrip('/')}",
        "uploaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {rel: {"sha256": ref.sha256, "size_bytes": ref.size_bytes} for rel, ref in refs.items()},
    }
    store.put_json(bucket, f"vlm/{name}/{version}.manifest.json", manifest)
    return manifest


def _upload(args: argparse.Namespace) -> int:
    from services.runtime.settings import SettingsError, load_settings
    from services.runtime.storage import ObjectStore, StorageAuthError

    for value, flag in ((args.name, "--name"), (args.version, "--version")):
        if not _NAME.match(value):
            raise CommandError(f"{flag} {value!r}: use letters, digits, '.', '_' and '-' only")
    if bool(args.local_dir) == bool(args.from_hub):
        raise CommandError("give either LOCAL_DIR or --from-hub REPO_ID")
    if args.local_dir and not Path(args.local_dir).is_dir():
        raise CommandError(f"no such folder: {args.local_dir}")
    try:
        store = ObjectStore(load_settings())
    except (SettingsError, StorageAuthError) as exc:
        raise CommandError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="cmrvl-hub-") as tmp:
        if args.from_hub:
            folder = _download_from_hub(args.from_hub, args.revision, Path(tmp))
            source = f"hf://{args.from_hub}" + (f"@{args.revision}" if args.revision else "")
        else:
            folder, source = Path(args.local_dir), ""
        try:
            manifest = upload_model(store, folder, args.name, args.version, overwrite=args.overwrite, source=source)
        except (StorageAuthError, OSError) as exc:
            raise CommandError(f"upload failed: {exc}") from None
        except Exception as exc:  # object store unreachable (urllib3) or refusing (minio S3Error)
            if type(exc).__module__.split(".")[0] in {"urllib3", "minio"}:
                raise CommandError(f"upload failed: object store error: {str(exc).splitlines()[0]}") from None
            raise
    total = sum(f["size_bytes"] for f in manifest["files"].values())
    print(json.dumps({"storage_uri": manifest["storage_uri"], "files": len(manifest["files"]),
                      "size_bytes": total}))
    return 0
