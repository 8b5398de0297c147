"""Integration tier: the whole PACS loop on real servers. A real Orthanc (loopback, temporary
configuration) pushes the Sunnybrook study to `cmrvl receive`, which submits it to a real local
stack whose report stage C-STOREs the SR and SEG back into Orthanc's study. The report covers all
240 images with the EF that `cmrvl analyze` gives on the same folder.

About 6.5 minutes on 2 cores (two Sunnybrook runs: through the PACS loop, and `cmrvl analyze`);
the default tier's tests/test_pacs_orthanc.py covers the receiver side with Orthanc in seconds.

    .venv/bin/python -m pytest -q -m integration tests/integration/test_pacs_round_trip.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, SUNNYBROOK_STUDY, require
from tests.orthanc_server import OrthancError, OrthancServer, free_port

pytestmark = pytest.mark.integration


def test_orthanc_to_cmrvl_receive_to_the_stack_and_the_sr_and_seg_back_into_orthanc(tmp_path):
    from cmrvl.v1 import study_pb2
    from services.gateway.client import StudyClient
    from services.runtime.settings import Settings
    from services.runtime.stack import Stack, free_base_port
    from services.runtime.storage import ObjectStore

    folder = require(SUNNYBROOK_STUDY)
    files = sorted(folder.glob("*.dcm"))
    receive_port = free_port()
    # One modality entry both ways: Orthanc pushes to it, and accepts C-STORE from its AET + host.
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={"cmrvl": ("CMRVL", "127.0.0.1", receive_port)})
    stack = Stack(tmp_path / "stack")
    receive = None
    try:
        orthanc.start()
        stack.up(base_port=free_base_port(), extra_env={"CMRVL_PACS_TARGET": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"})
        info = stack.info()
        receive = subprocess.Popen(
            [sys.executable, "-m", "services", "receive", "--target", info.target("gateway"), "--port",
             str(receive_port), "--incoming", str(tmp_path / "incoming"), "--quiet-s", "2"],
            cwd=REPO, env={**os.environ, "CMRVL_TOKEN": info.ris_token}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        orthanc_study = {a["ParentStudy"] for a in orthanc.upload(files)}.pop()
        deadline = time.monotonic() + 30
        while not _echo(orthanc):  # cmrvl receive is listening
            assert time.monotonic() < deadline and receive.poll() is None, "cmrvl receive did not start"
            time.sleep(0.3)
        answer = orthanc.post("/modalities/cmrvl/store", {"Resources": [orthanc_study], "Synchronous": True})
        assert answer["FailedInstancesCount"] == 0

        client = StudyClient(info.target("gateway"), info.ris_token)
        try:
            deadline = time.monotonic() + 120
            while not (studies := client.stub.ListStudies(study_pb2.ListStudiesRequest(), metadata=client.metadata)
                       .studies):
                assert time.monotonic() < deadline, "cmrvl receive did not submit the study"
                time.sleep(0.5)
            assert len(studies) == 1
            study = studies[0]
            final = list(client.watch(study.study_id, timeout_s=600))[-1]
            report = json.loads(client.get_report(study.study_id).report_json)
        finally:
            client.close()
        store = ObjectStore(Settings(s3_endpoint=info.s3_endpoint, s3_access_key=info.access_key,
                                     s3_secret_key=info.secret_key))
        manifest = store.get_json(store.bucket("artifacts"), f"{study.study_id}/preprocess/manifest.json")
        back = {s["MainDicomTags"].get("Modality"): len(s["Instances"])
                for s in orthanc.get(f"/studies/{orthanc_study}/series")}
    finally:
        if receive is not None:
            receive.terminate()
            receive.communicate(timeout=60)
        stack.down()
        orthanc.stop()

    assert final.status in (study_pb2.STUDY_STATUS_COMPLETED, study_pb2.STUDY_STATUS_PARTIAL)
    assert manifest["series"][0]["n_files"] == 240
    assert (report["series"][0]["n_slices"], report["series"][0]["n_phases"]) == (12, 20)
    assert report["dicom"].get("pushed_to") == f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", report["quality"]
    assert back.get("MR") == 240 and back.get("SR") == 1 and back.get("SEG", 0) >= 1, back  # in the source study

    analyzed = subprocess.run([sys.executable, "-m", "services", "analyze", str(folder), "--out", str(tmp_path / "out")],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    expected = json.loads((tmp_path / "out" / "report.json").read_text())["measurements"]
    print(f"PACS loop: {manifest['series'][0]['n_files']} images, LV EF {report['measurements']['lv_ef_pct']} %; "
          f"cmrvl analyze: LV EF {expected['lv_ef_pct']} %; back in Orthanc: {back}")
    assert report["measurements"]["lv_ef_pct"] == expected["lv_ef_pct"]
    assert report["measurements"]["lv_edv_ml"] == expected["lv_edv_ml"]


def _echo(orthanc: OrthancServer) -> bool:
    try:
        orthanc.post("/modalities/cmrvl/echo", {})
        return True
    except OrthancError:
        return False
