"""A stage scaled out to two replicas in the local stack (real processes on loopback): the
gateway's calls reach both, as they should reach every pod of a scaled-out Deployment."""

from __future__ import annotations

import re
import signal
import urllib.request

import pytest

from cmrvl.v1 import study_pb2
from tests.conftest import run_small_studies

N_STUDIES = 4
SEGMENT = "/cmrvl.v1.SegmentationService/Segment"


@pytest.fixture(scope="module")
def replica_stack(tmp_path_factory):
    from services.runtime.stack import Stack, free_base_port

    stack = Stack(tmp_path_factory.mktemp("replicas") / "stack")
    stack.up(base_port=free_base_port(), replicas={"segmentation": 2},
             extra_env={"CMRVL_RETRY_BACKOFF_S": "0.2"})  # the gateway's segmentation limit: 2 (one a replica)
    yield stack
    stack.down()


def _segment_calls(info, name: str) -> float:
    """Segment calls one replica answered, from its own Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{info.metrics_port(name)}/metrics", timeout=5).read().decode()
    pattern = rf'^cmrvl_rpc_total\{{code="(\w+)",method="{re.escape(SEGMENT)}"\}} ([0-9.e+]+)$'
    return sum(float(m.group(2)) for m in re.finditer(pattern, text, re.M))


def test_the_gateway_spreads_segment_calls_over_both_replicas(replica_stack, tmp_path):
    info = replica_stack.info()
    assert info.processes().count("segmentation-2") == 1
    assert info.target("segmentation") == (f"ipv4:127.0.0.1:{info.grpc_port('segmentation')},"
                                           f"127.0.0.1:{info.grpc_port('segmentation-2')}")
    assert info.service_env("gateway")["CMRVL_SEGMENTATION_TARGET"] == info.target("segmentation")
    assert info.service_env("gateway")["CMRVL_SEGMENTATION_CONCURRENCY"] == "2"  # both replicas' calls
    before = {name: _segment_calls(info, name) for name in ("segmentation", "segmentation-2")}

    finals = run_small_studies(info, tmp_path, N_STUDIES, seed=0)

    assert all(s.status in (study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL) for s in finals), \
        [s.error for s in finals]
    served = {name: _segment_calls(info, name) - before[name] for name in before}
    # One Segment call per study, round robin: each replica got some (pick_first: all on one).
    assert sum(served.values()) == N_STUDIES, served
    assert all(calls >= 1 for calls in served.values()), served


def test_a_stopped_replica_is_started_again_by_up_on_its_own_port(replica_stack):
    info = replica_stack.info()
    port = info.grpc_port("segmentation-2")
    old = info.pids["segmentation-2"]
    replica_stack.stop_service("segmentation-2", signal.SIGKILL)
    assert not replica_stack.running()
    with pytest.raises(RuntimeError, match="running with --replicas segmentation=2; run `cmrvl down` first"):
        replica_stack.up(replicas={"segmentation": 3})  # a running stack keeps its replicas
    restarted = replica_stack.up()
    assert replica_stack.running()
    assert restarted.pids["segmentation-2"] != old and restarted.grpc_port("segmentation-2") == port
    assert restarted.pids["segmentation"] == info.pids["segmentation"]  # the other one untouched
    assert (replica_stack.dir / "logs" / "segmentation-2.log").exists()
