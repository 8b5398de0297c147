#!/usr/bin/env bash
# Install the VLM training environment (LLaMA-Factory + Ray Train), idempotently.
#
#   infra/tools/install-train.sh            # creates <repo>/.venvs/train (once)
#   TRAIN_PYTHON=python3.11 infra/tools/install-train.sh
#
# Its own venv: llamafactory 0.9.5 pins pillow/av/pydantic/fsspec/datasets versions that differ from
# the main venv's (PyAV and Pillow produce the findings inputs, so the main venv keeps its own).
# The main test suite reaches this venv through subprocesses only (tests/test_vqa_dataset.py).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${TRAIN_VENV:-$REPO/.venvs/train}"
PY="${TRAIN_PYTHON:-python3.11}"
LLAMAFACTORY_VERSION="0.9.5"
RAY_VERSION="2.49.2"  # = charts/cmrvl values training.vlm.rayVersion
DEEPSPEED_VERSION="0.18.4"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
have() { "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
if ! have llamafactory "$LLAMAFACTORY_VERSION" || ! have ray "$RAY_VERSION" || ! have torch "2.14.1" \
    || ! have deepspeed "$DEEPSPEED_VERSION" || ! have rouge-chinese "1.0.3"; then
  # torch/torchvision first and pinned: a torchvision that imports is what llamafactory needs.
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
  # jieba/nltk/rouge-chinese: LLaMA-Factory's "metrics" extra (BLEU-4, ROUGE of predict_with_generate).
  # deepspeed: the SFT config's ZeRO-3 (transformers checks for it when parsing the config); no ops are
  # prebuilt (DS_BUILD_OPS=0), DeepSpeed compiles what it needs on the GPU nodes.
  DS_BUILD_OPS=0 "${PIP[@]}" "llamafactory==$LLAMAFACTORY_VERSION" "ray[train]==$RAY_VERSION" "torch==2.14.1" \
    "torchvision==0.29.1" "deepspeed==$DEEPSPEED_VERSION" jieba nltk rouge-chinese pyyaml
fi
# The torchaudio wheel pulled by llamafactory is built for another torch and fails to load; nothing
# here needs audio, and transformers imports torchaudio whenever it is installed.
if ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
  "$VENV/bin/python" -m pip uninstall --quiet -y torchaudio 2>/dev/null || true
fi
# The repo itself (training.vlm.*, services.findings.catalog/answers) without its server deps.
"${PIP[@]}" --no-deps -e "$REPO"

"$VENV/bin/python" -c "import llamafactory, ray, torch, torchvision, transformers, deepspeed, jieba, nltk, rouge_chinese; print('llamafactory', llamafactory.__version__, 'ray', ray.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "train venv: $VENV"
