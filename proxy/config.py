"""Reading the settings tree: config.toml, ``PGML_PROXY_*`` variables and flags.

Values come from, in rising priority: the defaults (declared with their validation in
`core/settings.py`), `config.toml` (or --config), ``PGML_PROXY_*`` environment variables,
and command-line flags. `load` validates the whole tree (`[proxy]`, `[runtime]`,
`[runtime.tabular]`, `[planner]`) at start-up, on RELOAD and on SIGHUP, raising
`ConfigError` that names the bad key by its full dotted name.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.settings import CLIENT_AUTH_METHODS, POOL_MODES, Config

__all__ = ["CLIENT_AUTH_METHODS", "POOL_MODES", "Config", "load"]

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
    try:
        return _load(path, overrides, environ)
    except ConfigError as exc:
        # [proxy]'s keys are flat in the object (they are flags and PGML_PROXY_* variables too);
        # the error names them by their full dotted name, as [runtime] and [planner] name theirs.
        if exc.key in _FIELDS and exc.key not in ("runtime", "planner", "http"):
            raise ConfigError(f"proxy.{exc.key}", exc.problem) from None
        raise


def _load(
    path: str | os.PathLike[str] | None,
    overrides: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None,
) -> Config:
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
        # [proxy] holds the proxy's own keys; [runtime], [planner] and [http] are sections of their own.
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
        if raw is not None and name not in ("runtime", "planner", "http", "users"):
            values[name] = _coerce(name, raw)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(key, "unknown key")
        values[key] = _coerce(key, value)
    return replace(Config(), **values).validate()
