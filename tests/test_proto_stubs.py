"""The committed Python stubs are exactly what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"


def test_generated_stubs_match_the_proto_files(tmp_path):
    protos = sorted(p.relative_to(PROTO_DIR).as_posix() for p in (PROTO_DIR / "cmrvl" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *protos],
        check=True,
    )
    generated, committed = (sorted(p.relative_to(root) for p in root.rglob("*_pb2*.py*") if p.suffix in (".py", ".pyi"))
                            for root in (tmp_path, PROTO_DIR))  # (not the __pycache__ of an import)
    assert generated == committed, "stubs added or missing: run `python -m grpc_tools.protoc` (see README)"
    for relative in generated:
        assert (tmp_path / relative).read_text() == (PROTO_DIR / relative).read_text(), (
            f"{relative} is stale: regenerate the stubs (see README)")


def test_every_service_is_documented_in_its_proto():
    for proto in (PROTO_DIR / "cmrvl" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith(("service ", "rpc ")):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}: undocumented `{line.strip()}`"
