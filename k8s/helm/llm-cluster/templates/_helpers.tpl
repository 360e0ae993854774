{{/* Names: the release name, prefixed with the chart name unless it already contains it. */}}
{{- define "llm-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-cluster.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "llm-cluster.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llm-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-cluster.labels" -}}
{{ include "llm-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The worker pods: they run the model-server replicas and the Serve proxies our Services use. */}}
{{- define "llm-cluster.workerSelectorLabels" -}}
{{ include "llm-cluster.selectorLabels" . }}
app.kubernetes.io/component: ray-worker
{{- end -}}

{{- define "llm-cluster.modelClaimName" -}}
{{- .Values.model.volume.pvc.existingClaim | default (printf "%s-models" (include "llm-cluster.fullname" .)) -}}
{{- end -}}

{{/*
Cross-field checks the JSON schema cannot express. Each failure names the values involved.
*/}}
{{- define "llm-cluster.validate" -}}
{{- $tp := int .Values.serve.tensorParallelSize -}}
{{- $gpus := int .Values.gpu.perWorker -}}
{{- if ne $tp $gpus -}}
{{- fail (printf "serve.tensorParallelSize (%d) must equal gpu.perWorker (%d): one replica's tensor-parallel group runs on the GPUs of one worker pod" $tp $gpus) -}}
{{- end -}}
{{- if lt (int .Values.workers.maxReplicas) (int .Values.workers.minReplicas) -}}
{{- fail (printf "workers.maxReplicas (%d) must be >= workers.minReplicas (%d)" (int .Values.workers.maxReplicas) (int .Values.workers.minReplicas)) -}}
{{- end -}}
{{- $as := .Values.serve.autoscaling -}}
{{- if $as.enabled -}}
{{- if lt (int $as.maxReplicas) (int $as.minReplicas) -}}
{{- fail (printf "serve.autoscaling.maxReplicas (%d) must be >= serve.autoscaling.minReplicas (%d)" (int $as.maxReplicas) (int $as.minReplicas)) -}}
{{- end -}}
{{- if or (lt (int $as.initialReplicas) (int $as.minReplicas)) (gt (int $as.initialReplicas) (int $as.maxReplicas)) -}}
{{- fail (printf "serve.autoscaling.initialReplicas (%d) must be within serve.autoscaling.minReplicas (%d) .. maxReplicas (%d)" (int $as.initialReplicas) (int $as.minReplicas) (int $as.maxReplicas)) -}}
{{- end -}}
{{- if gt (int $as.maxReplicas) (int .Values.workers.maxReplicas) -}}
{{- fail (printf "serve.autoscaling.maxReplicas (%d) needs workers.maxReplicas >= it (got %d): each replica fills one worker pod" (int $as.maxReplicas) (int .Values.workers.maxReplicas)) -}}
{{- end -}}
{{- else if gt (int .Values.serve.numReplicas) (int .Values.workers.maxReplicas) -}}
{{- fail (printf "serve.numReplicas (%d) needs workers.maxReplicas >= it (got %d): each replica fills one worker pod" (int .Values.serve.numReplicas) (int .Values.workers.maxReplicas)) -}}
{{- end -}}
{{- if and (eq .Values.model.volume.type "pvc") (not .Values.model.volume.pvc.create) (not .Values.model.volume.pvc.existingClaim) -}}
{{- fail "model.volume.pvc.existingClaim must be set when model.volume.pvc.create is false" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.existingSecret must name a Secret (tls.crt, tls.key, ca.crt) when tls.enabled is true" -}}
{{- end -}}
{{- $s := .Values.serve -}}
{{- if and $s.apiKey.enabled (not $s.apiKey.existingSecret) -}}
{{- fail "serve.apiKey.existingSecret must name a Secret holding the API key (under serve.apiKey.secretKey) when serve.apiKey.enabled is true" -}}
{{- end -}}
{{- if and $s.https.enabled (not $s.https.existingSecret) -}}
{{- fail "serve.https.existingSecret must name a kubernetes.io/tls Secret (tls.crt, tls.key) when serve.https.enabled is true" -}}
{{- end -}}
{{- if and $s.https.enabled (not .Values.probes.readiness.enabled) -}}
{{- fail "serve.https.enabled needs probes.readiness.enabled: without the chart's gRPC readiness probe KubeRay injects a plain-HTTP one on the serve port, which fails against HTTPS" -}}
{{- end -}}
{{- $gi := .Values.grpcIngress -}}
{{- if $gi.enabled -}}
{{- if not $gi.host -}}
{{- fail "grpcIngress.host must be set when grpcIngress.enabled is true (the TLS certificate's host name)" -}}
{{- end -}}
{{- if not $gi.tlsSecretName -}}
{{- fail "grpcIngress.tlsSecretName must name a kubernetes.io/tls Secret for grpcIngress.host when grpcIngress.enabled is true: the Ingress is there to terminate gRPC TLS" -}}
{{- end -}}
{{- end -}}
{{- /* Volumes mounted into the same Ray container must not sit at, or inside, one another. */ -}}
{{- $mounts := list (list "model.cacheDir" .Values.model.cacheDir) -}}
{{- if ne .Values.model.volume.type "none" -}}
{{- $mounts = append $mounts (list "model.volume.mountPath" .Values.model.volume.mountPath) -}}
{{- end -}}
{{- if .Values.tls.enabled -}}
{{- $mounts = append $mounts (list "tls.mountPath" .Values.tls.mountPath) -}}
{{- end -}}
{{- if $s.apiKey.enabled -}}
{{- $mounts = append $mounts (list "serve.apiKey.mountPath" $s.apiKey.mountPath) -}}
{{- end -}}
{{- if $s.https.enabled -}}
{{- $mounts = append $mounts (list "serve.https.mountPath" $s.https.mountPath) -}}
{{- end -}}
{{- $mounts = append $mounts (list "/dev/shm (workers' shared memory)" "/dev/shm") -}}
{{- range $i, $a := $mounts -}}
{{- range $j, $b := $mounts -}}
{{- if lt $i $j -}}
{{- $pa := trimSuffix "/" (index $a 1) -}}
{{- $pb := trimSuffix "/" (index $b 1) -}}
{{- if or (eq $pa $pb) (hasPrefix (printf "%s/" $pa) $pb) (hasPrefix (printf "%s/" $pb) $pa) -}}
{{- fail (printf "%s (%s) and %s (%s) overlap: each volume needs its own mount path" (index $a 0) (index $a 1) (index $b 0) (index $b 1)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where the API key file and the HTTPS certificate and key are inside the Ray containers. */}}
{{- define "llm-cluster.apiKeyFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.serve.apiKey.mountPath) .Values.serve.apiKey.secretKey -}}
{{- end -}}

{{/*
The Serve config (serveConfigV2): our app built by cluster.serving.app:app_builder from flat args,
the HTTP and gRPC proxy options. With autoscaling on, `args.autoscaling` carries the replica
bounds and the engine-load policy's targets (cluster/serving/autoscaling.py), which app_builder
turns into the ModelServer's autoscaling_config; num_replicas is then left out.
*/}}
{{- define "llm-cluster.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $m := .Values.model -}}
{{- $e := $s.engine -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ int $s.httpPort }}
  {{- if $s.https.enabled }}
  ssl_certfile: {{ printf "%s/tls.crt" (trimSuffix "/" $s.https.mountPath) | quote }}
  ssl_keyfile: {{ printf "%s/tls.key" (trimSuffix "/" $s.https.mountPath) | quote }}
  {{- end }}
grpc_options:
  port: {{ int $s.grpcPort }}
  grpc_servicer_functions:
    - cluster.serving.grpc_services.add_generation_service
    - cluster.serving.grpc_services.add_health_service
applications:
  - name: {{ $s.appName | quote }}
    route_prefix: /
    import_path: cluster.serving.app:app_builder
    args:
      app_name: {{ $s.appName | quote }}
      {{- with $m.name }}
      model_name: {{ . | quote }}
      {{- end }}
      model: {{ $m.path | quote }}
      dtype: {{ $m.dtype | quote }}
      device: {{ $m.device | quote }}
      cache_dir: {{ $m.cacheDir | quote }}
      {{- if not (kindIs "invalid" $m.maxModelLen) }}
      max_model_len: {{ int $m.maxModelLen }}
      {{- end }}
      tensor_parallel_size: {{ int $s.tensorParallelSize }}
      {{- if not $s.autoscaling.enabled }}
      num_replicas: {{ int $s.numReplicas }}
      {{- end }}
      replica_num_cpus: {{ $s.replicaNumCpus }}
      max_ongoing_requests: {{ int $s.maxOngoingRequests }}
      max_queued_requests: {{ int $s.maxQueuedRequests }}
      health_check_period_s: {{ $s.healthCheckPeriodS }}
      max_request_bytes: {{ int64 $s.maxRequestBytes }}
      {{- if $s.apiKey.enabled }}
      api_key_file: {{ include "llm-cluster.apiKeyFile" . | quote }}
      {{- end }}
      router: {{ $s.router | quote }}
      {{- if not (kindIs "invalid" $e.kvCacheMemoryBytes) }}
      kv_cache_memory_bytes: {{ int64 $e.kvCacheMemoryBytes }}
      {{- end }}
      {{- if not (kindIs "invalid" $e.kvCacheDtype) }}
      kv_cache_dtype: {{ $e.kvCacheDtype | quote }}
      {{- end }}
      {{- if not (kindIs "invalid" $e.maxNumSeqs) }}
      max_num_seqs: {{ int $e.maxNumSeqs }}
      {{- end }}
      {{- if not (kindIs "invalid" $e.maxNumBatchedTokens) }}
      max_num_batched_tokens: {{ int $e.maxNumBatchedTokens }}
      {{- end }}
      {{- if not (kindIs "invalid" $e.enablePrefixCaching) }}
      enable_prefix_caching: {{ $e.enablePrefixCaching }}
      {{- end }}
      {{- if not (kindIs "invalid" $e.swiftkv) }}
      swiftkv: {{ $e.swiftkv }}
      {{- end }}
      {{- with $e.speculative }}
      speculative: {{ toJson . }}
      {{- end }}
      {{- if $s.autoscaling.enabled }}
      autoscaling:
        min_replicas: {{ int $s.autoscaling.minReplicas }}
        max_replicas: {{ int $s.autoscaling.maxReplicas }}
        initial_replicas: {{ int $s.autoscaling.initialReplicas }}
        target_ongoing_requests: {{ $s.autoscaling.targetOngoingRequests }}
        upscale_delay_s: {{ $s.autoscaling.upscaleDelayS }}
        downscale_delay_s: {{ $s.autoscaling.downscaleDelayS }}
        look_back_period_s: {{ $s.autoscaling.lookBackPeriodS }}
        policy: {{ $s.autoscaling.policy | quote }}
        target_kv_cache_usage: {{ $s.autoscaling.targetKvCacheUsage }}
        target_waiting_requests: {{ $s.autoscaling.targetWaitingRequests }}
      {{- end }}
{{- end -}}

{{/*
Volumes every Ray pod has: the converted-checkpoint cache and, optionally, Ray's TLS files, the
API key and the HTTPS certificate. The last two go on every Ray pod too: a Serve proxy (HTTPS) runs
on every node, and the app's Ingress replica (which reads the key) takes no CPU and may land on any.
*/}}
{{- define "llm-cluster.commonVolumes" -}}
- name: model-cache
  emptyDir: {}
{{- if .Values.tls.enabled }}
- name: ray-tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0400
{{- end }}
{{- with .Values.serve.apiKey }}
{{- if .enabled }}
- name: serve-api-key
  secret:
    secretName: {{ .existingSecret }}
    items:
      - key: {{ .secretKey | quote }}
        path: {{ .secretKey | quote }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- with .Values.serve.https }}
{{- if .enabled }}
- name: serve-https
  secret:
    secretName: {{ .existingSecret }}
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}

{{- define "llm-cluster.commonVolumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.model.cacheDir }}
{{- if .Values.tls.enabled }}
- name: ray-tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.serve.apiKey.enabled }}
- name: serve-api-key
  mountPath: {{ .Values.serve.apiKey.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.serve.https.enabled }}
- name: serve-https
  mountPath: {{ .Values.serve.https.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The weights (workers only: the model-server replicas run there, the head holds no model). */}}
{{- define "llm-cluster.modelVolume" -}}
{{- $v := .Values.model.volume -}}
{{- if eq $v.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "llm-cluster.modelClaimName" . }}
    readOnly: {{ $v.readOnly }}
{{- else if eq $v.type "hostPath" }}
- name: models
  hostPath:
    path: {{ $v.hostPath.path | quote }}
    type: {{ $v.hostPath.type }}
{{- end }}
{{- end -}}

{{- define "llm-cluster.modelVolumeMount" -}}
{{- if ne .Values.model.volume.type "none" }}
- name: models
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: {{ .Values.model.volume.readOnly }}
{{- end }}
{{- end -}}

{{/*
Env of every Ray container. Serve's gRPC proxy (one per node) reads its message-size limit from
RAY_SERVE_GRPC_MAX_MESSAGE_SIZE when it starts; the app checks the same limit (max_request_bytes).
*/}}
{{- define "llm-cluster.commonEnv" -}}
- name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
  value: {{ int64 .Values.serve.maxRequestBytes | quote }}
{{- if .Values.serve.throughputOptimized }}
- name: RAY_SERVE_USE_GRPC_BY_DEFAULT
  value: "1"
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
{{- end }}
{{- if .Values.tls.enabled }}
- name: RAY_USE_TLS
  value: "1"
- name: RAY_TLS_SERVER_CERT
  value: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
- name: RAY_TLS_SERVER_KEY
  value: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
- name: RAY_TLS_CA_CERT
  value: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "llm-cluster.grpcProbe" -}}
grpc:
  port: {{ int .port }}
periodSeconds: {{ int .probe.periodSeconds }}
{{- with .probe.timeoutSeconds }}
timeoutSeconds: {{ int . }}
{{- end }}
failureThreshold: {{ int .probe.failureThreshold }}
{{- end -}}
