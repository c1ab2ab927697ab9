"""Pure parts of the cluster CLI: kubectl's kubeconfig precedence and merge, progress summed over
nodes, per-node budgets (the API-facing parts run against a real API server in tests/e2e)."""

from __future__ import annotations

from pathlib import Path

from modelcache.controller.reconcile import group_from, node_from
from modelcache.kube.cacheview import cache_view, node_rows, progress
from modelcache.kube.client import kubeconfig_paths, merge_kubeconfigs

MiB = 1 << 20


def test_kubeconfig_precedence_and_merge() -> None:
    assert kubeconfig_paths("/x/k", {"KUBECONFIG": "/a:/b"}) == [Path("/x/k")]
    assert kubeconfig_paths(None, {"KUBECONFIG": "/a::/b"}) == [Path("/a"), Path("/b")]
    assert kubeconfig_paths(None, {}) == [Path("~/.kube/config").expanduser()]
    a = {
        "clusters": [{"name": "c", "cluster": {"server": "https://a"}}],
        "contexts": [],
        "current-context": "",
    }
    b = {
        "clusters": [{"name": "c", "cluster": {"server": "https://b"}}, {"name": "d", "cluster": {}}],
        "contexts": [{"name": "x", "context": {"cluster": "c"}}],
        "current-context": "x",
    }
    merged = merge_kubeconfigs([a, b])
    assert [c["cluster"].get("server") for c in merged["clusters"]] == ["https://a", None]  # first wins
    assert merged["current-context"] == "x"


def _cache(
    node_status: dict[str, str], progress_: dict[str, dict[str, object]], available: int
) -> dict[str, object]:
    return {
        "kind": "LocalModelCache",
        "metadata": {"name": "m", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"sourceModelUri": "s3://u:pw@b/m", "modelSize": "10Mi", "nodeGroups": ["g"]},
        "status": {
            "copies": {"available": available, "total": len(node_status)},
            "nodeStatus": node_status,
            "nodeProgress": progress_,
        },
    }


def test_progress_sums_nodes_and_names_the_failing_one() -> None:
    view = cache_view(
        _cache(
            {"n1": "NodeDownloaded", "n2": "NodeDownloading", "n3": "NodeDownloadPending"},
            {"n2": {"bytesDone": 4 * MiB, "bytesTotal": 8 * MiB}},
            1,
        )
    )
    assert "pw" not in view.uri and view.created_at == 1767225600.0
    p = progress(view)
    assert (p.done, p.total, p.ready, p.errors) == (14 * MiB, 28 * MiB, False, [])
    failed = cache_view(_cache({"n1": "NodeDownloaded", "n2": "NodeDownloadError"}, {}, 1))
    assert progress(failed, {"n2": "403 Forbidden"}).errors == [("n2", "403 Forbidden")]
    done = progress(cache_view(_cache({"n1": "NodeDownloaded"}, {}, 1)))
    assert done.ready and done.done == done.total == 10 * MiB


def test_node_rows_budget_used_and_health() -> None:
    group = group_from(
        {
            "metadata": {"name": "g"},
            "spec": {
                "storageLimit": "1Gi",
                "persistentVolumeSpec": {
                    "nodeAffinity": {
                        "required": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}
                            ]
                        }
                    }
                },
            },
        }
    )

    def node(name: str, ready: bool) -> dict[str, object]:
        cond = [{"type": "Ready", "status": "True" if ready else "False"}]
        return {"metadata": {"name": name, "labels": {"pool": "gpu"}}, "status": {"conditions": cond}}

    nodes = [node_from(node("a", True)), node_from(node("b", True)), node_from(node("c", False))]
    lmns = [
        {
            "metadata": {"name": "a"},
            "status": {
                "modelStatus": {"m1": "ModelDownloaded", "m2": "ModelDownloadError"},
                "models": {"m1": {"bytesTotal": 100 * MiB}, "m2": {"lastError": "404 at https://u:pw@h/x"}},
            },
        }
    ]
    rows = {r.node: r for r in node_rows([group], nodes, lmns)}
    assert (rows["a"].used, rows["a"].models, rows["a"].free) == (100 * MiB, 1, 1024 * MiB - 100 * MiB)
    assert rows["a"].health == "1 error(s)" and "pw" not in rows["a"].errors[0]
    assert rows["b"].health == "no LocalModelNode" and rows["c"].health == "node not ready"
