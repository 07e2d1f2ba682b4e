{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "vsearch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-wide prefix; short enough that "<fullname>-embedder-predictor" stays a DNS label. */}}
{{- define "vsearch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vsearch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "vsearch.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required with serviceAccount.create=false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: call with (dict "ctx" $ "component" "search") ---------------------------------- */}}

{{- define "vsearch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vsearch.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{- define "vsearch.labels" -}}
{{ include "vsearch.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: vsearch
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The image: call with (dict "ctx" $ "cuda" false) --------------------------------------- */}}

{{- define "vsearch.image" -}}
{{- $img := .ctx.Values.image -}}
{{- $tag := default .ctx.Chart.AppVersion $img.tag | toString -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag must be pinned: `latest` is not allowed" -}}
{{- end -}}
{{- if .cuda }}{{ $tag = printf "%s-cuda" $tag }}{{ end -}}
{{- $repo := $img.repository -}}
{{- if $img.registry }}{{ $repo = printf "%s/%s" $img.registry $img.repository }}{{ end -}}
{{- if and .cuda $img.digest -}}
{{- printf "%s@%s" $repo (required "embedder.gpu.imageDigest is required when image.digest is set (the -cuda image has a digest of its own)" .ctx.Values.embedder.gpu.imageDigest) -}}
{{- else if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Connections ------------------------------------------------------------------------------ */}}

{{/* The Milvus CR is named after the release; the Milvus operator names its Service "<CR>-milvus". */}}
{{- define "vsearch.milvusName" -}}
{{- include "vsearch.fullname" . -}}
{{- end -}}

{{/* The Milvus URI every workload uses: the created Milvus's service, or milvus.uri. */}}
{{- define "vsearch.milvusUri" -}}
{{- if .Values.milvus.create -}}
{{- printf "http://%s-milvus.%s.svc:19530" (include "vsearch.milvusName" .) .Release.Namespace -}}
{{- else -}}
{{- required "milvus.uri is required unless milvus.create=true (an existing Milvus: http://HOST:19530)" .Values.milvus.uri -}}
{{- end -}}
{{- end -}}

{{- define "vsearch.kafkaBootstrap" -}}
{{- if .Values.kafka.bootstrap -}}
{{- .Values.kafka.bootstrap -}}
{{- else if .Values.kafka.strimzi.cluster -}}
{{- printf "%s-kafka-bootstrap.%s.svc:9092" .Values.kafka.strimzi.cluster .Release.Namespace -}}
{{- else -}}
{{- fail "kafka.bootstrap is required (HOST:PORT), or kafka.strimzi.cluster for a Strimzi cluster in this namespace" -}}
{{- end -}}
{{- end -}}

{{- define "vsearch.dlqTopic" -}}
{{- default (printf "%s.dlq" .Values.kafka.topics.catalog.name) .Values.kafka.topics.deadLetter.name -}}
{{- end -}}

{{- define "vsearch.collection" -}}
{{- printf "images__%s__%s" .Values.model.name .Values.model.version | replace "-" "_" | replace "." "_" -}}
{{- end -}}

{{- define "vsearch.embedderName" -}}
{{- printf "%s-embedder" (include "vsearch.fullname" .) -}}
{{- end -}}

{{- define "vsearch.searchName" -}}
{{- printf "%s-search" (include "vsearch.fullname" .) -}}
{{- end -}}

{{/* The operator's names (operators/spec.py) ------------------------------------------------ */}}

{{/* spec.dns_name: a DNS-1123 label from the parts (lower case, runs of other characters as one
     "-"), shortened with 8 hex digits of the sha1 of the joined parts when longer than limit.
     Call with (dict "parts" (list ...) "limit" 45). */}}
{{- define "vsearch.dnsName" -}}
{{- $raw := join "-" (compact .parts) -}}
{{- $name := regexReplaceAll "[^a-z0-9-]+" (lower $raw) "-" | trimAll "-" -}}
{{- $name = regexReplaceAll "-+" $name "-" -}}
{{- if gt (len $name) (int .limit) -}}
{{- $name = printf "%s-%s" (trunc (sub (int .limit) 9 | int) $name | trimSuffix "-") (sha1sum $raw | trunc 8) -}}
{{- end -}}
{{- default "x" $name -}}
{{- end -}}

{{- define "vsearch.searchIndexName" -}}
{{- default (include "vsearch.fullname" .) .Values.searchIndex.name -}}
{{- end -}}

{{/* The InferenceService the operator creates for model.name/model.version of the chart's
     SearchIndex (VersionRef.embedder_name): "<index>-<model>-<version>-<hash>-embedder", at most
     45; <hash>: 8 hex digits of the sha256 of the tuple encoded as "<len>:<text>" per part
     (spec.name_hash), so that joins cannot collide. */}}
{{- define "vsearch.operatorEmbedderName" -}}
{{- $idx := include "vsearch.searchIndexName" . -}}
{{- $m := .Values.model.name -}}
{{- $v := toString .Values.model.version -}}
{{- $hash := sha256sum (printf "%d:%s%d:%s%d:%s" (len $idx) $idx (len $m) $m (len $v) $v) | trunc 8 -}}
{{- printf "%s-%s-embedder" (include "vsearch.dnsName" (dict "parts" (list $idx $m $v) "limit" 27)) $hash -}}
{{- end -}}

{{/* spec.model.uri of the SearchIndex: model.storageUri, else the default model in the image. */}}
{{- define "vsearch.modelUri" -}}
{{- $uri := .Values.model.storageUri -}}
{{- if or (hasPrefix "hf://" $uri) (hasPrefix "oci://" $uri) -}}
{{- fail (printf "model.storageUri %s: the SearchIndex accepts s3://, gs://, pvc://, http(s):// (or a path in the image); hf:// and oci:// only work with operator.enabled=false" $uri) -}}
{{- end -}}
{{- default "/opt/vsearch/models/default" $uri -}}
{{- end -}}

{{/* KServe RawDeployment names the predictor's Service "<isvc>-predictor" (port 80). */}}
{{- define "vsearch.embedderUrl" -}}
{{- printf "http://%s-predictor.%s.svc" (include "vsearch.embedderName" .) .Release.Namespace -}}
{{- end -}}

{{/* The operator's embedder of model.version: the search service's fallback for collections
     that record no embedder (the operator's collections always record theirs). */}}
{{- define "vsearch.operatorEmbedderUrl" -}}
{{- printf "http://%s-predictor.%s.svc" (include "vsearch.operatorEmbedderName" .) .Release.Namespace -}}
{{- end -}}

{{- define "vsearch.searchUrl" -}}
{{- printf "http://%s-predictor.%s.svc" (include "vsearch.searchName" .) .Release.Namespace -}}
{{- end -}}

{{/* Search parameters: the values', else the index type's defaults (as JSON). */}}
{{- define "vsearch.searchParams" -}}
{{- $p := .Values.milvus.index.searchParams -}}
{{- if not $p -}}
{{- $p = get (dict "DISKANN" (dict "search_list" 100) "HNSW" (dict "ef" 64)) .Values.milvus.index.type | default dict -}}
{{- end -}}
{{- toJson $p -}}
{{- end -}}

{{/* The embedder's resources, with the GPU of embedder.gpu. */}}
{{- define "vsearch.embedderResources" -}}
{{- $e := .Values.embedder -}}
{{- $res := deepCopy $e.resources -}}
{{- if $e.gpu.enabled -}}
{{- $_ := set $res.limits $e.gpu.resourceName ($e.gpu.count | int64 | toString) -}}
{{- $_ := set $res.requests $e.gpu.resourceName ($e.gpu.count | int64 | toString) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* The embedder's variables that neither mode sets on its command line. */}}
{{- define "vsearch.embedderTuningEnv" -}}
- name: VSEARCH_EMBEDDER_BATCH_SIZE
  value: {{ .Values.embedder.batchSize | int64 | quote }}
{{- if .Values.embedder.threads }}
- name: VSEARCH_EMBEDDER_THREADS
  value: {{ .Values.embedder.threads | int64 | quote }}
{{- end }}
- name: VSEARCH_EMBEDDER_DEVICE
  value: {{ ternary "cuda" "cpu" .Values.embedder.gpu.enabled }}
- name: VSEARCH_EMBEDDER_RUNTIME
  value: {{ ternary "torchscript" .Values.embedder.runtime .Values.embedder.gpu.enabled | quote }}
{{- end -}}

{{/* The consumer's variables that neither mode sets on its command line. */}}
{{- define "vsearch.ingestTuningEnv" -}}
- name: VSEARCH_INGEST_DLQ_TOPIC
  value: {{ include "vsearch.dlqTopic" . | quote }}
- name: VSEARCH_INGEST_PARTITIONS
  value: {{ .Values.kafka.topics.catalog.partitions | int64 | quote }}
- name: VSEARCH_INGEST_BATCH_MS
  value: {{ .Values.ingest.batchMs | int64 | quote }}
- name: VSEARCH_INGEST_FETCH_WORKERS
  value: {{ .Values.ingest.fetchWorkers | int64 | quote }}
- name: VSEARCH_INGEST_STOP_GRACE_S
  value: {{ .Values.ingest.stopGraceSeconds | int64 | quote }}
{{- end -}}

{{/* The Milvus settings every component shares (shared variables, no component prefix). */}}
{{- define "vsearch.milvusEnv" -}}
- name: VSEARCH_MILVUS_URI
  value: {{ include "vsearch.milvusUri" . | quote }}
- name: VSEARCH_MILVUS_TIMEOUT
  value: {{ .Values.milvus.timeout | int64 | quote }}
{{- with .Values.milvus.auth.existingSecret }}
- name: VSEARCH_MILVUS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.milvus.auth.secretKey }}
{{- end }}
- name: VSEARCH_INDEX_TYPE
  value: {{ .Values.milvus.index.type | quote }}
{{- with .Values.milvus.index.params }}
- name: VSEARCH_INDEX_PARAMS
  value: {{ toJson . | quote }}
{{- end }}
{{- with (include "vsearch.searchParams" . | fromJson) }}
- name: VSEARCH_SEARCH_PARAMS
  value: {{ toJson . | quote }}
{{- end }}
- name: VSEARCH_METRIC
  value: {{ .Values.milvus.index.metric | quote }}
{{- end -}}

{{/* Hygiene ---------------------------------------------------------------------------------- */}}

{{- define "vsearch.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "vsearch.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Writable places on a read-only root filesystem: /tmp (caches) and the working folder. */}}
{{- define "vsearch.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
- name: data
  emptyDir:
    sizeLimit: 10Gi
{{- end -}}

{{- define "vsearch.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/vsearch
{{- end -}}

{{/* The operator's workloads run as the chart's ServiceAccount with its pull secrets, like
     the chart's own (fields of a SearchIndex workload: serviceAccountName, imagePullSecrets). */}}
{{- define "vsearch.searchIndexPodIdentity" -}}
serviceAccountName: {{ include "vsearch.serviceAccountName" . | quote }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "vsearch.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Security defaults ------------------------------------------------------------------------ */}}

{{/* The Secret holding the search API key: search.apiKey.existingSecret, else (with
     search.apiKey.required) the one the chart creates (templates/search-apikey-secret.yaml);
     empty: no key. */}}
{{- define "vsearch.apiKeySecret" -}}
{{- if .Values.search.apiKey.existingSecret -}}
{{- .Values.search.apiKey.existingSecret -}}
{{- else if .Values.search.apiKey.required -}}
{{- printf "%s-api-key" (include "vsearch.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The Secrets the operator may read (operator.allowedSecrets and the Milvus token's), sorted,
     comma-separated; empty: none. */}}
{{- define "vsearch.operatorSecrets" -}}
{{- $names := .Values.operator.allowedSecrets | default list -}}
{{- with .Values.milvus.auth.existingSecret }}{{ $names = append $names . }}{{ end -}}
{{- join "," ($names | uniq | sortAlpha) -}}
{{- end -}}

{{/* The learning loop (searchIndex.training) ------------------------------------------------- */}}
{{- define "vsearch.trainingRuntimeName" -}}
{{- default (printf "%s-torch" (include "vsearch.fullname" .)) .Values.searchIndex.training.runtime.name -}}
{{- end -}}

{{/* A training pod's resources: searchIndex.training.resources with the GPUs in its limits. */}}
{{- define "vsearch.trainingResources" -}}
{{- $t := .Values.searchIndex.training -}}
{{- $r := deepCopy (default dict $t.resources) -}}
{{- if gt (int $t.gpu) 0 -}}
{{- $limits := deepCopy (default dict (get $r "limits")) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int $t.gpu) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}
