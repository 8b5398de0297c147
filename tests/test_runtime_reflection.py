"""Server reflection in both protocol versions (v1, which grpcurl/Postman/grpc-java ask first, and
v1alpha), open without credentials like health, on a real server started by the shared runtime."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from cmrvl.v1 import stages_pb2_grpc
from services.runtime.server import ServiceSpec, start_server
from services.runtime.settings import load_settings


@pytest.fixture(scope="module")
def server():
    spec = ServiceSpec(
        names=["cmrvl.v1.PreprocessService"],
        register=lambda s: stages_pb2_grpc.add_PreprocessServiceServicer_to_server(
            stages_pb2_grpc.PreprocessServiceServicer(), s),
        tokens=frozenset({"secret"}),  # reflection must answer without it
    )
    running = start_server(spec, load_settings(grpc_port=0, metrics_port=0, shutdown_grace_s=1))
    yield running
    running.stop()


def _ask(port: int, version: str, request: reflection_pb2.ServerReflectionRequest):
    """One reflection request over `version` ("v1" or "v1alpha"): the messages are the same on the wire."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        (response,) = list(call(iter([request]), timeout=5))
    return response


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_services(server, version):
    response = _ask(server.port, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert {"cmrvl.v1.PreprocessService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize("symbol, package", [
    ("cmrvl.v1.PreprocessService", "cmrvl.v1"),
    ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1"),  # it can describe itself
])
def test_reflection_v1_describes_services(server, symbol, package):
    from google.protobuf import descriptor_pb2

    response = _ask(server.port, "v1", reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    assert not response.HasField("error_response"), response.error_response.error_message
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in response.file_descriptor_response.file_descriptor_proto]
    services = {f"{f.package}.{s.name}" for f in files for s in f.service}
    assert symbol in services and package in {f.package for f in files}
