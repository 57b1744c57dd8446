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

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fix_postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
TEST_CONFIG = Path(__file__).resolve().parent / "config.test.toml"


@dataclass
class ProxyProcess:
    host: str
    port: int
    upstream: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    pool_mode: str = "session"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def dsn(self, database: str = "postgres", user: str = "postgres", **params: str) -> str:
        extra = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{user}@{self.host}:{self.port}/{database}" + (f"?{extra}" if extra else "")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def _wait_ready(p: ProxyProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise RuntimeError(f"pgml-proxy exited with {p.proc.returncode}:\n{p.log()[-4000:]}")
        if "pgml-proxy ready on" in p.log():
            with socket.socket() as s:
                if s.connect_ex((p.host, p.port)) == 0:
                    return
        time.sleep(0.1)
    p.stop(signal.SIGKILL)
    raise RuntimeError(f"pgml-proxy did not start within {timeout} s:\n{p.log()[-4000:]}")


def start_proxy(upstream: str, pool_mode: str = "session", config: Path | None = None,
                environ: dict[str, str] | None = None, **overrides: Any) -> ProxyProcess:
    """Start `pgml-proxy` (the installed console script's module) and wait until it accepts.

    The proxy runs offline unless `environ` says otherwise (the hub tests set HF_HUB_OFFLINE=0).
    """
    port = free_port()
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(environ or {})})
    for key, value in overrides.items():
        env["PGML_PROXY_" + key.upper()] = str(value)
    logdir = Path(tempfile.mkdtemp(prefix="pgml-proxy-test-"))
    log_path = logdir / "proxy.log"
    cmd = [sys.executable, "-m", "proxy.main", "--listen", f"127.0.0.1:{port}", "--upstream", upstream,
           "--pool-mode", pool_mode, "--config", str(config or TEST_CONFIG)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    p = ProxyProcess("127.0.0.1", port, upstream, proc, log_path, env, pool_mode)
    _wait_ready(p)
    return p


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
