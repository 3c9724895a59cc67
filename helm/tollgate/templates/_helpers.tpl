{{/*
Expand the name of the chart.
*/}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "tollgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "tollgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "tollgate.labels" -}}
helm.sh/chart: {{ include "tollgate.chart" . }}
{{ include "tollgate.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The service account the pods run as.
*/}}
{{- define "tollgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tollgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding redis-url, admin-token and metrics-token: the user's own, or the one this chart makes.
*/}}
{{- define "tollgate.secretName" -}}
{{- default (include "tollgate.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
Tollgate's config file: `config` without its secrets (they reach the pods as TOLLGATE_* variables from the Secret,
which win over the file).
*/}}
{{- define "tollgate.configFile" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := unset $config "admin" }}
{{- $_ := unset $config.redis "url" }}
{{- $_ := unset $config.metrics "token" }}
{{- toYaml $config }}
{{- end }}

{{/*
Whether the pods have a metrics token (and Prometheus must send it).
*/}}
{{- define "tollgate.hasMetricsToken" -}}
{{- if .Values.existingSecret }}
{{- if .Values.serviceMonitor.metricsTokenInExistingSecret }}true{{ end }}
{{- else if .Values.config.metrics.token }}true
{{- end }}
{{- end }}

{{/*
What rolls the pods when it changes: the config file, without its pools while the pods re-read those themselves
(routing.reload_interval_seconds > 0).
*/}}
{{- define "tollgate.configChecksum" -}}
{{- $config := include "tollgate.configFile" . | fromYaml }}
{{- if gt (float64 .Values.config.routing.reload_interval_seconds) 0.0 }}
{{- $_ := unset $config "pools" }}
{{- end }}
{{- toYaml $config | sha256sum }}
{{- end }}

{{/*
The longest a pod may take to stop cleanly: the preStop pause, then the process's own shutdown (the drain, the
hang-up drain and 5 s: gateway/lifecycle.py shutdown_seconds), and 5 s more. A shorter grace period set in the
values is refused: the kubelet would kill streams before they are billed.
*/}}
{{- define "tollgate.terminationGracePeriodSeconds" -}}
{{- $drain := addf .Values.config.server.drain_seconds .Values.config.upstream.hang_up_drain_seconds }}
{{- $needed := addf $drain .Values.preStopSleepSeconds 10 | ceil | int }}
{{- $given := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $given }}
{{- $needed }}
{{- else if lt (int $given) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least %d: preStopSleepSeconds + config.server.drain_seconds + config.upstream.hang_up_drain_seconds + 10" (int $given) $needed) }}
{{- else }}
{{- int $given }}
{{- end }}
{{- end }}

{{/*
The port of a URL: explicit, or its scheme's default.
*/}}
{{- define "tollgate.urlPort" -}}
{{- $url := urlParse . }}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" }}
{{- if $port }}{{ $port }}
{{- else if eq $url.scheme "https" }}443
{{- else if eq $url.scheme "http" }}80
{{- else }}6379
{{- end }}
{{- end }}
