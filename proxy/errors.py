"""Errors that travel to the client as an ErrorResponse, each with its SQLSTATE.

One module owns them (as psycopg's ``errors``): every class knows its SQLSTATE and
registers itself, `lookup` maps a code to its class, and `PgError.fields` gives the
ErrorResponse fields (S, V, C, M and the optional ones). Peer misbehaviour on the wire
is `ProtocolViolation` (08P01); misuse of our own API is a plain Python exception.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

_REGISTRY: dict[str, type[PgError]] = {}

# ErrorResponse / NoticeResponse field codes (protocol docs, "Error and Notice Message Fields").
FIELD_NAMES: Mapping[str, str] = {
    "S": "severity_localized",
    "V": "severity",
    "C": "sqlstate",
    "M": "message",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internal_position",
    "q": "internal_query",
    "W": "where",
    "s": "schema_name",
    "t": "table_name",
    "c": "column_name",
    "d": "data_type_name",
    "n": "constraint_name",
    "F": "file",
    "L": "line",
    "R": "routine",
}


class PgError(Exception):
    """An error with a SQLSTATE, sent to the client as an ErrorResponse."""

    sqlstate: ClassVar[str] = "XX000"
    severity: ClassVar[str] = "ERROR"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Only the first class declared for a code is its canonical class.
        _REGISTRY.setdefault(cls.sqlstate, cls)

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        extra: dict[str, str] = dict(fields or {})
        if detail is not None:
            extra["D"] = detail
        if hint is not None:
            extra["H"] = hint
        self._extra = extra

    @property
    def code(self) -> str:
        return self._extra.get("C", self.sqlstate)

    @property
    def fields(self) -> dict[str, str]:
        """All ErrorResponse fields, S/V/C/M always present."""
        out = {"S": self.severity, "V": self.severity, "C": self.sqlstate, "M": self.message}
        out.update(self._extra)
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> PgError:
        """Build the registered class for an ErrorResponse received from upstream."""
        klass = _REGISTRY.get(fields.get("C", ""), PgError)
        err = klass(fields.get("M", ""), fields=fields)
        return err


def lookup(sqlstate: str) -> type[PgError]:
    """The class registered for `sqlstate`, or PgError itself."""
    return _REGISTRY.get(sqlstate, PgError)


_REGISTRY["XX000"] = PgError


# Class 08 — connection exception
class ConnectionFailure(PgError):
    sqlstate = "08006"


class ClientCannotConnect(PgError):
    sqlstate = "08001"


class ProtocolViolation(PgError):
    sqlstate = "08P01"
    severity = "FATAL"


# Class 0A — feature not supported
class FeatureNotSupported(PgError):
    sqlstate = "0A000"


# Class 22 — data exception
class DataException(PgError):
    sqlstate = "22000"


class InvalidParameterValue(PgError):
    sqlstate = "22023"


class NullValueNotAllowed(PgError):
    sqlstate = "22004"


class InvalidTextRepresentation(PgError):
    sqlstate = "22P02"


class ArraySubscriptError(PgError):
    sqlstate = "2202E"


# Class 25 / 28 — transaction state, authorization
class InFailedTransaction(PgError):
    sqlstate = "25P02"


class NoActiveSqlTransaction(PgError):
    sqlstate = "25P01"


class InvalidAuthorization(PgError):
    sqlstate = "28000"
    severity = "FATAL"


class InvalidPassword(PgError):
    sqlstate = "28P01"
    severity = "FATAL"


# Class 3D / 42 — catalog and syntax
class InvalidCatalogName(PgError):
    sqlstate = "3D000"
    severity = "FATAL"


class SyntaxError_(PgError):
    sqlstate = "42601"


class UndefinedFunction(PgError):
    sqlstate = "42883"


class InsufficientPrivilege(PgError):
    """Not allowed by configuration (a model outside `runtime.allowed_models`, remote code)."""

    sqlstate = "42501"


class UndefinedTable(PgError):
    sqlstate = "42P01"


class UndefinedObject(PgError):
    sqlstate = "42704"


class DatatypeMismatch(PgError):
    sqlstate = "42804"


class InvalidPreparedStatement(PgError):
    sqlstate = "26000"


class DuplicatePreparedStatement(PgError):
    sqlstate = "42P05"


class InvalidCursorName(PgError):
    sqlstate = "34000"


class DuplicateCursor(PgError):
    sqlstate = "42P03"


# Class 53 — insufficient resources (full queues, pool exhausted)
class InsufficientResources(PgError):
    sqlstate = "53000"


class TooManyConnections(PgError):
    sqlstate = "53300"
    severity = "FATAL"


class OutOfMemory(PgError):
    sqlstate = "53200"


# Class 57 — operator intervention
class QueryCanceled(PgError):
    sqlstate = "57014"


class AdminShutdown(PgError):
    sqlstate = "57P01"
    severity = "FATAL"


# Class 58 / XX — system errors (a model file that is missing, inference that crashed)
class SystemError_(PgError):
    sqlstate = "58000"


class UndefinedFile(PgError):
    sqlstate = "58P01"


class InternalError(PgError):
    sqlstate = "XX000"


# Class 22 / 42 for the ML side: a model or project that does not exist is an undefined object.
class UndefinedModel(PgError):
    """A model or project that cannot be found: names it and where it was looked for."""

    sqlstate = "42704"


class ConfigError(ValueError):
    """A bad configuration value, found at start-up or on reload; names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key {key!r}: {problem}")
        self.key = key
