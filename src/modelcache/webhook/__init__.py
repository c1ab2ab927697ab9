"""Admission webhooks: `modelcache webhook`.

- Validates LocalModelCache / LocalModelNamespaceCache (sourceModelUri immutable, URI and scheme,
  node groups exist, modelSize fits each group's storageLimit, one cache per URI, no deletion while
  a workload uses it) and LocalModelNodeGroup (quantities, PV source and node affinity).
- Labels InferenceServices / LLMInferenceServices with their cache exactly as KServe does.
- Mounts the cache into pods (KServe predictor pods, and any pod annotated
  `modelcache.io/model: <cache>`, optionally `modelcache.io/mount-path`) read-only, drops the
  storage-initializer and requires a node labelled `models.modelcache.io/<key>=ready`.
  When no node has the model yet the pod is admitted unchanged, with a warning and an Event
  (`--when-not-ready=warn`, the default), or mounted and left Pending until a node has it
  (`--when-not-ready=require`).

`admission` holds the decisions (pure), `server` the HTTP/TLS edge, `tls` the certificate and
caBundle upkeep, `registration` the webhook configurations.
"""
