"""Many proxies behind one address (issue 14): three proxies on one upstream behind HAProxy.

The proxies keep no state of their own: the registry is upstream and a deploy reaches every proxy
by NOTIFY. So a model trained through one proxy is served by all of them, through HAProxy and
directly, and a deploy made through one is served by the others within moments. A proxy killed
under load loses only its own clients' statements: clients that reconnect land on the others.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from testing.postgres import free_port
from testing.proxy import ProxyProcess, start_proxy

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy is not installed")
PROJECT = "many_proxies"


class HAProxy:
    """HAProxy (Debian's) in TCP mode, round-robin over `ports`, checking each every 200 ms."""

    def __init__(self, ports: list[int]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pgml-haproxy-"))
        self.port = free_port()
        servers = "\n".join(f"    server p{i} 127.0.0.1:{p} check inter 200 fall 1 rise 2"
                            for i, p in enumerate(ports))
        (self.dir / "haproxy.cfg").write_text(
            "global\n    maxconn 512\n"
            "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 60s\n"
            "    timeout server 60s\n    retries 3\n    option redispatch\n"
            f"frontend pg\n    bind 127.0.0.1:{self.port}\n    default_backend proxies\n"
            f"backend proxies\n    balance roundrobin\n{servers}\n"
        )
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.dir / "haproxy.cfg")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tier(pg_dsn: str) -> Iterator[tuple[list[ProxyProcess], HAProxy]]:
    proxies = [start_proxy(pg_dsn, "transaction") for _ in range(3)]
    balancer = HAProxy([p.port for p in proxies])
    try:
        yield proxies, balancer
    finally:
        balancer.stop()
        for p in proxies:
            p.stop()


def _predict(dsn: str, x: float = 2.0) -> float:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT pgml.predict('{PROJECT}', ARRAY[%s::float8])", (x,)).fetchone()
        assert row is not None
        return float(row[0])


def test_a_model_trained_through_one_proxy_is_served_by_all(
    tier: tuple[list[ProxyProcess], HAProxy],
) -> None:
    proxies, balancer = tier
    with psycopg.connect(proxies[0].dsn(), autocommit=True) as c:
        c.execute("DROP TABLE IF EXISTS many_proxies_data")
        c.execute("CREATE TABLE many_proxies_data AS SELECT g::float8 AS x, (2 * g + 1)::float8 AS y"
                  " FROM generate_series(1, 40) g")
        c.execute(f"SELECT * FROM pgml.train('{PROJECT}', 'regression', 'many_proxies_data', 'y')").fetchall()
    direct = [_predict(p.dsn()) for p in proxies]
    assert direct[0] == pytest.approx(5.0, abs=0.01) and direct == [direct[0]] * 3
    # Through HAProxy: round-robin spreads the connections over the three proxies.
    assert [_predict(balancer.dsn()) for _ in range(6)] == [direct[0]] * 6

    # A deploy through proxy 2 (a model that predicts differently) is served by proxies 1 and 3.
    with psycopg.connect(proxies[1].dsn(), autocommit=True) as c:
        c.execute("UPDATE many_proxies_data SET y = 3 * x")
        c.execute(f"SELECT * FROM pgml.train('{PROJECT}', algorithm => 'ridge', automatic_deploy => false)"
                  ).fetchall()
        start = time.monotonic()
        c.execute(f"SELECT * FROM pgml.deploy('{PROJECT}', 'most_recent')").fetchall()
    new = _predict(proxies[1].dsn())
    assert new != pytest.approx(direct[0], abs=0.01)
    seen: dict[int, float] = {}
    while len(seen) < 2 and time.monotonic() - start < 10:  # generous: NOTIFY takes milliseconds
        for i in (0, 2):
            if i not in seen and _predict(proxies[i].dsn()) == new:
                seen[i] = time.monotonic() - start
        time.sleep(0.05)
    assert set(seen) == {0, 2}, f"not served by every proxy after 10 s: {seen}"
    print(f"deploy served by the other proxies after {max(seen.values()):.3f} s")


def test_a_proxy_killed_under_load_loses_only_its_own_clients(
    tier: tuple[list[ProxyProcess], HAProxy],
) -> None:
    proxies, balancer = tier
    _predict(proxies[0].dsn())  # the model of the test above is deployed
    stop = threading.Event()
    done: list[int] = []
    failed: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                with psycopg.connect(balancer.dsn(), autocommit=True, connect_timeout=5) as c:
                    while not stop.is_set():
                        c.execute(f"SELECT pgml.predict('{PROJECT}', ARRAY[1.0::float8])").fetchone()
                        with lock:
                            done.append(1)
            except psycopg.Error as exc:
                with lock:
                    failed.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for th in threads:
        th.start()
    time.sleep(2)
    before = len(done)
    victim = proxies[2]
    victim.proc.kill()  # SIGKILL: no orderly shutdown
    victim.proc.wait()
    time.sleep(3)
    after_kill = len(done)
    time.sleep(2)
    stop.set()
    for th in threads:
        th.join(timeout=30)
    assert before > 0
    # Only the clients connected to the killed proxy lost their connection (each at most once:
    # HAProxy's check takes it out within ~200 ms, and a reconnect lands on a live proxy).
    assert 1 <= len(failed) <= 6, failed
    assert len(done) > after_kill > before, (before, after_kill, len(done))
    # The survivors still serve, directly and through the balancer.
    assert _predict(proxies[0].dsn(), 1.0) == _predict(balancer.dsn(), 1.0)
