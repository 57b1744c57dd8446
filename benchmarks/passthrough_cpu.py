"""CPU per pass-through transaction: the proxy beside PgBouncer and a bare uvloop relay.

On a shared 2-core machine the TPS of `pgbench -S` moves with every other process, but the CPU
a relay spends per transaction (user and system time from /proc over a run, divided by the
transactions pgbench counted) changes far less, and says where a relay's cost lies: system
time is the socket calls every relay makes (the same count here: two reads and two writes a
transaction, checked with strace), user time is its own work. benchmarks/bare_relay.py is the
floor of a Python relay on uvloop: a byte pump with no protocol awareness.

Run: ``.venv/bin/python -m benchmarks.passthrough_cpu [--duration 5] [--rounds 2] [--clients 8]
[--protocol simple|extended|prepared]``; writes benchmarks/results/passthrough-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, markdown_table, median, write_results
from benchmarks.passthrough import Target, _wait_ready, pgbench, pgbench_targets
from testing.postgres import free_port

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> tuple[float, float]:
    """User and system seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def _bare_relay(upstream_port: int) -> Target:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bare_relay", str(port), str(upstream_port)],
                            cwd=Path(__file__).resolve().parent.parent)
    target = Target("bare uvloop relay", f"postgresql://postgres@127.0.0.1:{port}/postgres", proc)
    _wait_ready(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--protocol", choices=["simple", "extended", "prepared"], default="simple")
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    with pgbench_targets(10, args.protocol) as (pg, targets):
        targets.insert(0, _bare_relay(pg.port))
        for target in targets:  # warm: connections opened, caches filled
            pgbench(pg, target.dsn, args.clients, 2, args.protocol)
        runs: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for target in targets:
                assert target.proc is not None
                user0, sys0 = _cpu(target.proc.pid)
                start = time.monotonic()
                result = pgbench(pg, target.dsn, args.clients, args.duration, args.protocol)
                user1, sys1 = _cpu(target.proc.pid)
                wall = time.monotonic() - start
                n = max(result["tps"] * args.duration, 1.0)
                runs.setdefault(target.name, []).append({
                    "tps": result["tps"], "user_us": 1e6 * (user1 - user0) / n,
                    "sys_us": 1e6 * (sys1 - sys0) / n, "cores": (user1 - user0 + sys1 - sys0) / wall})
                print(f"{target.name:24} {runs[target.name][-1]}", flush=True)
        rows: list[dict[str, Any]] = []
        for name, values in runs.items():
            rows.append({"target": name, "tps": median([v["tps"] for v in values]),
                         "user_us": median([v["user_us"] for v in values]),
                         "sys_us": median([v["sys_us"] for v in values]),
                         "cores": median([v["cores"] for v in values])})
        load_end = os.getloadavg()
        info = machine_info(pgbouncer=["pgbouncer", "--version"],
                            postgres=[str(pg.bin_dir / "postgres"), "--version"])
        table = markdown_table(
            ["target", "tps (median)", "user µs / tx", "system µs / tx", "CPU µs / tx", "cores busy"],
            [[r["target"], r["tps"], r["user_us"], r["sys_us"], r["user_us"] + r["sys_us"], r["cores"]]
             for r in rows])
        md = (f"# CPU per pass-through transaction: pgbench -S -M {args.protocol} -c {args.clients} "
              f"({args.duration} s runs, {args.rounds} rounds, medians)\n\nMachine: {info['cpu']}, "
              f"{info['cpus']} CPUs; {info['pgbouncer']}; {info['postgres']}; load average "
              f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end. Command: "
              f"`.venv/bin/python -m benchmarks.passthrough_cpu --duration {args.duration} --rounds "
              f"{args.rounds} --clients {args.clients} --protocol {args.protocol}`.\n\n{table}\n")
        name = "passthrough-cpu" if args.protocol == "simple" else f"passthrough-cpu-{args.protocol}"
        write_results(name, {"machine": info, "args": vars(args), "loadavg": [load_start, load_end],
                             "runs": runs, "results": rows}, md)


if __name__ == "__main__":
    main()
