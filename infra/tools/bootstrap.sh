#!/usr/bin/env bash
# Set up a fresh machine: `.venv/` with the `cmrvl` command; with --dev also the test tooling:
# the Helm/kubernetes-validate/checkov tools, and the servers with pins of their own, each in its
# own venv under .venvs/ (Triton: numpy<2; vLLM: torch 2.13 CPU; training: llamafactory + Ray),
# the DICOM tools tests check against (Orthanc, DCMTK, dicom3tools) and PostgreSQL for the
# gateway's workflow database (apt, as root).
set -euo pipefail
cd "$(dirname "$0")/../.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$dev" = 0 ]; then
  .venv/bin/python -m pip install -q -e .
else
  # The side venvs are independent: install them while the main one installs. The two apt
  # installs (DICOM tools, PostgreSQL) run in turn in one job: apt takes one lock at a time.
  mkdir -p .venvs
  pids=()
  for tools in chart-tools triton vllm train "dicom-tools postgres"; do
    (for tool in $tools; do bash "infra/tools/install-$tool.sh" > ".venvs/install-$tool.log" 2>&1 || exit 1; done) &
    pids+=("$!:$tools")
  done
  .venv/bin/python -m pip install -q -e '.[dev]'
  failed=0
  for entry in "${pids[@]}"; do
    if ! wait "${entry%%:*}"; then
      for tool in ${entry##*:}; do
        echo "install-$tool.sh failed or did not run:" >&2
        tail -n 30 ".venvs/install-$tool.log" >&2 2>/dev/null || true
      done
      failed=1
    fi
  done
  [ "$failed" = 0 ]
fi
.venv/bin/cmrvl --help > /dev/null
echo "bootstrap done: .venv/bin/cmrvl"
