"""What the rendered chart does: hardening, probes, limits, wiring between components, who may
reach whom under the NetworkPolicies, and where secrets come from.

Rendering needs the chart tools (infra/tools/install-chart-tools.sh); each profile is rendered
once per session.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from urllib.parse import urlsplit
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra" / "tools"))
import chart_testlib as lib  # noqa: E402

PROFILES = list(lib.PROFILES)
STAGES = ["gateway", "preprocess", "segmentation", "findings"]
DB = "StatefulSet/cmrvl-workflow-db"
LONG_RUNNING = ("Deployment", "StatefulSet")


def _grpc_services() -> dict[str, str]:
    """The gRPC service each server registers (and reports SERVING for), from the protos."""
    from cmrvl.v1 import stages_pb2, study_pb2

    return {
        "gateway": study_pb2.DESCRIPTOR.services_by_name["StudyService"].full_name,
        **{s: stages_pb2.DESCRIPTOR.services_by_name[f"{s.capitalize()}Service"].full_name
           for s in ("preprocess", "segmentation", "findings")},
    }


GRPC_SERVICES = _grpc_services()


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
        ready, live = c["readinessProbe"], c["livenessProbe"]
        if stage == "gateway" and tls:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["tcpSocket"]["port"] == "grpc"  # kubelet gRPC probes lack TLS
        else:
            # Ready = the stage's own service is SERVING; alive = the server answers at all.
            assert ready["grpc"] == {"port": 50051, "service": GRPC_SERVICES[stage]}, stage
            assert c["startupProbe"]["grpc"] == ready["grpc"], stage
            assert live["grpc"] == {"port": 50051, "service": ""}, stage
        # Liveness waits longer than readiness before it acts (a restart costs in-flight calls).
        assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"], stage
        assert live["timeoutSeconds"] > ready["timeoutSeconds"], stage
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


def _service_port(docs, host_port: str, domain: str = "cluster.local") -> int:
    """Resolve host:port (short or cluster-local name) to a rendered Service's port."""
    host, port = host_port.rsplit(":", 1)
    name, _, rest = host.partition(".")
    assert rest in ("", f"{lib.NAMESPACE}.svc.{domain}"), host
    svc = lib.one(docs, "Service", name)
    ports = {p["port"] for p in svc["spec"]["ports"]}
    assert int(port) in ports, (host_port, ports)
    return int(port)


@pytest.mark.parametrize("domain", ["cluster.local", "k8s.hospital.internal"])
def test_gateway_calls_every_stage_pod_through_a_headless_service(domain):
    """Scaled-out stages: the gateway's targets are dns:/// names of headless Services (DNS
    answers with each ready pod, the channel's round_robin spreads calls over them), in a form
    the gateway's settings accept; the ClusterIP Services stay for everything else."""
    from services.runtime.settings import Settings

    docs = lib.rendered("default") if domain == "cluster.local" else lib.render_docs(sets=[f"clusterDomain={domain}"])
    env = _env(docs, "gateway")
    pods = _pods(docs)
    for stage in ("preprocess", "segmentation", "findings"):
        target = env[f"CMRVL_{stage.upper()}_TARGET"]["value"]
        assert target == f"dns:///cmrvl-{stage}-headless.{lib.NAMESPACE}.svc.{domain}:50051"
        assert _service_port(docs, target.removeprefix("dns:///"), domain) == 50051
        Settings(**{f"{stage}_target": target})  # the gateway starts with it
        headless = lib.one(docs, "Service", f"cmrvl-{stage}-headless")["spec"]
        assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
        assert [w for w, labels, _ in pods if _selects({"matchLabels": headless["selector"]}, labels)] == [f"Deployment/cmrvl-{stage}"]
        assert headless["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]
        assert "clusterIP" not in lib.one(docs, "Service", f"cmrvl-{stage}")["spec"]  # upgrade-safe
    # Every in-cluster address follows clusterDomain.
    assert _env(docs, "preprocess")["CMRVL_S3_ENDPOINT"]["value"].endswith(f".svc.{domain}:9000")
    assert _env(docs, "segmentation")["CMRVL_TRITON_URL"]["value"].endswith(f".svc.{domain}:8001")
    assert f".svc.{domain}/" in _env(docs, "findings")["CMRVL_VLM_BASE_URL"]["value"]


def test_the_gateways_stage_limits_grow_with_the_stage_pods():
    """Every call the stage's pods can run: a limit of 1 would leave added pods idle."""
    docs = lib.rendered("default")
    env = _env(docs, "gateway")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"] for h in lib.find(docs, "HorizontalPodAutoscaler")}
    expected = {"preprocess": 2, "segmentation": 1, "findings": 1}  # values.yaml callsPerReplica
    for stage, calls in expected.items():
        assert int(env[f"CMRVL_{stage.upper()}_CONCURRENCY"]["value"]) == calls * hpas[f"cmrvl-{stage}"]["maxReplicas"]
    fixed = _env(lib.render_docs(sets=["segmentation.autoscaling.enabled=false", "segmentation.replicas=3",
                                       "segmentation.callsPerReplica=2"]), "gateway")
    assert fixed["CMRVL_SEGMENTATION_CONCURRENCY"]["value"] == "6"


def test_stage_targets_for_a_mesh_are_the_cluster_ip_services():
    from services.runtime.settings import Settings

    docs = lib.render_docs(sets=["gateway.stageTargets=clusterIP"])
    env = _env(docs, "gateway")
    for stage in ("preprocess", "segmentation", "findings"):
        target = env[f"CMRVL_{stage.upper()}_TARGET"]["value"]
        assert target == f"cmrvl-{stage}.{lib.NAMESPACE}.svc.cluster.local:50051"
        assert _service_port(docs, target) == 50051
        assert "clusterIP" not in lib.one(docs, "Service", f"cmrvl-{stage}")["spec"]
        Settings(**{f"{stage}_target": target})


def test_gateway_and_stages_point_at_real_services():
    docs = lib.rendered("default")
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


# --- workflow database ---------------------------------------------------------------------


def test_workflow_database_is_a_postgres_statefulset_only_the_gateway_uses():
    docs = lib.rendered("default")
    sts = lib.one(docs, "StatefulSet", "cmrvl-workflow-db")
    assert sts["spec"]["replicas"] == 1  # one primary
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    repo, tag = c["image"].rsplit(":", 1)
    assert repo == "docker.io/library/postgres" and re.fullmatch(r"\d+\.\d+-[a-z]+", tag), c["image"]
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    # PGDATA lies on the claim template's persistent volume.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    pgdata = env["PGDATA"]["value"]
    assert [m["name"] for path, m in mounts.items() if pgdata.startswith(path + "/")] == [claim["metadata"]["name"]]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert "/var/run/postgresql" in mounts  # the socket folder, under a read-only root
    # The credential: a file from the Secret the gateway's URL takes its password from.
    assert "POSTGRES_PASSWORD" not in env
    folder, key = env["POSTGRES_PASSWORD_FILE"]["value"].rsplit("/", 1)
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[folder]["name"])
    gw_container = lib.one(docs, "Deployment", "cmrvl-gateway")["spec"]["template"]["spec"]["containers"][0]
    gw = {e["name"]: e for e in gw_container["env"]}
    ref = gw["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert volume["secret"]["secretName"] == ref["name"]
    assert {"key": ref["key"], "path": key} in volume["secret"]["items"]
    assert ref["key"] in lib.one(docs, "Secret", ref["name"])["data"]
    # postgresql://<role>:$(PGPASSWORD)@<Service>:5432/<database>; the kubelet expands only
    # variables defined before the one that refers to them.
    names = [e["name"] for e in gw_container["env"]]
    assert names.index("PGPASSWORD") < names.index("CMRVL_WORKFLOW_DATABASE_URL")
    url = urlsplit(gw["CMRVL_WORKFLOW_DATABASE_URL"]["value"])
    assert (url.scheme, url.username, url.password) == ("postgresql", env["POSTGRES_USER"]["value"], "$(PGPASSWORD)")
    assert url.path == "/" + env["POSTGRES_DB"]["value"]
    assert _service_port(docs, f"{url.hostname}:{url.port}") == 5432
    svc = lib.one(docs, "Service", url.hostname.split(".")[0])
    assert [w for w, labels, _ in _pods(docs) if _selects({"matchLabels": svc["spec"]["selector"]}, labels)] == ["StatefulSet/cmrvl-workflow-db"]
    # Each replica names itself (the workflow engine's executor id) after its pod.
    assert gw["CMRVL_GATEWAY_REPLICA"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Ready = pg_isready for this role and database over TCP; alive = still listening, later.
    ready, live = c["readinessProbe"], c["livenessProbe"]
    command = ready["exec"]["command"]
    assert command[0] == "pg_isready" and "--host=127.0.0.1" in command
    assert f"--username={env['POSTGRES_USER']['value']}" in command and f"--dbname={env['POSTGRES_DB']['value']}" in command
    assert c["startupProbe"]["exec"]["command"] == command
    assert live["tcpSocket"]["port"] == "postgres" and "exec" not in live
    assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]
    # A fast shutdown ends the gateway's sessions within the grace period (SIGTERM would wait for them).
    stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert stop[:2] == ["pg_ctl", "stop"] and "--mode=fast" in stop and f"--pgdata={pgdata}" in stop
    timeout = int(next(a for a in stop if a.startswith("--timeout=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] > timeout


def test_workflow_database_external_or_refused():
    docs = lib.render_docs(sets=["workflowDatabase.enabled=false", "workflowDatabase.external.existingSecret=db-url"])
    assert not [d for d in docs if "workflow-db" in d["metadata"]["name"]]
    gw = _env(docs, "gateway")
    assert gw["CMRVL_WORKFLOW_DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "db-url", "key": "url"}}
    assert "PGPASSWORD" not in gw and "fieldRef" in gw["CMRVL_GATEWAY_REPLICA"]["valueFrom"]
    # Neither: the replicas would have no shared database; one line says what to set.
    proc = lib.helm(*lib.template_args([], ["workflowDatabase.enabled=false"]), check=False)
    assert proc.returncode != 0
    assert "workflowDatabase: set enabled=true (bundled Postgres) or external.existingSecret" in proc.stderr, proc.stderr


# --- scheduling ----------------------------------------------------------------------------

LOG_HEADROOM_MI = 512  # ephemeral-storage limit above the scratch volumes: the container's logs


def _mi(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti)", quantity).groups()
    return float(number) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}[unit]


def _pods_with_volumes(docs):
    """(where, volumes, containers with resources) of every pod, the VLM predictor's included
    (its volumes and container come from the ServingRuntime, its resources from the InferenceService)."""
    for d in docs:
        for where, _, spec in lib.pod_templates(d):
            yield where, spec.get("volumes", []), spec["containers"]
        if d["kind"] == "InferenceService":
            runtime = lib.one(docs, "ServingRuntime", d["spec"]["predictor"]["model"]["runtime"])["spec"]
            container = {**runtime["containers"][0], "resources": d["spec"]["predictor"]["model"]["resources"]}
            yield f"InferenceService/{d['metadata']['name']}", runtime["volumes"], [container]


@pytest.mark.parametrize("profile", PROFILES)
def test_ephemeral_storage_matches_the_scratch_volumes(profile):
    """The scheduler reserves the local disk a pod's emptyDirs may fill: the container that
    mounts them requests their summed sizeLimits (memory-backed ones count as memory)."""
    checked = 0
    for where, volumes, containers in _pods_with_volumes(lib.rendered(profile)):
        disk = {v["name"]: _mi(v["emptyDir"]["sizeLimit"]) for v in volumes
                if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
        mounted = set()
        for c in containers:
            names = {m["name"] for m in c.get("volumeMounts", [])} & set(disk)
            mounted |= names
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            if names:
                want = sum(disk[n] for n in names)
                assert _mi(requests["ephemeral-storage"]) == want, (where, c["name"])
                assert _mi(limits["ephemeral-storage"]) == want + LOG_HEADROOM_MI, (where, c["name"])
                checked += 1
        assert mounted == set(disk), where
    assert checked >= (9 if profile == "default" else 7)


@pytest.mark.parametrize("profile", PROFILES)
def test_service_replicas_prefer_different_nodes(profile):
    docs = lib.rendered(profile)
    pods = _pods(docs)
    for stage in STAGES:
        spec = lib.one(docs, "Deployment", f"cmrvl-{stage}")["spec"]["template"]["spec"]
        (term,) = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["weight"] == 100 and term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        (spread,) = spec["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["maxSkew"] == 1
        # Preferred, not required: two replicas on a one-node cluster still schedule.
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
        for selector in (term["podAffinityTerm"]["labelSelector"], spread["labelSelector"]):
            assert [w for w, labels, _ in pods if _selects(selector, labels)] == [f"Deployment/cmrvl-{stage}"]
    if profile == "default":  # the gateway runs (at least) two replicas for the anti-affinity to spread
        assert lib.one(docs, "HorizontalPodAutoscaler", "cmrvl-gateway")["spec"]["minReplicas"] >= 2


def test_affinity_value_replaces_the_default_anti_affinity(tmp_path):
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]}]}}}
    values = tmp_path / "affinity.json"
    values.write_text(json.dumps({"gateway": {"affinity": affinity}}))
    docs = lib.render_docs(values_files=[str(values)])
    assert lib.one(docs, "Deployment", "cmrvl-gateway")["spec"]["template"]["spec"]["affinity"] == affinity
    assert "podAntiAffinity" in lib.one(docs, "Deployment", "cmrvl-preprocess")["spec"]["template"]["spec"]["affinity"]


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


def _ip(dst: str):
    try:
        return ipaddress.ip_address(dst)
    except ValueError:
        return None


class Cluster:
    """Pods of a rendered profile plus pods outside the release, and the standard
    NetworkPolicy semantics for ingress and egress (additive allow rules; a pod that no policy
    of a direction selects is open in that direction). A destination is a pod, or an IP address
    outside the cluster (which only ipBlock peers match)."""

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
        self.pods["neighbour"] = (lib.NAMESPACE, {"app": "something-else"}, {"dns": 53})
        self.pods["kube-dns"] = ("kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
        self.pods["ml-triton"] = ("ml", {"app": "triton"}, {"grpc": 8001})

    def _applying(self, ns, labels, direction):
        return [p for p in self.policies
                if p["metadata"]["namespace"] == ns and direction in p["spec"].get("policyTypes", ["Ingress"])
                and _selects(p["spec"]["podSelector"], labels)]

    @staticmethod
    def _peer_matches(peer, policy_ns, peer_pod, ip):
        if "ipBlock" in peer:  # pod addresses are unknown here: an ipBlock stands for outside addresses
            block = peer["ipBlock"]
            return ip is not None and ip in ipaddress.ip_network(block["cidr"]) and not any(
                ip in ipaddress.ip_network(e) for e in block.get("except", []))
        if ip is not None:
            return False
        ns, labels, _ = peer_pod
        ns_ok = (_selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns})
                 if "namespaceSelector" in peer else ns == policy_ns)
        pod_ok = _selects(peer["podSelector"], labels) if "podSelector" in peer else True
        return ns_ok and pod_ok

    def _open(self, policies, direction, port, protocol, dst_ports, peer_pod, ip):
        if not policies:
            return True
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in policies:
            for rule in policy["spec"].get(key, []):
                rule_ports = [(dst_ports.get(p["port"], p["port"]), p.get("protocol", "TCP")) for p in rule.get("ports", [])]
                if rule_ports and (port, protocol) not in rule_ports:
                    continue
                peers = rule.get(peers_key)
                if not peers or any(self._peer_matches(peer, policy["metadata"]["namespace"], peer_pod, ip) for peer in peers):
                    return True
        return False

    def egress_allowed(self, src: str, dst: str, port: int, protocol: str = "TCP") -> bool:
        """Whether the source's egress policies let the packet out (its destination's ingress aside)."""
        src_ns, src_labels, _ = self.pods[src]
        ip = _ip(dst)
        dst_pod = None if ip else self.pods[dst]
        return self._open(self._applying(src_ns, src_labels, "Egress"), "Egress", port, protocol,
                          dst_pod[2] if dst_pod else {}, dst_pod, ip)

    def ingress_allowed(self, src: str, dst: str, port: int, protocol: str = "TCP") -> bool:
        if _ip(dst):
            return True  # outside the cluster
        dst_ns, dst_labels, dst_ports = self.pods[dst]
        return self._open(self._applying(dst_ns, dst_labels, "Ingress"), "Ingress", port, protocol,
                          dst_ports, self.pods[src], None)

    def allowed(self, src: str, dst: str, port: int, protocol: str = "TCP") -> bool:
        return self.egress_allowed(src, dst, port, protocol) and self.ingress_allowed(src, dst, port, protocol)


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
    assert c.allowed(seg, triton, 8001) and c.ingress_allowed(seg, triton, 8000)
    assert not c.egress_allowed(seg, triton, 8000)  # the service calls Triton over gRPC only
    assert c.allowed(fin, vlm, 8080)
    for other in (gw, pre, fin):
        assert not c.allowed(other, triton, 8001), other
    for other in (gw, pre, seg, triton):
        assert not c.allowed(other, vlm, 8080), other
    # MinIO only from the platform's own pods (the workflow database does not use the store).
    platform = [p for p, (ns, labels, _) in c.pods.items() if labels.get("app.kubernetes.io/instance") == "cmrvl"]
    assert len(platform) >= 9
    for src in platform:
        assert c.allowed(src, minio, 9000) == (src != DB), src
    assert not c.allowed("prometheus", minio, 9000)
    # The workflow database only from the gateway.
    for src in set(c.pods) - {gw, DB}:
        assert not c.allowed(src, DB, 5432), src
    assert c.allowed(gw, DB, 5432)
    # Metrics ports from the monitoring namespace, and nothing else from there.
    for dst, port in [(gw, 9090), (pre, 9090), (seg, 9090), (fin, 9090), (triton, 8002)]:
        assert c.allowed("prometheus", dst, port), dst
    assert not c.allowed("prometheus", pre, 50051)
    assert not c.allowed("prometheus", triton, 8001)
    # A selector typo would leave a pod unselected (= open): every release pod is under the
    # default deny, and every pod that serves a port has its own allow policy.
    deny = lib.one(c.policies, "NetworkPolicy", "cmrvl-default-deny-ingress")
    deny_out = lib.one(c.policies, "NetworkPolicy", "cmrvl-default-deny-egress")
    assert "ingress" not in deny["spec"] and "egress" not in deny_out["spec"]
    assert deny_out["spec"]["policyTypes"] == ["Egress"]
    for name, (ns, labels, ports) in c.pods.items():
        if labels.get("app.kubernetes.io/instance") == "cmrvl":
            assert _selects(deny["spec"]["podSelector"], labels), name
            assert _selects(deny_out["spec"]["podSelector"], labels), name
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


OUTSIDE = "203.0.113.7"  # an address on the internet


def test_egress_is_denied_but_along_the_call_graph():
    c = Cluster(lib.rendered("default"))
    gw, pre, seg, fin = (f"Deployment/cmrvl-{s}" for s in STAGES)
    triton, vlm, minio = "Deployment/cmrvl-triton", "InferenceService/cmr-vl", "StatefulSet/cmrvl-minio"
    platform = [p for p, (ns, labels, _) in c.pods.items() if labels.get("app.kubernetes.io/instance") == "cmrvl"]
    assert DB in platform and len(platform) >= 9
    # Every pod resolves names through kube-dns, and reaches nothing outside (no PACS is set).
    for src in platform:
        assert c.allowed(src, "kube-dns", 53, "UDP") and c.allowed(src, "kube-dns", 53, "TCP"), src
        assert not c.egress_allowed(src, "neighbour", 53, "UDP"), src
        for port in (53, 80, 104, 443, 5432, 8001, 9000, 11112):
            assert not c.egress_allowed(src, OUTSIDE, port), (src, port)
    # Whom each pod may call (egress alone, so that ingress cannot hide a missing rule).
    calls = {gw: {(pre, 50051), (seg, 50051), (fin, 50051), (DB, 5432), (minio, 9000)},
             pre: {(minio, 9000)}, seg: {(triton, 8001), (minio, 9000)}, fin: {(vlm, 8080), (minio, 9000)},
             triton: {(minio, 9000)}, vlm: {(minio, 9000)}, minio: {(minio, 9000)}, DB: set()}
    targets = {t for called in calls.values() for t in called}
    for src, allowed in calls.items():
        for dst, port in targets:
            assert c.egress_allowed(src, dst, port) == ((dst, port) in allowed), (src, dst, port)
            if (dst, port) in allowed:
                assert c.ingress_allowed(src, dst, port), (src, dst, port)
    for job in ("Job/cmrvl-buckets",):
        assert c.allowed(job, minio, 9000) and not c.egress_allowed(job, pre, 50051)
    # The egress policies name their destination's own ports.
    assert not c.egress_allowed(gw, pre, 9090) and not c.egress_allowed(seg, triton, 8002)


def test_egress_to_endpoints_outside_the_release():
    from chart_cases import EXTERNAL_SETS
    from services.gateway.pacs import parse_target

    docs = lib.render_docs(sets=EXTERNAL_SETS)
    c = Cluster(docs)
    gw, pre, seg, fin = (f"Deployment/cmrvl-{s}" for s in STAGES)
    values = dict(s.split("=", 1) for s in EXTERNAL_SETS)
    # Object store by IP address: that address on its port, for every store client.
    for src in (gw, pre, seg, fin, "Job/cmrvl-buckets"):
        assert c.allowed(src, "10.9.0.5", 9000), src
        assert not c.egress_allowed(src, "10.9.0.6", 9000), src
    # PACS by IP address: the gateway only, on the port the gateway's parser reads.
    _, host, port = parse_target(values["gateway.pacsTarget"])
    assert _env(docs, "gateway")["CMRVL_PACS_TARGET"]["value"] == values["gateway.pacsTarget"]
    assert c.egress_allowed(gw, host, port)
    assert not c.egress_allowed(gw, "10.1.2.4", port) and not c.egress_allowed(gw, host, 104)
    for src in (pre, seg, fin):
        assert not c.egress_allowed(src, host, port), src
    # External workflow database: its CIDR on its port, the gateway only.
    assert c.egress_allowed(gw, "10.20.3.4", 5432) and not c.egress_allowed(gw, "10.21.0.1", 5432)
    assert not c.egress_allowed(seg, "10.20.3.4", 5432)
    # Triton in another namespace (peers from values): segmentation only, nothing outside.
    assert c.egress_allowed(seg, "ml-triton", 8001) and not c.egress_allowed(seg, OUTSIDE, 8001)
    assert not c.egress_allowed(gw, "ml-triton", 8001) and not c.egress_allowed(fin, "ml-triton", 8001)
    # The VLM by DNS name (policies cannot match names): its port, anywhere, findings only.
    assert c.egress_allowed(fin, OUTSIDE, 8443) and not c.egress_allowed(fin, OUTSIDE, 443)
    assert not c.egress_allowed(gw, OUTSIDE, 8443) and not c.egress_allowed(seg, OUTSIDE, 8443)
    # Nothing of the bundled components is left to reach.
    assert not lib.find(docs, "StatefulSet") and not lib.find(docs, "NetworkPolicy", "cmrvl-workflow-db")


@pytest.mark.parametrize(("target", "inside", "outside"), [
    ("PACS@[fd00::7]:104", "fd00::7", "fd00::8"),
    ("ARCHIVE@pacs.hospital.org:11112", "198.51.100.20", None),  # a name: its port, anywhere
])
def test_pacs_egress_follows_the_target(target, inside, outside):
    from services.gateway.pacs import parse_target

    _, _, port = parse_target(target)
    c = Cluster(lib.render_docs(sets=[f"gateway.pacsTarget={target}"]))
    gw = "Deployment/cmrvl-gateway"
    assert c.egress_allowed(gw, inside, port) and not c.egress_allowed(gw, inside, port + 1)
    if outside:
        assert not c.egress_allowed(gw, outside, port)
    assert not c.egress_allowed("Deployment/cmrvl-findings", inside, port)
    # Peers from values replace the address the target names.
    c = Cluster(lib.render_docs(sets=[f"gateway.pacsTarget={target}", "networkPolicy.egress.pacsTo[0].ipBlock.cidr=192.0.2.0/24"]))
    assert c.egress_allowed(gw, "192.0.2.9", port) and not c.egress_allowed(gw, inside, port)


@pytest.mark.parametrize(("url", "address", "port"), [
    ("https://vlm.example.org/openai/v1", "198.51.100.30", 443),  # a name: its port, anywhere
    ("http://10.3.0.4/openai/v1", "10.3.0.4", 80),  # an address: that address only
])
def test_vlm_egress_follows_the_base_url(url, address, port):
    c = Cluster(lib.render_docs(sets=["vlm.enabled=false", f"findings.vlmBaseUrl={url}"]))
    fin = "Deployment/cmrvl-findings"
    assert c.egress_allowed(fin, address, port)
    assert not c.egress_allowed(fin, address, 443 if port == 80 else 80)
    assert c.egress_allowed(fin, "198.51.100.31", port) == url.startswith("https://vlm.example.org")
    assert not c.egress_allowed("Deployment/cmrvl-gateway", address, port)


# --- secrets -------------------------------------------------------------------------------

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY)", re.I)


@pytest.mark.parametrize("profile", PROFILES)
def test_secrets_come_from_secret_objects_only(profile):
    docs = lib.rendered(profile)
    secrets = {d["metadata"]["name"]: d for d in lib.find(docs, "Secret")}
    refs = 0
    for where, _, spec, c in containers_of(docs):
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]) and e["name"].endswith("_FILE"):
                # A path to the secret: it must lie in a mounted Secret volume.
                secret_volumes = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
                mount = next(m for m in c["volumeMounts"] if e["value"].startswith(m["mountPath"] + "/"))
                name = secret_volumes[mount["name"]]
                assert e["value"].rsplit("/", 1)[1] in secrets[name]["data"], (where, e)
                refs += 1
            elif SECRET_NAME.search(e["name"]):
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
    for name in ("cmrvl-s3", "cmrvl-auth", "cmrvl-gateway-tls", "cmrvl-workflow-db"):
        sa, sb = lib.one(a, "Secret", name), lib.one(b, "Secret", name)
        assert sa["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert sa["data"] != sb["data"], f"{name} is not generated"
    docs = lib.render_docs(sets=["objectStore.existingSecret=my-s3", "auth.existingSecret=my-auth",
                                 "gateway.tls.existingSecret=my-tls", "workflowDatabase.existingSecret=my-db"])
    assert not lib.find(docs, "Secret")
    names = set()
    for _, _, spec, c in containers_of(docs):
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                names.add(e["valueFrom"]["secretKeyRef"]["name"])
        for v in spec.get("volumes", []):
            if "secret" in v:
                names.add(v["secret"]["secretName"])
    assert names == {"my-s3", "my-auth", "my-tls", "my-db"}
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
