"""Run asyncpg's own published test suite against a given Postgres address; write per-test outcomes.

asyncpg's suite (tests/ of its sdist) points itself at an existing server when PGHOST is set
(asyncpg._testbase uses `cluster.RunningCluster`, which reads PGHOST/PGPORT/PGUSER/PGDATABASE).
The sdist of the *installed* asyncpg version is fetched once with `pip download` into
.cache/asyncpg-suite/ and its tests/ are copied beside an empty pytest ini, so that the installed
(compiled) asyncpg is the one imported and this project's pytest configuration stays out of it.

    python tests/drivers/run_suite.py --host 127.0.0.1 --port 5432 --out out.json [--subset ci|all]

The JSON holds the target, the counts per outcome and {test id: passed|failed|error|skipped}.
`--subset ci` runs CI_FILES only (a fixed, bounded part); `all` runs every test file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "asyncpg-suite"

# Bounded for CI (about a minute per target here): simple and extended query, prepared statements
# and their cache, cursors, transactions, errors. COPY, listeners, cancellation, timeouts, pools,
# codecs and connect run in the full suite (`--subset all`).
CI_FILES = ("test_execute.py", "test_prepare.py", "test_cursor.py", "test_transaction.py",
            "test_exceptions.py")
# Checks of asyncpg's own source tree and packaging, not of a server: never run.
EXCLUDED = ("test__sourcecode.py", "test__environment.py", "test_subinterpreters.py")


def suite_dir() -> Path:
    """The tests/ folder of the installed asyncpg's sdist, downloaded and unpacked once."""
    ver = version("asyncpg")
    tests = CACHE / f"asyncpg-{ver}" / "tests"
    if tests.is_dir():
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"asyncpg-{ver}.tar.gz"
    if not sdist.exists():
        # --no-build-isolation: pip only reads the sdist's metadata; nothing is built or installed.
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "asyncpg",
                        "--no-build-isolation", f"asyncpg=={ver}", "-d", str(CACHE)], check=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"asyncpg-{ver}/tests/")]
        tar.extractall(CACHE, members=members, filter="data")
    return tests


def outcomes(junit: Path) -> tuple[dict[str, str], dict[str, float]]:
    """({class::test: outcome}, {class::test: seconds}) from pytest's JUnit XML."""
    result: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        # a case without a class is pytest's report of a crash or collection error, not a test
        name = f"{case.get('classname') or 'pytest'}::{case.get('name')}"
        seconds[name] = float(case.get("time") or 0)
        kinds = {child.tag for child in case}
        if "error" in kinds:
            result[name] = "error"
        elif "failure" in kinds:
            result[name] = "failed"
        elif "skipped" in kinds:
            result[name] = "skipped"
        else:
            result[name] = "passed"
    return result, seconds


def run(host: str, port: int, subset: str, timeout: float) -> dict[str, Any]:
    tests = suite_dir()
    files = sorted(p.name for p in tests.glob("test_*.py") if p.name not in EXCLUDED)
    if subset == "ci":
        files = [f for f in files if f in CI_FILES]
    with tempfile.TemporaryDirectory(prefix="asyncpg-suite-") as tmp:
        work = Path(tmp)
        shutil.copytree(tests, work / "tests")
        (work / "pytest.ini").write_text("[pytest]\n")
        junit = work / "junit.xml"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=host, PGPORT=str(port), PGUSER="postgres", PGDATABASE="postgres",
                   PGSSLMODE="disable")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={junit}", "--timeout", "120",
               # native tracebacks: pytest's own formatting of one failure through PgBouncer hit
               # CPython 3.11's "AST constructor recursion depth mismatch" and aborted the run
               "--tb=native", *[f"tests/{f}" for f in files]]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        if not junit.exists():
            raise RuntimeError(f"asyncpg's suite did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        per_test, seconds = outcomes(junit)
    return {"target": f"{host}:{port}", "asyncpg": version("asyncpg"), "subset": subset, "files": files,
            "counts": dict(Counter(per_test.values())), "tests": per_test,
            "seconds": round(sum(seconds.values()), 1), "returncode": proc.returncode,
            "output_tail": proc.stdout[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--subset", choices=("ci", "all"), default="ci")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    report = run(args.host, args.port, args.subset, args.timeout)
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(json.dumps(report["counts"]))


if __name__ == "__main__":
    main()
