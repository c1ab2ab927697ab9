"""Which nodes can serve a model: a pure reading of cluster state the agent has already fetched.

A node is a peer for a model when its LocalModelNode reports that model `ModelDownloaded` or
`ModelDownloading` (KServe's status words) and the node has an InternalIP. The agent turns these
into `(ip:port, token)` pairs for the engine, which never sees Kubernetes objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

SERVING = frozenset({"ModelDownloaded", "ModelDownloading"})


def internal_ip(node: Mapping[str, Any]) -> str | None:
    """A Node's InternalIP (the first one), or None."""
    for addr in (node.get("status") or {}).get("addresses") or []:
        if isinstance(addr, Mapping) and addr.get("type") == "InternalIP" and addr.get("address"):
            return str(addr["address"])
    return None


def peer_nodes(model_name: str, node_statuses: Iterable[Mapping[str, Any]], me: str) -> list[str]:
    """Names of the nodes (not `me`) whose LocalModelNode says they hold or are fetching `model_name`."""
    out = []
    for lmn in node_statuses:
        name = (lmn.get("metadata") or {}).get("name")
        status = ((lmn.get("status") or {}).get("modelStatus") or {}).get(model_name)
        if name and name != me and status in SERVING:
            out.append(str(name))
    return sorted(out)


def address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
