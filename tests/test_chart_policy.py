"""What the rendered chart does: hardening, probes, limits, wiring between components, who may
reach whom under the NetworkPolicies, and where secrets come from.

Rendering needs the chart tools (infra/tools/install-chart-tools.sh); each profile is rendered
once per session.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra" / "tools"))
import chart_testlib as lib  # noqa: E402

PROFILES = list(lib.PROFILES)
STAGES = ["gateway", "preprocess", "segmentation", "findings"]
LONG_RUNNING = ("Deployment", "StatefulSet")


def containers_of(docs):
    """(where, pod metadata, pod spec, container) for every container the chart creates,
    including those KServe and KubeRay create from the custom resources."""
    for d in docs:
        for where, meta, spec in lib.pod_templates(d):
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield where, meta, spec, c
        if d["kind"] == "InferenceService":
            p = d["spec"]["predictor"]
            yield f"InferenceService/{d['metadata']['name']}", {"labels": p.get("labels", {})}, p, p["model"]
        if d["kind"] == "ServingRuntime":
            for c in d["spec"]["containers"]:
                yield f"ServingRuntime/{d['metadata']['name']}", {}, {}, c


# --- hardening, probes, resources ---------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_every_container_is_bounded_and_hardened(profile):
    docs = lib.rendered(profile)
    seen = 0
    for where, _, spec, c in containers_of(docs):
        seen += 1
        if where.startswith("ServingRuntime"):
            # Resources come from the InferenceService (checked there); hardening is here.
            sc = c["securityContext"]
        else:
            res = c["resources"]
            for field in ("cpu", "memory"):
                assert field in res["limits"] and field in res["requests"], f"{where}: {field}"
            pod_sc = spec["securityContext"]
            assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000, where
            assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
            sc = c.get("securityContext")
            if where.startswith("InferenceService"):
                continue  # the ServingRuntime's container carries the container context
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert "add" not in sc["capabilities"], where
        assert sc.get("privileged", False) is False, where
        assert sc["runAsNonRoot"] is True, where
    assert seen >= 7


@pytest.mark.parametrize("profile", PROFILES)
def test_long_running_pods_have_all_probes_and_writable_tmp(profile):
    docs = lib.rendered(profile)
    checked = 0
    for d in docs:
        if d["kind"] not in LONG_RUNNING:
            continue
        for where, _, spec in lib.pod_templates(d):
            for c in spec["containers"]:
                checked += 1
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in c, f"{where}/{c['name']}: no {probe}"
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"
                volumes = {v["name"]: v for v in spec["volumes"]}
                assert "emptyDir" in volumes[mounts["/tmp"]], where
    assert checked >= 6
    for d in lib.find(docs, "InferenceService"):
        model = d["spec"]["predictor"]["model"]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(model)


@pytest.mark.parametrize("profile", PROFILES)
def test_grpc_services_probe_the_grpc_health_service(profile):
    docs = lib.rendered(profile)
    tls = profile != "cpu-demo"  # the CPU demo turns gateway TLS off
    for stage in STAGES:
        dep = lib.one(docs, "Deployment", f"cmrvl-{stage}")
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["args"] == ["serve", stage]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": 50051, "metrics": 9090}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["CMRVL_GRPC_HOST"] == "0.0.0.0" and env["CMRVL_GRPC_PORT"] == "50051"
        assert env["CMRVL_METRICS_PORT"] == "9090"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if stage == "gateway" and tls:
                assert c[probe]["tcpSocket"]["port"] == "grpc"  # kubelet gRPC probes lack TLS
            else:
                assert c[probe]["grpc"]["port"] == 50051, (stage, probe)
        # Graceful shutdown fits in the termination grace period.
        grace = float(env["CMRVL_SHUTDOWN_GRACE_S"]) + c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > grace


@pytest.mark.parametrize("profile", PROFILES)
def test_no_pod_mounts_a_service_account_token(profile):
    docs = lib.rendered(profile)
    accounts = {d["metadata"]["name"]: d for d in lib.find(docs, "ServiceAccount")}
    for d in docs:
        pods = list(lib.pod_templates(d))
        if d["kind"] == "InferenceService":
            pods.append((d["metadata"]["name"], {}, d["spec"]["predictor"]))
        for where, _, spec in pods:
            assert spec["automountServiceAccountToken"] is False, where
            assert spec["serviceAccountName"] in accounts, where
    for name, sa in accounts.items():
        assert sa["automountServiceAccountToken"] is False, name


# --- wiring --------------------------------------------------------------------------------


def _pods(docs):
    """(workload name, pod labels, {port name: number}) of every pod template."""
    out = []
    for d in docs:
        for where, meta, spec in lib.pod_templates(d):
            ports = {p.get("name", str(p["containerPort"])): p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
            out.append((where, meta.get("labels", {}), ports))
    return out


def _selects(selector: dict, labels: dict) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@pytest.mark.parametrize("profile", PROFILES)
def test_services_hpas_and_pdbs_select_exactly_their_workload(profile):
    docs = lib.rendered(profile)
    pods = _pods(docs)
    for svc in lib.find(docs, "Service"):
        name = svc["metadata"]["name"]
        hits = [(w, ports) for w, labels, ports in pods if _selects({"matchLabels": svc["spec"]["selector"]}, labels)]
        assert len(hits) == 1, f"Service/{name} selects {[w for w, _ in hits]}"
        workload, ports = hits[0]
        assert workload.split("/")[1] == name.removesuffix("-headless"), (name, workload)
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            assert (target in ports) if isinstance(target, str) else (target in ports.values()), (name, target)
    for pdb in lib.find(docs, "PodDisruptionBudget"):
        hits = [w for w, labels, _ in pods if _selects(pdb["spec"]["selector"], labels)]
        assert hits == [f"{w.split('/')[0]}/{pdb['metadata']['name']}" for w in hits] and len(hits) == 1, hits
    workloads = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for hpa in lib.find(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in workloads
        dep = lib.one(docs, ref["kind"], ref["name"])
        assert "replicas" not in dep["spec"], "the HPA owns the replica count"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def _env(docs, stage):
    c = lib.one(docs, "Deployment", f"cmrvl-{stage}")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in c["env"]}


def _service_port(docs, host_port: str) -> int:
    """Resolve host:port (short or cluster-local name) to a rendered Service's port."""
    host, port = host_port.rsplit(":", 1)
    name, _, rest = host.partition(".")
    assert rest in ("", f"{lib.NAMESPACE}.svc.cluster.local"), host
    svc = lib.one(docs, "Service", name)
    ports = {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in ports, (host_port, ports)
    return int(port)


def test_gateway_and_stages_point_at_real_services():
    docs = lib.rendered("default")
    env = _env(docs, "gateway")
    for stage in ("preprocess", "segmentation", "findings"):
        target = env[f"CMRVL_{stage.upper()}_TARGET"]["value"]
        assert _service_port(docs, target) == 50051
        assert target.startswith(f"cmrvl-{stage}:")
    seg = _env(docs, "segmentation")
    assert _service_port(docs, seg["CMRVL_TRITON_URL"]["value"]) == 8001
    triton = lib.one(docs, "Deployment", "cmrvl-triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["readinessProbe"]["httpGet"]["path"] == f"/v2/models/{seg['CMRVL_SEGMENTATION_MODEL']['value']}/ready"
    s3 = _env(docs, "preprocess")["CMRVL_S3_ENDPOINT"]["value"]
    assert _service_port(docs, s3) == 9000
    repo = next(a for a in triton["args"] if a.startswith("--model-repository="))
    assert repo == f"--model-repository=s3://{s3}/cmrvl-models/triton"
    assert {e["name"] for e in triton["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def test_findings_calls_the_inference_service_openai_route():
    docs = lib.rendered("default")
    env = _env(docs, "findings")
    isvc = lib.one(docs, "InferenceService", "cmr-vl")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    # Standard mode: Service <isvc>-predictor, port 80 -> the runtime's 8080.
    assert env["CMRVL_VLM_BASE_URL"]["value"] == f"http://cmr-vl-predictor.{lib.NAMESPACE}.svc.cluster.local/openai/v1"
    model = isvc["spec"]["predictor"]["model"]
    args = dict(a.split("=", 1) for a in model["args"])
    assert args["--model_name"] == env["CMRVL_VLM_MODEL"]["value"]
    assert args["--backend"] == "vllm"
    assert model["modelFormat"]["name"] == "huggingface"
    assert int(args["--max-model-len"]) >= 5120
    mm = json.loads(args["--limit-mm-per-prompt"])
    assert mm["image"] >= 10 and mm["video"] >= 1
    # vLLM must sample videos at the frame rate the model was trained with (one source: the catalog).
    from services.findings.catalog import get_task

    assert json.loads(args["--media-io-kwargs"]) == {"video": {"fps": get_task("wall_motion").visual["fps"]}}
    assert args["--dtype"] == "bfloat16"
    assert re.fullmatch(r"s3://cmrvl-models/vlm/[^/]+/[^/]+", model["storageUri"])
    assert model["resources"]["limits"]["nvidia.com/gpu"] >= 1
    runtime = lib.one(docs, "ServingRuntime", model["runtime"])
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == "huggingface"
    assert runtime["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080
    # KServe's storage initializer gets the S3 endpoint and keys from the ServiceAccount's Secret.
    sa = lib.one(docs, "ServiceAccount", isvc["spec"]["predictor"]["serviceAccountName"])
    secret = lib.one(docs, "Secret", sa["secrets"][0]["name"])
    annotations = secret["metadata"]["annotations"]
    assert annotations["serving.kserve.io/s3-endpoint"] == _env(docs, "findings")["CMRVL_S3_ENDPOINT"]["value"]
    assert annotations["serving.kserve.io/s3-usehttps"] == "0"
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_bucket_job_creates_the_four_buckets():
    docs = lib.rendered("default")
    job = lib.one(docs, "Job", "cmrvl-buckets")
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for bucket in ("cmrvl-studies", "cmrvl-artifacts", "cmrvl-models", "cmrvl-reports"):
        assert re.search(rf"\b{bucket}\b", script), bucket
    assert "mc mb --ignore-existing" in script
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    sts = lib.one(docs, "StatefulSet", "cmrvl-minio")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"


def test_training_templates():
    docs = lib.rendered("training")
    rayjob = lib.one(docs, "RayJob", "cmrvl-vlm-sft")
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python -m training.vlm.train --config ")
    config_path = spec["entrypoint"].split("--config ")[1]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    # The config the entrypoint reads is mounted from the rendered ConfigMap.
    mount = next(m for m in head["containers"][0]["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    cm = lib.one(docs, "ConfigMap", volume["configMap"]["name"])
    assert config_path.rsplit("/", 1)[1] in cm["data"]
    assert "max_seq_len: 5120" in cm["data"]["vlm.yaml"]

    job = lib.one(docs, "Job", "cmrvl-nnunet-train")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["cmrvl"] and c["args"][:2] == ["train", "nnunet"]
    from services.cli import build_parser  # the rendered arguments are ones the CLI accepts

    args = build_parser().parse_args(c["args"])
    assert args.raw.startswith("s3://") and args.export_to.startswith("s3://")
    # A replaced pod resumes from the checkpoints in the store, and Kubernetes does replace it.
    assert args.checkpoint_to.startswith("s3://") and job["spec"]["backoffLimit"] >= 2
    names = {e["name"] for e in c["env"]}
    assert {"CMRVL_S3_ENDPOINT", "CMRVL_S3_ACCESS_KEY", "CMRVL_S3_SECRET_KEY", "nnUNet_results"} <= names
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


# --- NetworkPolicies -----------------------------------------------------------------------


class Cluster:
    """Pods of a rendered profile plus pods outside the release, and the standard
    NetworkPolicy semantics for ingress (additive allow rules; unselected pods are open)."""

    def __init__(self, docs):
        self.policies = lib.find(docs, "NetworkPolicy")
        self.pods = {}
        for where, labels, ports in _pods(docs):
            self.pods[where] = (lib.NAMESPACE, labels, ports)
        for d in lib.find(docs, "InferenceService"):
            # KServe labels predictor pods with the InferenceService name plus spec.predictor.labels.
            labels = {**d["spec"]["predictor"].get("labels", {}), "serving.kserve.io/inferenceservice": d["metadata"]["name"]}
            self.pods[f"InferenceService/{d['metadata']['name']}"] = (lib.NAMESPACE, labels, {"http1": 8080})
        self.pods["ris"] = ("hospital", {"app": "ris"}, {})
        self.pods["prometheus"] = ("monitoring", {"app": "prometheus"}, {})
        self.pods["kuberay"] = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}, {})
        self.pods["neighbour"] = (lib.NAMESPACE, {"app": "something-else"}, {})

    def allowed(self, src: str, dst: str, port: int) -> bool:
        src_ns, src_labels, _ = self.pods[src]
        dst_ns, dst_labels, dst_ports = self.pods[dst]
        applying = [p for p in self.policies
                    if p["metadata"]["namespace"] == dst_ns and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                    and _selects(p["spec"]["podSelector"], dst_labels)]
        if not applying:
            return True
        for policy in applying:
            for rule in policy["spec"].get("ingress", []):
                rule_ports = [dst_ports.get(p["port"], p["port"]) for p in rule.get("ports", [])]
                if rule_ports and port not in rule_ports:
                    continue
                peers = rule.get("from")
                if not peers:
                    return True
                for peer in peers:
                    ns_ok = (_selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src_ns})
                             if "namespaceSelector" in peer else src_ns == policy["metadata"]["namespace"])
                    pod_ok = _selects(peer["podSelector"], src_labels) if "podSelector" in peer else True
                    if "ipBlock" not in peer and ns_ok and pod_ok:
                        return True
        return False


def test_network_policies_follow_the_call_graph():
    c = Cluster(lib.rendered("default"))
    gw, pre, seg, fin = (f"Deployment/cmrvl-{s}" for s in STAGES)
    triton, vlm, minio = "Deployment/cmrvl-triton", "InferenceService/cmr-vl", "StatefulSet/cmrvl-minio"
    # Only the gateway is reachable from outside the namespace (the RIS).
    assert c.allowed("ris", gw, 50051)
    for dst, port in [(pre, 50051), (seg, 50051), (fin, 50051), (triton, 8001), (vlm, 8080), (minio, 9000)]:
        assert not c.allowed("ris", dst, port), dst
        assert not c.allowed("neighbour", dst, port), dst
    # Stages only from the gateway.
    for dst in (pre, seg, fin):
        assert c.allowed(gw, dst, 50051)
        for other in {pre, seg, fin, triton, minio} - {dst}:
            assert not c.allowed(other, dst, 50051), (other, dst)
    # Model servers only from their stage.
    assert c.allowed(seg, triton, 8001) and c.allowed(seg, triton, 8000)
    assert c.allowed(fin, vlm, 8080)
    for other in (gw, pre, fin):
        assert not c.allowed(other, triton, 8001), other
    for other in (gw, pre, seg, triton):
        assert not c.allowed(other, vlm, 8080), other
    # MinIO only from the platform's own pods.
    platform = [p for p, (ns, labels, _) in c.pods.items() if labels.get("app.kubernetes.io/instance") == "cmrvl"]
    assert len(platform) >= 8
    for src in platform:
        assert c.allowed(src, minio, 9000), src
    assert not c.allowed("prometheus", minio, 9000)
    # Metrics ports from the monitoring namespace, and nothing else from there.
    for dst, port in [(gw, 9090), (pre, 9090), (seg, 9090), (fin, 9090), (triton, 8002)]:
        assert c.allowed("prometheus", dst, port), dst
    assert not c.allowed("prometheus", pre, 50051)
    assert not c.allowed("prometheus", triton, 8001)
    # A selector typo would leave a pod unselected (= open): every release pod is under the
    # default deny, and every pod that serves a port has its own allow policy.
    deny = lib.one(c.policies, "NetworkPolicy", "cmrvl-default-deny-ingress")
    assert "ingress" not in deny["spec"]
    for name, (ns, labels, ports) in c.pods.items():
        if labels.get("app.kubernetes.io/instance") == "cmrvl":
            assert _selects(deny["spec"]["podSelector"], labels), name
            if ports:
                assert any(_selects(p["spec"]["podSelector"], labels) for p in c.policies if p is not deny), name


def test_network_policies_for_ray_training():
    c = Cluster(lib.rendered("training"))
    head, worker, submitter = "RayJob/cmrvl-vlm-sft/head", "RayJob/cmrvl-vlm-sft/gpu", "RayJob/cmrvl-vlm-sft/submitter"
    assert c.allowed(worker, head, 6379) and c.allowed(head, worker, 12345)
    assert c.allowed(submitter, head, 8265)
    assert c.allowed("kuberay", head, 8265) and not c.allowed("kuberay", head, 6379)
    assert not c.allowed("neighbour", head, 6379) and not c.allowed("ris", worker, 6379)
    assert not c.allowed("Deployment/cmrvl-gateway", head, 8265)
    assert c.allowed(worker, "StatefulSet/cmrvl-minio", 9000)
    assert c.allowed("Job/cmrvl-nnunet-train", "StatefulSet/cmrvl-minio", 9000)


# --- secrets -------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY)", re.I)


@pytest.mark.parametrize("profile", PROFILES)
def test_secrets_come_from_secret_objects_only(profile):
    docs = lib.rendered(profile)
    secrets = {d["metadata"]["name"]: d for d in lib.find(docs, "Secret")}
    refs = 0
    for where, _, _, c in containers_of(docs):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "value" not in e, f"{where}: {e['name']} has a literal value"
                ref = e["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]["data"], (where, ref)
                refs += 1
    assert refs >= 10
    # Nothing secret-looking in the ConfigMaps either.
    for cm in lib.find(docs, "ConfigMap"):
        assert not SECRET_NAME.search(json.dumps(cm["data"])), cm["metadata"]["name"]


def test_values_files_hold_no_secrets():
    """values.yaml and the CI profiles name Secrets; they never carry a credential."""
    suspicious = re.compile(r"^\s*[\w.-]*(password|secretKey|accessKey|token|apiKey)[\w.-]*:\s*(\S+)", re.I)
    for path in [lib.CHART / "values.yaml", *sorted((lib.CHART / "ci").glob("*.yaml"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = suspicious.match(line)
            assert not m or m.group(2) in ('""', "''", "{}", "[]"), f"{path.name}:{n}: {line.strip()}"
    schema = json.loads((lib.CHART / "values.schema.json").read_text())
    text = json.dumps(schema["properties"])
    assert '"existingSecret"' in text and "password" not in text.lower()


def test_generated_secrets_are_random_and_existing_ones_replace_them():
    a, b = lib.rendered("default"), lib.render_docs()
    for name in ("cmrvl-s3", "cmrvl-auth", "cmrvl-gateway-tls"):
        sa, sb = lib.one(a, "Secret", name), lib.one(b, "Secret", name)
        assert sa["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert sa["data"] != sb["data"], f"{name} is not generated"
    docs = lib.render_docs(sets=["objectStore.existingSecret=my-s3", "auth.existingSecret=my-auth",
                                 "gateway.tls.existingSecret=my-tls"])
    assert not lib.find(docs, "Secret")
    names = set()
    for _, _, spec, c in containers_of(docs):
        for e in c.get("env", []):
            if "valueFrom" in e:
                names.add(e["valueFrom"]["secretKeyRef"]["name"])
        for v in spec.get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
    assert names == {"my-s3", "my-auth", "my-tls"}
    isvc_sa = lib.one(docs, "ServiceAccount", "cmrvl-vlm")
    assert isvc_sa["secrets"] == [{"name": "my-s3"}]


def test_cert_manager_issues_the_gateway_certificate():
    docs = lib.render_docs(sets=["gateway.tls.certManager.enabled=true",
                                 "gateway.tls.certManager.issuerRef.name=hospital-ca"])
    cert = lib.one(docs, "Certificate", "cmrvl-gateway")
    assert cert["spec"]["issuerRef"] == {"name": "hospital-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert f"cmrvl-gateway.{lib.NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    assert not lib.find(docs, "Secret", "cmrvl-gateway-tls")  # cert-manager writes it
    gw = lib.one(docs, "Deployment", "cmrvl-gateway")["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": cert["spec"]["secretName"], "defaultMode": 0o440}} in gw["volumes"]


# --- images --------------------------------------------------------------------------------

DOCKERFILES = sorted((lib.REPO / "infra" / "images").glob("*/Dockerfile"))
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|build-essential|make|cmake|cargo|rustc|git)\b")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_are_multi_stage_pinned_and_non_root(dockerfile):
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages = re.split(r"^FROM\s", text, flags=re.M)[1:]
    assert len(stages) >= 2, "multi-stage build"
    for stage in stages:
        image = stage.split()[0]
        if image.startswith("${") or image in {s.split()[-1] for s in stages if " AS " in s.split("\n")[0]}:
            continue
        assert re.search(r":[\w.-]*\d[\w.-]*(@sha256:[a-f0-9]{64})?$", image), f"unpinned base {image}"
    final = stages[-1]
    users = re.findall(r"^USER\s+(\S+)", final, flags=re.M)
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 10000, users
    runs = " ".join(re.findall(r"^RUN\s+(.*)$", final, flags=re.M))
    installs = " ".join(re.findall(r"(?:apt-get install|apk add)[^;&|]*", runs))
    assert not BUILD_TOOLS.search(installs), installs
    assert "ENTRYPOINT" in final or "CMD" in final


def test_service_image_dockerfile_matches_the_chart():
    dockerfile = (lib.REPO / "infra" / "images" / "service" / "Dockerfile").read_text()
    final = re.split(r"^FROM\s", dockerfile, flags=re.M)[-1]
    assert final.startswith("python:3.11")
    assert re.search(r'^ENTRYPOINT \["cmrvl"\]', final, flags=re.M)
    uid = int(re.findall(r"^USER\s+(\d+)", final, flags=re.M)[-1])
    pod = lib.one(lib.rendered("default"), "Deployment", "cmrvl-gateway")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    assert "EXPOSE 50051 9090" in final
