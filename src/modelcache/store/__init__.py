"""One node's cache: layout, index, manifests, locks, publish, eviction plans, verification."""

from modelcache.store.core import ModelRecord, Store, default_root

__all__ = ["ModelRecord", "Store", "default_root"]
