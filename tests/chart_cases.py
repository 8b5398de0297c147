"""Values the chart tests render besides the CI profiles (shared by test_chart_render.py, which
validates and policy-checks them, and test_chart_policy.py, which asserts what they open)."""

# Every endpoint outside the release: object store and PACS by IP address, Triton in another
# namespace, the VLM by DNS name, an external workflow database in a CIDR.
EXTERNAL_SETS = [
    "minio.enabled=false", "objectStore.endpoint=10.9.0.5:9000",
    "triton.enabled=false", "segmentation.tritonUrl=triton.ml.svc.cluster.local:8001",
    "vlm.enabled=false", "findings.vlmBaseUrl=https://vlm.example.org:8443/v1",
    "gateway.pacsTarget=PACS@10.1.2.3:11112",
    "workflowDatabase.enabled=false", "workflowDatabase.external.existingSecret=cmrvl-db-url",
    "networkPolicy.egress.workflowDatabaseTo[0].ipBlock.cidr=10.20.0.0/16",
    "networkPolicy.egress.tritonTo[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=ml",
]
