{{/* ------------------------------------------------------------------------------------------ names, labels */}}

{{- define "deepmedix.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's object prefix: the release name, or release-chart when the release name lacks the chart's. */}}
{{- define "deepmedix.fullname" -}}
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

{{- define "deepmedix.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "deepmedix.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: deepmedix
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "reader") */}}
{{- define "deepmedix.selectorLabels" -}}
app.kubernetes.io/name: {{ include "deepmedix.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* ----------------------------------------------------------------------------------------------- S3 store */}}

{{/* The Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the user's, or the one this chart creates. */}}
{{- define "deepmedix.s3SecretName" -}}
{{- .Values.s3.existingSecret | default .Values.s3.secretName -}}
{{- end -}}

{{- define "deepmedix.minioName" -}}
{{- printf "%s-minio" (include "deepmedix.fullname" .) -}}
{{- end -}}

{{/* host:port of the store, no scheme (KServe's s3-endpoint annotation, S3_ENDPOINT, KFP's provider endpoint). */}}
{{- define "deepmedix.s3Endpoint" -}}
{{- if .Values.s3.endpoint -}}
{{- .Values.s3.endpoint -}}
{{- else if .Values.minio.enabled -}}
{{- printf "%s.%s.svc.cluster.local:9000" (include "deepmedix.minioName" .) .Release.Namespace -}}
{{- else -}}
{{- fail "s3.endpoint is required: the host[:port] of your S3 store (no scheme; KFP >= 2.15's SeaweedFS, MinIO, AWS S3, ...), or set minio.enabled=true for the chart's own MinIO" -}}
{{- end -}}
{{- end -}}

{{/* "true" / "false": s3.useHttps, or when null, false for the in-cluster MinIO and true for anything else. */}}
{{- define "deepmedix.s3UseHttps" -}}
{{- if kindIs "bool" .Values.s3.useHttps -}}
{{- .Values.s3.useHttps -}}
{{- else -}}
{{- not (and .Values.minio.enabled (not .Values.s3.endpoint)) -}}
{{- end -}}
{{- end -}}

{{- define "deepmedix.pipelineRoot" -}}
{{- .Values.kfp.pipelineRoot | default (printf "s3://%s/pipeline-root" .Values.s3.bucket) -}}
{{- end -}}

{{/* The model folder to serve, as a folder: KServe's storage-initializer lists s3:// and gs:// objects by raw key
prefix (kserve/storage/storage.py _download_s3), so ".../model" would also fetch ".../model-checkpoints/**". */}}
{{- define "deepmedix.storageUri" -}}
{{- $u := .Values.serving.storageUri -}}
{{- if and (or (hasPrefix "s3://" $u) (hasPrefix "gs://" $u)) (not (hasSuffix "/" $u)) -}}
{{- printf "%s/" $u -}}
{{- else -}}
{{- $u -}}
{{- end -}}
{{- end -}}

{{/* The store's environment for a pod that uses deepmedix.store: settings as values, credentials by reference. */}}
{{- define "deepmedix.s3Env" -}}
- name: S3_ENDPOINT
  value: {{ include "deepmedix.s3Endpoint" . | quote }}
- name: S3_USE_HTTPS
  value: {{ ternary "1" "0" (eq (include "deepmedix.s3UseHttps" .) "true") | quote }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "deepmedix.s3SecretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "deepmedix.s3SecretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}

{{/* KServe's storage-initializer settings, as annotations (on the S3 Secret; on the ServiceAccount for IRSA). */}}
{{- define "deepmedix.kserveS3Annotations" -}}
serving.kserve.io/s3-endpoint: {{ include "deepmedix.s3Endpoint" . | quote }}
serving.kserve.io/s3-usehttps: {{ ternary "1" "0" (eq (include "deepmedix.s3UseHttps" .) "true") | quote }}
serving.kserve.io/s3-verifyssl: {{ ternary "1" "0" .Values.s3.verifySsl | quote }}
serving.kserve.io/s3-region: {{ .Values.s3.region | quote }}
serving.kserve.io/s3-useanoncredential: "false"
{{- end -}}

{{/* ------------------------------------------------------------------------------------- Pod Security "restricted" */}}

{{- define "deepmedix.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Complete on its own (Knative keeps the pod-level securityContext behind a feature flag). */}}
{{- define "deepmedix.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "deepmedix.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------------------------------------------------ validation */}}

{{- define "deepmedix.validate" -}}
{{- $s3 := .Values.s3 -}}
{{- $given := or $s3.accessKey $s3.secretKey -}}
{{- if and $s3.existingSecret $given -}}
{{- fail "s3: give either s3.existingSecret or s3.accessKey/s3.secretKey, not both" -}}
{{- end -}}
{{- if not $s3.existingSecret -}}
{{- if not (and $s3.accessKey $s3.secretKey) -}}
{{- fail "S3 credentials are required and the chart ships none: set s3.existingSecret=<Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY> (recommended), or pass s3.accessKey and s3.secretKey with --set at install" -}}
{{- end -}}
{{- if and .Values.minio.enabled (or (lt (len $s3.accessKey) 3) (lt (len $s3.secretKey) 8)) -}}
{{- fail "minio.enabled: MinIO's root user (s3.accessKey) needs at least 3 characters and its password (s3.secretKey) at least 8" -}}
{{- end -}}
{{- end -}}
{{- $_ := include "deepmedix.s3Endpoint" . -}}
{{- if and (eq .Values.serving.deploymentMode "Standard") (eq (int .Values.serving.minReplicas) 0) -}}
{{- fail "serving.minReplicas=0 (scale to zero) needs serving.deploymentMode=Knative" -}}
{{- end -}}
{{- if lt (int .Values.serving.maxReplicas) (int .Values.serving.minReplicas) -}}
{{- fail "serving.maxReplicas must be >= serving.minReplicas" -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------------------------------------ autoscaling */}}

{{/*
The scaling fields of one InferenceService component, by deployment mode:
  Knative           -> KPA: scaleMetric concurrency|rps + scaleTarget
  Standard + hpa    -> HPA: scaleMetric cpu|memory + scaleTarget (utilization %)
  Standard + keda   -> KEDA ScaledObject: autoScaling.metrics (Prometheus query and/or CPU), optional behavior
(dict "ctx" $ "query" "<PromQL or empty>" "target" N "cpu" N-or-0 "behavior" dict-or-nil)
*/}}
{{- define "deepmedix.scaling" -}}
{{- $s := .ctx.Values.serving -}}
minReplicas: {{ int $s.minReplicas }}
maxReplicas: {{ int $s.maxReplicas }}
{{- if eq $s.deploymentMode "Knative" }}
scaleMetric: {{ $s.knative.scaleMetric }}
scaleTarget: {{ int $s.knative.scaleTarget }}
{{- else if eq $s.autoscaler "hpa" }}
scaleMetric: {{ $s.hpa.scaleMetric }}
scaleTarget: {{ int $s.hpa.scaleTarget }}
{{- else }}
autoScaling:
  metrics:
    {{- if .query }}
    - type: External
      external:
        metric:
          backend: prometheus
          serverAddress: {{ $s.keda.prometheusAddress }}
          query: {{ .query | quote }}
        target:
          type: Value
          value: {{ .target | int | toString | quote }}
    {{- end }}
    {{- if .cpu }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ int .cpu }}
    {{- end }}
  {{- with .behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level fields of a model component: pod securityContext (Standard mode only: Knative keeps it behind a
feature flag, the containers carry the full context either way) and pull secrets. */}}
{{- define "deepmedix.componentPodFields" -}}
{{- if eq .Values.serving.deploymentMode "Standard" }}
securityContext:
  {{- include "deepmedix.podSecurityContext" . | nindent 2 }}
{{- end }}
{{- include "deepmedix.imagePullSecrets" . }}
{{- end -}}

{{- define "deepmedix.gpuPlacement" -}}
{{- with .Values.gpuPool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.gpuPool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* resources plus N GPUs in requests and limits (extended resources need both, equal): (dict "res" . "gpus" N) */}}
{{- define "deepmedix.withGpus" -}}
{{- $res := deepCopy (.res | default dict) -}}
{{- if gt (int .gpus) 0 -}}
{{- $gpu := dict "nvidia.com/gpu" (int .gpus | toString) -}}
{{- $_ := set $res "requests" (merge (deepCopy $gpu) ($res.requests | default dict)) -}}
{{- $_ := set $res "limits" (merge (deepCopy $gpu) ($res.limits | default dict)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
