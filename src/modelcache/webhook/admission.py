"""Admission decisions: pure functions from an AdmissionReview `request` plus observed cluster state
to a `Decision` (allowed, message, JSON patch, warnings, events to record).

No I/O here. The server reads what `Cluster` needs for the request kind, calls `review`, and
turns the decision into an AdmissionReview response with `admission_response`.

What we decide, and why:
- LocalModelCache / LocalModelNamespaceCache: KServe never enforced `storageLimit`/`modelSize`
  (#6137) and 1.20 clusters have no CEL, so immutability and capacity are checked here.
- InferenceService / LLMInferenceService: exactly KServe's defaulting (`setLocalModelLabel`), so
  KServe's controllers and pod mutator keep working against our caches.
- Pods: mount the cache PVC as KServe's storage-initializer injector does for local models, and
  also require a node where the model is ready (KServe schedules blindly, #4681).
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelcache import domain
from modelcache.domain import CacheMatch
from modelcache.errors import UsageError
from modelcache.kube.config import LocalModelConfig
from modelcache.kube.constants import (
    DEFAULT_MODEL_MOUNT_PATH,
    DISABLE_LOCALMODEL_ANNOTATION,
    LOCALMODEL_LABEL,
    LOCALMODEL_NAMESPACE_LABEL,
    LOCALMODEL_PVC_ANNOTATION,
    LOCALMODEL_SOURCEURI_ANNOTATION,
    MODEL_ANNOTATION,
    MODEL_POD_LABEL,
    MODEL_POD_LABEL_VALUE,
    MOUNT_PATH_ANNOTATION,
    NODEGROUP_ANNOTATION,
    READY_NODE_LABEL_VALUE,
    STORAGE_INITIALIZER_CONTAINER,
    ready_label,
)
from modelcache.quantity import format_bytes, parse_quantity
from modelcache.uri import parse_uri, redact, storage_key, sub_path

Obj = dict[str, Any]

# KServe names the pod mutator relies on that kube/constants does not carry (yet).
#: Set by KServe on predictor pods: the InferenceService's storageUri.
STORAGE_INITIALIZER_SOURCEURI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"
KSERVE_CONTAINER = "kserve-container"
TRANSFORMER_CONTAINER = "transformer-container"
WORKER_CONTAINER = "worker-container"
#: KServe's volume name for a pvc:// model source (the local model PVC mounts under it).
PVC_SOURCE_VOLUME = "kserve-pvc-source"
#: Our volume name for plain (non-KServe) pods.
MODEL_VOLUME = "modelcache-model"
STORAGE_URI_ENV = "STORAGE_URI"
#: KServe's annotation for a writable model mount; a cached model stays read-only (shared copy).
READONLY_ANNOTATION = "storage.kserve.io/readonly"

CACHE_KINDS = ("LocalModelCache", "LocalModelNamespaceCache")
WORKLOAD_KINDS = ("InferenceService", "LLMInferenceService")
#: InferenceService predictor implementations in KServe's order (`PredictorSpec.GetImplementations`).
PREDICTOR_FRAMEWORKS = (
    "xgboost",
    "pytorch",
    "triton",
    "sklearn",
    "tensorflow",
    "onnx",
    "pmml",
    "lightgbm",
    "paddle",
    "huggingface",
    "model",
)
_MAX_LISTED = 5


class NotReadyPolicy(StrEnum):
    """What to do with a pod whose model is on no node yet."""

    #: Admit it unchanged (it loads the model the slow way) with a warning and an event.
    WARN = "warn"
    #: Mount and require a ready node anyway: the pod stays Pending until a node has the model.
    REQUIRE = "require"


@dataclass(frozen=True)
class Options:
    when_not_ready: NotReadyPolicy = NotReadyPolicy.WARN


@dataclass(frozen=True)
class EventNote:
    """An Event the server should record (never on dry-run requests)."""

    namespace: str
    involved: Mapping[str, str]
    reason: str
    message: str
    type: str = "Warning"


@dataclass(frozen=True)
class Decision:
    allowed: bool = True
    message: str = ""
    patch: list[Obj] = field(default_factory=list)
    warnings: tuple[str, ...] = ()
    events: tuple[EventNote, ...] = ()
    code: int = 403


@dataclass
class Cluster:
    """Observed state. The server fills the parts the request kind reads (see `reads`)."""

    caches: list[Obj] = field(default_factory=list)
    namespace_caches: list[Obj] = field(default_factory=list)
    node_groups: dict[str, Obj] = field(default_factory=dict)
    nodes: list[Obj] = field(default_factory=list)
    inference_services: list[Obj] = field(default_factory=list)
    llm_inference_services: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    local_model_config: LocalModelConfig = field(default_factory=LocalModelConfig)


# -- small accessors ------------------------------------------------------------------------------
# Input is hostile until checked: the apiserver sends typed objects, but anything that can reach
# the port can send any JSON, so every read tolerates a wrong type there (it reads as absent).
def _dict(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[Obj]:
    """The objects in a list (anything else in it, or a non-list, reads as nothing)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _strs(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _str_map(value: Any) -> dict[str, str]:
    return {k: v for k, v in _dict(value).items() if isinstance(v, str)}


def request_kind(request: Mapping[str, Any]) -> str:
    """The kind under review ('' when the request does not say)."""
    return _str(_dict(request.get("kind")).get("kind"))


def _meta(obj: Any) -> Obj:
    return dict(_dict(_dict(obj).get("metadata")))


def _labels(obj: Any) -> dict[str, str]:
    return _str_map(_meta(obj).get("labels"))


def _annotations(obj: Any) -> dict[str, str]:
    return _str_map(_meta(obj).get("annotations"))


def _name(obj: Any) -> str:
    return _str(_meta(obj).get("name"))


def _namespace(obj: Any) -> str:
    return _str(_meta(obj).get("namespace"))


def _spec(obj: Any) -> Obj:
    return dict(_dict(_dict(obj).get("spec")))


def _deleting(obj: Any) -> bool:
    return bool(_meta(obj).get("deletionTimestamp"))


def _path(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]... where every step is an object, else None."""
    for key in keys:
        obj = _dict(obj).get(key)
    return obj


def _by_name(objs: Iterable[Obj]) -> list[Obj]:
    """KServe takes the first match of a List, which the apiserver returns in name order."""
    return sorted(objs, key=lambda o: (_namespace(o), _name(o)))


def _quantity(value: Any) -> int | None:
    try:
        return parse_quantity(value) if isinstance(value, int | str) else None
    except UsageError:
        return None


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def deny(message: str, code: int = 403) -> Decision:
    return Decision(allowed=False, message=message, code=code)


# -- entry point ----------------------------------------------------------------------------------
def review(request: Mapping[str, Any], cluster: Cluster, options: Options | None = None) -> Decision:
    """Dispatch on the request's kind; kinds we do not handle are allowed untouched."""
    kind = request_kind(request)
    if kind in CACHE_KINDS:
        return validate_cache(request, cluster)
    if kind == "LocalModelNodeGroup":
        return validate_node_group(request, cluster)
    if kind in WORKLOAD_KINDS:
        return mutate_workload(request, cluster)
    if kind == "Pod":
        return mutate_pod(request, cluster, options or Options())
    return Decision()


class MalformedReview(ValueError):
    """The body is not an AdmissionReview we can answer; `reason` is one line, safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Deeper JSON is refused before any decision walks it. Kubernetes objects are rarely deeper than
#: 30 (managedFields included); our recursive helpers stay far below Python's recursion limit.
MAX_DEPTH = 100
REVIEW_API_VERSION = "admission.k8s.io/v1"


def _too_deep(doc: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _shown(value: Any) -> str:
    """A short, escaped rendering of a value from the request, for a reason line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_review(body: bytes) -> Obj:
    """The `request` of an admission.k8s.io/v1 AdmissionReview, checked just enough that every
    decision can read it: an object with a string uid, kind and operation; object/oldObject
    objects or null; name/namespace strings. Anything else is `MalformedReview`: the server answers
    HTTP 400, since without a well-formed request (and its uid) there is no AdmissionReview to
    answer with, and the apiserver never sends such a body (it applies its failurePolicy)."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise MalformedReview(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise MalformedReview("body is not UTF-8 JSON") from None
    except ValueError as exc:
        raise MalformedReview(f"body is not JSON: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(doc, dict):
        raise MalformedReview(f"expected an AdmissionReview object, got {type(doc).__name__}")
    if _too_deep(doc, MAX_DEPTH):
        raise MalformedReview(f"JSON nested deeper than {MAX_DEPTH} levels")
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if api_version is not None and api_version != REVIEW_API_VERSION:
        raise MalformedReview(f"apiVersion {_shown(api_version)} is not {REVIEW_API_VERSION}")
    if kind is not None and kind != "AdmissionReview":
        raise MalformedReview(f"kind {_shown(kind)} is not AdmissionReview")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise MalformedReview(f"request must be an object, got {type(request).__name__}")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("request.uid must be a non-empty string")
    gvk = request.get("kind")
    if not isinstance(gvk, dict) or not all(isinstance(gvk.get(k, ""), str) for k in ("group", "version")):
        raise MalformedReview("request.kind must be an object with string group, version and kind")
    if not isinstance(gvk.get("kind"), str):
        raise MalformedReview("request.kind must be an object with string group, version and kind")
    if not isinstance(request.get("operation"), str):
        raise MalformedReview("request.operation must be a string")
    for key in ("name", "namespace"):
        if not isinstance(request.get(key, ""), str):
            raise MalformedReview(f"request.{key} must be a string")
    for key in ("object", "oldObject"):
        if not isinstance(request.get(key), dict | None):
            raise MalformedReview(f"request.{key} must be an object or null")
    if not isinstance(request.get("dryRun", False), bool):
        raise MalformedReview("request.dryRun must be a boolean")
    return request


def admission_response(uid: str, decision: Decision) -> Obj:
    """The admission.k8s.io/v1 AdmissionReview the apiserver expects back."""
    response: Obj = {"uid": uid, "allowed": decision.allowed}
    if not decision.allowed:
        response["status"] = {"code": decision.code, "message": decision.message}
    if decision.allowed and decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(decision.patch).encode()).decode()
    if decision.warnings:
        response["warnings"] = list(decision.warnings)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def json_patch(old: Any, new: Any, path: str = "") -> list[Obj]:
    """RFC 6902 operations turning `old` into `new`: per key for objects, whole lists replaced."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[Obj] = []
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            sub = f"{path}/{_escape(key)}"
            if key not in old:
                ops.append({"op": "add", "path": sub, "value": value})
            elif old[key] != value:
                ops.extend(json_patch(old[key], value, sub))
        return ops
    if old == new:
        return []
    return [{"op": "replace", "path": path, "value": new}]


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


# -- LocalModelCache / LocalModelNamespaceCache ---------------------------------------------------
def _cache_id(obj: Mapping[str, Any], kind: str) -> tuple[str, str, str]:
    return (kind, _namespace(obj) if kind == "LocalModelNamespaceCache" else "", _name(obj))


def _cache_label(kind: str, namespace: str, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def validate_cache(request: Mapping[str, Any], cluster: Cluster) -> Decision:
    op = request.get("operation")
    kind = request_kind(request)
    if op == "DELETE":
        old = _dict(request.get("oldObject"))
        return _validate_cache_delete(old, kind, _str(request.get("namespace")) or _namespace(old), cluster)
    obj: Obj = dict(_dict(request.get("object")))
    if kind == "LocalModelNamespaceCache" and not _namespace(obj):
        obj["metadata"] = {**_meta(obj), "namespace": _str(request.get("namespace"))}
    if op == "UPDATE":
        old = _dict(request.get("oldObject"))
        if _deleting(obj):
            return Decision()  # finalizer removal must always pass, even if groups are gone
        before, after = _spec(old).get("sourceModelUri"), _spec(obj).get("sourceModelUri")
        if before != after:
            return deny(
                f"spec.sourceModelUri is immutable: it is {redact(str(before))!r}; "
                "create a new cache for another model"
            )
        if _spec(old) == _spec(obj):
            return Decision()  # metadata/status-only change: nothing to re-check
    problems = _cache_spec_problems(obj, kind, cluster)
    label = _cache_label(kind, _namespace(obj), _name(obj))
    if problems:
        return deny(f"{label}: " + "; ".join(problems))
    warnings = _job_warning(label, _spec(obj).get("sourceModelUri"))
    missing = [g for g in _strs(_spec(obj).get("nodeGroups")) if g not in cluster.node_groups]
    if missing:
        # GitOps applies in any order (KServe accepts this too): the controller reports
        # Scheduled=False NodeGroupNotFound and places the cache when the group appears.
        warnings += (
            f"{label}: node group(s) {', '.join(missing)} not found yet; admitted, and placed "
            "(after a capacity check) once they exist",
        )
    return Decision(warnings=warnings)


def _job_warning(label: str, uri: Any) -> tuple[str, ...]:
    """A scheme our engine does not read is fetched by a download Job, without our guarantees."""
    if not isinstance(uri, str) or not domain.needs_download_job(uri):
        return ()
    return (
        f"{label}: scheme {domain.uri_scheme(uri)!r} is downloaded by a Job in localModel.jobNamespace "
        "(the image of the ClusterStorageContainer declaring the URI, else defaultJobImage), not by "
        "modelcache's agent: no resume, checksums or disk budget for it",
    )


def _cache_spec_problems(obj: Obj, kind: str, cluster: Cluster) -> list[str]:
    spec = _spec(obj)
    problems: list[str] = []
    uri = spec.get("sourceModelUri")
    if not isinstance(uri, str) or not uri.strip():
        problems.append("spec.sourceModelUri is required")
    elif "://" not in uri:
        problems.append(f"spec.sourceModelUri {redact(uri)!r} needs a scheme, e.g. hf://org/model")
    elif domain.needs_download_job(uri):
        pass  # KServe-style download Job (see `_job_warning`): KServe checks no scheme either
    else:
        try:
            parse_uri(uri)
        except UsageError as exc:
            problems.append(f"spec.sourceModelUri: {_uri_problem(uri.strip(), exc.message)}")
    size = _quantity(spec.get("modelSize"))
    if size is None:
        problems.append(f"spec.modelSize {spec.get('modelSize')!r} is not a quantity such as 10Gi")
    groups = spec.get("nodeGroups") or []
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        problems.append("spec.nodeGroups must name at least one LocalModelNodeGroup")
        groups = []
    if size is not None and storage_policy(cluster) == domain.StoragePolicy.ENFORCE:
        for group in groups:
            if group in cluster.node_groups:
                problem = _capacity_problem(group, obj, kind, cluster)
                if problem:
                    problems.append(problem)
    if isinstance(uri, str):
        problems.extend(_duplicate_problem(obj, kind, uri, cluster))
    return problems


def _uri_problem(uri: str, message: str) -> str:
    """The parser's complaint, unless the URI carries credentials: a parser may quote a piece of
    them (urlsplit's port error quotes what follows the first ':' of `user:pa/ss@host`)."""
    if "@" in uri or redact(uri) != uri:
        return f"{redact(uri)!r} is not a valid model URI (details withheld: it carries credentials)"
    return message.replace(uri, redact(uri))


def _claim(cache: Obj, kind: str) -> domain.Claim:
    spec = _spec(cache)
    ns = _namespace(cache) if kind == "LocalModelNamespaceCache" else ""
    return domain.Claim(
        ref=(ns, _name(cache)),
        key=storage_key(_str(spec.get("sourceModelUri"))),
        size=_quantity(spec.get("modelSize")),
        groups=tuple(_strs(spec.get("nodeGroups"))),
        created=_str(_meta(cache).get("creationTimestamp")),
        deleting=_deleting(cache),
    )


def _claims(cluster: Cluster) -> list[domain.Claim]:
    return [_claim(c, "LocalModelCache") for c in cluster.caches] + [
        _claim(c, "LocalModelNamespaceCache") for c in cluster.namespace_caches
    ]


def _limits(cluster: Cluster) -> dict[str, int | None]:
    return {name: _quantity(_spec(g).get("storageLimit")) for name, g in cluster.node_groups.items()}


def storage_policy(cluster: Cluster) -> domain.StoragePolicy:
    return domain.storage_policy(cluster.local_model_config.model_extra)


def _capacity_problem(group: str, obj: Obj, kind: str, cluster: Cluster) -> str | None:
    """The controller's own placement (domain.place) with this cache created last: what is admitted
    here is placed there. Caches of one URI share one folder: a storage key counts once."""
    limits = _limits(cluster)
    if limits.get(group) is None:
        return f"node group {group} has no valid storageLimit"
    me = _claim(obj, kind)
    size = me.size or 0
    fit = domain.fits(me, group, _claims(cluster), limits, storage_policy(cluster))
    if fit.ok:
        return None
    limit = limits[group] or 0
    others = f" by {len(fit.others)} other cache(s) ({_listing(list(fit.others))})" if fit.others else ""
    return (
        f"modelSize {format_bytes(size)} does not fit node group {group}: storageLimit "
        f"{format_bytes(limit)}, {format_bytes(fit.committed)} already committed{others}, "
        f"{format_bytes(fit.available)} available"
    )


def _duplicate_problem(obj: Obj, kind: str, uri: str, cluster: Cluster) -> list[str]:
    """As KServe: one cache per exact URI (per namespace for namespace caches)."""
    me = _cache_id(obj, kind)
    if kind == "LocalModelCache":
        peers = cluster.caches
    else:
        peers = [c for c in cluster.namespace_caches if _namespace(c) == _namespace(obj)]
    for other in _by_name(peers):
        if _cache_id(other, kind) != me and _spec(other).get("sourceModelUri") == uri:
            label = _cache_label(kind, _namespace(other) if kind != "LocalModelCache" else "", _name(other))
            return [f"{label} has the same StorageURI {redact(uri)}"]
    return []


def _validate_cache_delete(old: Obj, kind: str, namespace: str, cluster: Cluster) -> Decision:
    name = _name(old)
    cache_ns = namespace if kind == "LocalModelNamespaceCache" else None
    users = cache_users(name, cache_ns, cluster)
    if not users:
        return Decision()
    return deny(
        f"{_cache_label(kind, cache_ns or '', name)} is still used by {_listing(users)}; "
        "delete those workloads (or stop them using the cache) first",
        code=409,
    )


def _uses(labels: Mapping[str, str], name: str, cache_ns: str | None) -> bool:
    if labels.get(LOCALMODEL_LABEL) != name:
        return False
    return (
        labels.get(LOCALMODEL_NAMESPACE_LABEL) == cache_ns
        if cache_ns
        else LOCALMODEL_NAMESPACE_LABEL not in labels
    )


def cache_users(name: str, cache_ns: str | None, cluster: Cluster) -> list[str]:
    """Existing workloads using the cache. Objects being deleted or finished pods never count."""
    users: list[str] = []
    for kind, items in (
        ("InferenceService", cluster.inference_services),
        ("LLMInferenceService", cluster.llm_inference_services),
    ):
        for obj in _by_name(items):
            if _deleting(obj) or (cache_ns and _namespace(obj) != cache_ns):
                continue
            if _uses(_labels(obj), name, cache_ns):
                users.append(f"{kind} {_namespace(obj)}/{_name(obj)}")
    ns_cache_names = {(_namespace(c), _name(c)) for c in cluster.namespace_caches}
    for pod in _by_name(cluster.pods):
        ns = _namespace(pod)
        phase = _path(pod, "status", "phase")
        if _deleting(pod) or phase in ("Succeeded", "Failed") or (cache_ns and ns != cache_ns):
            continue
        used = _uses(_labels(pod), name, cache_ns)
        if not used and _annotations(pod).get(MODEL_ANNOTATION) == name:
            # A pod's annotation names the namespace cache of that name if there is one.
            used = (ns, name) in ns_cache_names if cache_ns else (ns, name) not in ns_cache_names
        if used:
            users.append(f"Pod {ns}/{_name(pod)}")
    return users


# -- LocalModelNodeGroup --------------------------------------------------------------------------
def validate_node_group(request: Mapping[str, Any], cluster: Cluster) -> Decision:
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return Decision()
    obj: Obj = dict(_dict(request.get("object")))
    if request.get("operation") == "UPDATE" and (
        _deleting(obj) or _spec(obj) == _spec(request.get("oldObject"))
    ):
        return Decision()
    spec = _spec(obj)
    problems: list[str] = []
    limit = _quantity(spec.get("storageLimit"))
    if limit is None:
        problems.append(f"spec.storageLimit {spec.get('storageLimit')!r} is not a quantity such as 100Gi")
    pv = _dict(spec.get("persistentVolumeSpec"))
    if not any(_str(_path(pv, src, "path")) for src in ("local", "hostPath")):
        problems.append("spec.persistentVolumeSpec needs a local or hostPath source with a path")
    terms = _dicts(_path(pv, "nodeAffinity", "required", "nodeSelectorTerms"))
    if not terms:
        problems.append(
            "spec.persistentVolumeSpec.nodeAffinity.required.nodeSelectorTerms must select the group's nodes"
        )
    capacity = _path(pv, "capacity", "storage")
    if capacity is not None and _quantity(capacity) is None:
        problems.append(f"spec.persistentVolumeSpec.capacity.storage {capacity!r} is not a quantity")
    request_size = _path(spec, "persistentVolumeClaimSpec", "resources", "requests", "storage")
    if request_size is not None and _quantity(request_size) is None:
        problems.append(
            f"spec.persistentVolumeClaimSpec.resources.requests.storage {request_size!r} is not a quantity"
        )
    if problems:
        return deny(f"LocalModelNodeGroup {_name(obj)}: " + "; ".join(problems))
    name = _name(obj)
    placement = domain.place(_claims(cluster), {name: None}, domain.StoragePolicy.WARN)
    names = sorted(domain.status_key(*ref) for ref, groups in placement.placed.items() if name in groups)
    committed = placement.used.get(name, 0)
    if limit is not None and committed > limit:
        return Decision(
            warnings=(
                f"caches on node group {_name(obj)} ({_listing(names)}) already commit "
                f"{format_bytes(committed)}, more than the new storageLimit {format_bytes(limit)}",
            )
        )
    return Decision()


# -- InferenceService / LLMInferenceService -------------------------------------------------------
def workload_storage_uri(obj: Mapping[str, Any], kind: str) -> str | None:
    """The model URI KServe matches caches against (predictor implementation / spec.model.uri)."""
    spec = _spec(obj)
    if kind == "LLMInferenceService":
        return _str(_path(spec, "model", "uri")) or None
    predictor = _dict(spec.get("predictor"))
    for framework in PREDICTOR_FRAMEWORKS:
        impl = predictor.get(framework)
        if impl is not None:
            return _str(_dict(impl).get("storageUri")) or None
    containers = _dicts(predictor.get("containers"))
    main = next((c for c in containers if c.get("name") == KSERVE_CONTAINER), None)
    if main is None and containers:
        main = containers[0]
    for env in _dicts(_dict(main).get("env")):
        if env.get("name") == STORAGE_URI_ENV:
            value = env.get("value")
            return value if isinstance(value, str) and value else None
    return None


def _cache_views(namespace: str, cluster: Cluster) -> list[domain.CacheView]:
    views = []
    for cache, ns in [(c, _namespace(c)) for c in cluster.namespace_caches if _namespace(c) == namespace] + [
        (c, "") for c in cluster.caches
    ]:
        source = _spec(cache).get("sourceModelUri")
        if isinstance(source, str):
            groups = tuple(_strs(_spec(cache).get("nodeGroups")))
            views.append(domain.CacheView(_name(cache), ns, source, groups, _deleting(cache)))
    return views


def match_cache(
    storage_uri: str, namespace: str, node_group: str | None, cluster: Cluster
) -> CacheMatch | None:
    """KServe's `setLocalModelLabel` (domain.match_cache): namespace caches first, then cluster
    caches, in name order; a cache being deleted matches nothing (its PVCs are about to go)."""
    return domain.match_cache(storage_uri, namespace, node_group, _cache_views(namespace, cluster))


def _set_local_model_metadata(obj: Obj, match: CacheMatch | None) -> None:
    meta = obj["metadata"] = _meta(obj)
    labels = dict(_dict(meta.get("labels")))
    annotations = dict(_dict(meta.get("annotations")))
    for key in (LOCALMODEL_LABEL, LOCALMODEL_NAMESPACE_LABEL):
        labels.pop(key, None)
    for key in (LOCALMODEL_SOURCEURI_ANNOTATION, LOCALMODEL_PVC_ANNOTATION):
        annotations.pop(key, None)
    if match is not None:
        labels[LOCALMODEL_LABEL] = match.name
        if match.namespace:
            labels[LOCALMODEL_NAMESPACE_LABEL] = match.namespace
        annotations[LOCALMODEL_SOURCEURI_ANNOTATION] = match.source_uri
        annotations[LOCALMODEL_PVC_ANNOTATION] = match.pvc_name
    for key, value in (("labels", labels), ("annotations", annotations)):
        if value:
            meta[key] = value
        elif key in meta:
            meta[key] = {}


def mutate_workload(request: Mapping[str, Any], cluster: Cluster) -> Decision:
    """Label an (LLM)InferenceService with the cache serving its model, or clear stale labels."""
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return Decision()
    obj: Obj = _dict(request.get("object"))
    kind = request_kind(request)
    namespace = _namespace(obj) or _str(request.get("namespace"))
    annotations = _annotations(obj)
    match = None
    if cluster.local_model_config.enabled and DISABLE_LOCALMODEL_ANNOTATION not in annotations:
        uri = workload_storage_uri(obj, kind)
        if uri is not None:
            match = match_cache(uri, namespace, annotations.get(NODEGROUP_ANNOTATION), cluster)
    new = copy.deepcopy(obj)
    _set_local_model_metadata(new, match)
    return Decision(patch=json_patch(obj, new))


# -- Pods -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PodTarget:
    """Where a pod's model lives: which PVC, which directory in it, where to mount it."""

    cache: str
    cache_namespace: str | None
    source_uri: str
    pvc_name: str
    group: str | None
    sub_path: str
    mount_path: str
    volume: str
    containers: tuple[str, ...]
    kserve: bool

    @property
    def key(self) -> str:
        return storage_key(self.source_uri)

    @property
    def volume_sub_path(self) -> str:
        return f"models/{self.key}{self.sub_path}"


def _find_cache(name: str, namespace: str, cluster: Cluster) -> tuple[Obj, str | None] | None:
    """The cache a pod annotation names: the namespace's own first (caches being deleted never)."""
    for cache in cluster.namespace_caches:
        if _name(cache) == name and _namespace(cache) == namespace and not _deleting(cache):
            return cache, namespace
    for cache in cluster.caches:
        if _name(cache) == name and not _deleting(cache):
            return cache, None
    return None


def _container_names(pod: Obj) -> list[str]:
    return [_str(c.get("name")) for c in _dicts(_spec(pod).get("containers"))]


def _pod_storage_uri(pod: Obj) -> str | None:
    """The model URI of a KServe predictor pod (None: this pod does not load a model)."""
    uri = _annotations(pod).get(STORAGE_INITIALIZER_SOURCEURI_ANNOTATION)
    if uri:
        return uri
    spec = _spec(pod)
    for init in _dicts(spec.get("initContainers")):
        if init.get("name") == STORAGE_INITIALIZER_CONTAINER and _strs(init.get("args")):
            return _strs(init.get("args"))[0]
    for container in _dicts(spec.get("containers")):
        if container.get("name") == KSERVE_CONTAINER:
            for env in _dicts(container.get("env")):
                if env.get("name") == STORAGE_URI_ENV and _str(env.get("value")):
                    return _str(env.get("value"))
    return None


def _nodes_in_group(nodes: list[Obj], group: Obj | None) -> list[Obj]:
    """Members of `group` (domain.selects: no nodeAffinity selects none, as the controller and
    KServe); no group known: every node."""
    if group is None:
        return nodes
    terms = domain.parse_terms(_spec(group).get("persistentVolumeSpec"))
    return [n for n in nodes if domain.selects(terms, _name(n), _labels(n))]


def node_matches(node: Mapping[str, Any], terms: list[Obj]) -> bool:
    """core/v1 NodeSelector semantics (domain.selects): terms ORed, requirements ANDed."""
    parsed = domain.parse_terms({"nodeAffinity": {"required": {"nodeSelectorTerms": terms}}})
    return domain.selects(parsed, _name(node), _labels(node))


def ready_nodes(source_uri: str, group: str | None, cluster: Cluster) -> list[str]:
    """Nodes (of the group, when known) labelled as holding the verified model."""
    label = ready_label(storage_key(source_uri))
    ready = [n for n in cluster.nodes if _labels(n).get(label) == READY_NODE_LABEL_VALUE]
    return sorted(_name(n) for n in _nodes_in_group(ready, cluster.node_groups.get(group or "")))


def _event(pod: Obj, namespace: str, reason: str, message: str) -> EventNote:
    """On the pod's controller (pods being admitted have no name/uid yet when generated)."""
    owners = _dicts(_meta(pod).get("ownerReferences"))
    owner = next((o for o in owners if o.get("controller") is True), owners[0] if owners else None)
    if owner:
        involved = {
            "apiVersion": _str(owner.get("apiVersion")),
            "kind": _str(owner.get("kind")),
            "name": _str(owner.get("name")),
            "uid": _str(owner.get("uid")),
            "namespace": namespace,
        }
    else:
        pod_name = _name(pod) or _str(_meta(pod).get("generateName"))
        involved = {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "namespace": namespace}
    return EventNote(namespace=namespace, involved=involved, reason=reason, message=message)


def _pod_label(pod: Obj, namespace: str) -> str:
    return f"pod {namespace}/{_name(pod) or _str(_meta(pod).get('generateName')) + '*'}"


def pod_target(pod: Obj, namespace: str, cluster: Cluster) -> PodTarget | str | None:
    """What to mount into this pod; a string explains why a pod that asked cannot get it."""
    labels, annotations = _labels(pod), _annotations(pod)
    mount_path = annotations.get(MOUNT_PATH_ANNOTATION) or DEFAULT_MODEL_MOUNT_PATH
    if not mount_path.startswith("/"):
        return f"{MOUNT_PATH_ANNOTATION} must be an absolute path, got {mount_path!r}"
    if LOCALMODEL_LABEL in labels:
        storage_uri = _pod_storage_uri(pod)
        if storage_uri is None:
            return None  # a KServe pod that loads no model (e.g. a transformer)
        cache = labels[LOCALMODEL_LABEL]
        source = annotations.get(LOCALMODEL_SOURCEURI_ANNOTATION)
        pvc = annotations.get(LOCALMODEL_PVC_ANNOTATION)
        if not source or not pvc:
            return (
                f"local model {cache}: annotations {LOCALMODEL_SOURCEURI_ANNOTATION} and "
                f"{LOCALMODEL_PVC_ANNOTATION} are required"
            )
        rest = sub_path(storage_uri, source)
        if rest is None:
            return f"storage URI {redact(storage_uri)} is not under the cache's {redact(source)}"
        names = _container_names(pod)
        wanted = [n for n in (KSERVE_CONTAINER, TRANSFORMER_CONTAINER) if n in names]
        if KSERVE_CONTAINER not in wanted and WORKER_CONTAINER in names:
            wanted.insert(0, WORKER_CONTAINER)
        group = pvc[len(cache) + 1 :] if pvc.startswith(cache + "-") else None
        return PodTarget(
            cache=cache,
            cache_namespace=labels.get(LOCALMODEL_NAMESPACE_LABEL),
            source_uri=source,
            pvc_name=pvc,
            group=group,
            sub_path=rest,
            mount_path=mount_path,
            volume=PVC_SOURCE_VOLUME,
            containers=tuple(wanted or names),
            kserve=True,
        )
    name = annotations.get(MODEL_ANNOTATION)
    if not name:
        return None
    found = _find_cache(name, namespace, cluster)
    if found is None:
        return f"no LocalModelNamespaceCache {namespace}/{name} and no LocalModelCache {name}"
    cache_obj, cache_ns = found
    spec = _spec(cache_obj)
    source, groups = spec.get("sourceModelUri"), _strs(spec.get("nodeGroups"))
    if not isinstance(source, str) or not groups:
        return f"cache {name} has no sourceModelUri or nodeGroups"
    wanted_group = annotations.get(NODEGROUP_ANNOTATION)
    if wanted_group is not None and wanted_group not in groups:
        return f"cache {name} is not on node group {wanted_group} (its groups: {', '.join(groups)})"
    # as KServe (and the controller that creates the PVC): the annotated group, else the first one
    group = wanted_group or groups[0]
    return PodTarget(
        cache=name,
        cache_namespace=cache_ns,
        source_uri=source,
        pvc_name=f"{name}-{group}",
        group=group,
        sub_path="",
        mount_path=mount_path,
        volume=MODEL_VOLUME,
        containers=tuple(_container_names(pod)),
        kserve=False,
    )


def mutate_pod(request: Mapping[str, Any], cluster: Cluster, options: Options) -> Decision:
    if request.get("operation") != "CREATE":
        return Decision()
    pod: Obj = _dict(request.get("object"))
    namespace = _str(request.get("namespace")) or _namespace(pod)
    dry_run = bool(request.get("dryRun"))
    target = pod_target(pod, namespace, cluster)
    if target is None:
        return Decision()
    events: tuple[EventNote, ...] = ()
    labelled = _with_model_pod_label(pod)
    if isinstance(target, str):
        message = f"{_pod_label(pod, namespace)} admitted without the local model: {target}"
        if not dry_run:
            events = (_event(pod, namespace, "LocalModelUnavailable", message),)
        return Decision(patch=json_patch(pod, labelled), warnings=(message,), events=events)
    warnings: tuple[str, ...] = ()
    if _annotations(pod).get(READONLY_ANNOTATION, "").lower() == "false":
        # The folder is every pod's copy on that node (and KServe mounts it read-only too).
        warnings += (
            f"{_pod_label(pod, namespace)}: {READONLY_ANNOTATION}=false is ignored for a cached model: "
            "the node's copy is shared by every pod using it, so it is mounted read-only",
        )
    if not ready_nodes(target.source_uri, target.group, cluster):
        where = f" of node group {target.group}" if target.group else ""
        # KServe's own pod mutator ran first: the PVC is mounted already and the pod cannot load
        # the model from its source any more, so it waits for a node that has it.
        unchanged = options.when_not_ready is NotReadyPolicy.WARN and not kserve_mounted(pod, target)
        outcome = (
            "admitted without the local model mount (it must load the model from its source)"
            if unchanged
            else "it stays Pending until a node has it"
        )
        message = (
            f"{_pod_label(pod, namespace)}: model {target.cache} is not downloaded on any node{where} "
            f"yet; {outcome}"
        )
        warnings = (message,)
        if not dry_run:
            events = (_event(pod, namespace, "LocalModelNotReady", message),)
        if unchanged:
            return Decision(patch=json_patch(pod, labelled), warnings=warnings, events=events)
    apply_local_model(labelled, target)
    return Decision(patch=json_patch(pod, labelled), warnings=warnings, events=events)


def _with_model_pod_label(pod: Obj) -> Obj:
    """A copy of `pod`, labelled for the controller's server-side pod filter when it asks for a cache
    by annotation (KServe's pods are found through their InferenceServices instead)."""
    new = copy.deepcopy(pod)
    if LOCALMODEL_LABEL in _labels(pod) or not _annotations(pod).get(MODEL_ANNOTATION):
        return new
    meta = new["metadata"] = dict(_meta(new))
    meta["labels"] = {**_labels(new), MODEL_POD_LABEL: MODEL_POD_LABEL_VALUE}
    return new


def kserve_mounted(pod: Obj, target: PodTarget) -> bool:
    """Did KServe's pod mutator mount the cache PVC already (its webhook ran before ours)?"""
    spec = _spec(pod)
    volumes = {
        _str(v.get("name"))
        for v in _dicts(spec.get("volumes"))
        if _str(_path(v, "persistentVolumeClaim", "claimName")) == target.pvc_name
    }
    return any(
        m.get("mountPath") == target.mount_path and _str(m.get("name")) in volumes
        for c in _dicts(spec.get("containers"))
        for m in _dicts(c.get("volumeMounts"))
    )


def _mount_names(containers: Iterable[Obj]) -> set[str]:
    return {_str(m.get("name")) for c in containers for m in _dicts(c.get("volumeMounts"))}


def apply_local_model(pod: Obj, target: PodTarget) -> None:
    """Mutate `pod` in place. Idempotent: a second pass (reinvocation, KServe's own mutator
    having run first) changes nothing."""
    spec = pod["spec"] = _spec(pod)
    volumes = _dicts(spec.get("volumes"))
    containers = _dicts(spec.get("containers"))
    inits = _dicts(spec.get("initContainers"))
    before = _mount_names(containers + inits)

    kept_inits = [c for c in inits if c.get("name") != STORAGE_INITIALIZER_CONTAINER]
    if kept_inits:
        spec["initContainers"] = kept_inits
    else:
        spec.pop("initContainers", None)

    mount = {
        "name": target.volume,
        "mountPath": target.mount_path,
        "subPath": target.volume_sub_path,
        "readOnly": True,
    }
    for container in containers:
        if container.get("name") not in target.containers:
            continue
        container["volumeMounts"] = _upsert(
            [
                m
                for m in _dicts(container.get("volumeMounts"))
                if m.get("name") == target.volume or m.get("mountPath") != target.mount_path
            ],
            target.volume,
            mount,
        )
        if target.kserve:
            for env in _dicts(container.get("env")):
                if env.get("name") == STORAGE_URI_ENV and env.get("value"):
                    env["value"] = target.mount_path
    spec["containers"] = containers

    after = _mount_names(containers + kept_inits)
    dropped = before - after
    volume = {
        "name": target.volume,
        "persistentVolumeClaim": {"claimName": target.pvc_name, "readOnly": True},
    }
    spec["volumes"] = _upsert([v for v in volumes if v.get("name") not in dropped], target.volume, volume)
    _require_ready_node(spec, target.key)


def _upsert(items: list[Obj], name: str, item: Obj) -> list[Obj]:
    """`item` in place of the entry called `name` (order kept, so a re-run is a no-op), else appended."""
    out = [item if i.get("name") == name else i for i in items]
    return out if any(i.get("name") == name for i in items) else [*out, item]


def _require_ready_node(spec: Obj, key: str) -> None:
    """AND `<ready label>=ready` into every required node selector term (terms are ORed)."""
    requirement = {"key": ready_label(key), "operator": "In", "values": [READY_NODE_LABEL_VALUE]}
    affinity = spec["affinity"] = dict(_dict(spec.get("affinity")))
    node_affinity = affinity["nodeAffinity"] = dict(_dict(affinity.get("nodeAffinity")))
    key_ = "requiredDuringSchedulingIgnoredDuringExecution"
    required = node_affinity[key_] = dict(_dict(node_affinity.get(key_)))
    terms = _dicts(required.get("nodeSelectorTerms")) or [{}]
    for term in terms:
        exprs = _dicts(term.get("matchExpressions"))
        if requirement not in exprs:
            exprs.append(requirement)
        term["matchExpressions"] = exprs
    required["nodeSelectorTerms"] = terms


# -- what the server must read --------------------------------------------------------------------
@dataclass(frozen=True)
class Reads:
    """Which parts of `Cluster` a request needs, so the server reads no more than that."""

    caches: bool = False
    namespace_caches: bool = False
    #: where to list namespace caches: "*" (capacity is shared) or the workload's own namespace
    namespace_caches_in: str = "*"
    node_groups: bool = False
    #: nodes carrying the ready label of the pod's model (see `pod_model_uri`), read after caches
    ready_nodes: bool = False
    #: the cache whose users (InferenceServices, LLMInferenceServices, pods) to list
    users_of: str | None = None
    config: bool = False


def reads(request: Mapping[str, Any]) -> Reads:
    """Pure: from the request alone, what state its decision depends on."""
    kind = request_kind(request)
    op = request.get("operation")
    if kind in CACHE_KINDS:
        if op == "DELETE":
            return Reads(namespace_caches=True, users_of=_name(request.get("oldObject")))
        if op == "UPDATE" and (
            _deleting(request.get("object"))
            or _spec(request.get("object")) == _spec(request.get("oldObject"))
        ):
            return Reads()
        return Reads(caches=True, namespace_caches=True, node_groups=True)
    if kind == "LocalModelNodeGroup":
        return Reads(caches=True, namespace_caches=True)
    own = _str(request.get("namespace")) or _namespace(request.get("object")) or "*"
    if kind in WORKLOAD_KINDS:
        return Reads(caches=True, namespace_caches=True, namespace_caches_in=own, config=True)
    if kind == "Pod" and op == "CREATE":
        pod = _dict(request.get("object"))
        if LOCALMODEL_LABEL in _labels(pod):
            return Reads(node_groups=True, ready_nodes=True)
        if MODEL_ANNOTATION in _annotations(pod):
            return Reads(
                caches=True,
                namespace_caches=True,
                namespace_caches_in=own,
                node_groups=True,
                ready_nodes=True,
            )
    return Reads()


def pod_model_uri(pod: Obj, namespace: str, cluster: Cluster) -> str | None:
    """The cache source URI a pod asks for (its storage key picks the ready label to look for)."""
    if LOCALMODEL_LABEL in _labels(pod):
        return _annotations(pod).get(LOCALMODEL_SOURCEURI_ANNOTATION) or None
    name = _annotations(pod).get(MODEL_ANNOTATION)
    found = _find_cache(name, namespace, cluster) if name else None
    uri = _spec(found[0]).get("sourceModelUri") if found else None
    return uri if isinstance(uri, str) and uri else None
