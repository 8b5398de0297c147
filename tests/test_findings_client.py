"""Findings serving side: the OpenAI-compatible client, the embedded transformers backend and the
pipeline, against real HTTP and a real (tiny) Qwen2.5-VL.

The HTTP server here is a stdlib `http.server` that STANDS IN FOR vLLM: it speaks the same
chat-completions API and either answers with the tiny model run in process (the embedded backend)
or plays a failure mode (429/503, slow, down, malformed). The same client against a real vLLM is
tests/integration/test_vllm_server.py.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest

from services.findings import catalog
from services.findings.pipeline import SCHEMA, build_messages, generate_findings
from services.findings.vlm_client import VLMClient, VLMError, VLMTimeout, VLMUnavailable
from tests.vlm_fixtures import (SCRIPTED_ANSWER, SERVED_NAME, StandInServer, completion, embedded_responder,
                                free_port, stream_chunks, tiny_qwen25_vl)

pytestmark = pytest.mark.timeout(300)


def _png(rng, size) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _mp4(rng, size, n_frames, fps) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(n_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def study_inputs():
    """Media for the effusion (10 images) and wall-motion (1 video) tasks, sized by the catalog."""
    rng = np.random.default_rng(0)
    effusion, motion = catalog.get_task("pericardial_effusion"), catalog.get_task("wall_motion")
    v = motion.visual
    return {
        effusion.id: [(_png(rng, effusion.visual["size_px"]), "image/png") for _ in range(effusion.n_visuals)],
        # a short clip keeps the CPU test fast; the integration tier sends the full catalog video
        motion.id: [(_mp4(rng, v["size_px"], 2 * v["frames_per_cycle"], v["fps"]), "video/mp4")],
    }


@pytest.fixture(scope="module")
def embedded():
    from services.findings.embedded import EmbeddedBackend

    return EmbeddedBackend(tiny_qwen25_vl(), model_name="cmr-vl-tiny", version="test-1", max_new_tokens=32)


@pytest.fixture(scope="module")
def standin(embedded):
    with StandInServer(embedded_responder(embedded)) as server:
        yield server


def _client(base_url, **kw) -> VLMClient:
    kw.setdefault("backoff_s", 0.01)
    return VLMClient(base_url, SERVED_NAME, version="test-1", **kw)


def _check_document(doc, backend_name):
    assert doc["schema"] == SCHEMA
    by_id = {f["task_id"]: f for f in doc["findings"]}
    assert list(by_id) == ["pericardial_effusion", "wall_motion"]  # catalog order
    effusion, motion = by_id["pericardial_effusion"], by_id["wall_motion"]
    # the tiny model answers SCRIPTED_ANSWER to everything: right for one question, nonsense for the other
    assert effusion["answer"] == SCRIPTED_ANSWER
    assert effusion["status"] == "ok" and effusion["finding"]["status"] == "present"
    assert effusion["finding"]["grade"] == "small"
    assert motion["status"] == "unparseable" and motion["finding"]["status"] == "unparseable"
    assert motion["error"]  # the parser's reason
    for f in doc["findings"]:
        assert f["model"]["backend"] == backend_name and f["model"]["version"] == "test-1"
        assert f["prompt"] == catalog.build_user_message(f["task_id"])
        assert f["usage"]["completion_tokens"] > 0


def test_embedded_backend_runs_the_pipeline(embedded, study_inputs):
    doc = generate_findings(study_inputs, embedded)
    _check_document(doc, "embedded")
    assert doc["findings"][0]["usage"]["prompt_tokens"] > 10 * 64  # ten 224 px images = 10 x 64 vision tokens


def test_client_through_openai_endpoint_standing_in_for_vllm(standin, study_inputs):
    with _client(standin.base_url) as client:
        assert client.list_models() == [SERVED_NAME]
        n_before = len(standin.requests)
        doc = generate_findings(study_inputs, client, concurrency=2)
    _check_document(doc, "openai")
    assert doc["findings"][0]["model"]["served_name"] == SERVED_NAME
    # The wire format: one user turn whose parts rebuild the training prompt byte for byte, and
    # media that decode to exactly the bytes we were given.
    sent = {catalog.join_parts(r["messages"][0]["content"]): r for r in standin.requests[n_before:]}
    for task_id, items in study_inputs.items():
        prompt = catalog.build_user_message(task_id)
        body = sent[prompt]
        assert body["model"] == SERVED_NAME and body["temperature"] == 0.0
        media = [p for p in body["messages"][0]["content"] if p["type"] != "text"]
        for part, (data, mime) in zip(media, items, strict=True):
            url = part[part["type"]]["url"]
            header, payload = url.split(",", 1)
            assert header == f"data:{mime};base64" and base64.b64decode(payload) == data


def test_streaming_gives_the_same_answer(standin, study_inputs):
    messages = build_messages("pericardial_effusion", study_inputs["pericardial_effusion"])
    with _client(standin.base_url, stream=True) as client:
        result = client.chat(messages, max_tokens=32)
    assert standin.requests[-1]["stream"] is True
    assert result.text == SCRIPTED_ANSWER and result.finish_reason == "stop"


def test_kserve_route_prefix():
    with StandInServer(lambda body: (200, {}, completion("There is no pericardial effusion.")),
                       prefix="/openai/v1") as server, _client(server.base_url) as client:
        assert server.base_url.endswith("/openai/v1")
        assert client.chat([{"role": "user", "content": "x"}]).text == "There is no pericardial effusion."


def test_retries_429_and_503_then_succeeds():
    answers = iter([(429, {"Retry-After": "0"}, {"error": {"message": "rate limited"}}),
                    (503, {}, {"error": {"message": "loading"}}),
                    (200, {}, completion("There is no pericardial effusion."))])
    with StandInServer(lambda body: next(answers)) as server, _client(server.base_url) as client:
        result = client.chat([{"role": "user", "content": "x"}])
    assert result.attempts == 3 and len(server.requests) == 3
    assert result.text == "There is no pericardial effusion."


def test_overloaded_server_raises_unavailable_with_partial_document(study_inputs):
    with StandInServer(lambda body: (503, {}, {"error": {"message": "overloaded"}})) as server, \
            _client(server.base_url, max_attempts=3) as client:
        with pytest.raises(VLMUnavailable, match="503.*overloaded.*after 3 attempts") as info:
            generate_findings(study_inputs, client, concurrency=1)
    partial = info.value.partial
    assert partial["schema"] == SCHEMA
    assert {f["status"] for f in partial["findings"]} == {"error"}
    assert len(server.requests) == 3  # concurrency 1: the second task was cancelled, not sent


def test_client_error_is_not_retried_and_marks_only_that_finding(study_inputs):
    def respond(body):
        if body["messages"][0]["content"][0]["type"] == "video_url":
            return 400, {}, {"error": {"message": "At most 0 video(s) may be provided in one prompt."}}
        return 200, {}, completion("There is no pericardial effusion.")

    with StandInServer(respond) as server, _client(server.base_url) as client:
        doc = generate_findings(study_inputs, client)
    by_id = {f["task_id"]: f for f in doc["findings"]}
    assert by_id["wall_motion"]["status"] == "error" and "HTTP 400" in by_id["wall_motion"]["error"]
    assert by_id["pericardial_effusion"]["status"] == "ok"
    assert by_id["pericardial_effusion"]["finding"]["status"] == "absent"
    assert len(server.requests) == 2


def test_slow_server_raises_timeout(study_inputs):
    def respond(body):
        time.sleep(1.5)
        return 200, {}, completion("too late")

    with StandInServer(respond) as server, _client(server.base_url, timeout_s=0.3) as client:
        t0 = time.monotonic()
        with pytest.raises(VLMTimeout, match="no answer within 0.3 s"):
            generate_findings({"pericardial_effusion": study_inputs["pericardial_effusion"]}, client)
        assert time.monotonic() - t0 < 1.5  # not retried, not waited out
        assert len(server.requests) == 1


def test_server_down_raises_unavailable():
    with _client(f"http://127.0.0.1:{free_port()}/v1", max_attempts=2) as client:
        with pytest.raises(VLMUnavailable, match="cannot reach.*after 2 attempts"):
            client.chat([{"role": "user", "content": "x"}])
        with pytest.raises(VLMUnavailable):
            client.list_models()


@pytest.mark.parametrize("status,payload,expected", [
    (200, completion("Lorem ipsum dolor sit amet."), "unparseable"),  # nonsense from the model
    (200, completion(""), "unparseable"),
    (200, {"choices": [{"message": {"role": "assistant", "content": None}}]}, "unparseable"),
    (200, b"<html>proxy error</html>", "error"),  # not JSON
    (200, {"object": "chat.completion"}, "error"),  # no choices
    (200, ["{not json", "[DONE]"], "error"),  # a broken event stream
])
def test_malformed_output_never_crashes(status, payload, expected, study_inputs):
    with StandInServer(lambda body: (status, {}, payload)) as server, _client(server.base_url) as client:
        doc = generate_findings({"pericardial_effusion": study_inputs["pericardial_effusion"]}, client)
    (finding,) = doc["findings"]
    assert finding["status"] == expected and finding["error"]


def test_wrong_number_of_media_is_refused_before_any_request(study_inputs):
    with StandInServer(lambda body: (200, {}, completion("x"))) as server, _client(server.base_url) as client:
        doc = generate_findings({"pericardial_effusion": study_inputs["pericardial_effusion"][:9]}, client,
                                not_assessable={"lge": "the study has no LGE series"})
    by_id = {f["task_id"]: f for f in doc["findings"]}
    assert by_id["pericardial_effusion"]["status"] == "error" and "takes 10" in by_id["pericardial_effusion"]["error"]
    assert by_id["lge"]["error"] == "not assessable: the study has no LGE series"
    assert server.requests == []
    with pytest.raises(KeyError):
        generate_findings({"no_such_task": []}, client)


def test_client_needs_a_base_url():
    with pytest.raises(ValueError, match="CMRVL_VLM_BASE_URL"):
        VLMClient("", SERVED_NAME)
    with pytest.raises(VLMError):  # VLMUnavailable and VLMTimeout are VLMErrors too
        raise VLMTimeout("x")


def test_concurrency_is_bounded(study_inputs):
    """Every catalog task in flight at once would overload a small server: at most `concurrency`."""
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def respond(body):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return 200, {}, completion("There is no thrombus.")

    image = study_inputs["pericardial_effusion"][0]
    inputs = {t.id: study_inputs["wall_motion"] if t.is_video else [image] * t.n_visuals
              for t in catalog.load_catalog().tasks}
    with StandInServer(respond) as server, _client(server.base_url) as client:
        doc = generate_findings(inputs, client, concurrency=2)
    assert len(server.requests) == len(inputs) >= 5
    assert state["max"] == 2
    assert [f["task_id"] for f in doc["findings"]] == catalog.load_catalog().ids()
    thrombus = next(f for f in doc["findings"] if f["task_id"] == "lv_thrombus")
    assert thrombus["status"] == "ok" and thrombus["finding"]["status"] == "absent"
