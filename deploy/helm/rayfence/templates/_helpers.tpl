{{/*
Names and labels every template uses (Helm's conventions). Object names follow the
release: installed as release "rayfence" (deploy/README.md), they are the
Kustomize base's (rayfence-agent, rayfence-metrics-reader, ...).
*/}}

{{/* The application's name: nameOverride, else the chart's. */}}
{{- define "rayfence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, else the release name when
it already holds the application's name (release "rayfence" -> rayfence-agent),
else <release>-<name>. 63 characters at most, as Kubernetes names and labels.
*/}}
{{- define "rayfence.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "rayfence.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "rayfence.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The agent's objects: its DaemonSet, ServiceAccount, ClusterRole and binding. */}}
{{- define "rayfence.agentName" -}}
{{- include "rayfence.fullname" . }}-agent
{{- end }}

{{/* The image tag: image.tag, else the chart's appVersion. */}}
{{- define "rayfence.version" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/* helm.sh/chart: name-version ("+" is not allowed in a label). */}}
{{- define "rayfence.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
What selects the release's pods: stable across upgrades (a DaemonSet's selector
cannot change), so name and instance only.
*/}}
{{- define "rayfence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rayfence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Every object's labels. */}}
{{- define "rayfence.labels" -}}
helm.sh/chart: {{ include "rayfence.chart" . }}
{{ include "rayfence.selectorLabels" . }}
app.kubernetes.io/version: {{ include "rayfence.version" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rayfence
{{- end }}

{{/*
"true" when the kubelet's probes (127.0.0.1:port) reach the metrics listener,
which then speaks TLS, rather than the agent's plain loopback health listener:
the agent opens that one only when the metrics address does not cover
127.0.0.1:port (the node's own address does not; 0.0.0.0 and 127.0.0.1 do).
*/}}
{{- define "rayfence.probesOverTls" -}}
{{- if .Values.metrics.tls.enabled }}
{{- if not .Values.metrics.auth.enabled }}true
{{- else if .Values.metrics.bindNodeAddress }}
{{- else if or (eq .Values.metrics.host "0.0.0.0") (eq .Values.metrics.host "127.0.0.1") }}true
{{- end }}
{{- end }}
{{- end }}
