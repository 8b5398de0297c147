"""A burst of studies queues behind the per-stage limits instead of overloading the stages, and
the gateway's watchers behind its watch limit instead of starving its other calls."""

from __future__ import annotations

import re
import urllib.request

import pytest

from cmrvl.v1 import study_pb2
from tests.conftest import run_small_studies

N_STUDIES = 20


@pytest.fixture()
def limited_stack(tmp_path):
    from services.runtime.stack import Stack, free_base_port

    stack = Stack(tmp_path / "stack")
    stack.up(base_port=free_base_port(), extra_env={
        "CMRVL_WORKFLOW_WORKERS": "8", "CMRVL_PREPROCESS_CONCURRENCY": "2",
        "CMRVL_SEGMENTATION_CONCURRENCY": "1", "CMRVL_FINDINGS_CONCURRENCY": "1",
        # 16 threads: 12 WatchStudy streams at once, fewer than the 20 watching clients.
        "CMRVL_GRPC_WORKERS": "16",
    })
    yield stack
    stack.down()


def _peaks(metrics_text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^cmrvl_stage_inflight_peak\{stage="(\w+)"\} ([0-9.]+)$', metrics_text, re.M)}


def test_twenty_concurrent_studies_complete_within_the_stage_limits(limited_stack, tmp_path):
    info = limited_stack.info()
    finals = run_small_studies(info, tmp_path, N_STUDIES)
    assert len({s.study_id for s in finals}) == N_STUDIES
    assert all(s.status in (study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL) for s in finals), \
        [s.error for s in finals]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{info.base_port + 11}/metrics", timeout=5).read().decode()
    peaks = _peaks(metrics)
    assert 1 <= peaks["preprocess"] <= 2
    assert peaks.get("segmentation", 0) <= 1 and peaks.get("findings", 0) <= 1
    finished = re.findall(r'^cmrvl_studies_finished_total\{status="\w+"\} ([0-9.]+)$', metrics, re.M)
    assert sum(float(v) for v in finished) == N_STUDIES
    # The watchers beyond the limit were told so (and watched again later): nobody waited on a thread.
    refused = re.findall(r'^cmrvl_rpc_total\{code="RESOURCE_EXHAUSTED",method="/cmrvl.v1.StudyService/WatchStudy"\} '
                         r'([0-9.]+)$', metrics, re.M)
    assert refused and float(refused[0]) >= 1, "no watcher was refused: the limit did not apply"
