{{/* The labels every object carries: the same two the kustomize base sets, so both renders stay equal. */}}
{{- define "robin.labels" -}}
app.kubernetes.io/name: {{ . }}
app.kubernetes.io/part-of: robin
{{- end }}

{{- define "robin.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{- define "robin.pullPolicy" -}}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}
