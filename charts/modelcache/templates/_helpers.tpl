{{/* Namespace the operator runs in (KServe's). */}}
{{- define "modelcache.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{- define "modelcache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "modelcache.agentImage" -}}
{{- $img := mergeOverwrite (dict) .Values.image (.Values.agent.image | default dict) -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}

{{- define "modelcache.labels" -}}
app.kubernetes.io/part-of: modelcache
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* The controller's --agent-settings: the agent values as JSON (see controller/reconcile.py). */}}
{{- define "modelcache.agentSettings" -}}
{{- $a := .Values.agent -}}
{{- $img := mergeOverwrite (dict) .Values.image ($a.image | default dict) -}}
{{- $s := dict "image" (include "modelcache.agentImage" .) "imagePullPolicy" $img.pullPolicy -}}
{{- $args := list "--metrics-port" (toString $a.metricsPort) -}}
{{- $_ := set $s "extraArgs" (concat $args ($a.extraArgs | default list)) -}}
{{- range $k := list "resources" "tolerations" "nodeSelector" "priorityClassName" "securityContext" "podSecurityContext" "env" "podLabels" "podAnnotations" -}}
{{- with index $a $k }}{{ $_ := set $s $k . }}{{ end -}}
{{- end -}}
{{- with .Values.imagePullSecrets }}{{ $_ := set $s "imagePullSecrets" . }}{{ end -}}
{{- with $a.peer }}{{ if gt (int .port) 0 }}{{ $_ := set $s "peer" (dict "port" (int .port) "uploadRate" (toString .uploadRate)) }}{{ end }}{{ end -}}
{{- toJson $s -}}
{{- end -}}
