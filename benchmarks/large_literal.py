"""A `pgml.predict` whose features are a huge ARRAY[...] literal in the SQL text, against the same
array sent as a bound parameter: wall time and the proxy's peak RSS (VmHWM).

Run: ``.venv/bin/python -m benchmarks.large_literal [--n 1000000] [--root DIR ...]``.
Each `--root` is a checkout whose proxy is measured (default: this one), so a before/after
pair runs in one session: ``--root /path/to/old --root .``. The model is a 4-feature iris
classifier, so the predict ends in 22023 (wrong length) after the literal has been read:
what is measured is the reading. Figures go to ``benchmarks/results/large_literal.{json,md}``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import machine_info, markdown_table, write_results
from testing.postgres import free_port, start_postgres

REPO = Path(__file__).resolve().parent.parent


def _start_proxy(root: Path, upstream: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "proxy.main",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream,
        "--config",
        str(REPO / "tests" / "config.test.toml"),
    ]
    proc = subprocess.Popen(cmd, cwd=root, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "pgml-proxy ready on" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.2)
    return proc, port


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _timed(dsn: str, sql: str, params: Any = None) -> tuple[float, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        start = time.perf_counter()
        try:
            conn.execute(sql, params)
            outcome = "ok"
        except psycopg.Error as exc:
            outcome = f"{exc.sqlstate}: {str(exc)[:70]}"
        return time.perf_counter() - start, outcome


def measure(root: Path, upstream: str, n: int, work: Path) -> list[list[Any]]:
    proc, port = _start_proxy(root, upstream, work / f"proxy-{abs(hash(root))}.log")
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _timed(dsn, "SELECT pgml.predict('iris', ARRAY[1, 2, 3, 4])")  # model loaded, caches warm
        values = [1.5] * n
        param_s, param_out = _timed(dsn, "SELECT pgml.predict('iris', %s::real[])", (values,))
        after_param = _peak_rss_mib(proc.pid)
        literal = "SELECT pgml.predict('iris', ARRAY[" + ",".join(map(str, values)) + "])"
        literal_s, literal_out = _timed(dsn, literal)
        after_literal = _peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return [
        [str(root), "bound parameter", param_s, after_param, param_out],
        [str(root), "literal in SQL text", literal_s, after_literal, literal_out],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--root", type=Path, action="append")
    args = parser.parse_args()
    roots = [r.resolve() for r in (args.root or [REPO])]
    work = Path(tempfile.mkdtemp(prefix="pgml-bench-literal-"))
    work.chmod(0o755)
    server = start_postgres(work)
    try:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        proc, port = _start_proxy(REPO, server.dsn, work / "setup.log")
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as c:
            c.execute("SELECT * FROM pgml.load_dataset('iris')")
            c.execute("SELECT * FROM pgml.train('iris', 'classification', 'pgml.iris', 'target')")
        proc.terminate()
        proc.wait(30)
        rows = [row for root in roots for row in measure(root, server.dsn, args.n, work)]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    headers = ["proxy checkout", "features sent as", "seconds", "proxy peak RSS MiB", "answer"]
    md = f"# pgml.predict with a {args.n:,}-element features array\n\n" + markdown_table(headers, rows)
    write_results("large_literal", {"n": args.n, "rows": rows, "machine": machine_info()}, md)


if __name__ == "__main__":
    main()
