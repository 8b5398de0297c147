"""The Helm chart renders, lints, validates and passes checkov, for every CI profile.

Tools come from <repo>/.venvs/chart (infra/tools/install-chart-tools.sh); without them the tests
skip, or fail under CI=true. Each profile is rendered once per session.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra" / "tools"))
import chart_testlib as lib  # noqa: E402
from chart_cases import EXTERNAL_SETS  # noqa: E402

PROFILES = list(lib.PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_strict(profile):
    args = ["lint", "--strict", str(lib.CHART), "--namespace", lib.NAMESPACE]
    for f in lib.PROFILES[profile]:
        args += ["-f", f]
    proc = lib.helm(*args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def _broken_docs() -> list[dict]:
    """Rendered documents with one mistake each: a typo in a built-in kind, a wrongly cased
    field in an InferenceService, a wrong type in a RayJob."""
    training = lib.rendered("training")
    dep = copy.deepcopy(lib.one(training, "Deployment", "cmrvl-preprocess"))
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    isvc = copy.deepcopy(lib.one(lib.rendered("default"), "InferenceService", "cmr-vl"))
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://x"  # wrong case
    rayjob = copy.deepcopy(lib.one(training, "RayJob", "cmrvl-vlm-sft"))
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    return [dep, isvc, rayjob]


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """One validator run over every profile plus the deliberately broken documents."""
    if not lib.CRD_DIR.is_dir():
        pytest.skip(f"CRD schemas not found at {lib.CRD_DIR}")
    sets = {p: lib.rendered(p) for p in PROFILES}
    sets["external"] = lib.render_docs(sets=EXTERNAL_SETS)
    sets["broken"] = _broken_docs()
    return lib.validate_sets(sets, tmp_path_factory.mktemp("validate"))


@pytest.mark.parametrize("profile", PROFILES)
def test_manifests_valid_against_kubernetes_and_crd_schemas(profile, validation):
    docs = lib.rendered(profile)
    report = validation[profile]
    assert report["problems"] == []
    assert report["checked"] == len(docs)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "NetworkPolicy", "StatefulSet", "Job"} <= kinds
    if profile == "default":
        assert {"InferenceService", "ServingRuntime", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    if profile == "training":
        assert "RayJob" in kinds


def test_external_endpoints_render_valid_manifests(validation):
    report = validation["external"]
    assert report["problems"] == []
    assert report["checked"] == len(lib.render_docs(sets=EXTERNAL_SETS)) > 20


def test_validators_reject_broken_manifests(validation):
    """The validation step can fail, for built-in kinds and for custom kinds alike."""
    problems = validation["broken"]["problems"]
    assert any(p.startswith("Deployment/cmrvl-preprocess") for p in problems), problems
    assert any(p.startswith("InferenceService/cmr-vl") and "storageURI" in p for p in problems), problems
    assert any(p.startswith("RayJob/cmrvl-vlm-sft") and "four" in p for p in problems), problems
    assert len(problems) == 3, problems


# Checks skipped in the chart (checkov.io/skipN annotations) and the Dockerfiles
# (#checkov:skip comments), each with its reason next to it.
EXPLAINED_SKIPS = {
    "CKV_K8S_35",  # secrets as env vars: the apps read CMRVL_*/AWS_* env, set from secretKeyRef
    "CKV_K8S_43",  # image digests: tags are pinned; values take a digest, which lifts the skip
    "CKV_DOCKER_2",  # HEALTHCHECK: Kubernetes probes do this
}


def test_checkov_passes_with_explained_skips(tmp_path):
    checkov = lib.require_tool("checkov")
    for profile in PROFILES:
        (tmp_path / f"{profile}.yaml").write_text(lib.rendered_text(profile))
    (tmp_path / "external.yaml").write_text(lib.helm(*lib.template_args([], EXTERNAL_SETS)).stdout)
    out = tmp_path / "out"
    proc = subprocess.run(
        [checkov, "-d", str(tmp_path), "-d", str(lib.REPO / "infra" / "images"),
         "--framework", "kubernetes", "dockerfile", "--skip-download", "--compact",
         "-o", "json", "--output-file-path", str(out)],
        capture_output=True, text=True, env={**os.environ, "LOG_LEVEL": "ERROR"},
    )
    reports = json.loads((out / "results_json.json").read_text())
    reports = {r["check_type"]: r for r in (reports if isinstance(reports, list) else [reports])}
    assert set(reports) == {"kubernetes", "dockerfile"}, list(reports)
    for kind, report in reports.items():
        results = report["results"]
        failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
        assert failed == [], (kind, failed)
        assert report["summary"]["passed"] > (500 if kind == "kubernetes" else 50)
        for check in results["skipped_checks"]:
            assert check["check_id"] in EXPLAINED_SKIPS, check["check_id"]
            reason = (check.get("check_result") or {}).get("suppress_comment", "")
            assert len(reason) > 20, f"{check['check_id']} on {check['resource']} skipped without a reason"
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("gateway.replicas=two", "/gateway/replicas"),
        ("triton.gpus=-1", "/triton/gpus"),
        ("vlm.maxModelLen=4096", "/vlm/maxModelLen"),
        ("vlm.limitMmPerPrompt.image=4", "/vlm/limitMmPerPrompt/image"),
        ("vlm.dtype=int3", "/vlm/dtype"),
        ("minio.replicas=2", "/minio/replicas"),
        ("objectStore.endpoint=http://minio:9000", "/objectStore/endpoint"),
        ("gateway.resources.limits=null", "/gateway/resources"),
        ("gateway.env.CMRVL_INTERNAL_TOKEN=hunter2", "CMRVL_INTERNAL_TOKEN"),
        ("gateway.tls.enabled=yes please", "/gateway/tls/enabled"),
        ("preprocess.autoscaling.targetCPUUtilizationPercentage=150", "/preprocess/autoscaling"),
        ("gatway.replicas=1", "gatway"),
        ("clusterDomain=Cluster_Local", "/clusterDomain"),
        ("gateway.pacsTarget=pacs.example.org:104", "/gateway/pacsTarget"),
        ("gateway.scratchSize=lots", "/gateway/scratchSize"),
        ("gateway.stageTargets=mesh", "/gateway/stageTargets"),
        ("gateway.env.CMRVL_FINDINGS_TARGET=findings:50051", "CMRVL_FINDINGS_TARGET"),  # a value of its own
        ("gateway.env.CMRVL_WORKFLOW_DATABASE_URL=sqlite://", "CMRVL_WORKFLOW_DATABASE_URL"),
        ("vlm.scratchSize=20GB", "/vlm/scratchSize"),
        ("networkPolicy.egress.pacsTo[0].ipBlock.cidr=10.0.0.1", "/networkPolicy/egress/pacsTo"),
        ("networkPolicy.egress.dnsTo[0].nodeSelector.x=y", "/networkPolicy/egress/dnsTo"),
        ("networkPolicy.egres.dnsTo=null", "egres"),
        ("workflowDatabase.enabled=maybe", "/workflowDatabase/enabled"),
        ("workflowDatabase.username=cmrvl-gw", "/workflowDatabase/username"),
        ("workflowDatabase.persistence.size=20GB", "/workflowDatabase/persistence/size"),
        ("workflowDatabase.external.port=70000", "/workflowDatabase/external/port"),
        ("workflowDatabase.external.url=postgresql://u:p@h/db", "/workflowDatabase/external"),
    ],
)
def test_schema_rejects_wrong_values(setting, message):
    flag = "--set-string" if setting.endswith(("hunter2", "yes please", "maybe")) else "--set"
    proc = lib.helm(*lib.template_args([]), flag, setting, check=False)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


# Blocks whose inner keys are Kubernetes or training fields documented by their parent's comment.
SELF_DESCRIBING_BLOCKS = {"resources", "headResources", "workerResources", "config", "issuerRef",
                          "limitMmPerPrompt", "requests", "limits", "matchLabels", "namespaceSelector",
                          "podSelector"}


def test_every_values_field_is_documented():
    """values.yaml documents field by field: each key has a comment on the line above (or on
    its own line), except inside self-describing blocks and list items."""
    lines = (lib.CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        parent = next((lines[j] for j in range(i - 1, -1, -1)
                       if lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) < indent), "")
        if parent.lstrip().startswith("-") or parent.strip().rstrip(":") in SELF_DESCRIBING_BLOCKS:
            continue
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if "#" not in line and not previous.strip().startswith("#"):
            undocumented.append(f"line {i + 1}: {line.strip()}")
    assert undocumented == []
    assert len(lines) > 300


def test_profiles_differ_as_intended():
    gpu = "nvidia.com/gpu"

    def gpu_users(docs):
        users = {}
        for d in docs:
            text = json.dumps(d)
            if gpu in text:
                users[f"{d['kind']}/{d['metadata']['name']}"] = text.count(f'"{gpu}"')
        return users

    default, cpu, training = (lib.rendered(p) for p in PROFILES)
    assert set(gpu_users(default)) == {"Deployment/cmrvl-triton", "InferenceService/cmr-vl"}
    assert gpu_users(cpu) == {}, "the CPU demo must not request GPUs"
    assert {"RayJob/cmrvl-vlm-sft", "Job/cmrvl-nnunet-train"} <= set(gpu_users(training))
    assert not lib.find(default, "RayJob") and not lib.find(default, "Job", "cmrvl-nnunet-train")
    assert not lib.find(cpu, "InferenceService")
    # CPU demo: Triton still serves the model, on CPU; findings gets no bundled VLM endpoint.
    env = {e["name"]: e.get("value") for e in lib.one(cpu, "Deployment", "cmrvl-findings")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CMRVL_VLM_BASE_URL"] == ""


@pytest.mark.parametrize(
    ("template", "kinds"),
    [
        ("templates/training/vlm-rayjob.yaml", {"RayJob", "ServiceAccount", "ConfigMap", "NetworkPolicy"}),
        ("templates/training/nnunet-job.yaml", {"Job", "ServiceAccount"}),
    ],
)
def test_training_show_only_output_is_self_contained(template, kinds):
    """`helm template --show-only <file> | kubectl apply -f -` launches the job: the output
    holds the ServiceAccounts and ConfigMaps its pods refer to (the S3 Secret comes from the
    installed release)."""
    docs = lib.render_docs(lib.PROFILES["training"], show_only=template)
    assert {d["kind"] for d in docs} == kinds
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        assert d["metadata"]["namespace"] == lib.NAMESPACE
        for where, _, spec in lib.pod_templates(d):
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, where
            for vol in spec.get("volumes", []):
                if "configMap" in vol:
                    assert ("ConfigMap", vol["configMap"]["name"]) in names, where
            for c in spec["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == "cmrvl-s3", (where, ref)
