{{/*
Names. Object names are DNS labels: at most 63 characters.
*/}}
{{- define "mailwarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailwarden.fullname" -}}
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

{{- define "mailwarden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailwarden.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the webhook's serving certificate (generated or cert-manager's). */}}
{{- define "mailwarden.webhookTLSSecret" -}}
{{- printf "%s-webhook-tls" (include "mailwarden.fullname" .) }}
{{- end }}

{{/*
Labels. Selector labels never change after install (a Deployment's selector is
immutable), so they carry no version.
*/}}
{{- define "mailwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mailwarden.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mailwarden.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mailwarden
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "mailwarden.image" -}}
{{- $image := index . 0 }}
{{- $chart := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
The namespaces the operator watches, as a list; empty means all. The release namespace
is not added implicitly: the operator keeps no MailAccounts of its own.
*/}}
{{- define "mailwarden.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/*
The DNS names of the webhook Service, and the host of webhook.url when set: what the
serving certificate must cover. Output: YAML {dns: [...], ips: [...]}.
*/}}
{{- define "mailwarden.webhookSANs" -}}
{{- $svc := include "mailwarden.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $dns := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) }}
{{- $ips := list }}
{{- with .Values.webhook.url }}
{{- $host := (urlParse .).host | splitList ":" | first }}
{{- if regexMatch "^[0-9]+(\\.[0-9]+){3}$" $host }}
{{- $ips = append $ips $host }}
{{- else }}
{{- $dns = append $dns $host }}
{{- end }}
{{- end }}
dns: {{ toJson $dns }}
ips: {{ toJson $ips }}
{{- end }}

{{/* Rules the operator needs in each namespace it watches; see rbac.yaml. */}}
{{- define "mailwarden.namespacedRules" -}}
# MailAccounts. list+watch: kopf's watch behind every @kopf.on.* / @kopf.index /
# @kopf.daemon on mailaccounts (main.py, handlers/authorization.py), and
# KubeClient.list_mailaccounts (the consent server looks MailAccounts up).
# get: KubeClient.get_mailaccount (reconcile re-reads the object it writes status for).
# patch: kopf's finalizer (mailwarden.io/finalizer) and its progress annotations.
# No create/update/delete: MailAccounts belong to their users.
- apiGroups: ["mailwarden.io"]
  resources: ["mailaccounts"]
  verbs: ["get", "list", "watch", "patch"]
# status.conditions, status.authorization, tokenExpiresAt:
# KubeClient.patch_mailaccount_status (merge patch on the status subresource).
- apiGroups: ["mailwarden.io"]
  resources: ["mailaccounts/status"]
  verbs: ["patch"]
# The rendered Secrets' ownerReference has blockOwnerDeletion: clusters that enable the
# OwnerReferencesPermissionEnforcement admission plugin (OpenShift does) require update
# on the owner's finalizers subresource for that; it grants nothing else.
- apiGroups: ["mailwarden.io"]
  resources: ["mailaccounts/finalizers"]
  verbs: ["update"]
# Secrets. get: the Secrets a MailAccount references and the ones the operator owns
# (`<ma>-proxy`, `<ma>-oauth2-token`). create/update/patch: render writes `<ma>-proxy`
# (create, then merge patch), custody stores refresh tokens (create, replace = update).
# delete: the owned Secrets when a MailAccount is deleted (uid precondition).
# list+watch: kopf's Secret watches (main.secret_event: a referenced Secret changed;
# handlers/authorization.rendered_secret_event: the rendered Secret changed).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# KubeClient.create_event and kopf.info/warn: one core/v1 Event per condition change,
# plus injection warnings. Never read back, so no get/list.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# KubeClient.list_pods: the periodic check that lists annotated pods which started
# without the sidecar (webhook unreachable under failurePolicy Ignore). Pods are never
# changed by the operator: the webhook's patch is applied by the API server.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}
