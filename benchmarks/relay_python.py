"""The relay's own Python work per pass-through transaction, with no sockets.

`pgbench -S` through the proxy mixes the relay's Python with socket calls, Postgres and pgbench
on one shared CPU, and its TPS moves by ±20% between rounds on the development machine. This
drives the real `proxy.frontend.Frontend` and `proxy.backend.ServerConn` callbacks (a simple
Query in, its RowDescription, DataRow, CommandComplete and ReadyForQuery back; as `pgbench -M
extended` sends it, the unnamed statement parsed, bound, described and executed in one batch,
with ParseComplete and BindComplete before the same reply; or, as `pgbench -M prepared` sends
it, a prepared statement's Bind, Describe, Execute and Sync, with BindComplete before the same
reply) with transports that only count writes, so what it measures
is the Python of the path alone, in both pool modes: transaction pooling takes a server
connection from the pool and gives it back each time.
On the busy machine each microsecond here is several (caches go to Postgres and pgbench between
reads), so it is a guide for the order of changes, not a figure of speed.

Run: ``.venv/bin/python -m benchmarks.relay_python [--transactions 30000] [--rounds 9]``;
writes benchmarks/results/relay-python.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import time
from dataclasses import replace
from typing import Any

from benchmarks.common import machine_info, markdown_table, median, write_results
from core.settings import Config
from proxy import messages as m
from proxy.app import ProxyServer
from proxy.backend import ServerConn
from proxy.frontend import Frontend
from proxy.pool import Pool, PoolSettings
from proxy.session import Phase

QUERY = m.Query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;").encode()


# What Postgres answers pgbench -S: one int4 column, one row.
REPLY = (
    m.frame(b"T", struct.pack("!H", 1) + b"abalance\0" + struct.pack("!IHIhih", 16400, 3, 23, 4, -1, 0))
    + m.frame(b"D", struct.pack("!HI", 1, 1) + b"0")
    + m.frame(b"C", b"SELECT 1\0")
    + m.frame(b"Z", b"I")
)


# pgbench -M prepared: the statement is parsed once (ParseComplete, ReadyForQuery), then each
# transaction binds it to the unnamed portal with one text parameter.
PARSE = m.Parse("P0_1", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;", (23,)).encode() + m.SYNC
PARSED = m.frame(b"1", b"") + m.frame(b"Z", b"I")
BATCH = (
    # unnamed portal, P0_1, no parameter formats (text), one parameter, no result formats
    m.frame(b"B", b"\0P0_1\0" + struct.pack("!HHI", 0, 1, 5) + b"12345" + struct.pack("!H", 0))
    + m.frame(b"D", b"P\0")
    + m.frame(b"E", b"\0" + struct.pack("!I", 0))
    + m.SYNC
)
BATCH_REPLY = m.frame(b"2", b"") + REPLY
# pgbench -M extended: each transaction parses the statement again, unnamed, in its batch.
EXTENDED = (
    m.Parse("", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;", (23,)).encode()
    + m.frame(b"B", b"\0\0" + struct.pack("!HHI", 0, 1, 5) + b"12345" + struct.pack("!H", 0))
    + m.frame(b"D", b"P\0")
    + m.frame(b"E", b"\0" + struct.pack("!I", 0))
    + m.SYNC
)
EXTENDED_REPLY = m.frame(b"1", b"") + BATCH_REPLY


class _Transport:
    """Counts writes; everything else a transport is asked is a no-op."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 5432) if name == "peername" else None

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def close(self) -> None:
        return None


def _client(mode: str) -> tuple[Frontend, ServerConn]:
    """A logged-in client and the one server connection of its pool (attached in session mode)."""
    app = ProxyServer(replace(Config(), pool_mode=mode), "postgresql://postgres@127.0.0.1:5432/postgres")
    pool = Pool("postgres", "postgres", None, app.target, PoolSettings(40, 5.0, 600.0, "", mode))
    fe = Frontend(app)
    fe.connection_made(_Transport())  # type: ignore[arg-type]
    fe.s.phase = Phase.READY
    fe.pool = pool
    fe.set_want({"application_name": "pgbench", "client_encoding": "UTF8"})
    srv = ServerConn("postgres", "postgres")
    srv.connection_made(_Transport())  # type: ignore[arg-type]
    srv.internal = False
    srv.params = dict(fe.want)
    pool.idle.append(srv)
    if mode == "session":
        conn = pool.try_acquire()
        assert conn is srv
        fe._attach(srv)
    return fe, srv


def _per_transaction(mode: str, protocol: str, n: int) -> float:
    """µs of the relay's Python per transaction, over `n` after a warm-up."""
    fe, srv = _client(mode)
    sent, answer = {"simple": (QUERY, REPLY), "extended": (EXTENDED, EXTENDED_REPLY),
                    "prepared": (BATCH, BATCH_REPLY)}[protocol]
    if protocol == "prepared":
        fe.data_received(PARSE)
        srv.data_received(PARSED)

    def one() -> None:
        fe.data_received(sent)
        srv.data_received(answer)

    for _ in range(1000):
        one()
    assert fe.server is (srv if mode == "session" else None), "the server connection went astray"
    client = fe.transport
    assert isinstance(client, _Transport) and client.writes >= 1000, "replies did not reach the client"
    start = time.perf_counter()
    for _ in range(n):
        one()
    return (time.perf_counter() - start) / n * 1e6


async def _measure(n: int, rounds: int) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {
        f"{mode} {protocol}": []
        for protocol in ("simple", "extended", "prepared")
        for mode in ("session", "transaction")
    }
    for _ in range(rounds):  # interleaved, so a slow moment costs every target alike
        for target, values in runs.items():
            mode, protocol = target.split()
            values.append(_per_transaction(mode, protocol, n))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=30000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    runs = asyncio.run(_measure(args.transactions, args.rounds))
    info = machine_info()
    rows = [[mode, min(v), median(v), max(v)] for mode, v in runs.items()]
    md = (
        f"# The relay's Python per pass-through transaction, no sockets ({args.transactions} transactions, "
        f"{args.rounds} interleaved rounds)\n\nMachine: {info['cpu']}, {info['cpus']} CPUs; load average "
        f"{load:.1f} at the start. Command: `.venv/bin/python -m benchmarks.relay_python --transactions "
        f"{args.transactions} --rounds {args.rounds}`.\n\n"
        + markdown_table(["pool mode, protocol", "µs / tx (min)", "µs / tx (median)", "µs / tx (max)"], rows)
    )
    write_results("relay-python", {"machine": info, "args": vars(args), "loadavg": load, "runs": runs}, md)


if __name__ == "__main__":
    main()
