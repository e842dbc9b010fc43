{{/*
Metadata the chart adds to each generated CRD, inserted right after its `metadata:` line by
scripts/charts.py refresh. The CI check removes exactly these keys again and compares the rest
with `stackroute crd` byte for byte.
*/}}
{{- define "stackroute-crds.metadata" -}}
labels:
  app.kubernetes.io/name: stackroute-crds
  app.kubernetes.io/instance: {{ .Release.Name | quote }}
  app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
  app.kubernetes.io/component: crds
  app.kubernetes.io/part-of: stackroute
  app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
  helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | quote }}
  {{- with .Values.additionalLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if .Values.keep }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}
{{- end }}
