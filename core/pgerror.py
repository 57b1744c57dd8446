"""The base of every error that travels to a client as an ErrorResponse.

`PgError` knows its SQLSTATE and registers each subclass under it (the first class
declared for a code is its canonical one), `lookup` maps a code to its class, and
`PgError.fields` gives the ErrorResponse fields (S, V, C, M and the optional ones).
The classes themselves are generated (core/sqlstates.py); core/errors.py is the module
everyone imports.
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
