"""Pass-through speed: `pgbench -S` directly, through pgml-proxy (session and transaction pooling)
and through PgBouncer (same modes), interleaved in one session; medians of the rounds.

Run: ``.venv/bin/python -m benchmarks.passthrough [--duration 10] [--rounds 3] [--clients 8 32]
[--profile]``. It starts its own Postgres (testing/postgres.py), runs ``pgbench -i -s 10``,
starts pgml-proxy with its real CLI and PgBouncer (Debian package ``pgbouncer``) with an
ini written to a temp dir, and writes TPS, latency and ratios (to direct Postgres and to
PgBouncer in the same pool mode) to ``benchmarks/results/passthrough.{json,md}``.
``--profile`` then records the session-mode proxy with py-spy during one more run and
writes the functions where its time goes to ``benchmarks/results/passthrough-profile.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import machine_info, markdown_table, median, write_results
from testing.postgres import PG_USER, PgServer, free_port, start_postgres

POOL_SIZE = 40  # >= the most clients, for pgml-proxy and PgBouncer alike: session mode needs one each
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    name: str
    dsn: str
    proc: subprocess.Popen[bytes] | None = None
    others: tuple[subprocess.Popen[bytes], ...] = ()  # more processes on the same port

    def stop(self) -> None:
        for proc in (self.proc, *self.others):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_ready(target: Target, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for proc in (target.proc, *target.others):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{target.name} exited with {proc.returncode}")
        try:
            with psycopg.connect(target.dsn, connect_timeout=2) as conn:
                if conn.execute("SELECT 1").fetchone() == (1,):
                    return
        except psycopg.Error as exc:
            last = exc
        time.sleep(0.3)
    raise RuntimeError(f"{target.name} not ready in {timeout} s: {last}")


def _proxy_command() -> list[str]:
    script = Path(sys.executable).parent / "pgml-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.main"]


def start_proxy(mode: str, pg: PgServer, work: Path, processes: int = 1) -> Target:
    """pgml-proxy through its console script, fronting `pg`, in pool `mode`; with `processes`
    above 1, that many proxies on one port (`reuse_port`), the kernel spreading the clients."""
    port = free_port()
    env = dict(os.environ, PGML_PROXY_POOL_SIZE=str(POOL_SIZE), PGML_PROXY_LOG_LEVEL="WARNING")
    if processes > 1:
        env["PGML_PROXY_REUSE_PORT"] = "1"
    procs = []
    for k in range(processes):
        log = open(work / f"pgml-proxy-{mode}-{processes}-{k}.log", "wb")
        cmd = [
            *_proxy_command(),
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            pg.dsn,
            "--pool-mode",
            mode,
            "--data-dir",
            str(work / f"data-{mode}"),
        ]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work))
        if k == 0:  # the first creates the pgml schema; the others start once it has
            _wait_ready(Target("", f"postgresql://postgres@127.0.0.1:{port}/postgres", procs[0]))
    name = f"pgml-proxy {mode}" if processes == 1 else f"pgml-proxy x{processes} {mode}"
    target = Target(name, f"postgresql://postgres@127.0.0.1:{port}/postgres", procs[0], tuple(procs[1:]))
    _wait_ready(target)
    return target


def start_pgbouncer(mode: str, pg: PgServer, work: Path) -> Target:
    """PgBouncer in pool `mode` with trust auth, run as the unprivileged Postgres user."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer is missing: apt-get install -y pgbouncer")
    port = free_port()
    home = work / f"pgbouncer-{mode}"
    home.mkdir()
    (home / "userlist.txt").write_text('"postgres" ""\n')
    (home / "pgbouncer.ini").write_text(
        f"[databases]\n* = host=127.0.0.1 port={pg.port}\n\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home}/userlist.txt\npool_mode = {mode}\n"
        f"default_pool_size = {POOL_SIZE}\nmax_client_conn = 500\n"
        f"logfile = {home}/pgbouncer.log\npidfile = {home}/pgbouncer.pid\n"
        "ignore_startup_parameters = extra_float_digits, options\n"
    )
    ids: dict[str, Any] = {}
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        user = pwd.getpwnam(PG_USER)
        for path in (home, *home.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
        ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    proc = subprocess.Popen(
        [binary, str(home / "pgbouncer.ini")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, **ids
    )
    target = Target(f"pgbouncer {mode}", f"postgresql://postgres@127.0.0.1:{port}/postgres", proc)
    _wait_ready(target)
    return target


def pgbench(
    pg: PgServer, dsn: str, clients: int, duration: int, protocol: str = "simple"
) -> dict[str, float]:
    """One `pgbench -S -M protocol` run; returns tps, average latency (ms) and failed transactions."""
    threads = min(clients, 2)
    cmd = [
        str(pg.bin_dir / "pgbench"),
        "-n",
        "-S",
        "-M",
        protocol,
        "-c",
        str(clients),
        "-j",
        str(threads),
        "-T",
        str(duration),
        dsn,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=False)
    text = out.stdout + out.stderr
    tps = re.search(r"tps = ([\d.]+)", text)
    latency = re.search(r"latency average = ([\d.]+) ms", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    if out.returncode != 0 or tps is None or latency is None:
        raise RuntimeError(f"pgbench against {dsn} failed ({out.returncode}):\n{text[-2000:]}")
    return {
        "tps": float(tps.group(1)),
        "latency_ms": float(latency.group(1)),
        "failed": float(failed.group(1)) if failed else 0.0,
    }


Runs = dict[tuple[str, int], list[dict[str, float]]]  # (target, clients) -> one result per round


def _paired(runs: Runs, name: str, base: str, n: int) -> float | None:
    """Median over rounds of this round's tps ratio: robust when the machine's load drifts."""
    if (base, n) not in runs:
        return None
    return median([a["tps"] / b["tps"] for a, b in zip(runs[(name, n)], runs[(base, n)], strict=True)])


def _summary(runs: Runs) -> list[dict[str, Any]]:
    rows = []
    for (name, n), values in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tps = median([v["tps"] for v in values])
        mode = name.split()[-1]
        rows.append(
            {
                "target": name,
                "clients": n,
                "tps": tps,
                "latency_ms": median([v["latency_ms"] for v in values]),
                "failed": sum(v["failed"] for v in values),
                "vs_direct": _paired(runs, name, "postgres direct", n),
                "vs_pgbouncer": None
                if name.startswith("pgbouncer")
                else _paired(runs, name, f"pgbouncer {mode}", n),
                "runs_tps": [v["tps"] for v in values],
            }
        )
    return rows


def profile_proxy(
    pg: PgServer, target: Target, clients: int, duration: int, native: bool = False, protocol: str = "simple"
) -> str:
    """Record `target` with py-spy during one pgbench run; markdown of the top self-time functions.

    `native` adds C frames (uvloop, libc syscalls); py-spy then has to pause the process per
    sample, which slows it, so shares are comparable within one profile only.
    """
    assert target.proc is not None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = Path(tempfile.mkdtemp(prefix="pgml-profile-")) / "stacks.txt"
    mode = ["--native"] if native else ["--nonblocking"]
    rec = subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(target.proc.pid),
            "--duration",
            str(duration),
            "--format",
            "raw",
            *mode,
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result = pgbench(pg, target.dsn, clients, duration, protocol)
    rec.wait(timeout=duration + 60)
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
    rows = [[frame[:100], n, 100.0 * n / total] for frame, n in own.most_common(25)]
    tool = "py-spy --native" if native else "py-spy"
    head = (
        f"{tool} of {target.name}, pgbench -S -M {protocol} -c {clients}, {duration} s: "
        f"{result['tps']:.0f} tps, {total} samples (self time)\n\n"
    )
    return head + markdown_table(["function (file:line)", "samples", "% self"], rows)


@contextlib.contextmanager
def pgbench_targets(
    scale: int, protocol: str, processes: int = 1
) -> Iterator[tuple[PgServer, list[Target]]]:
    """A Postgres with pgbench's tables (`scale`) and, in front of it, pgml-proxy and PgBouncer
    in session and transaction pooling; everything stopped and removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix="pgml-bench-"))
    work.chmod(0o755)
    pg = start_postgres(work / "pg", conf={"max_connections": "300"})
    targets: list[Target] = []
    try:
        subprocess.run([str(pg.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale), pg.dsn],
                       check=True, capture_output=True)
        for mode in ("session", "transaction"):
            targets.append(start_proxy(mode, pg, work))
            if processes > 1:
                targets.append(start_proxy(mode, pg, work, processes))
            if mode == "transaction" and protocol == "prepared":
                # PgBouncer before 1.21 cannot keep protocol-level prepared statements under
                # transaction pooling ("prepared statement P_0 already exists"); pgml-proxy can.
                continue
            targets.append(start_pgbouncer(mode, pg, work))
        yield pg, targets
    finally:
        for target in targets:
            target.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="py-spy the session-mode proxy afterwards")
    parser.add_argument("--native", action="store_true", help="with --profile: include C frames (syscalls)")
    parser.add_argument("--protocol", choices=["simple", "extended", "prepared"], default="simple")
    parser.add_argument("--processes", type=int, default=1,
                        help="also this many pgml-proxy processes sharing one port (reuse_port)")
    args = parser.parse_args(argv)
    # Results of another protocol go to their own files, beside the simple protocol's.
    name = "passthrough" if args.protocol == "simple" else f"passthrough-{args.protocol}"

    load_start = os.getloadavg()
    with pgbench_targets(args.scale, args.protocol, args.processes) as (pg, targets):
        targets.insert(0, Target("postgres direct", pg.dsn))
        runs: Runs = {}
        for round_no in range(args.rounds):
            order = targets[round_no % len(targets) :] + targets[: round_no % len(targets)]
            for clients in args.clients:
                for target in order:
                    result = pgbench(pg, target.dsn, clients, args.duration, args.protocol)
                    runs.setdefault((target.name, clients), []).append(result)
                    print(
                        f"round {round_no + 1} c={clients:<3} {target.name:<24} {result['tps']:>9.0f} tps "
                        f"{result['latency_ms']:.3f} ms",
                        flush=True,
                    )
        rows = _summary(runs)
        info_load_end = os.getloadavg()
        info = machine_info(
            pgbench=[str(pg.bin_dir / "pgbench"), "--version"],
            pgbouncer=["pgbouncer", "--version"],
            postgres=[str(pg.bin_dir / "postgres"), "--version"],
        )
        info["loadavg_start"], info["loadavg_end"] = load_start, info_load_end
        table = markdown_table(
            [
                "target",
                "clients",
                "tps (median)",
                "latency ms",
                "failed",
                "x direct",
                "x PgBouncer",
                "runs (tps)",
            ],
            [
                [
                    r["target"],
                    r["clients"],
                    r["tps"],
                    r["latency_ms"],
                    int(r["failed"]),
                    r["vs_direct"],
                    "" if r["vs_pgbouncer"] is None else r["vs_pgbouncer"],
                    " ".join(f"{t:.0f}" for t in r["runs_tps"]),
                ]
                for r in rows
            ],
        )
        md = (
            f"# pgbench -S -M {args.protocol} pass-through (scale {args.scale}, {args.duration} s runs, "
            f"{args.rounds} interleaved rounds, medians)\n\nMachine: {info['cpu']}, {info['cpus']} CPUs; "
            f"{info['pgbouncer']}; {info['postgres']}; load average {load_start[0]:.1f} at the start, "
            f"{info_load_end[0]:.1f} at the end.\n\nRatios are medians of per-round ratios (the same "
            f"round's direct or PgBouncer run), so load that drifts between rounds cancels out.\n\n"
            f"{table}\n"
        )
        write_results(name, {"machine": info, "args": vars(args), "results": rows}, md)
        if args.profile:
            session = next(t for t in targets if t.name == "pgml-proxy session")
            profile = profile_proxy(pg, session, max(args.clients), args.duration, args.native, args.protocol)
            write_results(f"{name}-profile", {"profile_markdown": profile}, profile)


if __name__ == "__main__":
    main()
