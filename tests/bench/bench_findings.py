"""Benchmark: findings-stage overhead per study, and requests per second through the client vs
direct HTTP calls to the same vLLM server.

    .venv/bin/python tests/bench/bench_findings.py [--rounds 3] [--concurrency 4] [--base-url URL]

Starts the tiny Qwen2.5-VL on a real vLLM (infra/tools/install-vllm.sh) unless --base-url names
a running OpenAI-compatible server (its model must answer the served name given by --model).
For each round, on a synthetic phantom study (cine + LGE, every catalog task):
  (a) baseline: the request bodies built beforehand, POSTed straight to the server with httpx
      (same concurrency): the server's own time plus the bare minimum of HTTP.
  (b) candidate: `generate_findings` from the prepared visual inputs: data URLs, messages from the
      catalog, the client (retries, streaming off), answer parsing, the findings document.
Prints input preparation time, (a) and (b) per study, requests/s for both, and the ratios.
Everything shares this machine's CPU cores with the server; no GPU is used.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_inputs():
    """Visual inputs (PNG / MP4 bytes) of every catalog task for one synthetic study; returns
    (inputs, seconds)."""
    from services.findings import visual_inputs as vi
    from services.findings.catalog import load_catalog
    from services.findings.pipeline import inputs_from_visual
    from tests.test_findings_visual_inputs import make_cine, make_lge

    cine, cine_labels = make_cine()
    lge = make_lge()[0]
    t0 = time.perf_counter()
    inputs = {}
    for task in load_catalog().tasks:
        visual = vi.build_visual_input(task, cine=cine, cine_labels=cine_labels, lge=lge, t2=lge)
        # PNG-encoded here, as the service does when it stores the inputs (write_inputs)
        inputs[task.id] = [(_png(source) if media_type == "image/png" else source, media_type)
                           for source, media_type in inputs_from_visual(visual)]
    return inputs, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--base-url", default="", help="use this running server instead of starting vLLM")
    parser.add_argument("--model", default="", help="served model name (default: the tiny model's)")
    args = parser.parse_args()

    import httpx

    from services.findings.pipeline import build_messages, generate_findings
    from services.findings.vlm_client import VLMClient
    from tests.vlm_fixtures import SERVED_NAME, VLLMServer, tiny_qwen25_vl, vllm_python

    model = args.model or SERVED_NAME
    server = None
    if not args.base_url:
        if not vllm_python().exists():
            print("vLLM not installed: run infra/tools/install-vllm.sh, or pass --base-url", file=sys.stderr)
            return 2
        log = Path(tempfile.mkdtemp(prefix="bench-vllm-")) / "vllm.log"
        server = VLLMServer(tiny_qwen25_vl(), log).start()
        print(f"vLLM (tiny Qwen2.5-VL, CPU) started in {server.start_s:.1f} s, "
              f"resident memory {server.rss_mb():.0f} MB; log {log}", flush=True)
    base_url = args.base_url or server.base_url
    try:
        inputs, prep_s = prepare_inputs()
        prep = [prep_s] + [prepare_inputs()[1] for _ in range(args.rounds - 1)]
        n_req = len(inputs)
        print(f"study: {n_req} questions, "
              f"{sum(len(v) for v in inputs.values())} media items; concurrency {args.concurrency}", flush=True)

        # (a) baseline bodies, serialized once, outside the timing
        bodies = [json.dumps({"model": model, "messages": build_messages(task_id, items),
                              "max_tokens": 64, "temperature": 0.0, "stream": False}).encode()
                  for task_id, items in inputs.items()]
        http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.concurrency))

        def direct(body: bytes) -> str:
            r = http.post(f"{base_url}/chat/completions", content=body,
                          headers={"Content-Type": "application/json"})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        client = VLMClient(base_url, model, max_tokens=64, timeout_s=600, max_connections=args.concurrency)
        direct(bodies[0])  # warm-up: first multimodal request compiles/allocates on the server
        base_s, cand_s = [], []
        for _ in range(args.rounds):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                answers = list(pool.map(direct, bodies))
            base_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            doc = generate_findings(inputs, client, concurrency=args.concurrency, max_tokens=64)
            cand_s.append(time.perf_counter() - t0)
            assert [f["answer"] for f in doc["findings"]] == answers  # same work on both sides
        client.close()
        http.close()
    finally:
        if server is not None:
            server.stop()

    med = statistics.median
    b, c, p = med(base_s), med(cand_s), med(prep)
    print(f"\nmedian of {args.rounds} rounds, per study ({n_req} requests):")
    print(f"  input preparation (visual_inputs, all tasks)    {p:8.3f} s")
    print(f"  (a) direct HTTP to the server (baseline)        {b:8.3f} s   {n_req / b:6.2f} req/s")
    print(f"  (b) generate_findings via VLMClient (candidate) {c:8.3f} s   {n_req / c:6.2f} req/s")
    print(f"  client overhead (b - a)                         {c - b:8.3f} s")
    print(f"  ratio requests/s (b / a)                        {b / c:8.3f}")
    print(f"  ratio findings stage (prep + b) / a             {(p + c) / b:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
