"""The shared server runtime: settings errors, graceful shutdown, deadlines, request ids."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from cmrvl.v1 import stages_pb2, stages_pb2_grpc
from services.runtime.server import ServiceSpec, start_server
from services.runtime.settings import SettingsError, load_settings


def test_bad_settings_fail_with_the_variable_named(monkeypatch):
    monkeypatch.setenv("CMRVL_GRPC_PORT", "not-a-port")
    monkeypatch.setenv("CMRVL_LOG_LEVEL", "LOUD")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "CMRVL_GRPC_PORT" in str(err.value) and "CMRVL_LOG_LEVEL" in str(err.value)


def test_gateway_refuses_to_start_without_auth(monkeypatch):
    from services.gateway.service import service_spec

    with pytest.raises(SettingsError, match="CMRVL_AUTH_TOKENS"):
        service_spec(load_settings(auth_tokens="", s3_access_key="a", s3_secret_key="b"))


class SlowPreprocess(stages_pb2_grpc.PreprocessServiceServicer):
    """A servicer whose call takes a while and reports the deadline it saw."""

    def __init__(self):
        self.started = threading.Event()

    def Preprocess(self, request, context):
        self.started.set()
        remaining = context.time_remaining()
        time.sleep(1.0)
        return stages_pb2.PreprocessResponse(study_instance_uid=f"{remaining:.1f}", rejected_files=7)


@pytest.fixture()
def slow_server():
    servicer = SlowPreprocess()
    spec = ServiceSpec(
        names=["cmrvl.v1.PreprocessService"],
        register=lambda server: stages_pb2_grpc.add_PreprocessServiceServicer_to_server(servicer, server),
        tokens=frozenset({"secret"}),
    )
    running = start_server(spec, load_settings(grpc_port=0, metrics_port=0, shutdown_grace_s=10))
    yield running, servicer
    running.stop()


def _call(port, timeout=30, token="secret", request_id=None):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        metadata = [("authorization", f"Bearer {token}")]
        if request_id:
            metadata.append(("x-request-id", request_id))
        return stages_pb2_grpc.PreprocessServiceStub(channel).Preprocess.with_call(
            stages_pb2.PreprocessRequest(study_id="s"), timeout=timeout, metadata=metadata)


def test_sigterm_style_stop_lets_in_flight_calls_finish(slow_server):
    running, servicer = slow_server
    result = {}
    worker = threading.Thread(target=lambda: result.update(response=_call(running.port)[0]))
    worker.start()
    assert servicer.started.wait(10)
    running.stop()  # what serve_forever does on SIGTERM
    worker.join(20)
    assert result["response"].rejected_files == 7
    with pytest.raises(grpc.RpcError) as err:
        _call(running.port, timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_callers_deadline_reaches_the_servicer_and_request_id_is_echoed(slow_server):
    running, _ = slow_server
    response, call = _call(running.port, timeout=7, request_id="abc123")
    assert 5.0 < float(response.study_instance_uid) <= 7.0
    assert dict(call.trailing_metadata())["x-request-id"] == "abc123"


def test_a_wrong_token_is_unauthenticated(slow_server):
    running, _ = slow_server
    with pytest.raises(grpc.RpcError) as err:
        _call(running.port, token="guess")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_retry_with_backoff_gives_up_on_a_down_server():
    from services.runtime.clients import call_with_retry, open_channel

    with open_channel("127.0.0.1:9") as channel:  # nothing listens on the discard port
        stub = stages_pb2_grpc.PreprocessServiceStub(channel)
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            call_with_retry(stub.Preprocess, stages_pb2.PreprocessRequest(), timeout_s=2, attempts=3, backoff_s=0.1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.perf_counter() - started >= 0.3  # two backoffs happened (0.1 + 0.2)
