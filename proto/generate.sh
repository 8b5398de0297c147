#!/usr/bin/env bash
# Regenerate the committed Python stubs (tests/test_proto_stubs.py fails when they drift).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-../.venv/bin/python}"
rm -f cmrvl/v1/*_pb2*.py cmrvl/v1/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. cmrvl/v1/*.proto
