"""The one typed configuration object, and the only place defaults live.

Values come from, in rising priority: the defaults below, `config.toml` (or --config),
``PGML_PROXY_*`` environment variables, and command-line flags. `load` validates
everything at start-up and on SIGHUP, raising `ConfigError` that names the bad key.
The `[runtime]` and `[planner]` sections belong to runtime/ and planner/: they are kept
as mappings here and validated by their owners (`runtime.config.RuntimeConfig`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from core.errors import ConfigError

POOL_MODES = ("session", "transaction")
CLIENT_AUTH_METHODS = ("trust", "cleartext", "md5", "scram-sha-256", "passthrough")


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:6432"
    # libpq URL or key=value string; empty means: start the embedded Postgres in data_dir.
    upstream: str = ""
    pool_mode: str = "session"
    data_dir: str = "./pgml-data"
    # Server connections per (database, user) pool, and how long a client waits for one.
    pool_size: int = 20
    pool_timeout: float = 5.0
    # Idle server connections older than this are closed.
    server_idle_timeout: float = 600.0
    # How a server connection is reset before it goes back to the pool.
    server_reset_query: str = "DISCARD ALL"
    max_client_connections: int = 1000
    # Largest protocol message accepted from a client (bytes); larger ones are a protocol violation.
    max_message_size: int = 64 * 1024 * 1024
    # Client authentication: trust | cleartext | md5 | scram-sha-256 | passthrough (the upstream checks).
    auth_method: str = "trust"
    # user -> password (plain text or an md5/SCRAM verifier as Postgres stores them).
    users: Mapping[str, str] = field(default_factory=dict)
    # TLS towards clients: both set -> SSLRequest answered 'S'; else 'N'.
    tls_cert: str = ""
    tls_key: str = ""
    # TLS towards the upstream: disable | prefer | require (sslmode in the DSN wins when given).
    upstream_sslmode: str = "prefer"
    admin_users: tuple[str, ...] = ()
    # Prometheus metrics over HTTP; 0 disables.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # SIGINT: how long transactions get to finish before their clients are cut.
    shutdown_timeout: float = 30.0
    log_level: str = "INFO"
    runtime: Mapping[str, Any] = field(default_factory=dict)
    planner: Mapping[str, Any] = field(default_factory=dict)

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def validate(self) -> Config:
        """Return self, or raise ConfigError naming the first bad key."""
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError("listen", f"expected HOST:PORT, got {self.listen!r}")
        if self.pool_mode not in POOL_MODES:
            raise ConfigError("pool_mode", f"expected one of {POOL_MODES}, got {self.pool_mode!r}")
        if self.auth_method not in CLIENT_AUTH_METHODS:
            raise ConfigError(
                "auth_method", f"expected one of {CLIENT_AUTH_METHODS}, got {self.auth_method!r}"
            )
        if self.auth_method in ("cleartext", "md5", "scram-sha-256") and not self.users:
            raise ConfigError("users", f"auth_method {self.auth_method!r} needs at least one user")
        if self.upstream_sslmode not in ("disable", "prefer", "require"):
            raise ConfigError("upstream_sslmode", "expected disable, prefer or require")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert" if not self.tls_cert else "tls_key", "set both tls_cert and tls_key")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise ConfigError(key, f"no such file: {path}")
        for key in ("pool_size", "max_client_connections", "max_message_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, "must be at least 1")
        for key in ("pool_timeout", "server_idle_timeout", "shutdown_timeout"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be positive")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port", "must be a port number (0 disables)")
        return self


_FIELDS = {f.name: f for f in fields(Config)}
ENV_PREFIX = "PGML_PROXY_"


def _coerce(key: str, value: Any) -> Any:
    """Turn TOML/env/CLI values into the field's type, naming the key on failure."""
    default = getattr(Config(), key)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise TypeError("expected a table")
            return dict(value)
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"bad value {value!r}: {exc}") from None


def load(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build and validate the Config from a TOML file, the environment and overrides.

    `path` None means ``$PGML_PROXY_CONFIG`` or ``./config.toml`` when it exists.
    Unknown keys are errors (a typo must not be silently ignored).
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if path is None:
        path = env.get(ENV_PREFIX + "CONFIG") or ("config.toml" if Path("config.toml").is_file() else None)
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("config", f"no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path}: {exc}") from None
        # [proxy] holds the proxy's own keys; [runtime] and [planner] are sections of their own.
        flat = dict(data.get("proxy", {}))
        for key, value in data.items():
            if key in ("proxy",):
                continue
            flat[key] = value
        for key, value in flat.items():
            if key not in _FIELDS:
                raise ConfigError(key, "unknown key")
            values[key] = _coerce(key, value)
    for name in _FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and name not in ("runtime", "planner", "users"):
            values[name] = _coerce(name, raw)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(key, "unknown key")
        values[key] = _coerce(key, value)
    return replace(Config(), **values).validate()
