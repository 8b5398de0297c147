"""The local stack's real processes: health, reflection, metrics, object store credentials."""

from __future__ import annotations

import io
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio
from minio.error import S3Error

SERVICES = {
    "gateway": "cmrvl.v1.StudyService",
    "preprocess": "cmrvl.v1.PreprocessService",
    "segmentation": "cmrvl.v1.SegmentationService",
    "findings": "cmrvl.v1.FindingsService",
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_answers_health_checks_without_credentials(stack_info, service):
    with grpc.insecure_channel(stack_info.target(service)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICES[service]):
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="cmrvl.v1.NoSuchService"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_reflection_lists_the_service(stack_info, service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(stack_info.target(service)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert SERVICES[service] in names and "grpc.health.v1.Health" in names


def test_prometheus_endpoint_counts_rpcs(stack_info):
    port = stack_info.base_port + 11  # gateway metrics
    with grpc.insecure_channel(stack_info.target("gateway")) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'cmrvl_rpc_total{code="OK",method="/grpc.health.v1.Health/Check"}' in text


def test_stage_services_reject_calls_without_the_internal_token(stack_info):
    from cmrvl.v1 import stages_pb2, stages_pb2_grpc

    with grpc.insecure_channel(stack_info.target("preprocess")) as channel:
        stub = stages_pb2_grpc.PreprocessServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Preprocess(stages_pb2.PreprocessRequest(study_id="x"), timeout=5,
                            metadata=(("authorization", "Bearer wrong"),))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_object_store_round_trip(store):
    bucket = store.bucket("artifacts")
    key = f"tests/{uuid.uuid4().hex}/hello.json"
    ref = store.put_json(bucket, key, {"hello": "world"})
    assert ref.size_bytes > 0 and len(ref.sha256) == 64
    assert store.get_json(bucket, key) == {"hello": "world"}
    assert store.exists(bucket, key)
    assert list(store.list_keys(bucket, key.rsplit("/", 1)[0] + "/")) == [key]
    store.delete_prefix(bucket, key.rsplit("/", 1)[0] + "/")
    assert not store.exists(bucket, key)


def test_object_store_refuses_a_wrong_secret_and_anonymous_access(stack_info, store):
    from services.runtime.settings import Settings
    from services.runtime.storage import ObjectStore, StorageAuthError

    bucket = store.bucket("artifacts")
    store.put_bytes(bucket, "tests/secret.txt", b"patient data")
    wrong = ObjectStore(Settings(s3_endpoint=stack_info.s3_endpoint, s3_access_key=stack_info.access_key,
                                 s3_secret_key="not-the-secret"))
    with pytest.raises(StorageAuthError):
        wrong.get_bytes(bucket, "tests/secret.txt")
    with pytest.raises(StorageAuthError):
        wrong.put_bytes(bucket, "tests/overwrite.txt", b"x")
    anonymous = Minio(stack_info.s3_endpoint, secure=False)
    with pytest.raises(S3Error) as err:
        anonymous.get_object(bucket, "tests/secret.txt").read()
    assert err.value.code == "AccessDenied"
    with pytest.raises(StorageAuthError, match="no anonymous access"):
        ObjectStore(Settings(s3_endpoint=stack_info.s3_endpoint))
    assert not store.exists(bucket, "tests/overwrite.txt")


def test_cmrvl_up_and_down_refuse_with_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    def cmrvl(*args):
        return subprocess.run([sys.executable, "-m", "services", *args, "--stack-dir", str(tmp_path / "stack")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    too_high = cmrvl("up", "--base-port", "60000")  # its S3 admin port would be 70024
    assert too_high.returncode == 1
    assert too_high.stderr.strip().splitlines() == [
        "cmrvl up: error: base port 60000 out of range: the stack uses base .. base+10024, "
        "so the base must be between 1024 and 55511"]
    assert not (tmp_path / "stack" / "stack.json").exists()  # nothing was started
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "stack.json").write_text("{not json")
    for command in ("up", "down"):
        broken = cmrvl(command)
        assert broken.returncode == 1
        assert len(broken.stderr.strip().splitlines()) == 1 and "Traceback" not in broken.stderr, broken.stderr
        assert "is not a stack's state" in broken.stderr


def test_cmrvl_up_refuses_bad_replicas_with_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    for value, message in (
        ("gateway=2", "cannot run replicas of 'gateway': only preprocess, segmentation, findings can"),
        ("segmentation", "--replicas 'segmentation': expected STAGE=N, e.g. segmentation=2"),
        ("segmentation=0", "replicas of segmentation must be a whole number of at least 1, not 0"),
        ("segmentation=5,findings=3", "6 replicas beyond the first of each stage asked for"),
    ):
        # An out-of-range base port too, so that nothing could start if the replicas passed.
        result = subprocess.run([sys.executable, "-m", "services", "up", "--replicas", value, "--base-port", "60000",
                                 "--stack-dir", str(tmp_path / "stack")],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cmrvl up: error: ") and message in lines[0], result.stderr
        assert not (tmp_path / "stack" / "stack.json").exists()  # nothing was started


def test_replica_ports_stay_in_the_checked_range_and_the_default_stack_is_unchanged():
    from services.runtime.stack import GRPC_OFFSETS, STAGES, StackInfo, _ports, check_replicas

    base = 20000
    default = StackInfo(base, "a", "s", "r", "i")
    assert default.processes() == list(STAGES)
    for service, offset in GRPC_OFFSETS.items():
        assert default.target(service) == f"127.0.0.1:{base + offset}"
        assert default.metrics_port(service) == base + 10 + offset
    replicas = check_replicas({"segmentation": 3, "findings": 2, "preprocess": 2})
    scaled = StackInfo(base, "a", "s", "r", "i", replicas=replicas)
    ports = [p for name in scaled.processes() for p in (scaled.grpc_port(name), scaled.metrics_port(name))]
    assert len(set(ports)) == len(ports)  # every process on its own ports
    assert set(ports) <= set(_ports(base)) - {base + 20 + i for i in range(20)}  # free_base_port checks them; not S3's
    assert scaled.target("segmentation").startswith("ipv4:") and scaled.target("segmentation").count(",") == 2
    assert {n: scaled.service_env(n)["CMRVL_GRPC_PORT"] for n in ("segmentation-2", "segmentation-3")} == \
        {"segmentation-2": str(base + 6), "segmentation-3": str(base + 7)}  # preprocess-2 has +5
