"""PACS push (issue 15): CMRVL_PACS_TARGET parsing and its start-up check, C-STORE of the real
Sunnybrook SR/SEG/PDF to real pynetdicom receivers on 127.0.0.1 and [::1], the peer's answers in
the log and in PacsPushError (a rejected association says why), and the report objects built
without a pydicom warning per invalid source UID (the report lists them once)."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from services.gateway.pacs import PacsPushError, parse_target, push
from services.preprocess.cstore import StudyReceiver
from services.runtime.settings import SettingsError, load_settings

SUNNYBROOK = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sunnybrook"
STUDY = SUNNYBROOK / "SCD0000101"
needs_sunnybrook = pytest.mark.skipif(not (SUNNYBROOK / "link.csv").is_file(),
                                      reason=f"sample data absent: {SUNNYBROOK}")


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("target, expected", [
    ("ORTHANC@127.0.0.1:4242", ("ORTHANC", "127.0.0.1", 4242)),
    ("PACS@pacs.hospital.local:104", ("PACS", "pacs.hospital.local", 104)),
    ("PACS@[::1]:11112", ("PACS", "::1", 11112)),
    ("PACS@[fe80::1%eth0]:104", ("PACS", "fe80::1%eth0", 104)),
])
def test_parse_target_accepts_v4_names_and_bracketed_v6(target, expected):
    assert parse_target(target) == expected


@pytest.mark.parametrize("target", [
    "", "PACS", "PACS@host", "@host:104", "PACS@:104", "PACS@host:", "PACS@host:x104", "PACS@host:0",
    "PACS@host:70000", "PACS@::1:104", "PACS@[::1]", "PACS@[::1]104", "PACS@[]:104", "PACS@[127.0.0.1]:104",
    "A_TITLE_LONGER_THAN_16@host:104", "   @host:104", "PA\\CS@host:104",
])
def test_parse_target_rejects_bad_forms(target):
    with pytest.raises(ValueError, match="AET@host:port"):
        parse_target(target)


def test_bad_pacs_target_is_a_settings_error():
    with pytest.raises(SettingsError, match=r"CMRVL_PACS_TARGET: .*AET@host:port.*'PACS@\[::1\]'"):
        load_settings(pacs_target="PACS@[::1]")
    assert load_settings(pacs_target="PACS@[::1]:104").pacs_target == "PACS@[::1]:104"
    assert load_settings().pacs_target == ""  # empty: no push


def test_gateway_refuses_to_start_with_a_bad_pacs_target(tmp_path):
    cmrvl = shutil.which("cmrvl", path=str(Path(sys.executable).parent))
    assert cmrvl, "the cmrvl entry point is not installed in this environment"
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "CMRVL_PACS_TARGET": "PACS@127.0.0.1",
           "CMRVL_AUTH_TOKENS": "t", "CMRVL_S3_ACCESS_KEY": "k", "CMRVL_S3_SECRET_KEY": "s",
           "CMRVL_S3_ENDPOINT": "127.0.0.1:1", "CMRVL_GRPC_PORT": "0", "CMRVL_METRICS_PORT": "0"}
    done = subprocess.run([cmrvl, "serve", "gateway"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "cmrvl serve: error: invalid configuration: CMRVL_PACS_TARGET: Value error, PACS target must look like "
        "AET@host:port or AET@[ipv6]:port (AE title of 1-16 characters, port 1-65535), got 'PACS@127.0.0.1'"]


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """The report stage's DICOM objects of the Sunnybrook study (invalid UIDs: leading zeros), built as
    services.gateway.report builds them, counting pydicom's log records and warnings meanwhile."""
    if not (SUNNYBROOK / "link.csv").is_file():
        pytest.skip(f"sample data absent: {SUNNYBROOK}")
    import pydicom

    from services.gateway.dicom_pdf import build_encapsulated_pdf
    from services.gateway.dicom_sr import build_sr, seg_source_uids
    from services.preprocess.study import preprocess_study
    from services.segmentation.dicom_seg import build_segs, cine_entry, read_source_headers
    from services.segmentation.function import measure_labels
    from training.nnunet.sunnybrook import load_case

    manifest = preprocess_study(STUDY, tmp_path_factory.mktemp("pre"))
    entry = cine_entry(manifest)
    case = load_case(STUDY, SUNNYBROOK / "contours" / "SC-HF-I-1")
    labels = np.zeros((entry["columns"], entry["rows"], entry["n_slices"], entry["n_phases"]), np.uint8)
    labels[..., case.ed_phase], labels[..., case.es_phase] = case.labels["ed"], case.labels["es"]
    measurements = measure_labels(labels, np.array(entry["affine"]), height_m=1.75, weight_kg=70)
    model = {"name": "sunnybrook-contours", "version": "1.0", "backend": "expert"}
    report = {"measurements": {k: v for k, v in measurements.items()
                               if k not in ("quality", "model", "lv_volume_curve_ml", "rv_volume_curve_ml")},
              "models": {"segmentation": model, "vlm": None}}

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pydicom").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segs = build_segs(STUDY, manifest, labels, model, measurements=measurements, run="run-1")
            headers = list(read_source_headers(STUDY, seg_source_uids(segs.values())).values())
            files = {f"seg_phase{phase:02d}.dcm": seg for phase, seg in segs.items()}
            files["sr.dcm"] = build_sr(segs, headers, report, run="run-1")
            encoded = {}
            for name, dataset in files.items():
                buffer = io.BytesIO()
                dataset.save_as(buffer, enforce_file_format=True)
                encoded[name] = buffer.getvalue()
            made_from = {n: pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True) for n, d in encoded.items()}
            pdf = build_encapsulated_pdf(b"%PDF-1.4\n%%EOF\n", made_from["sr.dcm"], list(made_from.values()),
                                         run="run-1")
            buffer = io.BytesIO()
            pdf.save_as(buffer, enforce_file_format=True)
            encoded["pdf.dcm"] = buffer.getvalue()
    finally:
        logging.getLogger("pydicom").removeHandler(handler)
    invalid_ui = [r.getMessage() for r in records if "Invalid value for VR UI" in r.getMessage()]
    invalid_ui += [str(w.message) for w in caught if "Invalid value for VR UI" in str(w.message)]
    sops = {name: str(made_from[name].SOPInstanceUID) for name in made_from}
    sops["pdf.dcm"] = str(pdf.SOPInstanceUID)
    return SimpleNamespace(encoded=encoded, sops=sops, invalid_ui=invalid_ui,
                           study_uid=str(made_from["sr.dcm"].StudyInstanceUID))


class Peer:
    """A real pynetdicom C-STORE SCP that keeps the SOP instance UID of what it is sent and answers
    `status` (or `refuse[sop class]`)."""

    def __init__(self, host: str, status: int = 0x0000, refuse: dict[str, int] | None = None):
        self.received: dict[str, str] = {}
        self.status, self.refuse = status, refuse or {}
        ae = AE(ae_title="PEER")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server((host, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        request = event.request
        self.received[str(request.AffectedSOPInstanceUID)] = str(request.AffectedSOPClassUID)
        return self.refuse.get(str(request.AffectedSOPClassUID), self.status)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


@needs_sunnybrook
def test_report_objects_of_a_study_with_invalid_uids_warn_at_most_a_handful_of_times(objects):
    # Before quiet building, pydicom logged and warned this ~200 times per study (per element, per object).
    assert len(objects.invalid_ui) <= 3, objects.invalid_ui[:5]
    from services.preprocess.reader import is_valid_uid

    assert not is_valid_uid(objects.study_uid)  # copied from the source as it is: the study really has them


@needs_sunnybrook
def test_push_to_a_receiver_on_ipv4_loopback_stores_every_object_and_logs_the_answers(objects, caplog):
    caplog.set_level(logging.INFO)
    with Peer("127.0.0.1") as peer:
        statuses = push(objects.encoded, f"PEER@127.0.0.1:{peer.port}", study_id="study-4")
    assert statuses == {name: 0 for name in objects.encoded}
    assert set(peer.received) == set(objects.sops.values())
    answer = [r.getMessage() for r in caplog.records if r.name == "services.gateway.pacs"]
    assert answer == [f"study study-4: PACS push to PEER@127.0.0.1:{peer.port}, association accepted: "
                      + ", ".join(f"{name} status 0x0000" for name in objects.encoded)]
    assert not [r for r in caplog.records if "Invalid value for VR UI" in r.getMessage()]


@needs_sunnybrook
@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_push_to_a_receiver_on_ipv6_loopback(objects, tmp_path):
    with Peer("::1") as peer:
        assert push(objects.encoded, f"PEER@[::1]:{peer.port}", study_id="study-6") == {
            name: 0 for name in objects.encoded}
    assert set(peer.received) == set(objects.sops.values())
    # The project's own receiver, listening on ::1, accepts them too (derived objects: acknowledged).
    with StudyReceiver(tmp_path / "incoming", None, host="::1", port=0, quiet_s=0.5) as receiver:
        assert set(push(objects.encoded, f"CMRVL@[::1]:{receiver.port}").values()) == {0}


@needs_sunnybrook
def test_a_refused_object_is_named_with_its_status(objects, caplog):
    caplog.set_level(logging.INFO, logger="services.gateway.pacs")
    sr_class = "1.2.840.10008.5.1.4.1.1.88.34"
    with Peer("127.0.0.1", refuse={sr_class: 0xA700}) as peer:  # A700: out of resources
        with pytest.raises(PacsPushError, match=r"did not store: sr.dcm \(status 0xA700\)$"):
            push(objects.encoded, f"PEER@127.0.0.1:{peer.port}", study_id="study-7")
    assert set(peer.received) == set(objects.sops.values())  # the others were sent, in one association
    (record,) = [r for r in caplog.records if r.name == "services.gateway.pacs"]
    assert record.levelno == logging.WARNING and "sr.dcm status 0xA700" in record.getMessage()
    assert "seg_phase" in record.getMessage() and "status 0x0000" in record.getMessage()


@needs_sunnybrook
def test_a_rejected_association_says_why(objects, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="services.gateway.pacs")
    with StudyReceiver(tmp_path / "incoming", None, port=0, quiet_s=0.5, allowed_calling_aets=["MODALITY"]) as rx:
        target = f"CMRVL@127.0.0.1:{rx.port}"
        with pytest.raises(PacsPushError) as err:
            push(objects.encoded, target, calling_aet="STRANGER", study_id="study-9")
        with pytest.raises(PacsPushError, match="Called AE title not recognised"):
            push(objects.encoded, f"WRONG@127.0.0.1:{rx.port}", calling_aet="MODALITY")
        assert set(push(objects.encoded, target, calling_aet="MODALITY").values()) == {0}
    assert str(err.value) == (f"PACS {target}: association rejected: Rejected Permanent, "
                              "source Service User, reason Calling AE title not recognised")
    ours = [r.getMessage() for r in caplog.records if r.name == "services.gateway.pacs"]
    assert ours[0] == f"study study-9: PACS push to {target} failed: {str(err.value).split(': ', 1)[1]}"


def test_no_receiver_is_an_error_too(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import dicom_factory as factory

    spec = factory.write_cine_study(tmp_path / "d", n_slices=1, n_phases=1, rows=8, cols=8)
    data = {"image.dcm": Path(spec.files[0]).read_bytes()}
    with pytest.raises(PacsPushError, match="no association: connection refused"):
        push(data, f"PEER@127.0.0.1:{port}", timeout_s=5)
