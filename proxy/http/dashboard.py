"""The dashboard's plumbing: HTTP basic auth against the proxy's users, queries as that user.

Every query a page runs goes through the proxy's own listening port, connected with the
credentials the browser sent (psycopg, async, on the proxy's loop): the proxy authenticates
them as it does any client, and Postgres's privileges decide what the user may read or
change. A failed login is a 401 asking for basic auth again. `page` wraps the HTML in the
shared layout; the stylesheet is package data (`proxy/http/static`), so nothing comes from
a CDN. The pages themselves are in `proxy.http.pages`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Sequence
from html import escape
from typing import Any

import psycopg
import psycopg.sql
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from proxy.http.common import state_of

NAV = (("projects", "Projects"), ("loaded", "Loaded models"), ("snapshots", "Snapshots"),
       ("notebook", "SQL notebook"), ("upload", "Upload data"))


class Unauthorized(Exception):
    pass


def credentials(request: Request) -> tuple[str, str]:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized
    try:
        user, _, password = base64.b64decode(value.strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized from None
    if not user:
        raise Unauthorized
    return user, password


@contextlib.asynccontextmanager
async def connect(request: Request) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A connection through this proxy as the browser's user (401 when the proxy refuses them)."""
    user, password = credentials(request)
    host, port = state_of(request).server.address.rsplit(":", 1)
    dbname = request.query_params.get("db", "postgres")
    try:
        conn = await psycopg.AsyncConnection.connect(host=host, port=int(port), user=user, password=password,
                                                     dbname=dbname, autocommit=True,
                                                     application_name="pgml-proxy dashboard")
    except psycopg.OperationalError as exc:
        if "authentication" in str(exc) or "password" in str(exc):
            raise Unauthorized from None
        raise
    try:
        yield conn
    finally:
        await conn.close()


async def rows(conn: psycopg.AsyncConnection[Any], query: str | psycopg.sql.Composable,
               params: Sequence[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
    async with conn.cursor() as cur:
        await cur.execute(query, params)  # type: ignore[arg-type]
        names = [d.name for d in cur.description or []]
        return names, list(await cur.fetchall()) if cur.description else []


def table(names: Sequence[str], data: Sequence[Sequence[Any]], css: str = "") -> str:
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in data)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def cell(value: Any) -> str:
    """A value as text; floats in full (repr) so they read the same as in SQL clients."""
    if isinstance(value, str) and value.startswith("<a href="):
        return value  # a link built by a page (its text escaped there)
    if isinstance(value, float):
        return repr(value)
    return escape("" if value is None else str(value))


def link(href: str, text: Any) -> str:
    return f'<a href="{escape(href)}">{escape(str(text))}</a>'


def page(title: str, body: str, refresh: int = 0) -> HTMLResponse:
    nav = "".join(link(f"/dashboard/{path}", label) for path, label in NAV)
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return HTMLResponse(
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)} · pgml-proxy</title>{meta}'
        '<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>'
        f"<body><nav>{nav}</nav><main><h1>{escape(title)}</h1>{body}</main></body></html>")


def guarded(handler: Any) -> Any:
    """Route wrapper: no or wrong credentials ask for basic auth; SQL errors show on the page."""

    async def route(request: Request) -> Response:
        try:
            response: Response = await handler(request)
            return response
        except Unauthorized:
            return Response("authentication required", 401,
                            {"WWW-Authenticate": 'Basic realm="pgml-proxy", charset="UTF-8"'})
        except psycopg.Error as exc:
            return page("Error", f'<p class="error">{escape(str(exc))}</p>')

    route.__name__ = handler.__name__
    return route
