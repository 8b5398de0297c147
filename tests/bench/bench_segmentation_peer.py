"""Benchmark: the shipped default model vs the peer (myopari's ACDC Tiramisu), same volumes, same scoring.

    .venv/bin/python tests/bench/bench_segmentation_peer.py --dataset WORK/nnUNet_raw/Dataset131_ACDCh5 \
        [--model services/segmentation/default_model] [--sunnybrook ../shared/data/sunnybrook] [--stride K]

Volumes: the held-out ACDC patients recorded in the dataset's dataset.json (ED and ES; neither
model trained on them for our part; the peer's training split is its own, so it may have seen
them: read its ACDC numbers as an upper bound) and the Sunnybrook study (GE, unseen by both; LV
expert contours at ED and ES). Per model: Dice per class, LV/RV EDV, ESV, EF and LV mass errors
(predicted - expert; ACDC volumes use the dataset's assumed spacing, so they are approximate),
seconds per volume and per slice, and a whole 12 x 20 cine. Ours runs through the embedded ONNX
Runtime path (`load_segmenter`, as `cmrvl analyze` runs it); the peer runs with its own pre/post-
processing in its own venv (.venvs/peer: `python -m venv .venvs/peer && .venvs/peer/bin/pip install
myopari`), in a subprocess (tests/bench/peer_myopari.py); absent, it is skipped with a message.
Baseline only: nothing of the peer goes into the shipped model. Its labels are ACDC's (1 RV, 2
myocardium, 3 LV), remapped here. Both share this machine's CPU cores; no timing assertions.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
PEER_PYTHON = REPO / ".venvs" / "peer" / "bin" / "python"
CLASSES = {1: "LV cavity", 2: "LV myocardium", 3: "RV"}


def run_peer(volumes: list[np.ndarray]) -> tuple[list[np.ndarray], list[float]] | None:
    """The peer's labels (platform values) and seconds per volume, or None when it is not installed."""
    from training.nnunet.convert import ACDC_TO_PLATFORM, remap

    if not PEER_PYTHON.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, **{f"v{i}": v.astype(np.float32) for i, v in enumerate(volumes)})
        run = subprocess.run([str(PEER_PYTHON), str(Path(__file__).with_name("peer_myopari.py")), str(src), str(dst)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"myopari failed: {run.stderr.strip().splitlines()[-1:]}")
        out = np.load(dst)
        labels = [remap(out[f"v{i}"], ACDC_TO_PLATFORM, "myopari") for i in range(len(volumes))]
        return labels, [float(s) for s in out["seconds"]]


def only(labels: np.ndarray, scored_slices, i: int) -> np.ndarray:
    """The label map with the slices outside the scored ones set to background."""
    if scored_slices is None:
        return labels
    out = np.zeros_like(labels)
    out[..., scored_slices[i]] = labels[..., scored_slices[i]]
    return out


def score(preds, refs, affines, names, scored_slices=None, classes=(1, 2, 3)) -> dict:
    """Mean Dice per class (and per phase) and clinical errors per patient (cases `<patient>_ed|es`)."""
    from services.segmentation.function import measure_labels
    from training.nnunet.evaluate import dice

    per_case = {}
    for i, name in enumerate(names):
        sl = scored_slices[i] if scored_slices is not None else slice(None)
        per_case[name] = {CLASSES[c]: dice(preds[i][..., sl] == c, refs[i][..., sl] == c) for c in classes}
    mean = lambda sel: {CLASSES[c]: float(np.mean([v[CLASSES[c]] for k, v in per_case.items() if sel(k)  # noqa: E731
                                                  and v[CLASSES[c]] is not None])) for c in classes}
    errors: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        if not name.endswith("_ed") or f"{name[:-3]}_es" not in names:
            continue
        j = names.index(f"{name[:-3]}_es")
        p = measure_labels(np.stack([only(preds[i], scored_slices, i), only(preds[j], scored_slices, j)], -1),
                           affines[i], ed_phase=0, es_phase=1)
        r = measure_labels(np.stack([only(refs[i], scored_slices, i), only(refs[j], scored_slices, j)], -1),
                           affines[i], ed_phase=0, es_phase=1)
        for key in ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "lv_mass_g", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct"):
            if p.get(key) is not None and r.get(key) is not None:
                errors.setdefault(key, []).append(p[key] - r[key])
    return {"dice": mean(lambda k: True), "dice_ed": mean(lambda k: k.endswith("_ed")),
            "dice_es": mean(lambda k: k.endswith("_es")),
            "mean_abs_error": {k: float(np.mean(np.abs(v))) for k, v in errors.items()},
            "bias": {k: float(np.mean(v)) for k, v in errors.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="staged nnU-Net dataset with held_out in dataset.json")
    parser.add_argument("--model", default=str(REPO / "services" / "segmentation" / "default_model"))
    parser.add_argument("--sunnybrook", default=str(REPO / ".." / "shared" / "data" / "sunnybrook"))
    parser.add_argument("--stride", type=int, default=1,
                        help="every K-th held-out patient only (4: one per ACDC group), both phases")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for our model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import nibabel as nib

    from services.segmentation.inference import load_segmenter
    from training.nnunet.evaluate import held_out_cases

    dataset = Path(args.dataset)
    cases = held_out_cases(dataset)
    patients = sorted({c.rsplit("_", 1)[0] for c in cases})[:: args.stride]
    names = [c for c in cases if c.rsplit("_", 1)[0] in patients]
    images, refs, affines = [], [], []
    for name in names:
        img = nib.load(dataset / "imagesTr" / f"{name}_0000.nii.gz")
        images.append(np.asarray(img.dataobj, np.float32))
        affines.append(img.affine)
        refs.append(np.asarray(nib.load(dataset / "labelsTr" / f"{name}.nii.gz").dataobj, np.uint8))
    n_slices = sum(v.shape[2] for v in images)
    print(f"held-out ACDC: {len(names)} volumes, {n_slices} slices; model {args.model}", flush=True)

    seg = load_segmenter(args.model, backend="onnxruntime", threads=args.threads)
    seg.segment_volume(images[0], affines[0])  # warm-up
    start = time.perf_counter()
    ours = [seg.segment_volume(v, a) for v, a in zip(images, affines)]
    t_ours = time.perf_counter() - start
    peer = run_peer(images)
    results = {"ours": (score(ours, refs, affines, names), t_ours)}
    if peer is None:
        print(f"peer skipped: {PEER_PYTHON} not found (python -m venv .venvs/peer && .venvs/peer/bin/pip install myopari)")
    else:
        results["myopari"] = (score(peer[0], refs, affines, names), sum(peer[1]))

    # Sunnybrook (GE): LV expert contours on the drawn slices; and a whole cine for speed
    cine_rows = []
    sb = Path(args.sunnybrook)
    if (sb / "link.csv").is_file():
        from training.nnunet.sunnybrook import find_cases, load_case

        (sid, cid, d, c), = find_cases(sb)
        case = load_case(d, c, sid, cid)
        vols = [case.study.image[..., case.ed_phase], case.study.image[..., case.es_phase]]
        sb_refs = [case.labels["ed"], case.labels["es"]]
        drawn = [case.contoured_slices["ed"], case.contoured_slices["es"]]
        sb_names = ["sunnybrook_ed", "sunnybrook_es"]
        ours_sb = [seg.segment_volume(v, case.study.affine) for v in vols]
        results["ours"] += (score(ours_sb, sb_refs, [case.study.affine] * 2, sb_names, drawn, classes=(1, 2)),)
        start = time.perf_counter()
        seg.segment_cine(case.study.image, case.study.affine)
        cine_rows.append(("ours (ONNX Runtime, nnU-Net pre/post)", time.perf_counter() - start))
        if peer is not None:
            peer_sb = run_peer(vols)
            results["myopari"] += (score(peer_sb[0], sb_refs, [case.study.affine] * 2, sb_names, drawn, classes=(1, 2)),)
            cine = run_peer([case.study.image[..., t] for t in range(case.study.image.shape[3])])
            cine_rows.append(("myopari (its pipeline, per phase)", sum(cine[1])))
        cine_shape = case.study.image.shape
    seg.close()

    print(f"\n{'model':10s} {'set':11s} {'Dice LV':>8s} {'Dice MYO':>9s} {'Dice RV':>8s} "
          f"{'|dEDV|':>7s} {'|dESV|':>7s} {'|dEF|':>6s} {'|dRVEF|':>8s}  s/volume")
    for model, (acdc, seconds, *rest) in results.items():
        for label, s in [("ACDC", acdc)] + [("Sunnybrook", r) for r in rest]:
            d, e = s["dice"], s["mean_abs_error"]
            fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
            print(f"{model:10s} {label:11s} {fmt(d.get('LV cavity')):>8s} {fmt(d.get('LV myocardium')):>9s} "
                  f"{fmt(d.get('RV')):>8s} {e.get('lv_edv_ml', float('nan')):7.1f} {e.get('lv_esv_ml', float('nan')):7.1f} "
                  f"{e.get('lv_ef_pct', float('nan')):6.1f} {e.get('rv_ef_pct', float('nan')):8.1f}"
                  + (f"  {seconds / len(names):.2f}" if label == "ACDC" else ""))
        print(f"{'':10s} ACDC ED / ES Dice: " + json.dumps({k: {c: round(v, 3) for c, v in acdc[k].items()}
                                                          for k in ("dice_ed", "dice_es")}))
    if cine_rows:
        base = cine_rows[-1][1]
        print(f"\nwhole cine {cine_shape} ({cine_shape[2] * cine_shape[3]} slices):")
        for name, seconds in cine_rows:
            print(f"  {name:40s} {seconds:6.1f} s  {1000 * seconds / (cine_shape[2] * cine_shape[3]):6.1f} ms/slice"
                  f"  ratio to {cine_rows[-1][0].split()[0]} {seconds / base:.2f}")
    print("\nDice on the expert's classes and slices; errors = |predicted - expert| means over patients "
          "(ACDC: ml at the assumed spacing; Sunnybrook: drawn slices).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
