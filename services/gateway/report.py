"""The report a RIS receives: JSON (schema `cmrvl.report/v1`), a readable draft, DICOM SR + SEG.

Report JSON:
    schema          "cmrvl.report/v1"
    status          "completed" | "partial"
    study           study_id, study_instance_uid, accession_number, study_date, patient_id, client_request_id
    measurements    the keys `cmrvl measure` prints (lv_edv_ml ... rv_ef_pct, indexed *_m2, bsa_m2, ed/es phase)
    measurement_details  per key: value, unit, normal range (low, high, source), "low"/"normal"/"high";
                    a null value has "reason": the code and message of the quality flag that left it null
    findings        one entry per catalog task: task id, answer, parsed finding, model
    models          {"segmentation": {name, version, backend} | null, "vlm": {...} | null}
    quality         flags {code, message, source}: what preprocessing found in the study and its cine
                    (one entry per issue type, every gap named), segmentation quality, skipped stages
    timings_s       seconds per stage
    series          the series preprocessing found (uid, kind, slices, phases)
"""

from __future__ import annotations

import logging

from services.gateway.records import STAGES, now
from services.runtime.storage import ObjectStore

log = logging.getLogger("cmrvl.report")

SCHEMA = "cmrvl.report/v1"
UNITS = {"_ml_m2": "ml/m2", "_g_m2": "g/m2", "_ml": "ml", "_g": "g", "_pct": "%", "_m2": "m2"}
LABELS = {
    "lv_edv_ml": "LV end-diastolic volume", "lv_esv_ml": "LV end-systolic volume",
    "lv_sv_ml": "LV stroke volume", "lv_ef_pct": "LV ejection fraction", "lv_mass_g": "LV mass",
    "lv_edvi_ml_m2": "LV EDV index", "lv_esvi_ml_m2": "LV ESV index", "lv_svi_ml_m2": "LV SV index",
    "lv_massi_g_m2": "LV mass index", "rv_edv_ml": "RV end-diastolic volume",
    "rv_esv_ml": "RV end-systolic volume", "rv_sv_ml": "RV stroke volume", "rv_ef_pct": "RV ejection fraction",
    "rv_edvi_ml_m2": "RV EDV index", "rv_esvi_ml_m2": "RV ESV index", "rv_svi_ml_m2": "RV SV index",
}


def unit_of(key: str) -> str:
    return next((unit for suffix, unit in UNITS.items() if key.endswith(suffix)), "")


def measurement_details(measurements: dict, sex: str | None) -> dict:
    from services.segmentation.function import classify, normal_range

    # The segmentation's flags name the values they leave null ("keys"): that is the reason.
    reasons = {}
    for flag in measurements.get("quality", []):
        for key in flag.get("keys", []):
            reasons.setdefault(key, {"code": flag["code"], "message": flag["message"]})
    details = {}
    for key in LABELS:
        if key not in measurements:
            continue
        value = measurements[key]
        details[key] = {"label": LABELS[key], "value": value, "unit": unit_of(key),
                        "normal_range": normal_range(key, sex), "assessment": classify(key, value, sex)}
        if value is None and key in reasons:
            details[key]["reason"] = reasons[key]
    return details


def preprocess_quality(manifest: dict) -> list[dict]:
    """What preprocessing recorded about the study and its short-axis cine, one entry per issue
    type so that 60 missing cells are one readable line, yet every cell is named in it."""
    from services.preprocess.study import primary_series
    from services.segmentation.function import describe_cells

    cine = primary_series(manifest, "cine_sax") or {}
    by_type: dict[str, list[dict]] = {}
    for issue in [*manifest.get("issues", []), *cine.get("issues", [])]:
        by_type.setdefault(issue.get("type", "preprocess_issue"), []).append(issue)
    quality = []
    for kind, issues in by_type.items():
        per_cell = [i for i in issues if "slice" in i and "phase" in i]
        parts = [f"{len(per_cell)} slice/phase cell(s): {describe_cells((i['slice'], i['phase']) for i in per_cell)} "
                 f"(e.g. {per_cell[0].get('detail', '')})"] if per_cell else []
        details = [i.get("detail", "") for i in issues if i not in per_cell]
        parts += details if len(details) < 2 else [" ".join(f"({n}) {d}" for n, d in enumerate(details, 1))]
        quality.append({"code": kind, "message": "; ".join(parts), "source": "preprocess"})
    return quality


def render_text(report: dict) -> str:
    study = report["study"]
    lines = [
        "CARDIAC MRI - DRAFT REPORT (machine generated, for radiologist review)",
        f"Study: {study.get('study_instance_uid', '')}   Date: {study.get('study_date') or '-'}   "
        f"Accession: {study.get('accession_number') or '-'}",
        f"Status: {report['status']}",
        "",
        "MEASUREMENTS",
    ]
    details = report["measurement_details"]
    if not any(d["value"] is not None or d.get("reason") for d in details.values()):
        lines.append("  not available (no segmentation)")
    for d in details.values():
        if d["value"] is None:
            if d.get("reason"):  # null for a reason the QUALITY section gives in full
                lines.append(f"  {d['label']:<28} {'-':>8} {d['unit']:<6}  not measured ({d['reason']['code']})")
            continue
        rng = d["normal_range"]
        normal = f"  normal {rng['low']}-{rng['high']}" if rng else ""
        flag = f"  [{d['assessment']}]" if d["assessment"] not in (None, "normal") else ""
        lines.append(f"  {d['label']:<28} {d['value']:>8.1f} {d['unit']:<6}{normal}{flag}")
    lines += ["", "FINDINGS"]
    if not report["findings"]:
        lines.append("  not available (no vision-language findings)")
    for finding in report["findings"]:
        lines.append(f"  {finding.get('title', finding.get('task_id'))}: {finding.get('summary', finding.get('answer', ''))}")
    if report["quality"]:
        lines += ["", "QUALITY"] + [f"  - {q['code']}: {q['message']}" for q in report["quality"]]
    models = [f"{role} {m['name']} {m['version']}" + (" (the shipped default LV-only model, see its model card)"
                                                     if m.get("default_model") else "")
              for role, m in report["models"].items() if m]
    lines += ["", "Models: " + (", ".join(models) or "none")]
    return "\n".join(lines) + "\n"


def build_report(record: dict, manifest: dict, measurements: dict, findings_doc: dict) -> dict:
    """The report JSON from the workflow record and the stages' documents (empty when absent)."""
    stages = record["stages"]
    study_block = manifest.get("study", {})
    quality = preprocess_quality(manifest) if manifest else []
    quality += [dict(q, source="segmentation") for q in measurements.get("quality", [])]
    for name in STAGES:
        if stages[name]["state"] in ("skipped", "failed"):
            quality.append({"code": f"{name}_not_run", "message": stages[name]["error"], "source": "workflow"})
    seg_model = measurements.get("model") or stages["segmentation"]["outputs"].get("model")
    return {
        "schema": SCHEMA,
        "generated_at": now(),
        "status": "partial" if any(stages[s]["state"] in ("skipped", "failed") for s in STAGES[:-1]) else "completed",
        "study": {
            "study_id": record["study_id"],
            "study_instance_uid": record.get("study_instance_uid") or manifest.get("study_instance_uid", ""),
            "client_request_id": record.get("client_request_id", ""),
            "accession_number": study_block.get("accession_number"),
            "study_date": study_block.get("study_date"),
            "patient_id": study_block.get("patient_id"),
        },
        "measurements": {k: v for k, v in measurements.items()
                         if k not in ("quality", "model", "lv_volume_curve_ml", "rv_volume_curve_ml")},
        "measurement_details": measurement_details(measurements, study_block.get("patient_sex")),
        "findings": findings_doc.get("findings", []),
        "models": {"segmentation": seg_model, "vlm": findings_doc.get("model")},
        "quality": quality,
        "timings_s": {name: stages[name]["seconds"] for name in STAGES},
        "series": [{k: s.get(k) for k in ("series_instance_uid", "kind", "n_slices", "n_phases")}
                   for s in manifest.get("series", [])],
    }


def _predecessors(history: list[dict], run: str) -> list:
    """The SR this run's SR replaces: the last one written before this run's (or the last one)."""
    from pydicom.dataset import Dataset

    runs = [e["run"] for e in history]
    earlier = history[:runs.index(run)] if run in runs else history
    if not earlier:
        return []
    last, previous = earlier[-1], Dataset()
    previous.StudyInstanceUID, previous.SeriesInstanceUID = last["study_instance_uid"], last["series_instance_uid"]
    previous.SOPInstanceUID, previous.SOPClassUID = last["sop_instance_uid"], last["sop_class_uid"]
    return [previous]


class ReportBuilder:
    def __init__(self, store: ObjectStore, pacs_target: str = "", pacs_calling_aet: str = "CMRVL"):
        self.store = store
        self.pacs_target, self.pacs_calling_aet = pacs_target, pacs_calling_aet

    def _json(self, ref: dict | None):
        return self.store.get_json(ref["bucket"], ref["key"]) if ref else None

    def build(self, record: dict) -> dict:
        stages = record["stages"]
        return build_report(record, self._json(stages["preprocess"]["outputs"].get("manifest")) or {},
                            self._json(stages["segmentation"]["outputs"].get("measurements")) or {},
                            self._json(stages["findings"]["outputs"].get("findings")) or {})

    def dicom_outputs(self, record: dict, report: dict) -> dict[str, bytes]:
        """DICOM SEG (one per segmented phase: ED, ES) and the SR that references them."""
        import io
        import tempfile
        from pathlib import Path

        import nibabel as nib
        import numpy as np

        from services.gateway.dicom_sr import build_sr, seg_source_uids
        from services.segmentation.dicom_seg import build_segs, read_source_headers, source_conformance

        stages = record["stages"]
        labels_ref = stages["segmentation"]["outputs"].get("labels")
        if stages["segmentation"]["state"] != "done" or not labels_ref:
            return {}
        if report["measurements"].get("ed_phase") is None:
            report["quality"].append({"code": "no_dicom_outputs", "source": "report",
                                      "message": "no SR/SEG: the segmentation found no structure to measure"})
            return {}
        manifest_ref = stages["preprocess"]["outputs"]["manifest"]
        manifest = self.store.get_json(manifest_ref["bucket"], manifest_ref["key"])
        with tempfile.TemporaryDirectory(prefix="cmrvl-report-") as tmp:
            dicom_dir = Path(tmp) / "dicom"
            prefix = record["dicom_prefix"]
            self.store.download_prefix(prefix["bucket"], prefix["key"], dicom_dir)
            labels_path = self.store.get_file(labels_ref["bucket"], labels_ref["key"], Path(tmp) / "labels.nii.gz")
            labels = np.asarray(nib.load(labels_path).dataobj).astype(np.uint8)
            run = record["study_id"]  # one submission = one run: its own SR/SEG series
            segs = build_segs(dicom_dir, manifest, labels, report["models"]["segmentation"] or {},
                              measurements=report["measurements"], run=run)
            headers = list(read_source_headers(dicom_dir, seg_source_uids(segs.values())).values())
        # Said once here, not per validator line: what of the source SR/SEG carry on as it is.
        report["quality"] += source_conformance(headers)
        study_uid = next(iter(segs.values())).StudyInstanceUID
        history = self._sr_history(study_uid)
        sr = build_sr(segs, headers, report, run=run, predecessors=_predecessors(history, run))
        self._record_sr(study_uid, history, run, sr)
        ed, es = report["measurements"].get("ed_phase"), report["measurements"].get("es_phase")

        def seg_name(phase: int) -> str:  # `seg.dcm` is the end-diastolic one
            return "seg.dcm" if phase == ed else "seg_es.dcm" if phase == es else f"seg_phase{phase:02d}.dcm"

        files = {seg_name(phase): seg for phase, seg in segs.items()}
        files["sr.dcm"] = sr
        encoded = {}
        for name, dataset in files.items():
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            encoded[name] = buffer.getvalue()
        return encoded

    # Every SR written for a StudyInstanceUID, oldest first, so that a re-run's SR names the one it
    # replaces (PredecessorDocumentsSequence). Runs are different studies in this store (study_id is
    # per submission) but one study in the PACS. The gateway is one replica: no concurrent writer.
    def _sr_history_key(self, study_instance_uid: str) -> str:
        return f"sr-history/{study_instance_uid}.json"

    def _sr_history(self, study_instance_uid: str) -> list[dict]:
        bucket, key = self.store.bucket("reports"), self._sr_history_key(study_instance_uid)
        return self.store.get_json(bucket, key)["srs"] if self.store.exists(bucket, key) else []

    def _record_sr(self, study_instance_uid: str, history: list[dict], run: str, sr) -> None:
        entry = {"run": run, "study_instance_uid": sr.StudyInstanceUID, "series_instance_uid": sr.SeriesInstanceUID,
                 "sop_instance_uid": sr.SOPInstanceUID, "sop_class_uid": sr.SOPClassUID}
        if entry in history:
            return  # a retried report stage: the same SR again
        history = [e for e in history if e["run"] != run] + [entry]  # this run's newest SR is its entry
        self.store.put_json(self.store.bucket("reports"), self._sr_history_key(study_instance_uid), {"srs": history})

    def __call__(self, record: dict) -> dict:
        """The workflow's report stage: write every report object; returns their refs."""
        report = self.build(record)
        bucket, prefix = self.store.bucket("reports"), f"{record['study_id']}/"
        outputs = {}
        try:
            dicom = self.dicom_outputs(record, report)
        except Exception as exc:  # noqa: BLE001 - the JSON/text report still goes out, flagged
            log.exception("study %s: DICOM SR/SEG not written", record["study_id"])
            report["quality"].append({"code": "no_dicom_outputs", "source": "report",
                                      "message": f"DICOM SR/SEG could not be written: {type(exc).__name__}: {exc}"})
            dicom = {}
        for name, data in dicom.items():
            key = name.removesuffix(".dcm")
            outputs[key] = self.store.put_bytes(bucket, prefix + name, data, "application/dicom")
        report["dicom"] = {key: ref.key for key, ref in outputs.items()}
        if dicom and self.pacs_target:
            from services.gateway.pacs import push

            try:
                push(dicom, self.pacs_target, self.pacs_calling_aet)
                report["dicom"]["pushed_to"] = self.pacs_target
            except Exception as exc:  # noqa: BLE001 - the objects stay in the store; say so
                report["quality"].append({"code": "pacs_push_failed", "source": "report",
                                          "message": f"SR/SEG not pushed to {self.pacs_target}: {exc}"})
        outputs["json"] = self.store.put_json(bucket, prefix + "report.json", report)
        outputs["text"] = self.store.put_bytes(bucket, prefix + "report.txt", render_text(report).encode(), "text/plain")
        return {name: vars(ref) for name, ref in outputs.items()}
