"""Helpers shared by the e2e tests (kept out of conftest.py so tests can import them plainly)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from modelcache.dev import BinaryMissingError, find_etcd, find_kube_apiserver


def require_binaries() -> None:
    """Fail (not skip) with the fix when a server binary is missing."""
    problem = ""
    try:
        find_kube_apiserver()
        find_etcd()
    except BinaryMissingError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(problem, pytrace=False)


def leftover_processes(marker: str | Path) -> list[str]:
    """Live processes whose command line mentions `marker` (a control plane home)."""
    needle = str(marker)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if needle in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:200]}")
    return found
