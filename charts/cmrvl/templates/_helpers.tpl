{{/* Names */}}
{{- define "cmrvl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cmrvl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "cmrvl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "cmrvl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cmrvl
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway") */}}
{{- define "cmrvl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cmrvl.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of a component's resources and pods. */}}
{{- define "cmrvl.componentLabels" -}}
{{ include "cmrvl.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference from {repository, tag, digest}; (dict "image" .Values.image "root" $) */}}
{{- define "cmrvl.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Secret names */}}
{{- define "cmrvl.s3SecretName" -}}
{{- default (printf "%s-s3" (include "cmrvl.fullname" .)) .Values.objectStore.existingSecret -}}
{{- end -}}
{{- define "cmrvl.authSecretName" -}}
{{- default (printf "%s-auth" (include "cmrvl.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "cmrvl.tlsSecretName" -}}
{{- default (printf "%s-gateway-tls" (include "cmrvl.fullname" .)) .Values.gateway.tls.existingSecret -}}
{{- end -}}

{{/* host:port of the object store. */}}
{{- define "cmrvl.s3Endpoint" -}}
{{- if .Values.objectStore.endpoint -}}
{{- .Values.objectStore.endpoint -}}
{{- else -}}
{{- if not .Values.minio.enabled -}}
{{- fail "objectStore.endpoint is required when minio.enabled is false" -}}
{{- end -}}
{{- printf "%s-minio.%s.svc.%s:9000" (include "cmrvl.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}
{{- end -}}

{{- define "cmrvl.tritonService" -}}
{{- printf "%s-triton" (include "cmrvl.fullname" .) -}}
{{- end -}}

{{/* Triton gRPC endpoint the segmentation service uses ("" = none). */}}
{{- define "cmrvl.tritonUrl" -}}
{{- if .Values.segmentation.tritonUrl -}}
{{- .Values.segmentation.tritonUrl -}}
{{- else if .Values.triton.enabled -}}
{{- printf "%s.%s.svc.%s:8001" (include "cmrvl.tritonService" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}
{{- end -}}

{{/* OpenAI base URL the findings service uses ("" = none). */}}
{{- define "cmrvl.vlmBaseUrl" -}}
{{- if .Values.findings.vlmBaseUrl -}}
{{- .Values.findings.vlmBaseUrl -}}
{{- else if .Values.vlm.enabled -}}
{{- printf "http://%s-predictor.%s.svc.%s/openai/v1" .Values.vlm.name .Release.Namespace .Values.clusterDomain -}}
{{- end -}}
{{- end -}}

{{/* Pod and container hardening shared by every workload. */}}
{{- define "cmrvl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cmrvl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Object store environment (CMRVL_S3_*) for the services and training. */}}
{{- define "cmrvl.s3Env" -}}
- name: CMRVL_S3_ENDPOINT
  value: {{ include "cmrvl.s3Endpoint" . | quote }}
- name: CMRVL_S3_SECURE
  value: {{ .Values.objectStore.secure | quote }}
- name: CMRVL_S3_REGION
  value: {{ .Values.objectStore.region | quote }}
- name: CMRVL_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cmrvl.s3SecretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: CMRVL_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cmrvl.s3SecretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}

{{/* AWS SDK environment (Triton, training). */}}
{{- define "cmrvl.awsEnv" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "cmrvl.s3SecretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "cmrvl.s3SecretName" . }}
      key: AWS_SECRET_ACCESS_KEY
- name: AWS_DEFAULT_REGION
  value: {{ .Values.objectStore.region | quote }}
- name: AWS_REGION
  value: {{ .Values.objectStore.region | quote }}
{{- end -}}

{{/* Size ("512Mi", "1.5Gi", ...) in MiB, rounded up. */}}
{{- define "cmrvl.sizeMi" -}}
{{- $n := regexFind "^[0-9.]+" . | float64 -}}
{{- $unit := regexFind "[KMGT]i$" . -}}
{{- $factor := get (dict "Ki" 0.0009765625 "Mi" 1.0 "Gi" 1024.0 "Ti" 1048576.0) $unit -}}
{{- mulf $n $factor | ceil | int -}}
{{- end -}}

{{/*
Resources with an optional GPU count and the pod's scratch volumes:
(dict "resources" ... "gpus" N "scratch" (list "4Gi" ...)). The container that mounts the
disk-backed emptyDirs requests their summed sizeLimits as ephemeral-storage, so the scheduler
places the pod where that much local disk is free; its limit adds room for the container's logs.
*/}}
{{- define "cmrvl.resources" -}}
{{- $res := deepCopy .resources -}}
{{- $_ := set $res "limits" (deepCopy (default (dict) $res.limits)) -}}
{{- $_ := set $res "requests" (deepCopy (default (dict) $res.requests)) -}}
{{- if gt (int (default 0 .gpus)) 0 -}}
{{- $_ := set $res.limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res.requests "nvidia.com/gpu" (int .gpus) -}}
{{- end -}}
{{- if .scratch -}}
{{- $mi := 0 -}}
{{- range .scratch }}{{ $mi = add $mi (include "cmrvl.sizeMi" .) }}{{ end -}}
{{- $_ := set $res.requests "ephemeral-storage" (printf "%dMi" (int $mi)) -}}
{{- $_ := set $res.limits "ephemeral-storage" (printf "%dMi" (add $mi 512 | int)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Environment of training pods: object store access for the cmrvl code and the AWS SDKs. */}}
{{- define "cmrvl.trainingEnv" -}}
{{ include "cmrvl.s3Env" . }}
{{ include "cmrvl.awsEnv" . }}
- name: AWS_ENDPOINT_URL
  value: {{ printf "%s://%s" (ternary "https" "http" .Values.objectStore.secure) (include "cmrvl.s3Endpoint" .) | quote }}
- name: HOME
  value: /tmp
- name: USER
  value: cmrvl
- name: TMPDIR
  value: /tmp
- name: CMRVL_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end -}}

{{- define "cmrvl.trainingMounts" -}}
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- end -}}

{{/* Checkov skip of CKV_K8S_43 while an image is pinned by tag only: (dict "image" ... "n" 2) */}}
{{- define "cmrvl.digestSkip" -}}
{{- if not .image.digest -}}
checkov.io/skip{{ .n }}: CKV_K8S_43=Pinned by an immutable release tag in values; set the image's digest field to pin by digest (the release pipeline does).
{{- end -}}
{{- end -}}

{{/*
The gateway's target of a stage: (dict "root" $ "stage" "preprocess"). Headless: DNS answers with
every ready pod and the channel calls them round robin; clusterIP: one virtual IP, for a mesh
that balances the calls itself.
*/}}
{{- define "cmrvl.stageTarget" -}}
{{- $host := printf "%s-%s" (include "cmrvl.fullname" .root) .stage -}}
{{- $domain := printf "%s.svc.%s" .root.Release.Namespace .root.Values.clusterDomain -}}
{{- if eq .root.Values.gateway.stageTargets "clusterIP" -}}
{{- printf "%s.%s:50051" $host $domain -}}
{{- else -}}
{{- printf "dns:///%s-headless.%s:50051" $host $domain -}}
{{- end -}}
{{- end -}}

{{/* The bundled workflow database (Postgres). */}}
{{- define "cmrvl.workflowDbName" -}}
{{- printf "%s-workflow-db" (include "cmrvl.fullname" .) -}}
{{- end -}}
{{- define "cmrvl.workflowDbSecretName" -}}
{{- default (include "cmrvl.workflowDbName" .) .Values.workflowDatabase.existingSecret -}}
{{- end -}}

{{/*
The gateway's workflow database: CMRVL_WORKFLOW_DATABASE_URL from the bundled Postgres (the
password from its Secret, expanded by the kubelet through $(PGPASSWORD)) or from the external
Secret's key holding the whole URL. CMRVL_GATEWAY_REPLICA names the pod (the engine's executor id).
*/}}
{{- define "cmrvl.workflowDbEnv" -}}
{{- $db := .Values.workflowDatabase -}}
{{- if $db.enabled }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cmrvl.workflowDbSecretName" . }}
      key: password
- name: CMRVL_WORKFLOW_DATABASE_URL
  value: {{ printf "postgresql://%s:$(PGPASSWORD)@%s.%s.svc.%s:5432/%s" $db.username (include "cmrvl.workflowDbName" .) .Release.Namespace .Values.clusterDomain $db.database | quote }}
{{- else if $db.external.existingSecret }}
- name: CMRVL_WORKFLOW_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $db.external.existingSecret }}
      key: {{ $db.external.urlKey }}
{{- else }}
{{- fail "workflowDatabase: set enabled=true (bundled Postgres) or external.existingSecret (a Secret whose key holds postgresql://user:pass@host:5432/db); the gateway replicas share one database" }}
{{- end }}
- name: CMRVL_GATEWAY_REPLICA
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/*
Egress rule to an endpoint outside the release: (dict "host" H "port" P "to" peers). The peers
from values win; else an IP address allows just that address; else (a DNS name, which a
NetworkPolicy cannot match) any address on that port.
*/}}
{{- define "cmrvl.egressExternal" -}}
- ports:
    - port: {{ int .port }}
      protocol: TCP
  {{- if .to }}
  to:
    {{- toYaml .to | nindent 4 }}
  {{- else if regexMatch "^[0-9]{1,3}(\\.[0-9]{1,3}){3}$" .host }}
  to:
    - ipBlock:
        cidr: {{ .host }}/32
  {{- else if regexMatch "^[0-9A-Fa-f]*:[0-9A-Fa-f:.]*$" .host }}
  to:
    - ipBlock:
        cidr: {{ .host }}/128
  {{- end }}
{{- end -}}

{{/* Egress rule to pods of the release: (dict "root" $ "component" "minio" "port" 9000) */}}
{{- define "cmrvl.egressToComponent" -}}
- ports:
    - port: {{ .port }}
      protocol: TCP
  to:
    - podSelector:
        matchLabels:
          {{- include "cmrvl.selectorLabels" (dict "root" .root "component" .component) | nindent 10 }}
{{- end -}}

{{/* {"host", "port"} of "host:port", "[v6]:port" or a bare host: (dict "address" A "defaultPort" P) as JSON */}}
{{- define "cmrvl.splitHostPort" -}}
{{- $port := regexFind ":[0-9]+$" .address | trimPrefix ":" -}}
{{- $host := regexReplaceAll ":[0-9]+$" .address "" | trimPrefix "[" | trimSuffix "]" -}}
{{- dict "host" $host "port" (default .defaultPort $port | int) | toJson -}}
{{- end -}}
