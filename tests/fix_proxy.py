"""pytest plugin: the real `pgml-proxy` CLI as a subprocess in front of the test Postgres.

Fixtures: `proxy_factory(pool_mode=..., **config_overrides)` starts a proxy on a free port
(config from tests/config.test.toml, overrides as PGML_PROXY_* variables) and returns a
`ProxyProcess` (host, port, dsn(database=, user=), pid, stop()); `proxy` / `proxy_tx`
are session-scoped proxies in session / transaction pool mode, `proxy_dsn` /
`proxy_tx_dsn` their DSNs. `proxy_factory(config=PATH)` runs with another config file,
`upstream=DSN` in front of another Postgres. `inprocess_proxy_factory(handler, pool_mode)`
runs the real ProxyServer on a loop thread in this process with a given StatementHandler
(for hook tests and `snapshot()`). Every proxy started is stopped at the end of the session.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testing.proxy import ROOT, TEST_CONFIG, ProxyProcess, start_proxy

__all__ = ["ROOT", "TEST_CONFIG", "InProcessProxy", "ProxyProcess", "start_proxy"]


@pytest.fixture(scope="session")
def proxy_factory(pg_dsn: str) -> Iterator[Callable[..., ProxyProcess]]:
    started: list[ProxyProcess] = []

    def factory(pool_mode: str = "session", upstream: str | None = None, **overrides: Any) -> ProxyProcess:
        p = start_proxy(upstream or pg_dsn, pool_mode, **overrides)
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop()
        shutil.rmtree(p.log_path.parent, ignore_errors=True)


@pytest.fixture
def own_proxy(proxy_factory: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """proxy_factory whose proxies stop when the test ends, before the upstreams they hold."""
    mine: list[Any] = []

    def start(**overrides: Any) -> Any:
        mine.append(proxy_factory(**overrides))
        return mine[-1]

    yield start
    for started in mine:
        started.stop()


@pytest.fixture(scope="session")
def proxy(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("session")


@pytest.fixture(scope="session")
def proxy_tx(proxy_factory: Callable[..., ProxyProcess]) -> ProxyProcess:
    return proxy_factory("transaction")


@pytest.fixture(scope="session")
def proxy_dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn()


@pytest.fixture(scope="session")
def proxy_tx_dsn(proxy_tx: ProxyProcess) -> str:
    return proxy_tx.dsn()


class InProcessProxy:
    """The real ProxyServer on its own event loop thread, for tests that pass it a handler.

    The subprocess (`proxy_factory`) is what users run; this one exists so a test can
    give the proxy a deterministic StatementHandler and read `snapshot()` directly.
    """

    def __init__(self, upstream: str, pool_mode: str, handler: Any, **overrides: Any) -> None:
        import asyncio
        import threading

        import uvloop

        from proxy.app import ProxyServer
        from proxy.config import load

        values = {"listen": "127.0.0.1:0", "upstream": upstream, "pool_mode": pool_mode, **overrides}
        self.config = load(TEST_CONFIG, values, environ={})
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ProxyServer(self.config, upstream, handler)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        host, port = self.server.address.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def dsn(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@{self.host}:{self.port}/{database}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the proxy's loop (snapshot and the like are not thread-safe)."""
        import asyncio

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def inprocess_proxy_factory(pg_dsn: str) -> Iterator[Callable[..., InProcessProxy]]:
    started: list[InProcessProxy] = []

    def factory(handler: Any, pool_mode: str = "session", **overrides: Any) -> InProcessProxy:
        p = InProcessProxy(pg_dsn, pool_mode, handler, **overrides)
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop()
