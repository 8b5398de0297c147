"""What the pictures of issue 16 add to the report stage, per study, on the real Sunnybrook study.

Baseline (same run, same process): the SR + SEG the report stage already builds (build_segs +
build_sr + encoding). Candidate: contour mosaic + volume curves + one-page PDF + Encapsulated PDF.
The first render in a process pays the imports (matplotlib, fontTools) and cutting the PDF font;
the gateway pays that at start-up (ReportBuilder.warm_up, timed here on its own). The first study
after it is printed separately ("cold"), the rest are medians over --repeat runs ("warm"). Labels:
the expert LV contours at ED/ES (training.nnunet.sunnybrook), as in tests/test_dicom_outputs.py.
Prints the numbers and ratios; asserts nothing (target: rendering well under 2 s per study).

    .venv/bin/python tests/bench/bench_report.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
STUDY = REPO.parent / "shared" / "data" / "sunnybrook" / "SCD0000101"
MODEL = {"name": "sunnybrook-contours", "version": "1.0", "backend": "expert"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not STUDY.is_dir():
        print(f"sample data absent: {STUDY}")
        return 1
    import warnings

    warnings.filterwarnings("ignore")  # pydicom on the study's invalid UIDs
    import nibabel as nib
    import numpy as np

    from services.gateway.dicom_sr import build_sr, seg_source_uids
    from services.gateway.records import STAGES, new_record
    from services.gateway.report import build_report
    from services.preprocess.study import preprocess_study
    from services.segmentation.dicom_seg import build_segs, cine_entry, read_source_headers
    from services.segmentation.function import measure_labels, present_cells
    from training.nnunet.sunnybrook import load_case

    work = Path(tempfile.mkdtemp(prefix="bench-report-"))
    manifest = preprocess_study(STUDY, work / "pre")
    entry = cine_entry(manifest)
    cine = np.asarray(nib.load(work / "pre" / entry["volume"]).dataobj)
    case = load_case(STUDY, STUDY.parent / "contours" / "SC-HF-I-1")
    labels = np.zeros(cine.shape, np.uint8)
    labels[..., case.ed_phase], labels[..., case.es_phase] = case.labels["ed"], case.labels["es"]
    measurements = measure_labels(labels, np.array(entry["affine"]), height_m=1.75, weight_kg=70)
    record = new_record("bench", manifest["study_instance_uid"], "bench", {}, 1.75, 70)
    for name in STAGES:
        record["stages"][name].update(state="done", seconds=1.0)
    report = build_report(record, manifest, dict(measurements, model=MODEL), {"findings": []})
    present, _flags = present_cells(entry, cine.shape[2], cine.shape[3])

    def encoded(ds) -> bytes:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def baseline():
        segs = build_segs(STUDY, manifest, labels, MODEL, measurements=measurements, run="bench")
        headers = list(read_source_headers(STUDY, seg_source_uids(segs.values())).values())
        sr = build_sr(segs, headers, report, run="bench")
        return sr, [encoded(s) for s in segs.values()] + [encoded(sr)]

    def candidate(sr):
        from services.gateway.dicom_pdf import build_encapsulated_pdf
        from services.gateway.figures import contour_mosaic, volume_curves
        from services.gateway.report_pdf import render_pdf

        times = {}
        t = time.perf_counter()
        contours, _layout = contour_mosaic(cine, labels, np.array(entry["affine"]), measurements["ed_phase"],
                                           measurements["es_phase"], entry["trigger_times_ms"], present,
                                           entry["image_orientation_patient"])
        times["contours.png"] = time.perf_counter() - t
        t = time.perf_counter()
        volumes = volume_curves(measurements, entry["trigger_times_ms"])
        times["volumes.png"] = time.perf_counter() - t
        t = time.perf_counter()
        pdf = render_pdf(report, contours, volumes)
        times["report.pdf"] = time.perf_counter() - t
        t = time.perf_counter()
        encoded(build_encapsulated_pdf(pdf, sr, [sr], run="bench"))
        times["pdf.dcm"] = time.perf_counter() - t
        times["total"] = sum(times.values())
        return times, {"contours.png": len(contours), "volumes.png": len(volumes), "report.pdf": len(pdf)}

    t = time.perf_counter()
    sr, _files = baseline()
    cold_base = time.perf_counter() - t
    from services.gateway.report import ReportBuilder

    t = time.perf_counter()
    ReportBuilder.warm_up()  # what the gateway does in the background at start-up
    warm_up = time.perf_counter() - t
    cold, sizes = candidate(sr)
    base_runs, runs = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        sr, _files = baseline()
        base_runs.append(time.perf_counter() - t)
        runs.append(candidate(sr)[0])
    warm_base = statistics.median(base_runs)
    warm = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"Sunnybrook SCD0000101, {cine.shape[2]} slices x {cine.shape[3]} phases; {args.repeat} warm runs")
    print(f"gateway start-up warm-up of the pictures (ReportBuilder.warm_up, off the request path): {warm_up:.3f} s")
    print("cold: the first study in the process (pictures after the warm-up); warm: the median of the next ones")
    print(f"baseline SR+SEG      cold {cold_base:6.3f} s   warm {warm_base:6.3f} s")
    for key in warm:
        size = f"   {sizes[key] / 1024:7.0f} KiB" if key in sizes else ""
        print(f"{key:<20} cold {cold[key]:6.3f} s   warm {warm[key]:6.3f} s{size}")
    print(f"ratio pictures / SR+SEG: cold {cold['total'] / cold_base:.2f}   warm {warm['total'] / warm_base:.2f}")
    for name, seconds in (("first", cold["total"]), ("warm", warm["total"])):
        print(f"{name} study's pictures: {seconds:.3f} s (target well under 2 s: "
              f"{'met' if seconds < 1.5 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
