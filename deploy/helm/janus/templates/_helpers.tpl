{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "janus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name prefix: <release>-<chart>, or the release name alone when it already contains
the chart name. Truncated so that "<prefix>-understanding" still fits in 63 characters.
*/}}
{{- define "janus.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 49 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 49 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 49 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
chart-version label value.
*/}}
{{- define "janus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "janus.labels" -}}
helm.sh/chart: {{ include "janus.chart" . }}
{{ include "janus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: janus
{{- end }}

{{/*
Labels that select this release's pods and Services.
*/}}
{{- define "janus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "janus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Per-component helpers take (dict "root" $ "component" "gateway"|"understanding"|"generation").
*/}}
{{- define "janus.componentName" -}}
{{- printf "%s-%s" (include "janus.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "janus.componentLabels" -}}
{{ include "janus.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "janus.componentSelectorLabels" -}}
{{ include "janus.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Image reference of a component: <component>.image keys override .Values.image; the tag
defaults to the chart's appVersion.
*/}}
{{- define "janus.image" -}}
{{- $c := index .root.Values .component }}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (default (dict) $c.image) }}
{{- printf "%s:%s" $img.repository (default .root.Chart.AppVersion ($img.tag | toString)) }}
{{- end }}

{{- define "janus.imagePullPolicy" -}}
{{- $c := index .root.Values .component }}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (default (dict) $c.image) }}
{{- $img.pullPolicy | default "IfNotPresent" }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "janus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "janus.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
True ("true") for the components that load the model.
*/}}
{{- define "janus.isModelComponent" -}}
{{- if has .component (list "understanding" "generation") }}true{{ end }}
{{- end }}

{{/*
Sub-directory of a shared download PVC that holds one repository (org/name -> org--name).
*/}}
{{- define "janus.downloadSubPath" -}}
{{- .Values.model.download.repoId | replace "/" "--" }}
{{- end }}

{{/*
Backends the gateway forwards to: the values' list, or this release's Service.
Takes (dict "root" $ "component" "understanding"|"generation").
*/}}
{{- define "janus.backends" -}}
{{- $list := index .root.Values.gateway (printf "%sBackends" .component) }}
{{- if $list }}
{{- join "," $list }}
{{- else if (index .root.Values .component).enabled }}
{{- printf "%s.%s.svc.cluster.local:%d" (include "janus.headlessName" .) .root.Release.Namespace (int (index .root.Values .component).port) }}
{{- end }}
{{- end }}

{{/*
Headless Service of a model component: DNS answers with one address per ready pod; the gateway
re-resolves it and keeps one connection per pod.
*/}}
{{- define "janus.headlessName" -}}
{{- printf "%s-headless" (include "janus.componentName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
