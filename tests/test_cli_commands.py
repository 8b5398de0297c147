"""The README's main command and the RIS-like client, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.dicom_factory import write_cine_study


def _cmrvl(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "services", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_analyze_runs_the_whole_pipeline_on_its_own_stack(tmp_path):
    spec = write_cine_study(tmp_path / "study", n_slices=6, n_phases=6, rows=48, cols=48)
    out = tmp_path / "out"
    result = _cmrvl("analyze", str(tmp_path / "study"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written to" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["study"]["study_instance_uid"] == spec.study_instance_uid
    assert {"lv_edv_ml", "lv_ef_pct", "rv_edv_ml"} <= set(report["measurements"])
    assert report["models"]["segmentation"]["default_model"] is True
    # No VLM weights on this machine: findings are not run, and the report says so.
    assert report["status"] == "partial"
    assert any(q["code"] == "findings_not_run" for q in report["quality"])
    assert (out / "report.txt").read_text().startswith("CARDIAC MRI - DRAFT REPORT")


def test_analyze_of_a_folder_without_dicom_fails_with_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    result = _cmrvl("analyze", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("cmrvl analyze: error: INVALID_ARGUMENT")
    assert "Traceback" not in result.stderr


def test_submit_waits_and_writes_the_report(stack_info, tmp_path):
    write_cine_study(tmp_path / "study", n_slices=4, n_phases=5)
    result = _cmrvl("submit", str(tmp_path / "study"), "--target", stack_info.target("gateway"), "--wait",
                    "--out", str(tmp_path / "out"), env={"CMRVL_TOKEN": stack_info.ris_token})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "submitted" in result.stdout and "status" in result.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["schema"] == "cmrvl.report/v1"
    assert "100.0%" in result.stderr  # the progress bar reached the end

    denied = _cmrvl("submit", str(tmp_path / "study"), "--target", stack_info.target("gateway"),
                    env={"CMRVL_TOKEN": "wrong"})
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr


def test_building_the_command_line_imports_no_heavy_library():
    """`cmrvl --help` and every command's start pay only for what that command uses."""
    probe = ("import sys; from services.cli import build_parser; build_parser(); "
             "print(' '.join(m for m in ('numpy', 'pydicom', 'nibabel', 'torch', 'grpc', 'minio') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == ""
