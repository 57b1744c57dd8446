"""The `pgml-proxy` command: flags, configuration, embedded Postgres, runtime, signals.

Owns the process lifecycle: parse flags into `proxy.config.load` overrides, start the
embedded Postgres when no upstream is given, build the runtime and the planner handler
(a failure in either stops the start), start the ProxyServer and metrics, and handle
SIGINT (drain), SIGTERM (stop) and SIGHUP (reload; a bad config keeps the old one and
logs the key).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import resource
import signal
import sys
from typing import TYPE_CHECKING, Any

import uvloop

from core.errors import ConfigError
from core.interfaces import StatementHandler
from core.settings import HttpSettings
from proxy.config import Config, load

if TYPE_CHECKING:
    from runtime import Runtime

log = logging.getLogger("pgml_proxy")

# OpenMP's threads (XGBoost's predict on every core, torch) wait by spinning unless told
# otherwise, and a spinning thread takes the core the event loop and the upstream need: a
# 100,000-row XGBoost predict went from 257,000 to 290,000 rows/s on this 2-core machine with
# them sleeping instead; MiniLM on torch did not change. Read once, when OpenMP starts; the
# environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgml-proxy",
        description="PostgresML's SQL API (pgml.embed, pgml.transform, pgml.train, pgml.predict, ...) "
        "as a Postgres wire-protocol proxy in front of any Postgres. Every flag can also be set "
        "in the config file or with a PGML_PROXY_<KEY> environment variable; flags win.",
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="where clients connect (default 127.0.0.1:6432)")
    p.add_argument("--upstream", metavar="DSN",
                   help="the Postgres to serve, as a libpq URL or key=value string; "
                   "empty: start the embedded Postgres in --data-dir")
    p.add_argument("--replica", metavar="DSN", action="append",
                   help="a read replica (repeatable); reads go there, writes to the primary, "
                   "roles found by pg_is_in_recovery()")
    p.add_argument("--pool-mode", choices=("session", "transaction"),
                   help="session: a server connection per client for its whole session (default); "
                   "transaction: shared between transactions")
    p.add_argument("--config", metavar="PATH",
                   help="TOML config file (default $PGML_PROXY_CONFIG or ./config.toml when present)")
    p.add_argument("--data-dir", metavar="PATH",
                   help="data directory of the embedded Postgres (default ./pgml-data)")
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--http-listen", metavar="HOST:PORT",
                   help="serve the OpenAI-compatible API and /metrics over HTTP here "
                   "(the [http] listen key; default off)")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"listen": args.listen, "upstream": args.upstream, "pool_mode": args.pool_mode,
            "data_dir": args.data_dir, "log_level": args.log_level,
            "replicas": tuple(args.replica) if args.replica else None}


def _load(path: str | None, overrides: dict[str, Any], http_listen: str | None) -> Config:
    """`load`, with --http-listen put into the [http] section (a flag for one nested key)."""
    config = load(path, overrides)
    if http_listen is None:
        return config
    return dataclasses.replace(config, http={**config.http, "listen": http_listen}).validate()


async def _build_handler(config: Config, upstream: str) -> tuple[Runtime, StatementHandler]:
    """The runtime (started: its migrations run) and the planner's handler in front of it.

    Imported here rather than at the top so `pgml-proxy --help` and a bad config answer at
    once, without loading the model libraries. Any failure, an import included, stops the
    start: a proxy without its runtime would answer pgml statements with errors for nothing.
    """
    import planner
    from runtime import Runtime

    runtime = Runtime(config.runtime, upstream)
    await runtime.start()
    return runtime, planner.build_handler(runtime, config.planner)


def raise_open_files_limit(config: Config) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit and log it; returns the limit.

    Every client is a socket and so is every server connection: a soft limit of 1024 (a common
    default) would refuse clients long before max_client_connections. A limit still too low
    for max_client_connections plus the pools is logged as a warning, not refused: the limit
    may be raised outside, and the proxy answers the clients it can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one on Linux (fs.nr_open bounds it).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, exc)
            target = soft
    # A client, its server connection, the runtime's pool, models and the listener.
    needed = 2 * config.max_client_connections + 256
    log.info("open files limit %d (soft was %d, hard %d); max_client_connections %d",
             target, soft, hard, config.max_client_connections)
    if target < needed:
        log.warning("the open files limit %d is below what max_client_connections %d may need (%d): "
                    "raise `ulimit -n`", target, config.max_client_connections, needed)
    return target


async def serve(config: Config, config_path: str | None, overrides: dict[str, Any],
                http_listen: str | None = None) -> int:
    from proxy.app import ProxyServer

    raise_open_files_limit(config)
    embedded = None
    upstream = config.upstream
    if not upstream:
        from proxy.embedded import EmbeddedPostgres

        embedded = EmbeddedPostgres(config.data_dir)
        upstream = await asyncio.to_thread(embedded.start)
    from proxy.replicas import runtime_dsn

    # With replicas the runtime's own connections find the primary (registry writes, LISTEN).
    runtime, handler = await _build_handler(config, runtime_dsn(upstream, config.replicas))
    server = ProxyServer(config, upstream, handler)
    server.load_config = lambda: _load(config_path, overrides, http_listen)
    server.runtime = runtime
    await server.start()
    if config.metrics_port:
        from proxy import metrics

        metrics.start(config, server)
    http = None
    http_settings = HttpSettings.from_mapping(config.http)
    if http_settings.listen:
        from proxy import http as http_listener

        http = await http_listener.start(http_settings, server)
    print(f"pgml-proxy ready on {server.address}", file=sys.stderr, flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def drain() -> None:
        log.info("SIGINT: draining (up to %.0f s)", server.config.shutdown_timeout)
        if http is not None:
            http.drain()
        await server.drain(server.config.shutdown_timeout)
        done.set()

    async def stop() -> None:
        await server.stop()
        done.set()

    def reload() -> None:
        try:
            new = server.load_config() if server.load_config else _load(config_path, overrides, http_listen)
        except ConfigError as exc:
            log.error("reload failed, keeping the old configuration: %s (key %s)", exc, exc.key)
            return
        server.reload(new)

    def later(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)

    loop.add_signal_handler(signal.SIGINT, lambda: later(drain()))
    loop.add_signal_handler(signal.SIGTERM, lambda: later(stop()))
    loop.add_signal_handler(signal.SIGHUP, reload)
    await done.wait()
    if http is not None:
        await http.close()
    await runtime.close()
    if embedded is not None:
        await asyncio.to_thread(embedded.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["models"]:  # `pgml-proxy models pull|list|remove` (runtime/models_cli.py)
        from runtime import models_cli

        return models_cli.main(argv[1:], lambda path: load(path).runtime)
    args = build_parser().parse_args(argv)
    overrides = _overrides(args)
    try:
        config = _load(args.config, overrides, args.http_listen)
    except ConfigError as exc:
        print(f"pgml-proxy: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # uvloop: a dependency
        rc = int(uvloop.run(serve(config, args.config, overrides, args.http_listen)))
    except ConfigError as exc:
        print(f"pgml-proxy: {exc}", file=sys.stderr)
        return 2
    # `serve` has closed what the proxy opened (clients, pools, the runtime and its workers, the
    # embedded Postgres). What is left is the interpreter's teardown of torch, onnxruntime and
    # their thread pools: 3-4 s with one model loaded, which every restart would wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
