"""Read replicas: `pgbench -S` through pgml-proxy (transaction pooling) with 0, 1 and 2 replicas,
and the cost of routing itself (the same single server with routing on and off).

Run: ``.venv/bin/python -m benchmarks.replicas [--duration 8] [--rounds 3] [--clients 8]``.
It starts a primary and two standbys (testing/replication.py), runs ``pgbench -i``, and
interleaves, per round and protocol (simple, prepared), one run against each proxy:

- ``no routing``: the primary alone, no replicas configured (the baseline);
- ``routing, 1 server``: the same primary listed again as a replica under another host name
  (`localhost`): every statement is classified and routed, the health checks run, and since
  that "replica" reports itself a primary every read lands on the one server. The ratio to
  the baseline is the routing cost (target >= 0.95);
- ``1 replica`` / ``2 replicas``: reads spread over real standbys.

Writes ``benchmarks/results/replicas.{json,md}``: median tps per target, and the median
over rounds of each round's ratio to the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, markdown_table, median, write_results
from benchmarks.passthrough import pgbench
from testing.proxy import ProxyProcess, start_proxy
from testing.replication import replay_caught_up, start_cluster

BASELINE = "no routing"


def _proxies(primary_dsn: str, localhost_dsn: str, standbys: list[str]) -> dict[str, ProxyProcess]:
    replicas = {"routing, 1 server": localhost_dsn, "1 replica": standbys[0],
                "2 replicas": ",".join(standbys)}
    out = {BASELINE: start_proxy(primary_dsn, "transaction", log_level="WARNING", pool_size=40)}
    for name, dsns in replicas.items():
        out[name] = start_proxy(primary_dsn, "transaction", log_level="WARNING", pool_size=40, replicas=dsns)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds per pgbench run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=int, default=5)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="pgml-bench-repl-"))
    work.chmod(0o755)
    cluster = start_cluster(work, standbys=2, conf={"max_connections": "300"})
    proxies: dict[str, ProxyProcess] = {}
    try:
        pg = cluster.primary
        subprocess.run([str(pg.bin_dir / "pgbench"), "-i", "-q", "-s", str(args.scale), pg.dsn],
                       check=True, capture_output=True)
        for standby in cluster.standbys:
            replay_caught_up(pg, standby, timeout=120)
        proxies = _proxies(pg.dsn, f"postgresql://postgres@localhost:{pg.port}/postgres",
                           [s.dsn for s in cluster.standbys])
        runs: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for protocol in ("simple", "prepared"):
                for name, proxy in proxies.items():
                    result = pgbench(pg, proxy.dsn(), args.clients, args.duration, protocol)
                    if result["failed"]:
                        raise RuntimeError(f"{name}: {result['failed']} failed transactions")
                    runs.setdefault((name, protocol), []).append(result["tps"])
    finally:
        for proxy in proxies.values():
            proxy.stop()
            shutil.rmtree(proxy.log_path.parent, ignore_errors=True)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    for (name, protocol), tps in runs.items():
        base = runs[(BASELINE, protocol)]
        rows.append({"target": name, "protocol": protocol, "clients": args.clients, "tps": median(tps),
                     "vs_no_routing": median([a / b for a, b in zip(tps, base, strict=True)]),
                     "runs_tps": tps})
    data = {"machine": machine_info(), "load_before": load_start, "load_after": os.getloadavg(),
            "duration_s": args.duration, "rounds": args.rounds, "scale": args.scale, "results": rows}
    md = (
        f"pgbench -S -c {args.clients}, {args.duration} s x {args.rounds} interleaved rounds, "
        f"transaction pooling; load average before {load_start[0]:.1f}, after {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs (every server, proxy and pgbench share them).\n\n"
        + markdown_table(["target", "protocol", "tps (median)", "x no routing (median of rounds)"],
                         [[r["target"], r["protocol"], round(r["tps"]), round(r["vs_no_routing"], 3)]
                          for r in rows])
    )
    write_results("replicas", data, md)


if __name__ == "__main__":
    main()
