"""Shared pieces of the direct-vs-proxy driver harness (tests/test_drivers_*.py).

A driver program (Java, node, Go) or a Python ORM runs the same named cases against each target
and reports, per case, the list of observations a user of that driver sees (command tags or
update counts, column names, type OIDs or names, result formats, rows, SQLSTATEs). This module
names the targets and turns two such reports into a readable per-case difference.
"""

from __future__ import annotations

import difflib
import json
from typing import Any
from urllib.parse import urlsplit

from tests.fix_proxy import ProxyProcess

Report = dict[str, list[Any]]


def targets(pg_dsn: str, proxy: ProxyProcess, proxy_tx: ProxyProcess) -> dict[str, tuple[str, int]]:
    """{"direct" | "session" | "transaction": (host, port)}."""
    direct = urlsplit(pg_dsn)
    return {"direct": (direct.hostname or "127.0.0.1", direct.port or 5432),
            "session": (proxy.host, proxy.port), "transaction": (proxy_tx.host, proxy_tx.port)}


def small_tx_proxy(proxy_factory: Any) -> ProxyProcess:
    """A transaction-mode proxy with 2 server connections: each new client of a driver program then
    lands on a server connection that earlier clients left statements on (pool churn)."""
    started: ProxyProcess = proxy_factory("transaction", pool_size=2)
    return started


def differences(expected: Report, got: Report, cases: list[str] | None = None) -> str:
    """A unified diff per case whose observations differ; empty when all named cases agree."""
    out: list[str] = []
    for case in cases or sorted(expected):
        want = [json.dumps(x, sort_keys=True) for x in expected.get(case, ["<case missing>"])]
        have = [json.dumps(x, sort_keys=True) for x in got.get(case, ["<case missing>"])]
        if want != have:
            diff = difflib.unified_diff(want, have, "direct", "proxied", n=1, lineterm="")
            out.append(f"--- case {case}\n" + "\n".join(list(diff)[2:40]))
    return "\n".join(out)
