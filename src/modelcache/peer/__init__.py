"""Node-to-node fill: agents serve what they hold and fetch from each other before the origin.

* `server` serves verified model files (and, while a node is still downloading, the pieces it has
  written and hashed) with Range support, to authenticated peers only, under an upload rate cap.
* `source` wraps the origin's `Source`: each chunk (one piece) comes from a peer that has it, else
  from the origin; every piece from a peer is checked against its sha256 before it is written.
* `auth` signs requests with a shared cluster token (HMAC, so the token never crosses the wire).

The engine knows peers only as a list of `Peer(address, token)`; the agent finds them in the
cluster (LocalModelNode statuses and node addresses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 8477
API = "/v1/models"


@dataclass(frozen=True)
class Peer:
    """Another node's peer server. `address` is host:port; the token is never shown."""

    address: str
    token: str = field(repr=False)

    @property
    def base(self) -> str:
        return f"http://{self.address}"  # host:port, with an IPv6 host in brackets
