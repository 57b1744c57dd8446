"""The proxy as a user starts it: README's `make run`, on the embedded Postgres in a fresh data dir.

Its config is the test config plus `tests/models.test.toml`, which aliases hub model names to
local models of the same task (tiny random models for mechanics, MiniLM and SmolLM2 where they
fit), plus what the caller adds. Used by the modules that replay what users paste: the README's
SQL (tests/test_readme_examples.py) and PostgresML's SDKs (tests/test_sdks.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from testing.tiny_models import build_all
from tests.fix_postgres import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def make_run(tmp_path_factory: pytest.TempPathFactory, name: str, extra_config: str = "") -> Iterator[str]:
    """Start `make run` on free ports; yields the proxy's DSN once it answers `SELECT 1`."""
    data_dir = tmp_path_factory.mktemp(f"{name}-data")
    data_dir.chmod(0o755)
    build_all(ROOT / ".cache" / "tiny-models")
    base = (ROOT / "tests" / "config.test.toml").read_text().replace("[runtime]\n", "", 1)
    config = data_dir.parent / f"{name}-config.toml"
    config.write_text(base + "\n" + (ROOT / "tests" / "models.test.toml").read_text() + extra_config)
    port = free_port()
    env = dict(os.environ)
    env.update(
        PGML_PROXY_LISTEN=f"127.0.0.1:{port}",
        HTTP_LISTEN=f"127.0.0.1:{free_port()}",  # make run's HTTP listener, off the fixed 8000
        PGML_PROXY_DATA_DIR=str(data_dir),
        PGML_PROXY_CONFIG=str(config),
        HF_HUB_OFFLINE="1",
    )
    log_path = data_dir.parent / f"{name}-proxy.log"
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["make", "-s", "run"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, connect_timeout=5) as conn:
                if conn.execute("SELECT 1").fetchone() == (1,):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"make run did not serve: {log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield dsn
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
