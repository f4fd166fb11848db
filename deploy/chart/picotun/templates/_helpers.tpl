{{/* The one image of the webhook, the controller and the sidecars. */}}
{{- define "picotun.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{/* The tunnel server's host: server.host, or REGION.tuns.sh for a tuns.sh region. */}}
{{- define "picotun.serverHost" -}}
{{- if .Values.server.region -}}
{{- if ne .Values.server.host "tuns.sh" -}}
{{- fail (printf "server.region (%s) is a tuns.sh region; with server.host %s leave it empty" .Values.server.region .Values.server.host) -}}
{{- end -}}
{{ .Values.server.region }}.tuns.sh
{{- else -}}
{{ .Values.server.host }}
{{- end -}}
{{- end }}

{{/* Key mode (key-secret or sync-key-secret): sidecars mount Secret picotun-ssh-key. */}}
{{- define "picotun.keyMode" -}}
{{- if has .Values.auth (list "key-secret" "sync-key-secret") }}true{{ end -}}
{{- end }}

{{/* The values checked once, with what to set instead. */}}
{{- define "picotun.validate" -}}
{{- if not (has .Values.auth (list "certificate" "key-secret" "sync-key-secret")) -}}
{{- fail (printf "auth is %q; set certificate (the default), key-secret or sync-key-secret" .Values.auth) -}}
{{- end -}}
{{- if not .Values.certManager.enabled -}}
{{- if not (and .Values.webhookTLS.crt .Values.webhookTLS.key .Values.webhookTLS.ca) -}}
{{- fail "certManager.enabled=false needs the webhook's certificate: run `picotun certs --out-dir DIR`, then --set-file webhookTLS.crt=DIR/tls.crt --set-file webhookTLS.key=DIR/tls.key --set-file webhookTLS.ca=DIR/ca.crt" -}}
{{- end -}}
{{- end -}}
{{- end }}
