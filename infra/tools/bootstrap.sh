#!/usr/bin/env bash
# Set up a fresh machine: `.venv/` with the `cmrvl` command; with --dev also the test tooling
# (pytest, the Helm/kubernetes-validate/checkov tools, a Triton server in its own venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$dev" = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[dev]'
  bash infra/tools/install-chart-tools.sh
  bash infra/tools/install-triton.sh
  bash infra/tools/install-vllm.sh
else
  .venv/bin/python -m pip install -q -e .
fi
.venv/bin/cmrvl --help > /dev/null
echo "bootstrap done: .venv/bin/cmrvl"
