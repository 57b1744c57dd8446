"""The real `pgml-proxy` CLI as a subprocess, for tests and benchmarks.

`start_proxy(upstream, pool_mode, config=None, **overrides)` starts `python -m proxy.main`
on a free port (config from tests/config.test.toml unless given, overrides as PGML_PROXY_*
variables), waits until it accepts, and returns a `ProxyProcess` (host, port,
dsn(database=, user=), pid, log(), wait_log(text), stop()). tests/fix_proxy.py makes pytest fixtures of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testing.postgres import free_port

ROOT = Path(__file__).resolve().parent.parent
# The test suite's config (pool sizes for ~32 clients, short timeouts); benchmarks use it too.
TEST_CONFIG = ROOT / "tests" / "config.test.toml"


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

    def wait_log(self, text: str, timeout: float = 60) -> str:
        """The log once it holds `text` (what background work writes when it ends), or as it is
        after `timeout` seconds; the caller asserts."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return log

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
