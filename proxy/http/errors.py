"""Errors of the HTTP API in OpenAI's shape, and the HTTP status of each SQLSTATE class.

`ApiError` is what a handler raises; `from_pg` turns the runtime's `PgError` (the same errors
SQL callers get) into one, so a message reads the same over SQL and HTTP. The body is
`{"error": {"message", "type", "param", "code"}}`, as OpenAI's clients parse it.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from core.errors import PgError

# SQLSTATE (or its class, the first two characters) -> (HTTP status, OpenAI error type, code).
_BY_STATE: dict[str, tuple[int, str, str | None]] = {
    "42704": (404, "invalid_request_error", "model_not_found"),
    "42501": (403, "permission_error", "permission_denied"),
    "28": (401, "authentication_error", "invalid_api_key"),
    "53": (429, "rate_limit_error", "rate_limit_exceeded"),
    "57P": (503, "server_error", "unavailable"),
    "57014": (408, "invalid_request_error", "cancelled"),
    "0A": (400, "invalid_request_error", "unsupported"),
    "22": (400, "invalid_request_error", "invalid_value"),
    "42": (400, "invalid_request_error", None),
    "54": (400, "invalid_request_error", "too_large"),
    "08": (503, "server_error", "upstream_unavailable"),
    "58": (503, "server_error", "unavailable"),
}


class ApiError(Exception):
    """An error answer: status, message and OpenAI's type/param/code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    """A 400 naming the request field that is wrong."""
    return ApiError(400, message, "invalid_request_error", param, code)


def from_pg(exc: PgError, param: str | None = None) -> ApiError:
    """The HTTP answer for a runtime error; our own bugs (class XX) are 500."""
    state = exc.code
    for key in (state, state[:3], state[:2]):
        if key in _BY_STATE:
            status, type_, code = _BY_STATE[key]
            break
    else:
        status, type_, code = 500, "server_error", None
    hint = exc.fields.get("H")
    message = exc.message + (f" ({hint})" if hint else "")
    return ApiError(status, message, type_, param if status in (400, 404) else None, code)
