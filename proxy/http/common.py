"""What every HTTP route shares: the app's state, body reading, API-key auth, stopping work.

`HttpState` is the one object routes read (the ProxyServer, the `[http]` settings, whether
the proxy is draining). `read_json` reads a body up to `max_body_bytes` (413 past it) and
parses it off the event loop when it is large; `api_user` maps a bearer key to a proxy user;
`until_disconnect` runs a request's model work and stops it (`core.stop.Stop`) when the
client goes away, as a vanished SQL client stops its statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from core.interfaces import CallContext
from core.settings import HttpSettings
from core.stop import Stop
from proxy.http.errors import ApiError, bad

log = logging.getLogger("pgml_proxy.http")
T = TypeVar("T")
# Bodies larger than this are parsed in a thread: json.loads of megabytes takes milliseconds.
_PARSE_OFF_LOOP = 256 * 1024


@dataclass
class HttpState:
    server: Any  # proxy.app.ProxyServer
    settings: HttpSettings
    draining: bool = False

    @property
    def runtime(self) -> Any:
        """The runtime serving the API; 503 while there is none or the proxy is shutting down."""
        runtime = getattr(self.server, "runtime", None)
        if runtime is None or self.draining:
            raise ApiError(503, "the model runtime is not available (the proxy is starting or "
                                "shutting down)", "server_error", code="unavailable")
        return runtime


def state_of(request: Request) -> HttpState:
    state: HttpState = request.app.state.http
    return state


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object; 413 past `max_body_bytes`, 400 when it is not a JSON object."""
    limit = state_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than the limit of {limit} bytes "
                              "(http.max_body_bytes)", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = await asyncio.to_thread(json.loads, raw) if size > _PARSE_OFF_LOOP else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def api_user(request: Request) -> str:
    """The proxy user of the request's bearer key (401 without a right one when keys are set).

    Without `[http] api_keys` the API is open only where the proxy itself trusts its
    clients (`auth_method = "trust"`); any other auth method needs keys.
    """
    state = state_of(request)
    keys = state.settings.api_keys
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if keys:
        if scheme.lower() == "bearer" and token:
            for key, user in keys.items():
                if hmac.compare_digest(key.encode(), token.encode()):
                    return user
        raise ApiError(401, "Incorrect API key provided" if token else "Missing bearer API key",
                       "invalid_request_error", code="invalid_api_key")
    if state.server.config.auth_method != "trust":
        raise ApiError(401, "this proxy authenticates its users: the API needs [http] api_keys",
                       "invalid_request_error", code="invalid_api_key")
    return ""


async def _quiet(_: str) -> None:
    return None


def context(user: str, stop: Stop) -> CallContext:
    """The runtime's call context for one HTTP request (notices have nowhere to go)."""
    return CallContext(notice=_quiet, user=user, stop=stop)


async def until_disconnect(request: Request, stop: Stop, work: Awaitable[T]) -> T:
    """`work`'s result; when the client disconnects first, its work is stopped and cancelled."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            log.info("HTTP client went away: its model work is stopped")
            stop.stop()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise ApiError(499, "client closed the request", code="cancelled")
        return task.result()
    finally:
        watcher.cancel()
        stop.close()
