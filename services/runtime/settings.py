"""Typed configuration from `CMRVL_*` environment variables, shared by every service and the CLI.

A bad value fails at start-up with one message naming the variable, never later in a request."""

from __future__ import annotations

import re

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """Raised with a readable list of the offending CMRVL_* variables."""


_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"  # a DNS name or an IPv4 address
_PORT = r"(?:[1-9][0-9]{0,4})"
_V6 = r"\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?\]"
GRPC_TARGET_FORMS = {
    "host:port": re.compile(rf"(?:{_HOST}|{_V6}):{_PORT}"),
    "dns:///host:port": re.compile(rf"dns://(?:{_HOST}(?::{_PORT})?)?/{_HOST}:{_PORT}"),
    "ipv4:a:port,b:port": re.compile(rf"ipv4:{_HOST}:{_PORT}(?:,{_HOST}:{_PORT})*"),
    "ipv6:[a]:port,[b]:port": re.compile(rf"ipv6:{_V6}:{_PORT}(?:,{_V6}:{_PORT})*"),
}


def check_grpc_target(value: str) -> str:
    """A gRPC target the stage channels accept (clients.open_channel spreads calls over all of
    its addresses), or ValueError naming the accepted forms."""
    value = value.strip()
    form = next((f for f, pattern in GRPC_TARGET_FORMS.items() if pattern.fullmatch(value)), None)
    ports = re.findall(r":([0-9]+)(?:,|$)", value)
    if form is None or not all(int(p) <= 65535 for p in ports):
        raise ValueError(f"{value!r} is not a gRPC target: use " + " or ".join(GRPC_TARGET_FORMS))
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CMRVL_", extra="ignore", frozen=True)

    # gRPC server
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    # Each open WatchStudy stream holds one worker thread for the study's whole run; with 16, twenty
    # watching clients starved every unary call (GetStudy, SubmitStudy) until a study ended. The
    # gateway now serves at most three quarters of them as watch streams (RESOURCE_EXHAUSTED beyond).
    grpc_workers: int = Field(64, ge=1, le=1024)
    max_message_mb: int = Field(64, ge=1, le=2047)
    shutdown_grace_s: float = Field(30.0, ge=0)
    metrics_port: int = Field(9090, ge=0, le=65535)  # 0 disables the Prometheus endpoint
    log_level: str = "INFO"

    # Auth. Gateway: bearer tokens the RIS may present (comma-separated). Stages: the one token
    # the gateway presents. Empty `internal_token` disables auth on a stage (local stack only).
    auth_tokens: str = ""
    internal_token: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # set to require client certificates (mTLS)

    # Object store
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    bucket_prefix: str = "cmrvl-"

    # Gateway -> stages
    preprocess_target: str = "127.0.0.1:50052"
    segmentation_target: str = "127.0.0.1:50053"
    findings_target: str = "127.0.0.1:50054"
    stage_timeout_s: float = Field(600.0, gt=0)
    stage_attempts: int = Field(3, ge=1, le=20)  # DEADLINE_EXCEEDED: the stage ran and was too slow
    retry_backoff_s: float = Field(1.0, ge=0)
    # How long an unreachable stage or object store is waited out (UNAVAILABLE, connection
    # errors: a pod restart, a rolling update, a model load) before the study fails.
    outage_retry_s: float = Field(600.0, ge=0)
    max_backoff_s: float = Field(30.0, gt=0)
    # Where SubmitStudyReference may point: "bucket/prefix" entries, comma-separated; empty =
    # the studies bucket only (not every bucket the gateway's credentials can read).
    reference_prefixes: str = ""
    max_upload_mb: int = Field(2048, ge=1)
    workflow_workers: int = Field(4, ge=1)
    preprocess_concurrency: int = Field(2, ge=1)
    segmentation_concurrency: int = Field(1, ge=1)
    findings_concurrency: int = Field(1, ge=1)
    # The workflow engine (DBOS): its database, a SQLAlchemy-style URL (postgresql://user:pass@host:5432/db);
    # empty = an SQLite file in `state_dir` (the embedded default: no server needed).
    workflow_database_url: str = ""
    state_dir: str = ""  # the gateway's own files; empty = ~/.cmrvl/gateway
    # This replica's stable name (the pod name; DBOS's executor id); empty = the host name.
    gateway_replica: str = ""
    # Replicas write a heartbeat every `replica_heartbeat_s`; one silent for `replica_dead_s` is
    # taken for dead and its unfinished studies are recovered by a live replica.
    replica_heartbeat_s: float = Field(5.0, gt=0)
    replica_dead_s: float = Field(30.0, gt=0)

    # Optional push of each report's SR + SEG to a PACS by C-STORE: "AET@host:port"; empty = off.
    pacs_target: str = ""
    pacs_calling_aet: str = "CMRVL"

    # Model servers
    triton_url: str = ""  # host:port of Triton's gRPC endpoint; empty = in-process ONNX Runtime
    segmentation_model: str = "cmr_seg"
    # Local model layout folder; empty = download `triton/<segmentation_model>/` from the models bucket.
    segmentation_model_dir: str = ""
    vlm_base_url: str = ""  # OpenAI-compatible base URL (KServe: .../openai/v1); empty = none
    vlm_model: str = "cmr-vl"
    vlm_model_version: str = ""
    vlm_api_key: str = ""
    vlm_timeout_s: float = Field(120.0, gt=0)
    vlm_max_attempts: int = Field(4, ge=1, le=20)
    vlm_concurrency: int = Field(4, ge=1, le=64)
    # Embedded backend: a local Qwen2.5-VL folder run in-process with transformers, used when
    # CMRVL_VLM_BASE_URL is empty (machines without a model server).
    vlm_model_dir: str = ""

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @field_validator("workflow_database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "sqlite:///")):
            raise ValueError("must be a postgresql://user:pass@host:5432/db or sqlite:///path URL (or empty)")
        return value

    @field_validator("pacs_target")
    @classmethod
    def _pacs_target(cls, value: str) -> str:
        from services.gateway.pacs import parse_target  # no pydicom/pynetdicom import here

        if value:
            parse_target(value)  # its ValueError names the expected form
        return value

    @field_validator("preprocess_target", "segmentation_target", "findings_target")
    @classmethod
    def _grpc_target(cls, value: str) -> str:
        return check_grpc_target(value)

    @property
    def accepted_tokens(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.auth_tokens.split(",") if t.strip())

    @property
    def allowed_reference_prefixes(self) -> tuple[str, ...]:
        entries = [p.strip() for p in self.reference_prefixes.split(",") if p.strip()]
        return tuple(entries) or (f"{self.bucket_prefix}studies/",)

    @property
    def stage_tokens(self) -> frozenset[str]:
        """What a stage service accepts: the gateway's internal token (none = auth off, local only)."""
        return frozenset({self.internal_token} - {""})


def load_settings(**overrides) -> Settings:
    """Settings from the environment (plus explicit overrides), or SettingsError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [
            f"CMRVL_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        ]
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
