"""Helpers for tests/test_chart_*.py: find the chart tools, render each values profile once.

Standard library only (the tests run in the main venv); YAML parsing and validation run in the
tools venv that infra/tools/install-chart-tools.sh creates (.venvs/chart).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cmrvl"
TOOLS_BIN = REPO / ".venvs" / "chart" / "bin"
VERIFY = REPO / "infra" / "tools" / "chart_verify.py"
CRD_DIR = REPO / ".." / "shared" / "k8s" / "crds"
RELEASE = NAMESPACE = "cmrvl"

# Profile name -> values files (besides values.yaml).
PROFILES = {
    "default": [],
    "cpu-demo": [str(CHART / "ci" / "cpu-demo-values.yaml")],
    "training": [str(CHART / "ci" / "training-values.yaml")],
}


def require_tool(name: str) -> str:
    """Path of a tool in .venvs/chart/bin; fails under CI=true, skips elsewhere."""
    import pytest

    path = TOOLS_BIN / name
    if path.exists():
        return str(path)
    message = f"{path} missing: run infra/tools/install-chart-tools.sh"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("helm"), *args], capture_output=True, text=True, check=check)


def template_args(values_files, sets=()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", f]
    for s in sets:
        args += ["--set", s]
    return args


@functools.lru_cache(maxsize=None)
def rendered_text(profile: str) -> str:
    return helm(*template_args(PROFILES[profile])).stdout


def render_docs(values_files=(), sets=(), show_only=None) -> list[dict]:
    """Rendered documents (parsed by the tools venv's PyYAML, handed over as JSON)."""
    python = require_tool("python")
    cmd = [python, str(VERIFY), "render"]
    for f in values_files:
        cmd += ["-f", f]
    for s in sets:
        cmd += ["--set", s]
    if show_only:
        cmd += ["--show-only", show_only]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@functools.lru_cache(maxsize=None)
def _rendered_json(profile: str) -> str:
    return json.dumps(render_docs(PROFILES[profile]))


def rendered(profile: str) -> list[dict]:
    """The profile's documents; rendered once per session, a fresh copy per call."""
    return json.loads(_rendered_json(profile))


def validate_sets(sets: dict[str, list[dict]], workdir: Path) -> dict[str, dict]:
    """Validate several document lists in one chart_verify.py run (the CRD schemas load once).
    Returns name -> {"checked": n, "problems": [...]}."""
    paths = {}
    for name, docs in sets.items():
        path = workdir / f"{name}.yaml"
        # JSON is YAML: one JSON document per `---` section.
        path.write_text("\n---\n".join(json.dumps(d) for d in docs))
        paths[str(path)] = name
    python = require_tool("python")
    proc = subprocess.run([python, str(VERIFY), "validate", *paths], capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    return {paths[k]: v for k, v in json.loads(proc.stdout).items()}


def find(docs, kind, name=None):
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return hits


def one(docs, kind, name):
    hits = find(docs, kind, name)
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_templates(doc) -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) of every pod a workload or custom resource creates."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        t = spec["template"]
        return [(f"{kind}/{name}", t.get("metadata", {}), t["spec"])]
    if kind == "RayJob":
        out = []
        rc = spec["rayClusterSpec"]
        t = rc["headGroupSpec"]["template"]
        out.append((f"RayJob/{name}/head", t.get("metadata", {}), t["spec"]))
        for g in rc.get("workerGroupSpecs", []):
            t = g["template"]
            out.append((f"RayJob/{name}/{g['groupName']}", t.get("metadata", {}), t["spec"]))
        if "submitterPodTemplate" in spec:
            t = spec["submitterPodTemplate"]
            out.append((f"RayJob/{name}/submitter", t.get("metadata", {}), t["spec"]))
        return out
    return []
