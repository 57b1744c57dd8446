"""Errors with their SQLSTATEs: the one module proxy/, planner/ and runtime/ import them from.

Every SQLSTATE of Postgres is a class (generated from errcodes.txt into core/sqlstates.py,
named as psycopg names them). This module adds what Postgres does not define: the
severity a few codes always carry when the proxy raises them (FATAL: the connection ends),
the ML-side `UndefinedModel`, and `ConfigError` for configuration (never sent to a client).
Peer misbehaviour on the wire is `ProtocolViolation` (08P01); misuse of our own API is a
plain Python exception.
"""

from __future__ import annotations

from core.pgerror import FIELD_NAMES as FIELD_NAMES
from core.pgerror import PgError as PgError
from core.pgerror import lookup as lookup
from core.sqlstates import *  # noqa: F403  (the generated classes are this module's API)
from core.sqlstates import (
    AdminShutdown,
    InvalidAuthorizationSpecification,
    InvalidCatalogName,
    InvalidPassword,
    ProtocolViolation,
    TooManyConnections,
    UndefinedObject,
)

# Codes the proxy only ever raises while ending a connection (as Postgres does for them).
for _fatal in (
    ProtocolViolation,
    InvalidAuthorizationSpecification,
    InvalidPassword,
    InvalidCatalogName,
    TooManyConnections,
    AdminShutdown,
):
    _fatal.severity = "FATAL"


class UndefinedModel(UndefinedObject):
    """A model or project that cannot be found (42704): names it and where it was looked for."""


class ConfigError(ValueError):
    """A bad configuration value, found at start-up or on reload; names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key {key!r}: {problem}")
        self.key = key
        self.problem = problem
