"""Resource limits of the webhook's TLS listener (see `listener`), apart so that the CLI can show
the defaults without importing aiohttp."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Limits:
    """Resource limits of the webhook listener. Defaults suit an apiserver on the cluster network:
    it sends a request as soon as the connection is up, and gives up on a webhook after 10 s by
    default (30 s at most)."""

    #: TLS handshake, from accept (ms on a cluster network).
    tls_handshake_timeout: float = 10.0
    #: Request line and headers, from the end of the handshake or the first byte after keep-alive.
    header_timeout: float = 10.0
    #: The whole body, from the end of the headers.
    body_timeout: float = 10.0
    #: Our decision and the response; longer than the apiserver's 30 s maximum is of no use.
    request_timeout: float = 30.0
    #: Keep-alive between requests: long enough for the apiserver to reuse connections.
    idle_timeout: float = 60.0
    #: Open connections (each costs ~280 KB: asyncio's TLS buffer and OpenSSL state).
    max_connections: int = 256
    #: One AdmissionReview. 7 MiB like controller-runtime: an UPDATE carries two objects of up to
    #: 3 MiB each (the apiserver's request limit) plus the envelope.
    max_body_bytes: int = 7 * MiB
    #: Bodies up to this size never wait for the budget below (nearly every review is a few KiB).
    small_body_bytes: int = 64 * KiB
    #: Bytes of larger bodies held at once; beyond it a large request gets 503 (the apiserver's
    #: failurePolicy decides), so max_connections x max_body_bytes is never in memory at once.
    large_body_budget_bytes: int = 32 * MiB

    def __post_init__(self) -> None:
        for name in (
            "tls_handshake_timeout",
            "header_timeout",
            "body_timeout",
            "request_timeout",
            "idle_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if not 0 < self.small_body_bytes <= self.max_body_bytes <= self.large_body_budget_bytes:
            raise ValueError("need 0 < small_body_bytes <= max_body_bytes <= large_body_budget_bytes")
