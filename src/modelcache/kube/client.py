"""The kube client layer of the cluster CLI (`modelcache cache ...`): kubectl's kubeconfig rules,
one lightkube Client, the resources it reads, and API errors as our exit codes.

kubectl's rules, so `kubectl modelcache` talks to the same cluster as `kubectl`: `--kubeconfig`
wins; else every file in `KUBECONFIG` (path-list, merged: the first file to name a cluster, user or
context wins, and the first `current-context` set), else `~/.kube/config`, else the in-cluster
service account. `--context` picks a context; the namespace is `-n`, else the context's, else
`default`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml
from lightkube import ApiError, Client, ConfigError, KubeConfig

from modelcache.errors import (
    AuthError,
    ConflictError,
    ModelcacheError,
    NotFoundError,
    SourceError,
    UsageError,
)
from modelcache.kube import resources
from modelcache.safepath import printable

# The resources, defined once in kube/resources.py (re-exported: the cluster CLI imports them here).
LocalModelCache = resources.LocalModelCache
LocalModelNamespaceCache = resources.LocalModelNamespaceCache
LocalModelNode = resources.LocalModelNode
LocalModelNodeGroup = resources.LocalModelNodeGroup
InferenceService = resources.InferenceService


@dataclass(frozen=True)
class KubeTarget:
    """Which cluster and namespace, as the user asked (flags and environment)."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False


def kubeconfig_paths(explicit: str | None, env: Mapping[str, str]) -> list[Path]:
    """The files kubectl would read, in precedence order (pure)."""
    if explicit:
        return [Path(explicit).expanduser()]
    listed = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        return [Path(p).expanduser() for p in listed]
    return [Path("~/.kube/config").expanduser()]


def merge_kubeconfigs(docs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """kubectl's merge of several kubeconfig files: the first to set a name or current-context wins."""
    out: dict[str, Any] = {"clusters": [], "contexts": [], "users": [], "current-context": None}
    for doc in docs:
        for section in ("clusters", "contexts", "users"):
            have = {e.get("name") for e in out[section]}
            for entry in doc.get(section) or []:
                if isinstance(entry, Mapping) and entry.get("name") not in have:
                    out[section].append(dict(entry))
                    have.add(entry.get("name"))
        if not out["current-context"] and doc.get("current-context"):
            out["current-context"] = doc["current-context"]
    return out


def load_config(target: KubeTarget, env: Mapping[str, str] | None = None) -> KubeConfig:
    env = os.environ if env is None else env
    paths = kubeconfig_paths(target.kubeconfig, env)
    existing = [p for p in paths if p.is_file()]
    if target.kubeconfig and not existing:
        raise UsageError(f"--kubeconfig {printable(target.kubeconfig)}: no such file")
    if not existing:
        try:
            return KubeConfig.from_service_account()
        except ConfigError:
            shown = ", ".join(printable(str(p)) for p in paths)
            raise UsageError(f"no kubeconfig found ({shown}); use --kubeconfig or KUBECONFIG") from None
    docs = []
    for p in existing:
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UsageError(f"kubeconfig {printable(str(p))} is not readable YAML: {exc}") from None
        if not isinstance(doc, Mapping):
            raise UsageError(f"kubeconfig {printable(str(p))} is not a kubeconfig")
        docs.append(doc)
    try:
        return KubeConfig.from_dict(merge_kubeconfigs(docs), fname=existing[0])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise UsageError(f"kubeconfig {printable(str(existing[0]))} is not valid: {exc}") from None


@dataclass
class Kube:
    """A connected client and the namespace commands default to."""

    client: Client
    namespace: str
    namespace_given: bool
    all_namespaces: bool


def connect(target: KubeTarget) -> Kube:
    config = load_config(target)
    if target.context is not None and target.context not in config.contexts:
        raise UsageError(f"--context {printable(target.context)}: no such context in the kubeconfig")
    try:
        single = config.get(context_name=target.context)
    except (ConfigError, KeyError) as exc:
        raise UsageError(f"kubeconfig: {printable(str(exc))}") from None
    if single is None:
        raise UsageError("kubeconfig: no current context; use --context")
    namespace = target.namespace or single.namespace or "default"
    timeout = httpx2.Timeout(30.0)
    client = Client(config=single, namespace=namespace, field_manager="modelcache-cli", timeout=timeout)
    return Kube(client, namespace, target.namespace is not None, target.all_namespaces)


@contextlib.contextmanager
def api_errors(what: str) -> Iterator[None]:
    """API failures as our one-line errors and exit codes (3 missing, 7 conflict, 6 otherwise)."""
    try:
        yield
    except ModelcacheError:
        raise
    except ApiError as exc:
        code = exc.status.code or 0
        message = printable(exc.status.message or str(exc), 300)
        if code == 404:
            raise NotFoundError(f"{what}: not found") from None
        if code in (401, 403):
            raise AuthError(f"{what}: {message}") from None
        if code == 409:
            raise ConflictError(f"{what}: {message}") from None
        if code in (400, 422):
            raise UsageError(f"{what}: {message}") from None
        raise SourceError(f"{what}: API server said {code}: {message}") from None
    except (httpx2.HTTPError, OSError) as exc:
        raise SourceError(f"{what}: cannot reach the API server: {printable(str(exc), 300)}") from None


def plain(obj: Any) -> dict[str, Any]:
    """A lightkube object as the plain dict the pure views take."""
    if isinstance(obj, dict):
        return obj
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return dict(data)
