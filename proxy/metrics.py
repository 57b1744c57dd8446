"""Prometheus metrics: `render` for the HTTP listener's /metrics (proxy/http), and the old
endpoint on `config.metrics_host:metrics_port` (deprecated: it logs so at start).

Nothing is counted per query here: a custom Collector reads `server.snapshot()` (through
`proxy.admin.take_snapshot`) when Prometheus scrapes. prometheus_client's own WSGI server
answers on a daemon thread, so a scrape never blocks the event loop; the snapshot itself
is taken on the event loop (`run_coroutine_threadsafe`), so the collector never reads the
proxy's state while the loop is changing it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.admin import STAT_COLUMNS, Snapshot, field_of, take_snapshot

log = logging.getLogger("pgml_proxy")
SCRAPE_TIMEOUT = 5.0  # seconds the scrape waits for the event loop before failing the scrape
PREFIX = "pgml_proxy_"

# (metric name, counter key, help); the counter keys are `proxy.admin.Snapshot`'s.
COUNTERS = (
    ("queries", "queries", "Statements received from clients"),
    ("pgml_queries", "pgml_queries", "Statements that mentioned pgml and went to the planner"),
    ("received_bytes", "bytes_in", "Bytes received from clients"),
    ("sent_bytes", "bytes_out", "Bytes sent to clients"),
    ("errors", "errors", "ErrorResponses sent to clients"),
    ("wait_seconds", "wait_time", "Time clients spent waiting for a server connection"),
)
assert {key for _, key, _ in COUNTERS} == {key for _, key, _ in STAT_COLUMNS}  # admin and metrics agree

POOL_GAUGES = (
    ("pool_size", "size", "Largest number of server connections of the pool"),
    ("pool_active", "active", "Server connections of the pool in use by a client"),
    ("pool_idle", "idle", "Idle server connections of the pool"),
    ("pool_waiting", "waiting", "Clients waiting for a server connection of the pool"),
)


class SnapshotCollector(Collector):
    """Turns one snapshot per scrape into metric families."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        future = asyncio.run_coroutine_threadsafe(take_snapshot(self._server), self._loop)
        yield from families(future.result(timeout=SCRAPE_TIMEOUT))


class _Taken(Collector):
    """One snapshot already taken (on the loop), for a scrape served on the loop."""

    def __init__(self, snap: Snapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterator[Metric]:
        yield from families(self._snap)


async def render(server: Any) -> bytes:
    """The exposition text for one scrape, served on the event loop (the HTTP listener)."""
    snap = await take_snapshot(server)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Taken(snap))
    ProcessCollector(namespace="pgml_proxy", registry=registry)
    return bytes(generate_latest(registry))


def families(snap: Snapshot) -> Iterator[Metric]:
    """Every metric family of one snapshot."""
    yield from _counters(snap)
    yield from _pools(snap)
    yield from _states("clients", "Client connections by state", snap.clients)
    yield from _states("servers", "Server connections by state", snap.servers)
    yield from _upstreams(snap)
    yield from _models(snap)


def _counters(snap: Snapshot) -> Iterator[Metric]:
    entries = snap.counters if isinstance(snap.counters, list) else [snap.counters]
    for name, key, doc in COUNTERS:
        family = CounterMetricFamily(PREFIX + name, doc, labels=["database"])
        for entry in entries:
            family.add_metric([str(field_of(entry, "database", "*"))], float(field_of(entry, key, 0) or 0))
        yield family


def _pools(snap: Snapshot) -> Iterator[Metric]:
    for name, key, doc in POOL_GAUGES:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["database", "user", "mode"])
        for pool in snap.pools:
            labels = [str(field_of(pool, k)) for k in ("database", "user", "mode")]
            family.add_metric(labels, float(field_of(pool, key, 0) or 0))
        yield family


def _states(name: str, doc: str, entries: list[Any]) -> Iterator[Metric]:
    counts = Counter(
        (str(field_of(e, "database")), str(field_of(e, "user")), str(field_of(e, "state"))) for e in entries
    )
    family = GaugeMetricFamily(PREFIX + name, doc, labels=["database", "user", "state"])
    for labels, count in sorted(counts.items()):
        family.add_metric(list(labels), count)
    yield family


def _upstreams(snap: Snapshot) -> Iterator[Metric]:
    """Each upstream server's health (replicas configured): from its health-check row."""
    checks = [s for s in snap.servers if field_of(s, "state") == "health"]
    up = GaugeMetricFamily(PREFIX + "upstream_up", "1 while the server answers its health check",
                           labels=["server", "role"])
    banned = GaugeMetricFamily(PREFIX + "upstream_banned", "1 while the replica is banned", labels=["server"])
    lag = GaugeMetricFamily(PREFIX + "upstream_lag_bytes", "Bytes of WAL the replica is behind the primary",
                            labels=["server"])
    for s in checks:
        server, role = str(field_of(s, "server")), str(field_of(s, "role"))
        up.add_metric([server, role], 0.0 if role in ("down", "unknown") else 1.0)
        banned.add_metric([server], 1.0 if field_of(s, "banned") else 0.0)
        if field_of(s, "lag_bytes") is not None:
            lag.add_metric([server], float(field_of(s, "lag_bytes")))
    yield from (up, banned, lag)


def _models(snap: Snapshot) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        PREFIX + "model_memory_bytes", "Memory held by each loaded model", labels=["name", "engine", "device"]
    )
    for model in snap.models:
        labels = [str(field_of(model, k)) for k in ("name", "engine", "device")]
        family.add_metric(labels, float(field_of(model, "memory_bytes", field_of(model, "memory", 0)) or 0))
    yield family
    yield GaugeMetricFamily(PREFIX + "models_loaded", "Models the runtime holds", value=len(snap.models))
    for key, doc in (("batches", "Batches each model has run"), ("items", "Items each model has processed")):
        counter = CounterMetricFamily(PREFIX + "model_" + key, doc, labels=["name"])
        for model in snap.models:
            counter.add_metric([str(field_of(model, "name"))], float(field_of(model, key, 0) or 0))
        yield counter


class MetricsHandle:
    """The running metrics endpoint; `port` is the bound one (useful when configured as 0)."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host, self.port = httpd.server_address[:2]

    async def close(self) -> None:
        """Stop serving and join the thread (off the loop: shutdown waits for the serve loop)."""
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start(config: Any, server: Any, *, port: int | None = None) -> MetricsHandle | None:
    """Serve metrics for `server`; call from the running event loop. None when metrics_port is 0.

    `port` overrides `config.metrics_port` (0 there disables; tests pass an explicit port).
    """
    port = config.metrics_port if port is None else port
    if not port:
        return None
    log.warning("proxy.metrics_port is deprecated: /metrics is served by the HTTP listener "
                "([http] listen); metrics_port will be removed in a later release")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(server, asyncio.get_running_loop()))
    ProcessCollector(namespace="pgml_proxy", registry=registry)
    httpd, thread = start_http_server(port, addr=config.metrics_host, registry=registry)
    return MetricsHandle(httpd, thread)
