"""A study pushed by C-STORE (as a modality or PACS does) becomes a gateway submission, on the
real local stack; `cmrvl receive` logs per study, not per file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from cmrvl.v1 import study_pb2
from tests.conftest import REPO, SUNNYBROOK_STUDY, require
from tests.dicom_factory import write_cine_study

QUIET_S = 0.5


def _push(port: int, files) -> list[int]:
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(MRImageStorage)
    assoc = scu.associate("127.0.0.1", port, ae_title="CMRVL")
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(f)).Status for f in files]
    assoc.release()
    return statuses


def _wait_for(condition, timeout_s: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


def test_pushed_study_is_submitted_once_and_the_incoming_files_are_removed(stack_info, gateway, tmp_path):
    from services.gateway.dicom_ingest import make_submitter
    from services.preprocess.cstore import StudyReceiver

    spec = write_cine_study(tmp_path / "scanner", n_slices=4, n_phases=5)
    submitted = []
    incoming = tmp_path / "incoming"
    with StudyReceiver(incoming, make_submitter(stack_info.target("gateway"), stack_info.ris_token, submitted),
                       port=0, quiet_s=QUIET_S, keep_s=0.5) as receiver:
        assert set(_push(receiver.port, spec.files)) == {0x0000}
        _wait_for(lambda: submitted, what="the submission")
        study = submitted[0]
        assert study.study_instance_uid == spec.study_instance_uid
        _wait_for(lambda: not any(incoming.rglob("*.dcm")), 10, "the files to go")  # after keep_s
        # The same push again is the same submission, not a second study.
        assert set(_push(receiver.port, spec.files)) == {0x0000}
        _wait_for(lambda: len(submitted) == 2, what="the second submission")
    assert submitted[1].study_id == study.study_id
    final = list(gateway.watch(study.study_id, timeout_s=300))[-1]
    assert final.percent == 100.0


def test_pushed_study_stays_on_disk_when_the_gateway_is_unreachable(tmp_path, caplog):
    from services.gateway.dicom_ingest import make_submitter
    from services.preprocess.cstore import StudyReceiver

    spec = write_cine_study(tmp_path / "scanner", n_slices=4, n_phases=5)
    incoming = tmp_path / "incoming"
    submitted = []
    with StudyReceiver(incoming, make_submitter("127.0.0.1:9", "token", submitted), port=0,
                       quiet_s=QUIET_S, keep_s=0) as receiver:
        assert set(_push(receiver.port, spec.files)) == {0x0000}
        failed = _wait_for(lambda: [r for r in caplog.records if "hand-off failed" in r.getMessage()],
                           what="the failed hand-off")
        time.sleep(1.0)
    assert not submitted
    assert "gateway 127.0.0.1:9: UNAVAILABLE" in failed[0].getMessage()
    assert len(list(incoming.rglob("*.dcm"))) == len(spec.files)  # no data lost


def test_a_re_sent_study_runs_again_after_its_run_failed(stack_info, gateway, tmp_path):
    from services.gateway.dicom_ingest import make_submitter
    from services.preprocess.cstore import StudyReceiver

    # Images without position/orientation: preprocessing fails the study ("no usable short-axis cine").
    spec = write_cine_study(tmp_path / "scanner", n_slices=3, n_phases=5, rows=8, cols=8)
    for path in spec.files:
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.save_as(path)
    submitted = []
    with StudyReceiver(tmp_path / "incoming", make_submitter(stack_info.target("gateway"), stack_info.ris_token,
                                                             submitted), port=0, quiet_s=QUIET_S) as receiver:
        runs = []
        for attempt in range(2):
            _push(receiver.port, spec.files)
            _wait_for(lambda: len(submitted) > attempt, what=f"submission {attempt}")
            runs.append(submitted[attempt])
            assert list(gateway.watch(runs[-1].study_id, timeout_s=120))[-1].status == study_pb2.STUDY_STATUS_FAILED
    first, second = runs
    assert second.study_id != first.study_id  # a new run, not the old failed study again
    assert second.client_request_id == f"{first.client_request_id}:retry-1"
    assert gateway.get_study(second.study_id).error.startswith("preprocess failed")


def test_cmrvl_receive_submits_a_real_study_and_logs_per_study_not_per_file(stack_info, gateway, tmp_path):
    from orthanc_server import free_port

    files = sorted(require(SUNNYBROOK_STUDY).glob("*.dcm"))
    port = free_port()
    env = {**os.environ, "CMRVL_TOKEN": stack_info.ris_token}
    receive = subprocess.Popen(
        [sys.executable, "-m", "services", "receive", "--target", stack_info.target("gateway"),
         "--port", str(port), "--incoming", str(tmp_path / "incoming"), "--quiet-s", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: subprocess.run(["echoscu", "-aec", "CMRVL", "127.0.0.1", str(port)],
                                                 capture_output=True).returncode == 0,
                  30, "cmrvl receive to listen")
        pushes = [subprocess.run(["storescu", "-aec", "CMRVL", "127.0.0.1", str(port), *map(str, half)],
                                 capture_output=True) for half in (files[:120], files[120:])]
        assert all(p.returncode == 0 for p in pushes)
        _wait_for(lambda: any((tmp_path / "incoming" / ".submissions").rglob("*.done")), 120, "the submission")
    finally:
        receive.terminate()
        output = receive.communicate(timeout=60)[0]
    lines = output.strip().splitlines()
    assert receive.returncode == 0, output[-3000:]
    submitted = [line for line in lines if "submitted to" in line]
    assert len(submitted) == 1, output[-3000:]
    assert "Invalid value" not in output and len(lines) < 15, output[-3000:]  # not one line per file
    study_id = submitted[0].split(" as ")[1].split()[0]
    assert gateway.get_study(study_id).study_instance_uid == str(pydicom.dcmread(files[0]).StudyInstanceUID)
    # Its run is not this test's subject (tests/integration/test_pacs_round_trip.py follows one to the
    # report): stop it, so that it does not load the shared stack.
    gateway.stub.CancelStudy(study_pb2.CancelStudyRequest(study_id=study_id), metadata=gateway.metadata)


def test_cmrvl_receive_refuses_bad_options_in_one_line(tmp_path):
    from orthanc_server import free_port

    def receive(*args):
        return subprocess.run([sys.executable, "-m", "services", "receive", "--target", "127.0.0.1:9",
                               "--incoming", str(tmp_path / "incoming"), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60)

    long_title = receive("--ae-title", "A_TITLE_LONGER_THAN_16", "--port", str(free_port()))
    assert long_title.returncode == 1
    assert long_title.stderr.strip().splitlines()[-1].startswith("cmrvl receive: error: Invalid 'ae_title'")
    negative = receive("--quiet-s", "-3")
    assert negative.returncode == 2 and "expected seconds >= 0" in negative.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = receive("--port", str(busy.getsockname()[1]))
    assert taken.returncode == 1
    assert taken.stderr.strip().splitlines()[-1].startswith("cmrvl receive: error: cannot listen on 127.0.0.1:")
