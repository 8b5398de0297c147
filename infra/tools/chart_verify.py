"""Offline checks of the rendered CMR-VL chart, run with the tools venv (.venvs/chart).

    .venvs/chart/bin/python infra/tools/chart_verify.py render  [-f values.yaml ...]
    .venvs/chart/bin/python infra/tools/chart_verify.py validate MANIFEST.yaml [...]

`render` prints the rendered documents as one JSON list (so callers need no YAML parser).
`validate` checks built-in kinds with kubernetes-validate (strict) and the KServe / KubeRay
kinds against the CRD schemas in <repo>/../shared/k8s/crds; it prints a JSON list of problems
("kind/name: message") and exits 1 when there are any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

# The CRD files are large; libyaml parses them in a fraction of pure Python's time.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "cmrvl"
HELM = REPO / ".venvs" / "chart" / "bin" / "helm"
CRD_DIR = REPO / ".." / "shared" / "k8s" / "crds"
KUBERNETES_VERSION = "1.34.0"
RELEASE, NAMESPACE = "cmrvl", "cmrvl"

# Custom kinds without a CRD here: their fields are asserted by the chart tests instead.
CRD_GROUPS = {"serving.kserve.io", "ray.io"}
UNCHECKED_KINDS = {("cert-manager.io/v1", "Certificate")}


def render(values_files: list[str], sets: list[str] = (), show_only: str | None = None) -> list[dict]:
    cmd = [str(HELM), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if show_only:
        cmd += ["--show-only", show_only]
    for f in values_files:
        cmd += ["-f", f]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.load_all(out, Loader=_Loader) if d]


def crd_schema(api_version: str, kind: str) -> dict | None:
    """openAPIV3Schema of a custom kind, from <group>_<plural>.yaml in shared/k8s/crds.

    The CRD files are large YAML; the parsed schemas are cached as JSON in the tools venv,
    keyed by the file's content hash."""
    group, version = api_version.split("/")
    path = CRD_DIR / f"{group}_{kind.lower()}s.yaml"
    if not path.exists():
        return None
    data = path.read_bytes()
    cache = REPO / ".venvs" / "chart" / "crd-cache" / f"{hashlib.sha256(data).hexdigest()}.json"
    if cache.exists():
        versions = json.loads(cache.read_text())
    else:
        versions = {}
        for crd in yaml.load_all(data, Loader=_Loader):
            if crd and crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind:
                for v in crd["spec"]["versions"]:
                    versions[v["name"]] = v["schema"]["openAPIV3Schema"]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(versions))
    return versions.get(version)


def _strict(schema):
    """OpenAPI structural schemas prune unknown fields; make them errors, as kubectl's strict
    field validation does. Objects with x-kubernetes-preserve-unknown-fields stay open."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def validate(docs: list[dict]) -> list[str]:
    import jsonschema
    import kubernetes_validate

    problems = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        where = f"{key[1]}/{doc.get('metadata', {}).get('name')}"
        if key in UNCHECKED_KINDS:
            continue
        if key[0].split("/")[0] in CRD_GROUPS:
            schema = crd_schema(*key)
            if schema is None:
                problems.append(f"{where}: no schema for {key[0]} {key[1]}")
                continue
            # metadata is checked by the API server's own rules, not by the CRD schema.
            schema = _strict(schema)
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            validator = jsonschema.Draft7Validator(schema)
            for err in validator.iter_errors(doc):
                path = ".".join(str(p) for p in err.absolute_path)
                problems.append(f"{where}: {path}: {err.message}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("-f", "--values", action="append", default=[])
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--show-only")
    v = sub.add_parser("validate")
    v.add_argument("manifests", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "render":
        json.dump(render(args.values, args.set, args.show_only), sys.stdout)
        return 0
    report, failed = {}, False
    for manifest in args.manifests:
        docs = [d for d in yaml.load_all(Path(manifest).read_text(), Loader=_Loader) if d]
        problems = validate(docs)
        report[manifest] = {"checked": len(docs), "problems": problems}
        failed = failed or bool(problems)
    json.dump(report, sys.stdout, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
