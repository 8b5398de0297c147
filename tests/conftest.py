"""Shared fixtures: the real local stack (SeaweedFS S3 + the four gRPC services as processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SUNNYBROOK_STUDY = SHARED_DATA / "sunnybrook" / "SCD0000101"
TEST_MAX_UPLOAD_MB = 64


def require(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"sample data missing in CI: {path}")
        pytest.skip(f"sample data not present: {path}")
    return path


def wait_for(predicate, timeout_s: float = 120, what: str = "condition"):
    """predicate()'s first truthy value, polled every 0.1 s; AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def object_store(info):
    """The object store of a local stack (its StackInfo), as the services reach it."""
    from services.runtime.settings import Settings
    from services.runtime.storage import ObjectStore

    return ObjectStore(Settings(s3_endpoint=info.s3_endpoint, s3_access_key=info.access_key,
                                s3_secret_key=info.secret_key))


def stage_of(client, study_id: str, stage):
    """One stage's state of a study, as the gateway reports it (GetStudy)."""
    return {s.stage: s for s in client.get_study(study_id).stages}[stage]


def run_small_studies(info, root: Path, n: int, seed: int = 0) -> list:
    """n small synthetic cine studies (4 slices x 5 phases, 24 x 24) submitted to the stack's
    gateway at once, each watched to its end; their final GetStudy answers, in order."""
    from concurrent.futures import ThreadPoolExecutor

    from services.gateway.client import StudyClient
    from tests.dicom_factory import write_cine_study

    folders = []
    for i in range(n):
        folder = root / f"study{seed + i}"
        write_cine_study(folder, n_slices=4, n_phases=5, rows=24, cols=24, seed=seed + i)
        folders.append(folder)

    def run(folder):
        client = StudyClient(info.target("gateway"), info.ris_token)
        try:
            study = client.submit_folder(folder, folder.name)
            list(client.watch(study.study_id, timeout_s=600))
            return client.get_study(study.study_id)
        finally:
            client.close()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, folders))


@pytest.fixture(scope="session")
def pacs(tmp_path_factory):
    """A real C-STORE receiver playing the PACS the gateway pushes SR + SEG to (a plain storage
    SCP: no hand-off, every object kept under <StudyInstanceUID>/)."""
    from services.preprocess.cstore import StudyReceiver

    receiver = StudyReceiver(tmp_path_factory.mktemp("pacs"), None, ae_title="PACS", port=0)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def small_sunnybrook(tmp_path_factory) -> Path:
    """The real Sunnybrook cine cut to its 4 middle slice locations, every phase (80 of its 240
    files): the same scanner's files at a third of the pipeline's time, for tests of the workflow
    rather than of the numbers."""
    import shutil

    import pydicom

    files = sorted(require(SUNNYBROOK_STUDY).glob("*.dcm"))
    location = {f: round(float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation), 1) for f in files}
    slices = sorted(set(location.values()))
    middle = set(slices[len(slices) // 2 - 2:len(slices) // 2 + 2])
    folder = tmp_path_factory.mktemp("sunnybrook-4-slices")
    for f in files:
        if location[f] in middle:
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def stack(tmp_path_factory, pacs):
    """One real stack for the session, on free ports, torn down at the end. Segmentation uses the
    shipped default model; findings run a tiny Qwen2.5-VL (random weights, built by the tests)
    in-process, since no real weights can be downloaded here."""
    from services.runtime.stack import Stack, free_base_port
    from vlm_fixtures import tiny_qwen25_vl

    stack = Stack(tmp_path_factory.mktemp("stack"))
    stack.up(
        base_port=free_base_port(),
        extra_env={"CMRVL_MAX_UPLOAD_MB": str(TEST_MAX_UPLOAD_MB), "CMRVL_RETRY_BACKOFF_S": "0.2",
                   "CMRVL_VLM_MODEL_DIR": str(tiny_qwen25_vl()), "CMRVL_VLM_MODEL": "tiny-qwen2.5-vl",
                   "CMRVL_PACS_TARGET": f"PACS@127.0.0.1:{pacs.port}"},
    )
    yield stack
    stack.down()


@pytest.fixture(scope="session")
def stack_info(stack):
    return stack.info()


@pytest.fixture(scope="session")
def store(stack_info):
    return object_store(stack_info)


@pytest.fixture()
def gateway(stack_info):
    from services.gateway.client import StudyClient

    client = StudyClient(stack_info.target("gateway"), stack_info.ris_token)
    yield client
    client.close()
