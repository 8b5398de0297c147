"""Channels between services (clients.open_channel) against real loopback servers: calls spread
round robin over every address of a target, keepalive pings are accepted by our servers, and
connections are recycled without cutting calls in flight."""

from __future__ import annotations

import collections
import threading
import time

import grpc
import pytest

from cmrvl.v1 import stages_pb2, stages_pb2_grpc
from services.runtime import clients, server
from services.runtime.server import ServiceSpec, start_server
from services.runtime.settings import SettingsError, check_grpc_target, load_settings


class NamedPreprocess(stages_pb2_grpc.PreprocessServiceServicer):
    """Answers with its own name (and counts its calls), optionally after a pause."""

    def __init__(self, name: str, pause_s: float = 0.0):
        self.name, self.pause_s, self.calls = name, pause_s, 0
        self._lock = threading.Lock()

    def Preprocess(self, request, context):
        with self._lock:
            self.calls += 1
        time.sleep(self.pause_s)
        return stages_pb2.PreprocessResponse(study_instance_uid=self.name)


def _serve(servicer):
    spec = ServiceSpec(names=["cmrvl.v1.PreprocessService"],
                       register=lambda s: stages_pb2_grpc.add_PreprocessServiceServicer_to_server(servicer, s))
    return start_server(spec, load_settings(grpc_port=0, metrics_port=0, shutdown_grace_s=1))


@pytest.fixture()
def two_servers():
    servicers = [NamedPreprocess("a"), NamedPreprocess("b")]
    running = [_serve(s) for s in servicers]
    yield servicers, running
    for r in running:
        r.stop()


def _call(channel, timeout=10):
    return stages_pb2_grpc.PreprocessServiceStub(channel).Preprocess(stages_pb2.PreprocessRequest(), timeout=timeout)


def test_unary_calls_spread_over_every_address_of_the_target(two_servers):
    servicers, running = two_servers
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in running)
    with clients.open_channel(check_grpc_target(target)) as channel:
        # round_robin connects to every address, calls go to those already connected: call until
        # both answered (pick_first, gRPC's default, would send every call to "a").
        deadline = time.monotonic() + 10
        while not all(s.calls for s in servicers) and time.monotonic() < deadline:
            _call(channel)
        assert all(s.calls for s in servicers), [s.calls for s in servicers]
        before = [s.calls for s in servicers]
        answers = collections.Counter(_call(channel).study_instance_uid for _ in range(40))
    assert answers == {"a": 20, "b": 20}  # now strictly alternating
    assert [s.calls - b for s, b in zip(servicers, before)] == [20, 20]


def test_a_dns_target_is_resolved_and_called(two_servers):
    """The cluster's form (`dns:///<headless service>:port`); here the name is localhost."""
    servicers, running = two_servers
    with clients.open_channel(check_grpc_target(f"dns:///localhost:{running[1].port}")) as channel:
        assert {_call(channel).study_instance_uid for _ in range(3)} == {"b"}
    assert servicers[1].calls == 3


def test_a_replica_going_away_leaves_the_calls_to_the_others(two_servers):
    servicers, running = two_servers
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in running)
    with clients.open_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        running[0].stop()  # a pod drained away in a rolling update
        answers = collections.Counter(
            clients.call_with_retry(stages_pb2_grpc.PreprocessServiceStub(channel).Preprocess,
                                    stages_pb2.PreprocessRequest(), timeout_s=10, backoff_s=0.1,
                                    outage_s=10).study_instance_uid
            for _ in range(10))
    assert answers == {"b": 10}


def test_a_replica_answering_not_serving_gets_no_new_calls_while_it_is_still_up(two_servers):
    from grpc_health.v1 import health_pb2

    servicers, running = two_servers
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in running)
    with clients.open_channel(target) as channel:
        deadline = time.monotonic() + 10
        while not all(s.calls for s in servicers) and time.monotonic() < deadline:
            _call(channel)
        assert all(s.calls for s in servicers)
        running[0].health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # draining, still answering
        time.sleep(1)  # the channel's health Watch sees it
        answers = collections.Counter(_call(channel).study_instance_uid for _ in range(20))
        assert answers == {"b": 20}
        running[0].health.set("", health_pb2.HealthCheckResponse.SERVING)
        deadline = time.monotonic() + 10
        while _call(channel).study_instance_uid != "a" and time.monotonic() < deadline:
            pass  # back in the rotation
        assert time.monotonic() < deadline


def _connectivity(channel) -> list[grpc.ChannelConnectivity]:
    states: list[grpc.ChannelConnectivity] = []
    channel.subscribe(states.append, try_to_connect=True)
    return states


def test_servers_accept_the_keepalive_pings_of_idle_channels(monkeypatch):
    """Without the server's ping allowance, gRPC answers a client pinging between calls with
    GOAWAY too_many_pings after a few pings and the connection drops (seen as a reconnect)."""
    assert clients.KEEPALIVE_TIME_MS >= server.MIN_CLIENT_PING_INTERVAL_MS
    # The same ratio, scaled down so that several pings pass in a few seconds.
    monkeypatch.setattr(clients, "KEEPALIVE_TIME_MS", 600)
    monkeypatch.setattr(server, "MIN_CLIENT_PING_INTERVAL_MS", 200)
    running = _serve(NamedPreprocess("a"))
    try:
        with clients.open_channel(f"127.0.0.1:{running.port}") as channel:
            states = _connectivity(channel)
            assert _call(channel).study_instance_uid == "a"
            time.sleep(5)  # idle: about 8 pings, no data
            assert _call(channel).study_instance_uid == "a"
            assert states.count(grpc.ChannelConnectivity.READY) == 1, states  # never reconnected
            assert states[-1] == grpc.ChannelConnectivity.READY
    finally:
        running.stop()


def test_connections_are_recycled_without_cutting_a_call_in_flight(monkeypatch):
    """Servers close connections after MAX_CONNECTION_AGE_MS so that clients resolve `dns:///`
    targets again (new replicas get calls); a long stage call on the old connection finishes."""
    monkeypatch.setattr(server, "MAX_CONNECTION_AGE_MS", 500)
    running = _serve(NamedPreprocess("slow", pause_s=3.0))
    try:
        with clients.open_channel(f"127.0.0.1:{running.port}") as channel:
            states = _connectivity(channel)
            assert _call(channel).study_instance_uid == "slow"  # 3 s, past the connection's age
            time.sleep(1.0)
            assert _call(channel).study_instance_uid == "slow"
            assert states.count(grpc.ChannelConnectivity.READY) >= 2, states  # a new connection
    finally:
        running.stop()


@pytest.mark.parametrize("target", [
    "127.0.0.1:50053", "cmrvl-segmentation:50051", "[::1]:50051",
    "dns:///cmrvl-segmentation.cmrvl.svc.cluster.local:50051", "dns://10.96.0.10:53/seg.ns:50051",
    "ipv4:127.0.0.1:50053,127.0.0.1:50055", "ipv6:[::1]:50053,[::1]:50055",
])
def test_settings_accept_stage_targets(target):
    assert load_settings(segmentation_target=target).segmentation_target == target


@pytest.mark.parametrize("target", [
    "", "cmrvl-segmentation", "seg:0", "seg:70000", "dns:///seg", "http://seg:50051",
    "ipv4:127.0.0.1:1,", "ipv4:[::1]:50051", "ipv4:127.0.0.1:1,127.0.0.1:99999", "seg :50051",
])
def test_settings_refuse_other_stage_targets_with_the_variable_named(target):
    with pytest.raises(SettingsError) as err:
        load_settings(findings_target=target)
    message = str(err.value)
    assert "CMRVL_FINDINGS_TARGET" in message and "dns:///host:port" in message and len(message.splitlines()) == 1
