"""The one-page PDF draft and its DICOM Encapsulated PDF (issue 16).

- The PDF parses (pypdf), is one A4 page with embedded TrueType fonts and holds report.json's
  numbers, identity and findings (with the images each question was asked on, or "no images").
- The Encapsulated PDF passes dciodvfy: no error on a conformant synthetic source, only the
  source's own errors on the real Sunnybrook study (rules of tests/test_dicom_conformance.py);
  it lands in the source study in a real Orthanc by C-STORE (services/gateway/pacs.py).
- The report stage (ReportBuilder on the real S3 server) stores every object, and without its
  cine still delivers JSON/text/SR/SEG with a one-line quality entry saying why there is no PDF.
- Through the real stack: the report stage stores report.pdf, contours.png, volumes.png and pdf.dcm
  under <study_id>/ in the reports bucket, pushes pdf.dcm with SR/SEG to the PACS, and the PDF's
  numbers are the report's.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from tests.conftest import SUNNYBROOK_STUDY, require
from tests.test_dicom_conformance import (MODEL, _source_faults, build_outputs, dcentvfy, dciodvfy, source_own,
                                          study_level_mismatches, write_conformant_study)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on Sunnybrook's invalid UIDs
A4_PT = (595.3, 841.9)


def _report(outputs, findings=()) -> dict:
    """The report document build_report makes of these stage outputs (a finished record)."""
    from services.gateway.records import STAGES, new_record
    from services.gateway.report import build_report

    record = new_record("run-1", outputs.sr.StudyInstanceUID, "req-1", {}, 1.75, 70)
    for name in STAGES:
        record["stages"][name].update(state="done", seconds=1.0)
    measurements = dict(outputs.measurements, model=MODEL)
    return build_report(record, outputs.manifest, measurements, {"findings": list(findings)})


def _figures(outputs) -> tuple[bytes, bytes]:
    import nibabel as nib

    from services.gateway.figures import contour_mosaic, volume_curves

    entry, m = outputs.entry, outputs.measurements
    cine = np.asarray(nib.load(Path(outputs.pre_dir) / entry["volume"]).dataobj)
    png, _layout = contour_mosaic(cine, outputs.labels, np.array(entry["affine"]), m["ed_phase"], m["es_phase"],
                                  entry["trigger_times_ms"])
    return png, volume_curves(m, entry["trigger_times_ms"])


def _build(dicom_dir: Path, work: Path, **kwargs):
    outputs = build_outputs(dicom_dir, work, **kwargs)
    outputs.pre_dir = work / "pre"
    return outputs


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    work = tmp_path_factory.mktemp("pdf-valid")
    spec = write_conformant_study(work / "dicom")
    return SimpleNamespace(spec=spec, **vars(_build(work / "dicom", work)))


def pdf_text(pdf: bytes) -> tuple[object, str]:
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(pdf))
    return reader, "\n".join(page.extract_text() for page in reader.pages)


def page_fonts(page) -> dict[str, object]:
    return {str(name): font.get_object() for name, font in page["/Resources"]["/Font"].items()}


def page_images(page) -> int:
    """Image XObjects drawn on the page (matplotlib puts each image in its own XObject)."""
    return sum(1 for x in page["/Resources"].get("/XObject", {}).values() if x.get_object()["/Subtype"] == "/Image")


def test_pdf_is_one_a4_page_with_the_reports_numbers_and_embedded_fonts(valid):
    from services.gateway.report_pdf import DRAFT, render_pdf

    report = _report(valid)
    contours, volumes = _figures(valid)
    reader, text = pdf_text(render_pdf(report, contours, volumes))
    assert len(reader.pages) == 1
    width, height = (float(v) for v in reader.pages[0].mediabox[2:])
    assert (width, height) == pytest.approx(A4_PT, abs=1)
    flat = " ".join(text.split())
    measured = {k: d["value"] for k, d in report["measurement_details"].items() if d["value"] is not None}
    assert {"lv_edv_ml", "lv_ef_pct", "lv_mass_g", "rv_edv_ml", "lv_edvi_ml_m2"} <= set(measured)
    for key, value in measured.items():
        label = report["measurement_details"][key]["label"]
        assert re.search(rf"{re.escape(label)} {value:.1f} ", flat), (key, f"{value:.1f}")
    study = report["study"]
    for expected in (DRAFT, study["patient_id"], study["study_instance_uid"], f"{MODEL['name']} {MODEL['version']}",
                     f"ED phase {report['measurements']['ed_phase']}, ES phase {report['measurements']['es_phase']}"):
        assert expected in flat, expected
    for name, font in page_fonts(reader.pages[0]).items():  # TrueType, embedded (not a PDF base font)
        descriptor = font["/DescendantFonts"][0].get_object()["/FontDescriptor"] if "/DescendantFonts" in font \
            else font["/FontDescriptor"]
        assert "/FontFile2" in descriptor.get_object(), name
    assert page_images(reader.pages[0]) == 2  # the mosaic and the curves


def test_pdf_names_what_is_not_measured_and_flags_abnormal_values(valid):
    from services.gateway.report_pdf import render_pdf

    report = _report(valid)
    report["measurement_details"]["lv_ef_pct"].update(value=30.0, assessment="low")
    report["measurement_details"]["rv_edv_ml"].update(value=None,
                                                      reason={"code": "class_not_segmented", "message": "x"})
    _reader, text = pdf_text(render_pdf(report))
    flat = " ".join(text.split())
    assert re.search(r"LV ejection fraction 30\.0 % \S+ LOW", flat)
    assert "Not measured (class_not_segmented, see QUALITY): RV end-diastolic volume" in flat


def test_pdf_marks_values_a_quality_flag_doubts(valid):
    from services.gateway.report_pdf import render_pdf

    report = _report(valid)
    caveat = [{"code": "es_larger_than_ed_on_slices", "message": "x"}]
    report["measurement_details"]["lv_ef_pct"].update(value=30.0, assessment="low", caveats=caveat)
    report["measurement_details"]["lv_edv_ml"]["caveats"] = caveat
    flat = " ".join(pdf_text(render_pdf(report))[1].split())
    assert re.search(r"LV ejection fraction 30\.0 % \S+ LOW \*", flat)
    assert re.search(r"LV end-diastolic volume \S+ ml \S+ (LOW |HIGH )?\*", flat)
    assert re.search(r"\* Doubted by quality flags \(see QUALITY\): [a-z_, ]*es_larger_than_ed_on_slices", flat)


def test_findings_show_their_images_or_say_no_images(valid):
    from services.gateway.report_pdf import render_pdf

    findings = [{"task_id": "pericardial_effusion", "title": "Pericardial effusion", "status": "ok",
                 "answer": "No pericardial effusion."},
                {"task_id": "lge", "title": "Late gadolinium enhancement", "status": "error",
                 "error": "not assessable: task lge needs a LGE volume", "answer": ""}]
    report = _report(valid, findings)
    thumbs = {"pericardial_effusion": [np.full((64, 64, 3), 90 * i, np.uint8) for i in range(3)]}
    reader, text = pdf_text(render_pdf(report, thumbnails=thumbs))
    flat = " ".join(text.split())
    assert "Pericardial effusion: No pericardial effusion." in flat
    assert "Late gadolinium enhancement: [error] not assessable: task lge needs a LGE volume no images" in flat
    assert flat.count("no images") == 1
    assert page_images(reader.pages[0]) == 3


def test_a_long_quality_list_is_cut_on_the_one_page_and_says_so(valid):
    from services.gateway.report_pdf import render_pdf

    report = _report(valid)
    report["quality"] = [{"code": f"issue_{i}", "source": "preprocess", "message": "slice 3 at phase 7 " * 20}
                         for i in range(60)]
    reader, text = pdf_text(render_pdf(report, *_figures(valid)))
    assert len(reader.pages) == 1
    flat = " ".join(text.split())
    assert "issue_0 (preprocess)" in flat and "issue_59" not in flat
    cut = re.search(r"(\d+) more quality entr(y|ies) in (full in )?report\.json", flat)
    shown = len(re.findall(r"- issue_\d+ \(preprocess\)", flat))
    assert cut and shown + int(cut.group(1)) >= 60


def test_the_same_report_gives_the_same_pdf(valid):
    from services.gateway.report_pdf import render_pdf

    report = _report(valid)
    assert render_pdf(report) == render_pdf(report)


# --- the PDF in DICOM ---------------------------------------------------------------------------

def _encapsulated(outputs, work: Path) -> tuple[Path, bytes]:
    from services.gateway.dicom_pdf import build_encapsulated_pdf
    from services.gateway.report_pdf import render_pdf

    pdf = render_pdf(_report(outputs))
    ds = build_encapsulated_pdf(pdf, outputs.sr, [outputs.sr, *outputs.segs.values()], run="run-1")
    path = work / "pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pdf


def test_encapsulated_pdf_of_a_conformant_source_has_no_dciodvfy_error(valid, tmp_path):
    from services.gateway.dicom_pdf import ENCAPSULATED_PDF_STORAGE, read_encapsulated_pdf

    path, pdf = _encapsulated(valid, tmp_path)
    errors, _warnings = dciodvfy(path)
    assert errors == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE and ds.Modality == "DOC"
    assert read_encapsulated_pdf(ds) == pdf
    assert ds.StudyInstanceUID == valid.spec.study_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in ds.SourceInstanceSequence} == \
        {valid.sr.SOPInstanceUID, *(s.SOPInstanceUID for s in valid.segs.values())}
    assert study_level_mismatches(dcentvfy([*valid.spec.files, path])) == []


def test_encapsulated_pdf_of_sunnybrook_carries_only_the_sources_errors(tmp_path):
    from tests.test_dicom_conformance import _sunnybrook_labels

    require(SUNNYBROOK_STUDY)
    sunnybrook = _build(SUNNYBROOK_STUDY, tmp_path, labels_of=_sunnybrook_labels)
    path, _pdf = _encapsulated(sunnybrook, tmp_path)
    invalid_uids, source_errors = _source_faults(sunnybrook)
    errors, _ = dciodvfy(path)
    assert [e for e in errors if source_own(e, invalid_uids, source_errors) is None] == []
    assert errors  # the premise: the study's own UID and dates are copied as they are
    files = sorted(SUNNYBROOK_STUDY.glob("*.dcm"))
    assert study_level_mismatches(dcentvfy([*files, path])) == []


def test_encapsulated_pdf_is_refused_for_something_that_is_not_a_pdf(valid):
    from services.gateway.dicom_pdf import build_encapsulated_pdf

    with pytest.raises(ValueError, match="not a PDF"):
        build_encapsulated_pdf(b"PNG...", valid.sr)


def test_encapsulated_pdf_lands_in_the_source_study_in_orthanc(valid, tmp_path):
    from orthanc_server import OrthancServer

    from services.gateway.pacs import push

    path, _pdf = _encapsulated(valid, tmp_path)
    objects = {"sr.dcm": _bytes(valid.sr), "pdf.dcm": path.read_bytes()}
    with OrthancServer(tmp_path / "orthanc", modalities={"cmrvl": ("CMRVL", "127.0.0.1", 11112)}) as orthanc:
        orthanc.upload(valid.spec.files[:1])  # the source study, as the PACS has it
        push(objects, f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "CMRVL")
        studies = orthanc.get("/studies")
        assert len(studies) == 1  # filed into the source study, not a new one
        pdfs = [i for i in orthanc.study_instances(studies[0]) if i["Modality"] == "DOC"]
        assert len(pdfs) == 1 and pdfs[0]["StudyInstanceUID"] == valid.spec.study_instance_uid
        assert pdfs[0]["MIMETypeOfEncapsulatedDocument"] == "application/pdf"


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- the report stage, through the real stack -----------------------------------------------------

@pytest.fixture(scope="module")
def sunnybrook_run(stack_info, small_sunnybrook):
    """The real scanner's files (4 slices, every phase: the report stage's outputs do not depend on
    the slice count) through the whole stack."""
    from services.gateway.client import StudyClient

    client = StudyClient(stack_info.target("gateway"), stack_info.ris_token)
    try:
        study = client.submit_folder(small_sunnybrook, "report-pdf-test")
        list(client.watch(study.study_id, timeout_s=900))
        return study, client.get_report(study.study_id)
    finally:
        client.close()


def test_report_stage_stores_pdf_figures_and_pdf_dicom_beside_the_report(sunnybrook_run, store, pacs):
    import pypdf
    from PIL import Image

    from services.gateway.dicom_pdf import read_encapsulated_pdf

    study, report = sunnybrook_run
    document = json.loads(report.report_json)
    bucket, prefix = store.bucket("reports"), f"{study.study_id}/"
    assert document["review"] == {name: prefix + name for name in ("contours.png", "volumes.png", "report.pdf")}
    assert document["dicom"]["pdf"] == prefix + "pdf.dcm"
    for name in ("contours.png", "volumes.png"):
        assert Image.open(io.BytesIO(store.get_bytes(bucket, prefix + name))).format == "PNG"
    pdf = store.get_bytes(bucket, prefix + "report.pdf")
    reader, text = pdf_text(pdf)
    assert len(reader.pages) == 1
    flat = " ".join(text.split())
    for key, d in document["measurement_details"].items():
        if d["value"] is not None:
            assert f"{d['label']} {d['value']:.1f} " in flat, key
    # The findings' own inputs are on the page: the effusion question was asked on images.
    findings = {f["task_id"]: f for f in document["findings"]}
    assert findings["pericardial_effusion"]["status"] in ("ok", "unparseable")
    assert page_images(reader.pages[0]) > 2
    # The same PDF in DICOM, in the source study, pushed with SR and SEG.
    ds = pydicom.dcmread(io.BytesIO(store.get_bytes(bucket, prefix + "pdf.dcm")))
    assert read_encapsulated_pdf(ds) == pdf and ds.StudyInstanceUID == study.study_instance_uid
    pushed = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
              for p in (pacs.storage_dir / study.study_instance_uid).glob("*.dcm")}
    assert ds.SOPInstanceUID in pushed
    assert pypdf.PdfReader(io.BytesIO(read_encapsulated_pdf(ds))).pages


def _stored_record(outputs, store, study_id: str, volume_key: str | None = None) -> dict:
    """A finished workflow record of the synthetic study, its stage outputs in the real store."""
    import nibabel as nib

    from services.gateway.records import STAGES, new_record

    studies, artifacts = store.bucket("studies"), store.bucket("artifacts")
    store.upload_folder(outputs.spec.files[0].parent, studies, f"{study_id}/dicom/")
    manifest = dict(outputs.manifest)
    entry = outputs.entry
    store.put_file(artifacts, f"{study_id}/preprocess/{volume_key or entry['volume']}",
                   Path(outputs.pre_dir) / entry["volume"])
    manifest_ref = store.put_json(artifacts, f"{study_id}/preprocess/manifest.json", manifest)
    labels_path = Path(outputs.pre_dir) / "labels.nii.gz"
    nib.save(nib.Nifti1Image(outputs.labels, np.array(entry["affine"])), labels_path)
    labels_ref = store.put_file(artifacts, f"{study_id}/segmentation/labels.nii.gz", labels_path)
    measurements_ref = store.put_json(artifacts, f"{study_id}/segmentation/measurements.json",
                                      dict(outputs.measurements, model=MODEL))
    dicom_prefix = {"bucket": studies, "key": f"{study_id}/dicom/"}
    record = new_record(study_id, outputs.sr.StudyInstanceUID, study_id, dicom_prefix, 1.75, 70)
    for name in STAGES:
        record["stages"][name].update(state="done", seconds=1.0)
    record["stages"]["findings"].update(state="skipped", error="no vision-language model configured")
    record["stages"]["preprocess"]["outputs"] = {"manifest": vars(manifest_ref)}
    record["stages"]["segmentation"]["outputs"] = {"labels": vars(labels_ref), "measurements": vars(measurements_ref),
                                                   "model": MODEL}
    return record


def test_report_stage_without_its_cine_still_delivers_the_report_and_says_why(valid, store):
    """The figures cannot be drawn (the cine volume is not in the store): report.json, report.txt,
    SR and SEG still go out, and the quality section names what is missing and why."""
    import uuid

    from services.gateway.report import ReportBuilder

    study_id = f"review-failure-{uuid.uuid4().hex[:8]}"
    record = _stored_record(valid, store, study_id, volume_key="elsewhere.nii.gz")
    outputs = ReportBuilder(store)(record)
    assert {"json", "text", "sr", "seg"} <= set(outputs)
    assert not {"report_pdf", "contours_png", "volumes_png", "pdf"} & set(outputs)
    report = store.get_json(outputs["json"]["bucket"], outputs["json"]["key"])
    flags = [q for q in report["quality"] if q["code"] == "no_review_outputs"]
    assert len(flags) == 1 and "could not be written" in flags[0]["message"] and "\n" not in flags[0]["message"]
    assert report["review"] == {} and "pdf" not in report["dicom"]
    assert report["measurements"]["lv_edv_ml"] == pytest.approx(valid.measurements["lv_edv_ml"])


def test_report_stage_of_a_stored_study_writes_every_review_object(valid, store):
    import uuid

    from services.gateway.report import ReportBuilder

    study_id = f"review-{uuid.uuid4().hex[:8]}"
    outputs = ReportBuilder(store)(_stored_record(valid, store, study_id))
    assert {"report_pdf", "contours_png", "volumes_png", "pdf"} <= set(outputs)
    for key, name in (("report_pdf", "report.pdf"), ("contours_png", "contours.png"), ("volumes_png", "volumes.png"),
                      ("pdf", "pdf.dcm")):
        assert outputs[key]["key"] == f"{study_id}/{name}" and outputs[key]["bucket"] == store.bucket("reports")
    report = store.get_json(outputs["json"]["bucket"], outputs["json"]["key"])
    assert not [q for q in report["quality"] if q["code"] == "no_review_outputs"]
    _reader, text = pdf_text(store.get_bytes(store.bucket("reports"), f"{study_id}/report.pdf"))
    assert f"{report['measurements']['lv_ef_pct']:.1f}" in text


def test_warm_up_pays_the_first_renders_costs_before_any_study():
    """ReportBuilder.warm_up (run by the gateway at start-up) leaves the PDF font cut and
    matplotlib's PNG and PDF back ends loaded, in a fresh process that rendered nothing else."""
    import subprocess
    import sys

    code = ("import sys; from services.gateway.report import ReportBuilder; ReportBuilder.warm_up(); "
            "from services.gateway.report_pdf import _page_fonts; "
            "print(_page_fonts.cache_info().currsize, 'matplotlib.backends.backend_pdf' in sys.modules, "
            "'matplotlib.backends.backend_agg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["1", "True", "True"]
