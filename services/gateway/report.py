"""The report a RIS receives: JSON (schema `cmrvl.report/v1`), a readable draft, DICOM SR + SEG,
and what a reader checks before signing (issue 16): `contours.png` (ED/ES contour mosaic),
`volumes.png` (volume curves), `report.pdf` (the one-page draft with both) and `pdf.dcm` (that PDF
as a DICOM Encapsulated PDF in the source study, pushed to the PACS with the SR and SEG).

Report JSON:
    schema          "cmrvl.report/v1"
    status          "completed" | "partial"
    study           study_id, study_instance_uid, accession_number, study_date, patient_id, client_request_id
    measurements    the keys `cmrvl measure` prints (lv_edv_ml ... rv_ef_pct, indexed *_m2, bsa_m2, ed/es phase)
    measurement_details  per key: value, unit, normal range (low, high, source), "low"/"normal"/"high";
                    a null value has "reason": the code and message of the quality flag that left it null;
                    a measured one "caveats": the flags that doubt it (text, PDF and SR mark it)
    findings        one entry per catalog task: task id, answer, parsed finding, model
    models          {"segmentation": {name, version, backend} | null, "vlm": {...} | null}
    quality         flags {code, message, source}: what preprocessing found in the study and its cine
                    (one entry per issue type, every gap named), segmentation quality, skipped stages
    timings_s       seconds per stage before the report (preprocess, segmentation, findings)
    series          the series preprocessing found (uid, kind, slices, phases)
    dicom           keys of the DICOM objects in the reports bucket (sr, seg, seg_es, pdf), pushed_to
    review          keys of report.pdf, contours.png, volumes.png in the reports bucket
"""

from __future__ import annotations

import logging

from services.gateway.records import STAGES, now
from services.runtime.storage import ObjectNotFound, ObjectStore, WriteConflict

log = logging.getLogger("cmrvl.report")
REVIEW_TYPES = {"contours.png": "image/png", "volumes.png": "image/png", "report.pdf": "application/pdf"}

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
    from services.segmentation.function import classify, flags_doubting, normal_range

    # The segmentation's flags name the values they leave null ("keys"): that is the reason; and
    # those they leave measured but doubtful ("doubts"): those are the value's caveats.
    reasons = {}
    for flag in measurements.get("quality", []):
        for key in flag.get("keys", []):
            reasons.setdefault(key, {"code": flag["code"], "message": flag["message"]})
    caveats = {key: [{"code": f["code"], "message": f["message"]} for f in flags]
               for key, flags in flags_doubting(measurements.get("quality", [])).items()}
    details = {}
    for key in LABELS:
        if key not in measurements:
            continue
        value = measurements[key]
        details[key] = {"label": LABELS[key], "value": value, "unit": unit_of(key),
                        "normal_range": normal_range(key, sex), "assessment": classify(key, value, sex)}
        if value is None and key in reasons:
            details[key]["reason"] = reasons[key]
        if value is not None and key in caveats:
            details[key]["caveats"] = caveats[key]
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
        doubt = f"  doubtful ({', '.join(c['code'] for c in d['caveats'])})" if d.get("caveats") else ""
        lines.append(f"  {d['label']:<28} {d['value']:>8.1f} {d['unit']:<6}{normal}{flag}{doubt}")
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
        # The report stage is still running while it writes this: only the stages before it have a time.
        "timings_s": {name: stages[name]["seconds"] for name in STAGES[:-1]},
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


def _video_thumbnails(mp4: bytes, frames_per_slice: int) -> list:
    """The first frame of each slice of a findings video (slices follow one another)."""
    import io

    import av

    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for i, frame in enumerate(container.decode(video=0))
                if i % frames_per_slice == 0]


class ReportBuilder:
    def __init__(self, store: ObjectStore, pacs_target: str = "", pacs_calling_aet: str = "CMRVL"):
        self.store = store
        self.pacs_target, self.pacs_calling_aet = pacs_target, pacs_calling_aet

    @staticmethod
    def warm_up() -> None:
        """Render the review outputs once for a tiny synthetic study and throw them away.

        The first render in a process pays matplotlib's imports, its font cache and cutting the PDF
        font (about 2.5 s of the first study's report stage); the gateway calls this in the background
        at start-up so that the first study costs what the others do."""
        import numpy as np

        from services.gateway.figures import contour_mosaic, volume_curves
        from services.gateway.report_pdf import render_pdf

        cine = np.zeros((32, 32, 2, 2), np.int16)
        labels = np.zeros(cine.shape, np.uint8)
        labels[10:20, 10:20], labels[20:28, 10:20] = 1, 3
        contours, _layout = contour_mosaic(cine, labels, np.diag([1.5, 1.5, 8.0, 1.0]), 0, 1)
        render_pdf({}, contours, volume_curves({"lv_volume_curve_ml": [1.0, 0.5], "rv_volume_curve_ml": [1.0, 0.5]}))

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
        while True:  # read, build, record: two runs of one study (any replica) must not drop each other's SR
            history, etag = self._sr_history(study_uid)
            sr = build_sr(segs, headers, report, run=run, predecessors=_predecessors(history, run))
            try:
                self._record_sr(study_uid, history, etag, run, sr)
                break
            except WriteConflict:
                continue  # another run recorded its SR meanwhile: this one names it as predecessor
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
    # per submission) but one study in the PACS. Report stages run in parallel (threads, replicas): the
    # history is written back only over the version read (a conditional write), else read again.
    def _sr_history_key(self, study_instance_uid: str) -> str:
        return f"sr-history/{study_instance_uid}.json"

    def _sr_history(self, study_instance_uid: str) -> tuple[list[dict], str | None]:
        """The SRs so far and the ETag they were read with (None: no history yet)."""
        try:
            document, etag = self.store.get_json_tagged(self.store.bucket("reports"),
                                                        self._sr_history_key(study_instance_uid))
        except ObjectNotFound:
            return [], None
        return document["srs"], etag

    def _record_sr(self, study_instance_uid: str, history: list[dict], etag: str | None, run: str, sr) -> None:
        entry = {"run": run, "study_instance_uid": sr.StudyInstanceUID, "series_instance_uid": sr.SeriesInstanceUID,
                 "sop_instance_uid": sr.SOPInstanceUID, "sop_class_uid": sr.SOPClassUID}
        if entry in history:
            return  # a retried report stage: the same SR again
        history = [e for e in history if e["run"] != run] + [entry]  # this run's newest SR is its entry
        self.store.put_json(self.store.bucket("reports"), self._sr_history_key(study_instance_uid), {"srs": history},
                            if_match=etag, if_absent=etag is None)

    def review_outputs(self, record: dict, report: dict) -> dict[str, bytes]:
        """contours.png and volumes.png (with measurements) and report.pdf, as {file name: bytes}."""
        import tempfile
        from pathlib import Path

        import nibabel as nib
        import numpy as np

        from services.gateway.figures import contour_mosaic, volume_curves
        from services.gateway.report_pdf import render_pdf
        from services.segmentation.dicom_seg import cine_entry
        from services.segmentation.function import present_cells

        stages = record["stages"]
        measurements = self._json(stages["segmentation"]["outputs"].get("measurements")) or {}
        labels_ref = stages["segmentation"]["outputs"].get("labels")
        files = {}
        if stages["segmentation"]["state"] == "done" and labels_ref and measurements.get("ed_phase") is not None:
            manifest_ref = stages["preprocess"]["outputs"]["manifest"]
            manifest = self.store.get_json(manifest_ref["bucket"], manifest_ref["key"])
            entry = cine_entry(manifest)
            times = entry.get("trigger_times_ms") or []
            with tempfile.TemporaryDirectory(prefix="cmrvl-figures-") as tmp:
                cine_key = f"{manifest_ref['key'].rsplit('/', 1)[0]}/{entry['volume']}"
                cine = nib.load(self.store.get_file(manifest_ref["bucket"], cine_key, Path(tmp) / "cine.nii.gz"))
                labels = nib.load(self.store.get_file(labels_ref["bucket"], labels_ref["key"],
                                                      Path(tmp) / "labels.nii.gz"))
                cine_data, label_data = np.asarray(cine.dataobj), np.asarray(labels.dataobj).astype(np.uint8)
            n_phases = cine_data.shape[3] if cine_data.ndim == 4 else 1  # a one-phase cine is 3D
            present, _flags = present_cells(entry, cine_data.shape[2], n_phases)
            files["contours.png"], _layout = contour_mosaic(
                cine_data, label_data, np.asarray(entry["affine"]), measurements["ed_phase"],
                measurements.get("es_phase"), times, present, entry.get("image_orientation_patient"))
            files["volumes.png"] = volume_curves(measurements, times)
        files["report.pdf"] = render_pdf(report, files.get("contours.png"), files.get("volumes.png"),
                                         self._finding_thumbnails(stages["findings"]["outputs"].get("findings")))
        return files

    def _finding_thumbnails(self, findings_ref: dict | None) -> dict:
        """{task id: RGB arrays} of the images each findings question was asked on, as the findings
        stage stored them beside its document (`inputs/<task>/meta.json` lists them); a video
        gives the first frame of each of its slices. A task without stored inputs has none."""
        import io

        import numpy as np
        from PIL import Image

        if not findings_ref:
            return {}
        bucket, folder = findings_ref["bucket"], findings_ref["key"].rsplit("/", 1)[0] + "/inputs/"
        out = {}
        for key in self.store.list_keys(bucket, folder):
            if not key.endswith("/meta.json"):
                continue
            meta = self.store.get_json(bucket, key)
            images = []
            for name in meta.get("files", []):
                data = self.store.get_bytes(bucket, folder + name)
                if name.endswith(".mp4"):
                    images += _video_thumbnails(data, len(meta.get("phases") or []) or 1)
                else:
                    images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            out[meta.get("task_id", key.rsplit("/", 2)[-2])] = images
        return out

    def _pdf_dicom(self, pdf: bytes, dicom: dict[str, bytes], run: str) -> bytes:
        """report.pdf as an Encapsulated PDF in the source study, referencing this run's SR and SEGs."""
        import io

        import pydicom

        from services.gateway.dicom_pdf import build_encapsulated_pdf

        made_from = {name: pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True) for name, data in dicom.items()}
        dataset = build_encapsulated_pdf(pdf, made_from["sr.dcm"], list(made_from.values()), run=run)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

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
        try:  # after SR/SEG (their quality entries are on the page), before the PACS push (pdf.dcm goes too)
            review = self.review_outputs(record, report)
            if dicom and "sr.dcm" in dicom:
                dicom["pdf.dcm"] = self._pdf_dicom(review["report.pdf"], dicom, record["study_id"])
        except Exception as exc:  # noqa: BLE001 - the numbers still go out, flagged
            log.exception("study %s: figures/PDF not written", record["study_id"])
            report["quality"].append({"code": "no_review_outputs", "source": "report", "message":
                                      f"contours/volume curves/PDF could not be written: {type(exc).__name__}: {exc}"})
            review = {}
        for name, data in review.items():
            outputs[name.replace(".", "_")] = self.store.put_bytes(bucket, prefix + name, data, REVIEW_TYPES[name])
        report["review"] = {name: prefix + name for name in review}
        for name, data in dicom.items():
            key = name.removesuffix(".dcm")
            outputs[key] = self.store.put_bytes(bucket, prefix + name, data, "application/dicom")
        report["dicom"] = {name.removesuffix(".dcm"): prefix + name for name in dicom}
        if dicom and self.pacs_target:
            from services.gateway.pacs import push

            try:
                push(dicom, self.pacs_target, self.pacs_calling_aet, study_id=record["study_id"])  # logs the answer
                report["dicom"]["pushed_to"] = self.pacs_target
            except Exception as exc:  # noqa: BLE001 - the objects stay in the store; say so
                log.warning("study %s: SR/SEG/PDF not pushed to %s: %s", record["study_id"], self.pacs_target, exc)
                report["quality"].append({"code": "pacs_push_failed", "source": "report",
                                          "message": f"SR/SEG/PDF not pushed to {self.pacs_target}: {exc}"})
        outputs["json"] = self.store.put_json(bucket, prefix + "report.json", report)
        outputs["text"] = self.store.put_bytes(bucket, prefix + "report.txt", render_text(report).encode(), "text/plain")
        return {name: vars(ref) for name, ref in outputs.items()}
