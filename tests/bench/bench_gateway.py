"""Gateway overhead per study and studies per minute, with the stages stubbed at a fixed latency.

The real gateway process and the real S3 server run as in `cmrvl up`; the three stage services
are replaced by in-process stubs that sleep `--latency` seconds and return pre-made artifacts, so
everything measured beyond the stubs' sleep is the gateway's own cost (upload, records, events,
report). The burst runs through one gateway replica, then through two (the studies alternate
between them) on the same workflow database. Prints the numbers; asserts nothing.

With `--replicas segmentation=2` the burst also runs against that many stub replicas of the stage
(`cmrvl up --replicas`), each serving `--stage-capacity` calls at a time like a GPU pod, and
prints studies/minute beside the one-replica run and their ratio: what spreading the gateway's
calls over the replicas buys.

    .venv/bin/python tests/bench/bench_gateway.py [--studies 20] [--latency 0.2]
        [--replicas segmentation=2 --stage-capacity 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cmrvl.v1 import common_pb2, stages_pb2, stages_pb2_grpc  # noqa: E402
from services.gateway.client import StudyClient  # noqa: E402
from services.runtime.settings import Settings  # noqa: E402
from services.runtime.stack import Stack, free_base_port  # noqa: E402
from services.runtime.storage import ObjectStore  # noqa: E402
from tests.dicom_factory import write_cine_study  # noqa: E402


class StubStages(stages_pb2_grpc.PreprocessServiceServicer, stages_pb2_grpc.SegmentationServiceServicer,
                 stages_pb2_grpc.FindingsServiceServicer):
    def __init__(self, store: ObjectStore, latency_s: float, capacity: int = 0, calls: list | None = None):
        self.latency_s = latency_s
        self.calls = calls if calls is not None else []  # one entry per stage call, shared by all stubs
        # Calls this replica works on at once (0: any); the others wait, as in a GPU pod's queue.
        self.slots = threading.BoundedSemaphore(capacity) if capacity else None
        bucket = store.bucket("artifacts")
        self.manifest = self._put(store, bucket, "bench/manifest.json", {"study_instance_uid": "1.2.3", "series": []})
        self.measurements = self._put(store, bucket, "bench/measurements.json", {"lv_ef_pct": 60.0, "quality": []})
        self.findings = self._put(store, bucket, "bench/findings.json", {"findings": [], "model": None})

    @staticmethod
    def _put(store, bucket, key, document):
        ref = store.put_json(bucket, key, document)
        return common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key)

    def _work(self) -> None:
        self.calls.append(1)  # list.append is atomic
        if self.slots is None:
            time.sleep(self.latency_s)
            return
        with self.slots:
            time.sleep(self.latency_s)

    def Preprocess(self, request, context):
        self._work()
        return stages_pb2.PreprocessResponse(manifest=self.manifest)

    def Segment(self, request, context):
        self._work()
        return stages_pb2.SegmentResponse(measurements=self.measurements)

    def GenerateFindings(self, request, context):
        self._work()
        return stages_pb2.FindingsResponse(findings=self.findings)


def measure(args, replicas: dict[str, int] | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stack = Stack(tmp / "stack")
        info = stack.up(base_port=free_base_port(), replicas=replicas, extra_env={
            "CMRVL_WORKFLOW_WORKERS": "8", "CMRVL_PREPROCESS_CONCURRENCY": "4",
            "CMRVL_SEGMENTATION_CONCURRENCY": "4", "CMRVL_FINDINGS_CONCURRENCY": "4"})
        try:
            store = ObjectStore(Settings(s3_endpoint=info.s3_endpoint, s3_access_key=info.access_key,
                                         s3_secret_key=info.secret_key))
            servers, calls = [], []
            for stage, add in (("preprocess", stages_pb2_grpc.add_PreprocessServiceServicer_to_server),
                               ("segmentation", stages_pb2_grpc.add_SegmentationServiceServicer_to_server),
                               ("findings", stages_pb2_grpc.add_FindingsServiceServicer_to_server)):
                for name in info.replica_names(stage):  # each replica's process makes way for a stub
                    stack.stop_service(name)
                    server = grpc.server(futures.ThreadPoolExecutor(16))
                    add(StubStages(store, args.latency, args.stage_capacity, calls), server)
                    server.add_insecure_port(info.address(name))
                    server.start()
                    servers.append(server)
            folders = []
            for i in range(args.studies):
                folder = tmp / f"study{i}"
                write_cine_study(folder, n_slices=4, n_phases=5, rows=32, cols=32, seed=i)
                folders.append(folder)

            def run(folder: Path, target: str = info.target("gateway"), tag: str = "") -> float:
                client = StudyClient(target, info.ris_token)
                try:
                    started = time.perf_counter()
                    study = client.submit_folder(folder, folder.name + tag)
                    for _ in client.watch(study.study_id):
                        pass
                    return time.perf_counter() - started
                finally:
                    client.close()

            sequential = [run(folders[0])] + [run(f) for f in folders[1:3]]
            # The stages a study really calls (findings is skipped: the stub segmentation has no masks).
            calls_per_study = len(calls) / len(sequential)
            stage_time = calls_per_study * args.latency
            overhead = statistics.median(sequential) - stage_time
            burst = folders[3:]

            def burst_rate(targets: list[str], tag: str) -> float:
                started = time.perf_counter()
                with futures.ThreadPoolExecutor(len(burst)) as pool:
                    list(pool.map(lambda i: run(burst[i], targets[i % len(targets)], tag), range(len(burst))))
                return 60 * len(burst) / (time.perf_counter() - started)

            one = burst_rate([info.target("gateway")], "")
            two = burst_rate([info.target("gateway"), stack.start_gateway_replica("bench-2")], "-two")
            result = {
                "stage_latency_s": args.latency,
                "end_to_end_median_s": round(statistics.median(sequential), 3),
                "gateway_overhead_per_study_s": round(overhead, 3),
                "overhead_ratio_to_stage_time": round(overhead / stage_time, 3),
                "burst_studies": len(burst),
                "studies_per_minute": round(one, 1),  # one gateway replica
                "studies_per_minute_2_gateway_replicas": round(two, 1),
                "ratio_2_to_1_gateway_replicas": round(two / one, 3),
                "stage_calls_per_study": round(calls_per_study, 2),
                "ideal_studies_per_minute_at_concurrency_4": round(60 * 4 / stage_time, 1),
            }
            for server in servers:
                server.stop(0)
            return result
        finally:
            stack.down()


def main() -> None:
    from services.runtime.stack_cli import parse_replicas

    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--replicas", action="append", metavar="STAGE=N",
                        help="also measure with N stub replicas of a stage (beside one of each)")
    parser.add_argument("--stage-capacity", type=int, default=0,
                        help="calls one stub replica works on at once (default 0: any)")
    args = parser.parse_args()
    replicas = parse_replicas(args.replicas)
    baseline = measure(args)
    if not replicas:
        print(json.dumps(baseline, indent=2))
        return
    scaled = measure(args, replicas)
    print(json.dumps({
        "stage_capacity": args.stage_capacity or "any",
        "one_replica_each": baseline,
        "replicas": {"replicas": replicas, **scaled},
        "studies_per_minute_ratio": round(scaled["studies_per_minute"] / baseline["studies_per_minute"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
