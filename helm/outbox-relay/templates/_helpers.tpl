{{/* Names and labels shared by every object of the chart. */}}
{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.fullname" -}}
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

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "outbox-relay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "outbox-relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
{{- end -}}

{{- define "outbox-relay.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* relay.toml: the settings and the effect-type registry, from values. */}}
{{- define "outbox-relay.configToml" -}}
{{- $settings := deepCopy .Values.config -}}
{{- $_ := set $settings "kafka_bootstrap_servers" .Values.kafka.bootstrapServers -}}
{{- $protocol := "PLAINTEXT" -}}
{{- if and .Values.kafka.tls.enabled .Values.kafka.sasl.enabled -}}
{{- $protocol = "SASL_SSL" -}}
{{- else if .Values.kafka.tls.enabled -}}
{{- $protocol = "SSL" -}}
{{- else if .Values.kafka.sasl.enabled -}}
{{- $protocol = "SASL_PLAINTEXT" -}}
{{- end -}}
{{- $_ := set $settings "kafka_security_protocol" $protocol -}}
{{- if .Values.kafka.sasl.enabled -}}
{{- $_ := set $settings "kafka_sasl_mechanism" .Values.kafka.sasl.mechanism -}}
{{- end -}}
{{- if .Values.effectTypes -}}
{{- $_ := set $settings "effect_types" (deepCopy .Values.effectTypes) -}}
{{- end -}}
{{- include "outbox-relay.integers" $settings -}}
{{- range $spec := $settings.effect_types -}}
{{- include "outbox-relay.integers" $spec -}}
{{- if $spec.observer }}{{ include "outbox-relay.integers" $spec.observer }}{{ end -}}
{{- end -}}
{{- toToml $settings -}}
{{- end -}}

{{/* Values arrive as floats (500 -> 500.0): write whole numbers back as integers, in place. */}}
{{- define "outbox-relay.integers" -}}
{{- range $key, $value := . -}}
{{- if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) -}}
{{- $_ := set $ $key (int64 $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The pod security context: a numeric non-root user, RuntimeDefault seccomp. */}}
{{- define "outbox-relay.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "outbox-relay.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Environment every container shares: the config file, the secrets, and the metrics address.
Called with (dict "root" $ "workload" "migrate"|"relay"|"reconciler"): each workload logs in to
PostgreSQL with its own Secret (database.<workload>), else with database.existingSecret. */}}
{{- define "outbox-relay.env" -}}
{{- $db := .root.Values.database -}}
{{- $own := default dict (index $db .workload) -}}
- name: RELAY_CONFIG
  value: /etc/relay/config/relay.toml
- name: RELAY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "database.%s.existingSecret or database.existingSecret: name the Secret holding the PostgreSQL URL" .workload) (default $db.existingSecret $own.existingSecret) | quote }}
      key: {{ default $db.urlKey $own.urlKey | quote }}
{{- if .root.Values.kafka.sasl.enabled }}
- name: RELAY_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret: name the Secret holding the SASL credentials" .root.Values.kafka.sasl.existingSecret | quote }}
      key: {{ .root.Values.kafka.sasl.usernameKey | quote }}
- name: RELAY_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.kafka.sasl.existingSecret | quote }}
      key: {{ .root.Values.kafka.sasl.passwordKey | quote }}
{{- end }}
{{- if .root.Values.kafka.tls.enabled }}
- name: RELAY_KAFKA_SSL_CAFILE
  value: /etc/relay/kafka-ca/{{ .root.Values.kafka.tls.caKey }}
{{- if .root.Values.kafka.tls.clientSecret }}
- name: RELAY_KAFKA_SSL_CERTFILE
  value: /etc/relay/kafka-client/tls.crt
- name: RELAY_KAFKA_SSL_KEYFILE
  value: /etc/relay/kafka-client/tls.key
{{- if .root.Values.kafka.tls.clientKeyPasswordKey }}
- name: RELAY_KAFKA_SSL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.kafka.tls.clientSecret | quote }}
      key: {{ .root.Values.kafka.tls.clientKeyPasswordKey | quote }}
{{- end }}
{{- end }}
{{- end }}
{{/* Explicit: the relay's default address may become loopback, unreachable for probes. */}}
- name: RELAY_METRICS_HOST
  value: "0.0.0.0"
- name: RELAY_METRICS_PORT
  value: {{ .root.Values.metrics.relayPort | quote }}
- name: RELAY_RECONCILE_METRICS_PORT
  value: {{ .root.Values.metrics.reconcilerPort | quote }}
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}


{{- define "outbox-relay.volumeMounts" -}}
- name: config
  mountPath: /etc/relay/config
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.tls.enabled }}
- name: kafka-ca
  mountPath: /etc/relay/kafka-ca
  readOnly: true
{{- if .Values.kafka.tls.clientSecret }}
- name: kafka-client
  mountPath: /etc/relay/kafka-client
  readOnly: true
{{- end }}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* $configMap: the ConfigMap to mount (the migration hook has its own copy). */}}
{{- define "outbox-relay.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .root.Values.kafka.tls.enabled }}
- name: kafka-ca
  secret:
    secretName: {{ required "kafka.tls.caSecret: name the Secret holding the Kafka CA" .root.Values.kafka.tls.caSecret | quote }}
    items:
      - key: {{ .root.Values.kafka.tls.caKey | quote }}
        path: {{ .root.Values.kafka.tls.caKey | quote }}
{{- if .root.Values.kafka.tls.clientSecret }}
- name: kafka-client
  secret:
    secretName: {{ .root.Values.kafka.tls.clientSecret | quote }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* startupProbe: /healthz answers once the process serves its endpoints; liveness and readiness
wait until it has (periodSeconds x failureThreshold of startup time). */}}
{{- define "outbox-relay.probes" -}}
{{- if .Values.probes.startup.enabled -}}
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- toYaml (omit .Values.probes.startup "enabled") | nindent 2 }}
{{ end -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end -}}

{{/* Spread a workload's replicas across nodes (topologySpread of relay or reconciler values):
one node lost takes at most maxSkew more replicas than another. ScheduleAnyway by default, so a
one-node cluster still schedules them all. */}}
{{- define "outbox-relay.topologySpread" -}}
{{- $spread := .spread -}}
{{- if $spread.enabled -}}
topologySpreadConstraints:
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: {{ $spread.topologyKey | quote }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "outbox-relay.selectorLabels" .root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* Every Secret (and key) the pods read, as (secret, key, value that names it) triples. */}}
{{- define "outbox-relay.secretRefs" -}}
{{- $v := .Values -}}
{{- $refs := list -}}
{{- $workloads := list "relay" -}}
{{- if $v.migrations.enabled }}{{ $workloads = append $workloads "migrate" }}{{ end -}}
{{- if $v.reconciler.enabled }}{{ $workloads = append $workloads "reconciler" }}{{ end -}}
{{- range $w := $workloads -}}
{{- $own := default dict (index $v.database $w) -}}
{{- $secret := default $v.database.existingSecret $own.existingSecret -}}
{{- $what := ternary (printf "database.%s.existingSecret" $w) "database.existingSecret" (not (empty $own.existingSecret)) -}}
{{- $refs = append $refs (list $secret (default $v.database.urlKey $own.urlKey) $what) -}}
{{- end -}}
{{- if $v.kafka.sasl.enabled -}}
{{- $refs = append $refs (list $v.kafka.sasl.existingSecret $v.kafka.sasl.usernameKey "kafka.sasl.existingSecret") -}}
{{- $refs = append $refs (list $v.kafka.sasl.existingSecret $v.kafka.sasl.passwordKey "kafka.sasl.existingSecret") -}}
{{- end -}}
{{- if $v.kafka.tls.enabled -}}
{{- $refs = append $refs (list $v.kafka.tls.caSecret $v.kafka.tls.caKey "kafka.tls.caSecret") -}}
{{- with $v.kafka.tls.clientSecret -}}
{{- $refs = append $refs (list . "tls.crt" "kafka.tls.clientSecret") -}}
{{- $refs = append $refs (list . "tls.key" "kafka.tls.clientSecret") -}}
{{- with $v.kafka.tls.clientKeyPasswordKey -}}
{{- $refs = append $refs (list $v.kafka.tls.clientSecret . "kafka.tls.clientKeyPasswordKey") -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.console.enabled -}}
{{- $cdb := $v.console.database -}}
{{- $refs = append $refs (list $cdb.existingSecret $cdb.operatorUrlKey "console.database.existingSecret") -}}
{{- $refs = append $refs (list $cdb.existingSecret $cdb.viewerUrlKey "console.database.existingSecret") -}}
{{- with $cdb.sessionSecretKey -}}
{{- $refs = append $refs (list $cdb.existingSecret . "console.database.sessionSecretKey") -}}
{{- end -}}
{{- with $v.console.usersSecret -}}
{{- $refs = append $refs (list . $v.console.usersKey "console.usersSecret") -}}
{{- end -}}
{{- end -}}
{{- toJson $refs -}}
{{- end -}}

{{/* Fail the install or upgrade, before any hook runs, when a Secret the pods read (or a key in
it) is missing: otherwise the migration hook's pod waits in CreateContainerConfigError until
its deadline. Called with (dict "root" $ "found" <lookup of every Secret in the namespace>).
Without a cluster (helm template, --dry-run=client) lookup returns nothing and nothing is
checked. */}}
{{- define "outbox-relay.requireSecrets" -}}
{{- if .found -}}
{{- $have := dict -}}
{{- range $item := (default list .found.items) -}}
{{- $_ := set $have $item.metadata.name (default dict $item.data) -}}
{{- end -}}
{{- range $ref := (include "outbox-relay.secretRefs" .root | fromJsonArray) -}}
{{- $secret := index $ref 0 -}}{{- $key := index $ref 1 -}}{{- $what := index $ref 2 -}}
{{- if not (hasKey $have $secret) -}}
{{- fail (printf "Secret %q (%s) does not exist in namespace %q: create it before installing (docs/deployment.md#kubernetes-the-helm-chart)" $secret $what $.root.Release.Namespace) -}}
{{- end -}}
{{- if not (hasKey (index $have $secret) $key) -}}
{{- fail (printf "Secret %q (%s) in namespace %q has no key %q: add it, or name the key in values" $secret $what $.root.Release.Namespace $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
