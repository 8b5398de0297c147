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
{{- printf "%s-minio.%s.svc.cluster.local:9000" (include "cmrvl.fullname" .) .Release.Namespace -}}
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
{{- printf "%s.%s.svc.cluster.local:8001" (include "cmrvl.tritonService" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* OpenAI base URL the findings service uses ("" = none). */}}
{{- define "cmrvl.vlmBaseUrl" -}}
{{- if .Values.findings.vlmBaseUrl -}}
{{- .Values.findings.vlmBaseUrl -}}
{{- else if .Values.vlm.enabled -}}
{{- printf "http://%s-predictor.%s.svc.cluster.local/openai/v1" .Values.vlm.name .Release.Namespace -}}
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

{{/* Resources with an optional GPU count: (dict "resources" ... "gpus" N) */}}
{{- define "cmrvl.resources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.limits)) -}}
{{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) (default (dict) $res.requests)) -}}
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
