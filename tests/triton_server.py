"""Start a real Triton Inference Server (from the PyPI package nvidia-pytriton) on 127.0.0.1.

It needs infra/tools/install-triton.sh (creates <repo>/.venvs/triton: pytriton, numpy<2,
onnxruntime, and a backend directory with the Python backend and the `onnxruntime` TEST STAND-IN,
tests/triton/onnxruntime_backend/model.py). The model repository is served as exported, unchanged.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRITON_VENV = Path(os.environ.get("TRITON_VENV", REPO / ".venvs" / "triton"))
BACKENDS = TRITON_VENV / "backends"


def triton_missing_reason() -> str | None:
    """Why a Triton test cannot run here, or None."""
    if not (BACKENDS / "onnxruntime" / "model.py").is_file() or not (BACKENDS / "python").is_dir():
        return f"Triton not installed in {TRITON_VENV}: run infra/tools/install-triton.sh"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_paths() -> tuple[Path, str]:
    """tritonserver binary and the LD_LIBRARY_PATH it needs."""
    py = TRITON_VENV / "bin" / "python"
    out = subprocess.run([str(py), "-c", "import pathlib, sysconfig, pytriton; "
                          "print(pathlib.Path(pytriton.__file__).parent); print(sysconfig.get_config_var('LIBDIR'))"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    pytriton_dir, libdir = Path(out[0]), out[1]
    # pytriton's bundled shared libraries, and the libpython the Python-backend stub links against
    # (the interpreter's own LIBDIR, not the venv: a venv has no libpython).
    libs = [str(pytriton_dir.parent / "nvidia_pytriton.libs"), libdir]
    if os.environ.get("LD_LIBRARY_PATH"):
        libs.append(os.environ["LD_LIBRARY_PATH"])
    return pytriton_dir / "tritonserver" / "bin" / "tritonserver", ":".join(libs)


@contextmanager
def triton_server(model_repository: Path, log_path: Path, startup_timeout_s: float = 90.0, ort_threads: int = 0):
    """Yield the gRPC url (host:port) of a running Triton serving ``model_repository``."""
    binary, ld_path = _venv_paths()
    grpc_port, http_port = _free_port(), _free_port()
    env = dict(os.environ, LD_LIBRARY_PATH=ld_path,
               PATH=f"{TRITON_VENV / 'bin'}:{os.environ.get('PATH', '')}")
    if ort_threads:
        env["CMRVL_ORT_THREADS"] = str(ort_threads)
    cmd = [str(binary), f"--model-repository={model_repository}", f"--backend-directory={BACKENDS}",
           "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
           "--http-address=127.0.0.1", f"--http-port={http_port}", "--allow-metrics=false",
           "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0"]
    url = f"127.0.0.1:{grpc_port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(url)
            deadline = time.monotonic() + startup_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {proc.returncode}; log:\n{log_path.read_text()[-4000:]}")
                try:
                    if client.is_server_ready(client_timeout=1.0):
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tritonserver not ready in {startup_timeout_s} s; log:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.25)
            client.close()
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
