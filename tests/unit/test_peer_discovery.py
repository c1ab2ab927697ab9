"""Which nodes are peers for a model, read from LocalModelNode statuses and Node addresses."""

from __future__ import annotations

from typing import Any

from modelcache.peer import discovery
from modelcache.peer.auth import sign, verify


def lmn(name: str, **status: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"modelStatus": status}}


def test_peers_are_nodes_that_hold_or_fetch_the_model() -> None:
    statuses: list[dict[str, Any]] = [
        lmn("a", llama="ModelDownloaded"),
        lmn("b", llama="ModelDownloading"),
        lmn("c", llama="ModelDownloadError"),
        lmn("d", other="ModelDownloaded"),
        lmn("me", llama="ModelDownloading"),
        {"metadata": {}},
    ]
    assert discovery.peer_nodes("llama", statuses, "me") == ["a", "b"]


def test_internal_ip_and_address() -> None:
    node = {
        "status": {
            "addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "InternalIP", "address": "10.0.0.7"},
            ]
        }
    }
    assert discovery.internal_ip(node) == "10.0.0.7"
    assert discovery.internal_ip({"status": {}}) is None
    assert discovery.address("10.0.0.7", 8477) == "10.0.0.7:8477"
    assert discovery.address("fd00::7", 8477) == "[fd00::7]:8477"


def test_signatures_bind_token_request_and_time() -> None:
    value = sign("t", "GET", "/v1/models/k/files/a", "bytes=0-9", now=1000)
    assert verify("t", value, "GET", "/v1/models/k/files/a", "bytes=0-9", now=1010)
    assert not verify("u", value, "GET", "/v1/models/k/files/a", "bytes=0-9", now=1010)
    assert not verify("t", value, "GET", "/v1/models/k/files/b", "bytes=0-9", now=1010)
    assert not verify("t", value, "GET", "/v1/models/k/files/a", "bytes=0-99", now=1010)
    assert not verify("t", value, "GET", "/v1/models/k/files/a", "bytes=0-9", now=1000 + 3600)
    assert not verify("", value, "GET", "/v1/models/k/files/a", "bytes=0-9", now=1010)


def test_agent_settings_publish_the_peer_port_and_token_reference() -> None:
    from modelcache.cli.controller import parse_agent_settings
    from modelcache.controller.manifests import apply_agent_settings

    settings = parse_agent_settings('{"peer": {"port": 8477, "uploadRate": "128Mi"}}')
    pod: dict[str, Any] = {"containers": [{"name": "agent", "args": [], "env": []}]}
    apply_agent_settings(pod, settings)
    c = pod["containers"][0]
    assert c["ports"] == [{"name": "peer", "containerPort": 8477, "hostPort": 8477}]
    env = {e["name"]: e for e in c["env"]}
    assert env["MODELCACHE_PEER_PORT"]["value"] == "8477"
    assert env["MODELCACHE_PEER_UPLOAD_RATE"]["value"] == "128Mi"
    ref = env["MODELCACHE_PEER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "modelcache-peer", "key": "token", "optional": True}
    off: dict[str, Any] = {"containers": [{"name": "agent", "args": [], "env": []}]}
    apply_agent_settings(off, parse_agent_settings('{"peer": {"port": 0}}'))
    assert "ports" not in off["containers"][0] and off["containers"][0]["env"] == []
