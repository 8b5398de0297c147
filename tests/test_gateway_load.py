"""A burst of studies queues behind the per-stage limits instead of overloading the stages."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from cmrvl.v1 import study_pb2
from tests.dicom_factory import write_cine_study

N_STUDIES = 20


@pytest.fixture()
def limited_stack(tmp_path):
    from services.runtime.stack import Stack, free_base_port

    stack = Stack(tmp_path / "stack")
    stack.up(base_port=free_base_port(), extra_env={
        "CMRVL_WORKFLOW_WORKERS": "8", "CMRVL_PREPROCESS_CONCURRENCY": "2",
        "CMRVL_SEGMENTATION_CONCURRENCY": "1", "CMRVL_FINDINGS_CONCURRENCY": "1",
    })
    yield stack
    stack.down()


def _peaks(metrics_text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^cmrvl_stage_inflight_peak\{stage="(\w+)"\} ([0-9.]+)$', metrics_text, re.M)}


def test_twenty_concurrent_studies_complete_within_the_stage_limits(limited_stack, tmp_path):
    from services.gateway.client import StudyClient

    info = limited_stack.info()
    folders = []
    for i in range(N_STUDIES):
        folder = tmp_path / f"study{i}"
        write_cine_study(folder, n_slices=4, n_phases=5, rows=24, cols=24, seed=i)
        folders.append(folder)

    def run(folder):
        client = StudyClient(info.target("gateway"), info.ris_token)
        try:
            study = client.submit_folder(folder, folder.name)
            list(client.watch(study.study_id, timeout_s=600))
            return client.get_study(study.study_id)
        finally:
            client.close()

    with ThreadPoolExecutor(N_STUDIES) as pool:
        finals = list(pool.map(run, folders))
    assert len({s.study_id for s in finals}) == N_STUDIES
    assert all(s.status in (study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL) for s in finals), \
        [s.error for s in finals]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{info.base_port + 11}/metrics", timeout=5).read().decode()
    peaks = _peaks(metrics)
    assert 1 <= peaks["preprocess"] <= 2
    assert peaks.get("segmentation", 0) <= 1 and peaks.get("findings", 0) <= 1
    finished = re.findall(r'^cmrvl_studies_finished_total\{status="\w+"\} ([0-9.]+)$', metrics, re.M)
    assert sum(float(v) for v in finished) == N_STUDIES
