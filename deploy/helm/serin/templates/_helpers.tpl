{{/* Names and labels shared by every template. */}}

{{- define "serin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "serin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "serin.injectorName" -}}
{{- printf "%s-injector" (include "serin.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "serin.tokenSecret" -}}
{{- default (printf "%s-admin-token" (include "serin.fullname" .)) .Values.adminToken.existingSecret -}}
{{- end -}}

{{- define "serin.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "serin.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "serin.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels; the argument is (list $ "component"). */}}
{{- define "serin.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "serin.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The fleet's SerinRollout name, checked: "" when fleet mode is off. */}}
{{- define "serin.fleetName" -}}
{{- $name := .Values.fleet.name | default "" | toString -}}
{{- if $name -}}
{{- if or (gt (len $name) 247) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" $name)) -}}
{{- fail (printf "fleet.name %q is not a valid SerinRollout name: use a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit) of at most 247 characters, so that the Lease serin-NAME fits" $name) -}}
{{- end -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{/* Name of the fleet's Role and RoleBinding. */}}
{{- define "serin.fleetRbacName" -}}
{{- printf "%s-fleet" (include "serin.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The ServiceAccount the fleet's members run as. */}}
{{- define "serin.fleetServiceAccount" -}}
{{- default (include "serin.fleetRbacName" .) .Values.fleet.serviceAccount.name -}}
{{- end -}}
