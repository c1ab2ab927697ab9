"""Source registry: scheme -> module, imported lazily so `modelcache path` stays fast."""

from __future__ import annotations

import importlib

from modelcache.errors import UsageError
from modelcache.sources.base import RemoteFile, Snapshot, Source, SourceOptions
from modelcache.uri import SCHEMES, ModelURI

__all__ = ["RemoteFile", "Snapshot", "Source", "SourceOptions", "open_source"]


def open_source(uri: ModelURI, options: SourceOptions | None = None) -> Source:
    module = SCHEMES.get(uri.scheme)
    if module is None:
        raise UsageError(f"scheme {uri.scheme}:// is not supported by this build yet")
    mod = importlib.import_module(f"modelcache.sources.{module}")
    source: Source = mod.SOURCE(uri, options or SourceOptions())
    return source
