"""One way to start every CMR-VL gRPC server: settings, health, reflection, auth, metrics,
message-size limits and graceful shutdown on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import start_http_server

from services.runtime.interceptors import BearerAuthInterceptor, ObservabilityInterceptor, RequestIdFilter
from services.runtime.settings import Settings

log = logging.getLogger("cmrvl.server")


@dataclass
class ServiceSpec:
    """What a service contributes: its full gRPC names and how to register its servicer."""

    names: list[str]  # e.g. cmrvl.v1.PreprocessService
    register: Callable[[grpc.Server], None]
    tokens: frozenset[str] = field(default_factory=frozenset)  # empty = no auth
    on_start: Callable[[], None] | None = None
    on_stop: Callable[[], None] | None = None


# Clients (clients.py open_channel) ping every KEEPALIVE_TIME_MS, also between calls: accept
# that (gRPC's server default allows one ping per 5 minutes without data and answers more with
# GOAWAY too_many_pings, dropping the connection and any call on it).
MIN_CLIENT_PING_INTERVAL_MS = 10_000
# Close each connection after about this long (gRPC adds jitter), so that clients resolve a
# `dns:///` target again and spread onto replicas added since; calls in flight run to their end
# on the old connection (max_connection_age_grace_ms left at its default: unlimited).
MAX_CONNECTION_AGE_MS = 300_000


def keepalive_options() -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        # The server's own pings find clients that vanished (their calls are then cancelled).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
    ]


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_reflection_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto into the default pool, so that reflection can
    describe its own v1 service. It is v1alpha renamed (same messages, same field numbers)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(server: grpc.Server, names: list[str]) -> None:
    """Server reflection in both protocol versions: v1alpha (grpcio-reflection) and v1, which newer
    clients (grpcurl, Postman, grpc-java) ask first. grpcio-reflection has no v1 servicer yet
    (grpc/grpc#38576); the v1 messages are wire-identical, so the one servicer answers both."""
    _register_reflection_v1_descriptor()
    servicer = reflection.ReflectionServicer([*names, reflection.SERVICE_NAME, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert_file:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    cert = Path(settings.tls_cert_file).read_bytes()
    if settings.tls_client_ca_file:
        ca = Path(settings.tls_client_ca_file).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    return grpc.ssl_server_credentials([(key, cert)])


class RunningServer:
    def __init__(self, server: grpc.Server, health_servicer, port: int, spec: ServiceSpec, grace_s: float):
        self.server, self.health, self.port, self.spec, self.grace_s = server, health_servicer, port, spec, grace_s
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish within the grace."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace_s).wait()
        if self.spec.on_stop:
            self.spec.on_stop()
        log.info("stopped")

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(spec: ServiceSpec, settings: Settings) -> RunningServer:
    interceptors = [ObservabilityInterceptor()]
    if spec.tokens:
        interceptors.append(BearerAuthInterceptor(spec.tokens))
    max_bytes = settings.max_message_mb * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
            *keepalive_options(),
        ],
    )
    spec.register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [*spec.names, health.SERVICE_NAME])

    address = f"{settings.grpc_host}:{settings.grpc_port}"
    credentials = _credentials(settings)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.grpc_host)
    if spec.on_start:
        spec.on_start()
    server.start()
    for name in ("", *spec.names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s (metrics :%s)", ",".join(spec.names), f"{settings.grpc_host}:{port}", settings.metrics_port)
    return RunningServer(server, health_servicer, port, spec, settings.shutdown_grace_s)


def serve_forever(spec: ServiceSpec, settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    running = start_server(spec, settings)
    done = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %s: draining", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    running.stop()
