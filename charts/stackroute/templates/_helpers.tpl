{{/* Name prefix of every object: the release name unless overridden. */}}
{{- define "stackroute.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "stackroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of a component: only name, instance and component (selectors are immutable). */}}
{{- define "stackroute.selectorLabels" -}}
app.kubernetes.io/name: stackroute
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Recommended labels. Call with (dict "root" $ "component" "controller"). */}}
{{- define "stackroute.labels" -}}
{{ include "stackroute.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: stackroute
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "stackroute.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* An image reference. Call with (dict "root" $ "image" .Values.controller.image). */}}
{{- define "stackroute.image" -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "stackroute.controllerName" -}}{{ include "stackroute.fullname" . }}-controller{{- end -}}
{{- define "stackroute.agentName" -}}{{ include "stackroute.fullname" . }}-agent{{- end -}}
{{- define "stackroute.webhookServiceName" -}}{{ include "stackroute.fullname" . }}-webhook{{- end -}}
{{- define "stackroute.injectorName" -}}{{ include "stackroute.fullname" . }}-injector{{- end -}}
{{- define "stackroute.webhookCASecret" -}}{{ include "stackroute.fullname" . }}-webhook-ca{{- end -}}
{{- define "stackroute.etcdTLSSecret" -}}{{ include "stackroute.etcdName" . }}-tls{{- end -}}
{{- define "stackroute.caConfigMap" -}}{{ include "stackroute.fullname" . }}-ca{{- end -}}
{{- define "stackroute.webhookTLSSecret" -}}{{ include "stackroute.fullname" . }}-webhook-tls{{- end -}}
{{- define "stackroute.etcdName" -}}{{ include "stackroute.fullname" . }}-etcd{{- end -}}
{{- define "stackroute.leaseName" -}}
{{- .Values.controller.leaseName | default (printf "%s-controller-status" (include "stackroute.fullname" .)) -}}
{{- end -}}

{{/* failurePolicy of the label-selected webhook entries: Fail with HA, Ignore for one replica. */}}
{{- define "stackroute.webhookFailurePolicy" -}}
{{- if .Values.webhook.failurePolicy -}}
{{- .Values.webhook.failurePolicy -}}
{{- else if gt (int .Values.controller.replicas) 1 -}}
Fail
{{- else -}}
Ignore
{{- end -}}
{{- end -}}

{{/* etcd endpoints the controller uses, comma separated ("" for the embedded store). */}}
{{- define "stackroute.etcdEndpoints" -}}
{{- if .Values.etcd.endpoints -}}
{{- join "," .Values.etcd.endpoints -}}
{{- else if .Values.etcd.bundled.enabled -}}
{{- $name := include "stackroute.etcdName" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $eps = append $eps (printf "%s://%s-%d.%s-headless.%s.svc:2379" (ternary "https" "http" $.Values.etcd.bundled.tls.enabled) $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- end -}}
{{- end -}}

{{/* Kubernetes features newer than the charts' floor (1.20), by the server's version (README
"Older Kubernetes"). DaemonSet rollingUpdate.maxSurge: beta and on by default from 1.22. */}}
{{- define "stackroute.daemonSetSurge" -}}
{{- if semverCompare ">=1.22.0-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}

{{/* PodDisruptionBudget: policy/v1 from 1.21; 1.20 serves only policy/v1beta1 (same fields). */}}
{{- define "stackroute.pdbApiVersion" -}}
{{- if semverCompare ">=1.21.0-0" .Capabilities.KubeVersion.Version -}}policy/v1{{- else -}}policy/v1beta1{{- end -}}
{{- end -}}

{{/* The API server labels every namespace kubernetes.io/metadata.name=<name> from 1.21; the
webhook's namespace exclusions select on that label. */}}
{{- define "stackroute.namespaceNameLabel" -}}
{{- if semverCompare ">=1.21.0-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}

{{/* Namespaces never sent to the injector, as a JSON list. */}}
{{- define "stackroute.excludedNamespaces" -}}
{{- concat (list "kube-system" .Release.Namespace) .Values.webhook.excludedNamespaces | uniq | toJson -}}
{{- end -}}

{{/* Rendering guards. */}}
{{- define "stackroute.validate" -}}
{{- if and (gt (int .Values.controller.replicas) 1) (not (include "stackroute.etcdEndpoints" .)) -}}
{{- fail "controller.replicas > 1 needs shared state: set etcd.endpoints or etcd.bundled.enabled=true" -}}
{{- end -}}
{{- $us := .Values.agent.updateStrategy -}}
{{- if and (eq (toString $us.maxSurge) "0") (eq (toString $us.maxUnavailable) "0") -}}
{{- fail "agent.updateStrategy: maxSurge and maxUnavailable cannot both be 0" -}}
{{- end -}}
{{- if and .Values.agent.hostNetwork (ne (toString $us.maxSurge) "0") (include "stackroute.daemonSetSurge" .) -}}
{{- fail "agent.hostNetwork: a surge pod would need the same host port as the running agent and never be scheduled; set agent.updateStrategy.maxSurge=0 and maxUnavailable=1" -}}
{{- end -}}
{{- if and .Values.etcd.endpoints .Values.etcd.bundled.enabled -}}
{{- fail "set either etcd.endpoints or etcd.bundled.enabled, not both" -}}
{{- end -}}
{{- end -}}

{{/* Fields shared by the injector's webhook entries. */}}
{{- define "stackroute.webhookCommon" -}}
admissionReviewVersions: [v1]
sideEffects: None
timeoutSeconds: {{ .root.Values.webhook.timeoutSeconds }}
reinvocationPolicy: IfNeeded
matchPolicy: Equivalent
clientConfig:
  service:
    name: {{ .svc }}
    namespace: {{ .root.Release.Namespace }}
    path: /inject
    port: 443
rules:
  - operations: [CREATE]
    apiGroups: [""]
    apiVersions: [v1]
    resources: [pods]
    scope: Namespaced
{{- end -}}

{{/* "true" when the controller talks to etcd over TLS with a client certificate. */}}
{{- define "stackroute.etcdClientTLS" -}}
{{- if and .Values.etcd.bundled.enabled .Values.etcd.bundled.tls.enabled -}}true
{{- else if and .Values.etcd.endpoints .Values.etcd.clientTLS.secretName -}}true
{{- end -}}
{{- end -}}
