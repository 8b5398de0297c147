#!/usr/bin/env bash
# Install a local Triton Inference Server for tests and benchmarks, idempotently.
#
#   infra/tools/install-triton.sh            # creates <repo>/.venvs/triton (once)
#   TRITON_PYTHON=python3.11 infra/tools/install-triton.sh
#
# Triton comes from the PyPI package nvidia-pytriton, which ships a `tritonserver` binary and its
# Python backend. It lives in its OWN virtual environment because pytriton needs numpy<2 while the
# main venv uses numpy 2. The script also assembles a backend directory
#   <repo>/.venvs/triton/backends/python        -> pytriton's Python backend (symlink)
#   <repo>/.venvs/triton/backends/onnxruntime/model.py  (tests/triton/onnxruntime_backend/model.py)
# The second one is a TEST STAND-IN for Triton's C++ ONNX Runtime backend: a Python-based backend
# registered under the backend name `onnxruntime`, so the production model repository
# (config.pbtxt with `backend: "onnxruntime"`) is served unchanged.
# Start the server with tests/triton_server.py (it sets LD_LIBRARY_PATH for the Python stub).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${TRITON_VENV:-$REPO/.venvs/triton}"
PY="${TRITON_PYTHON:-python3.11}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
# pip is a no-op when the pinned set is already satisfied, so reruns are cheap.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.17,<1.24"

TRITON_HOME="$("$VENV/bin/python" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')"
test -x "$TRITON_HOME/bin/tritonserver" || { echo "tritonserver binary not found in $TRITON_HOME" >&2; exit 1; }

BACKENDS="$VENV/backends"
PYVER="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
mkdir -p "$BACKENDS/python" "$BACKENDS/onnxruntime"
# The Python backend: pytriton's shared library + utils, and the stub built for THIS venv's Python
# (pytriton ships one stub per Python version and normally copies it in at start-up). Copies, not
# symlinks: Triton refuses backend libraries that resolve outside the backend directory.
install -m 0755 "$TRITON_HOME/backends/python/libtriton_python.so" "$BACKENDS/python/libtriton_python.so"
install -m 0644 "$TRITON_HOME/backends/python/triton_python_backend_utils.py" "$BACKENDS/python/triton_python_backend_utils.py"
install -m 0755 "$TRITON_HOME/python_backend_stubs/$PYVER/triton_python_backend_stub" "$BACKENDS/python/triton_python_backend_stub"
install -m 0644 "$REPO/tests/triton/onnxruntime_backend/model.py" "$BACKENDS/onnxruntime/model.py"

echo "tritonserver: $TRITON_HOME/bin/tritonserver"
echo "backend directory: $BACKENDS (python, onnxruntime [test stand-in])"
