"""Source registry: scheme -> module, imported lazily so `modelcache path` stays fast.

Each scheme is one module under this package exposing `SOURCE`, a `Source` subclass.
"""

from __future__ import annotations

import importlib

from modelcache.errors import UsageError
from modelcache.sources.base import RemoteFile, Snapshot, Source, SourceOptions
from modelcache.uri import AZURE_BLOB_HOST_SUFFIX, SCHEMES, ModelURI

__all__ = ["RemoteFile", "Snapshot", "Source", "SourceOptions", "module_for", "open_source"]


def module_for(uri: ModelURI) -> str:
    host = uri.host.rsplit("@", 1)[-1].split(":", 1)[0].lower()
    if uri.scheme == "https" and host.endswith(AZURE_BLOB_HOST_SUFFIX):
        return "azure"
    return SCHEMES[uri.scheme]


def open_source(uri: ModelURI, options: SourceOptions | None = None) -> Source:
    name = module_for(uri)
    try:
        mod = importlib.import_module(f"modelcache.sources.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"modelcache.sources.{name}":
            raise
        raise UsageError(f"scheme {uri.scheme}:// is not supported by this build yet") from exc
    options = options or SourceOptions()
    source: Source = mod.SOURCE(uri, options)
    if options.revision and not source.supports_revision:
        raise UsageError(f"--revision does not apply to {uri.scheme}:// sources")
    return source
