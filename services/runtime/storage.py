"""The object store (MinIO in the cluster, SeaweedFS's S3 server locally) and its one layout.

Buckets (names carry `Settings.bucket_prefix`, default `cmrvl-`):

| bucket            | key                                         | content                          |
|-------------------|---------------------------------------------|----------------------------------|
| `cmrvl-studies`   | `<study_id>/dicom/<relative path>`          | uploaded DICOM files, as sent    |
|                   | `<study_id>/study.json`                     | durable workflow record (written |
|                   |                                             | last: its presence = submitted)  |
| `cmrvl-artifacts` | `<study_id>/preprocess/manifest.json`, ...  | derived data, one folder a stage |
|                   | `<study_id>/segmentation/labels.nii.gz`     |                                  |
|                   | `<study_id>/findings/findings.json`, inputs |                                  |
| `cmrvl-models`    | `triton/<model>/config.pbtxt`,              | Triton model repository          |
|                   | `triton/<model>/<version>/model.onnx`       |                                  |
|                   | `vlm/<name>/<version>/...`                  | weights for KServe `storageUri`  |
| `cmrvl-reports`   | `<study_id>/report.json`, `report.txt`,     | what the RIS/PACS receives       |
|                   | `<study_id>/sr.dcm`, `<study_id>/seg.dcm`   |                                  |

Keys are deterministic from the study id, so a repeated stage overwrites its own result."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from services.runtime.settings import Settings

BUCKET_ROLES = ("studies", "artifacts", "models", "reports")
# S3 answers that mean "the store is there but cannot serve now": waited out like an outage.
_BUSY_CODES = {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "XMinioServerNotInitialized"}

log = logging.getLogger("cmrvl.storage")
# urllib3 logs every retry of a refused connection; the one warning below says it once per call.
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


class ObjectNotFound(KeyError):
    pass


class StorageAuthError(PermissionError):
    pass


class WriteConflict(Exception):
    """A conditional write lost: the object changed (or came to exist) since it was read."""


class StoreUnavailable(ConnectionError):
    """The object store cannot be reached or is not serving. The message names no host: it
    reaches API callers (the log has the details)."""


@dataclass(frozen=True)
class Ref:
    """Plain-Python twin of cmrvl.v1.ObjectRef, so stage logic needs no protobuf."""

    bucket: str
    key: str
    sha256: str = ""
    size_bytes: int = 0


def _translate(exc: Exception, bucket: str, key: str) -> Exception:
    if isinstance(exc, S3Error):
        if exc.code in {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}:
            return ObjectNotFound(f"s3://{bucket}/{key} does not exist")
        if exc.code in {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}:
            return StorageAuthError(f"object store refused the credentials ({exc.code})")
        if exc.code == "PreconditionFailed":
            return WriteConflict(f"s3://{bucket}/{key} was written by someone else meanwhile")
        if exc.code in _BUSY_CODES:
            return StoreUnavailable(f"object store unavailable ({exc.code})")
        return exc
    # urllib3 errors (connection refused, reset, timeouts) and 5xx answers that are not S3 XML.
    log.warning("object store unavailable for s3://%s/%s: %s", bucket, key, exc)
    return StoreUnavailable(f"object store unavailable ({type(exc).__name__})")


_FAILURES = (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError)


@contextlib.contextmanager
def _translated(bucket: str, key: str):
    """Store client errors as this module's exceptions (not found, credentials, unavailable)."""
    try:
        yield
    except _FAILURES as exc:
        raise _translate(exc, bucket, key) from None


def _http_client() -> urllib3.PoolManager:
    """The SDK's client, but brief about a store that is down: the callers wait outages out
    themselves (the workflow) or answer UNAVAILABLE (the API) instead of blocking for long."""
    import os

    import certifi

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10, read=300), maxsize=32,
        cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class ObjectStore:
    def __init__(self, settings: Settings):
        if not settings.s3_access_key or not settings.s3_secret_key:
            raise StorageAuthError(
                "CMRVL_S3_ACCESS_KEY and CMRVL_S3_SECRET_KEY must be set (no anonymous access)"
            )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=_http_client(),
        )
        self.buckets = {role: f"{settings.bucket_prefix}{role}" for role in BUCKET_ROLES}

    def bucket(self, role: str) -> str:
        return self.buckets[role]

    def ensure_buckets(self) -> None:
        for name in self.buckets.values():
            with _translated(name, ""):
                if not self.client.bucket_exists(name):
                    self.client.make_bucket(name)

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream",
                  condition: dict[str, str] | None = None) -> Ref:
        """`condition`: If-Match / If-None-Match headers (a conditional write: WriteConflict when
        it does not hold)."""
        with _translated(bucket, key):
            if condition:
                # The SDK's put_object turns unknown headers into user metadata (x-amz-meta-*), so
                # the condition goes through its one-request PutObject call.
                self.client._put_object(bucket, key, data, headers={"Content-Type": content_type, **condition})
            else:
                self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        return Ref(bucket, key, hashlib.sha256(data).hexdigest(), len(data))

    def put_file(self, bucket: str, key: str, path: Path, content_type: str = "application/octet-stream") -> Ref:
        """Upload a file without holding it in memory (checkpoints can be gigabytes)."""
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        with _translated(bucket, key):
            self.client.fput_object(bucket, key, str(path), content_type=content_type)
        return Ref(bucket, key, digest.hexdigest(), Path(path).stat().st_size)

    def put_json(self, bucket: str, key: str, document, if_match: str | None = None,
                 if_absent: bool = False) -> Ref:
        """`if_match` (an ETag from get_json_tagged) or `if_absent`: a conditional write (S3
        If-Match / If-None-Match, kept by MinIO, SeaweedFS and AWS), which raises WriteConflict
        instead of overwriting what another writer wrote since."""
        data = json.dumps(document, indent=2, sort_keys=True).encode()
        condition = None
        if if_absent:
            condition = {"If-None-Match": "*"}
        elif if_match is not None:
            condition = {"If-Match": if_match}
        return self.put_bytes(bucket, key, data, "application/json", condition)

    def _get(self, bucket: str, key: str) -> tuple[bytes, str]:
        """The object's bytes and its ETag."""
        with _translated(bucket, key):
            response = self.client.get_object(bucket, key)
            try:
                return response.read(), response.headers.get("ETag", "")
            finally:
                response.close()
                response.release_conn()

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self._get(bucket, key)[0]

    def get_json(self, bucket: str, key: str):
        return json.loads(self.get_bytes(bucket, key))

    def get_json_tagged(self, bucket: str, key: str) -> tuple[object, str]:
        """The document and the ETag it was read with, for a conditional write back."""
        data, etag = self._get(bucket, key)
        return json.loads(data), etag

    def keeps_write_conditions(self, bucket: str) -> bool:
        """Whether the store refuses a conditional write that should lose (an old MinIO or
        other S3 server may ignore If-None-Match and overwrite)."""
        key = ".cmrvl-conditional-write-probe"
        self.put_json(bucket, key, {"probe": 1})
        try:
            self.put_json(bucket, key, {"probe": 2}, if_absent=True)
            return False
        except WriteConflict:
            return True
        finally:
            with contextlib.suppress(Exception):
                self.client.remove_object(bucket, key)

    def get_file(self, bucket: str, key: str, path: Path) -> Path:
        """Download to path, streamed; the file appears whole (the SDK renames a .part file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _translated(bucket, key):
            self.client.fget_object(bucket, key, str(path))
        return path

    def exists(self, bucket: str, key: str) -> bool:
        try:
            with _translated(bucket, key):
                self.client.stat_object(bucket, key)
            return True
        except ObjectNotFound:
            return False

    def list_keys(self, bucket: str, prefix: str, recursive: bool = True) -> Iterator[str]:
        with _translated(bucket, prefix):
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=recursive):
                yield obj.object_name

    def download_prefix(self, bucket: str, prefix: str, folder: Path) -> list[Path]:
        """Copy every object under `prefix` into `folder`, keeping relative paths."""
        paths = []
        for key in self.list_keys(bucket, prefix):
            relative = key[len(prefix):].lstrip("/")
            if relative:
                paths.append(self.get_file(bucket, key, Path(folder) / relative))
        return paths

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> dict[str, Ref]:
        """Upload every file under `folder` to `prefix`; returns refs by relative path."""
        refs = {}
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                relative = path.relative_to(folder).as_posix()
                refs[relative] = self.put_file(bucket, prefix + relative, path)
        return refs

    def delete_prefix(self, bucket: str, prefix: str) -> None:
        for key in list(self.list_keys(bucket, prefix)):
            with _translated(bucket, key):
                self.client.remove_object(bucket, key)

    def presigned_get(self, bucket: str, key: str, expires_s: int = 3600) -> str:
        from datetime import timedelta

        return self.client.presigned_get_object(bucket, key, expires=timedelta(seconds=expires_s))
