"""The first moments of a client connection: startup packet, TLS, authentication, login.

Owns answering SSLRequest/GSSENCRequest/CancelRequest, reading the StartupMessage
(its settings and `options`), running `proxy.auth`'s exchange, getting a first server
connection with the client's settings applied, and the greeting (ParameterStatus,
BackendKeyData, ReadyForQuery). Then `proxy.frontend.Frontend` takes over.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, cast

from core.errors import (
    FeatureNotSupported,
    InvalidAuthorizationSpecification,
    InvalidParameterValue,
    PgError,
    ProtocolViolation,
)
from proxy import messages as m
from proxy.auth import ClientAuthenticator
from proxy.backend import ServerConn, Startup
from proxy.routing import ROUTE_SETTING, ROUTE_VALUES
from proxy.session import Phase
from proxy.txstate import settings_sql, valid_setting_name

if TYPE_CHECKING:
    from proxy.frontend import Frontend

# Reported by the server but not settable: never replayed.
UNSETTABLE = frozenset({
    "server_version", "server_encoding", "integer_datetimes", "is_superuser", "session_authorization",
    "in_hot_standby", "scram_iterations",
})


def startup_bytes(fe: Frontend, data: bytes) -> None:
    """Read the untyped first packet(s): SSL/GSS/Cancel requests, then the StartupMessage."""
    buf = fe.startup_buf
    buf += data
    if len(buf) < 8:
        return
    length = int.from_bytes(buf[:4], "big")
    if length < 8 or length > 10000:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    if len(buf) < length:
        return
    body, rest = bytes(buf[4:length]), bytes(buf[length:])
    buf.clear()
    code = int.from_bytes(body[:4], "big")
    if code == m.SSL_REQUEST:
        fe.start_task(_ssl(fe, rest))
    elif code == m.GSSENC_REQUEST:
        fe.write(b"N")  # no GSS encryption; the client goes on in plain text or asks for SSL
        if rest:
            startup_bytes(fe, rest)
    elif code == m.CANCEL_REQUEST:
        req = m.CancelRequest.parse(body)
        fe.app.cancel(req.pid, req.secret)
        fe.close()
    elif code >> 16 == 3:
        fe.s.phase = Phase.AUTH
        fe.framer.feed(rest)
        fe.start_task(_client_login(fe, m.StartupMessage.parse(body)))
    else:
        raise FeatureNotSupported(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0"
        )


async def _ssl(fe: Frontend, rest: bytes) -> None:
    ctx = fe.app.client_tls
    if ctx is None or fe.transport is None or rest:
        fe.write(b"N")
        if rest:
            startup_bytes(fe, rest)
        return
    fe.write(b"S")
    loop = asyncio.get_running_loop()
    tr = await loop.start_tls(fe.transport, fe, ctx, server_side=True)
    fe.transport = cast(asyncio.Transport, tr)


async def _client_login(fe: Frontend, startup: m.StartupMessage) -> None:
    params = dict(startup.params)
    user = params.pop("user", "")
    database = params.pop("database", "") or user
    if not user:
        raise InvalidAuthorizationSpecification("no PostgreSQL user name specified in startup packet")
    if "replication" in params and params.pop("replication") not in ("false", "0", "off", "no"):
        raise FeatureNotSupported("replication connections are not supported by pgml-proxy")
    unknown = [k for k in params if k.startswith("_pq_.")]
    passed = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
    settings = {k: v for k, v in passed.items() if k != "options"}
    settings.update(m.parse_options(params.get("options", "")))
    if fe.tx:  # applied with SQL later, so the names must be names
        for name in settings:
            if not valid_setting_name(name):
                raise InvalidAuthorizationSpecification(f"invalid startup parameter name {name!r}")
    fe.user, fe.database = user, database
    fe.application_name = settings.get("application_name", "")
    if startup.version & 0xFFFF or unknown:
        fe.write(m.NegotiateProtocolVersion(0, tuple(unknown)).encode())
    password = await _authenticate(fe, user)
    if database == fe.app.ADMIN_DB:
        await _admin_login(fe, user, password)
        _admin_ready(fe)
        return
    fe.app.check_client_limit()
    # Session mode: the client's startup parameters go into the server's own startup packet,
    # as on a direct connection (so RESET and DISCARD ALL return to them).
    route = _route(fe, settings.get(ROUTE_SETTING, "auto"))
    conn = await _first_server(fe, password, () if fe.tx else tuple(passed.items()), route)
    conn.client = fe
    conn.internal = True
    if fe.tx:
        await _apply_settings(fe, conn, settings)
        fe.key = (fe.id, secrets.randbits(31))
    else:
        fe.set_want({k: v for k, v in conn.params.items() if k not in UNSETTABLE})
        conn.applied = fe.want_key()
        fe.key = (conn.pid, secrets.randbits(31))  # the server's own pid, our secret
    fe.app.register_key(fe)
    fe.write(b"".join(m.ParameterStatus(k, v).encode() for k, v in conn.params.items()))
    fe.write(m.BackendKeyData(*fe.key).encode() + m.ReadyForQuery("I").encode())
    conn.internal = False
    if fe.tx:
        conn.client = None
        assert fe.pool is not None
        fe.pool.release(conn)
    else:
        fe.server = conn
    fe.ready()


def _route(fe: Frontend, value: str) -> str:
    """`pgml_proxy.route` given at login (`options=-c pgml_proxy.route=replica`): transaction
    pooling starts the client's setting with it; session pooling serves the session from a
    replica when it says `replica` (else from the primary)."""
    if value not in ROUTE_VALUES:
        raise InvalidParameterValue(f'invalid value for parameter "{ROUTE_SETTING}": "{value}"',
                                    hint=f"Available values: {', '.join(ROUTE_VALUES)}.")
    if fe.route is not None:
        fe.route.setting = value
    return value


async def _first_server(fe: Frontend, password: str | None, startup: Startup,
                        route: str = "auto") -> ServerConn:
    node = fe.app.session_node() if route == "replica" and not fe.tx else None
    fe.pool = pool = fe.app.pool_for(fe.database, fe.user, node)
    try:
        conn = await pool.acquire(password, startup)
    except BaseException:
        fe.pool = None
        fe.app.drop_if_unused(pool)  # a failed login leaves no pool entry behind
        raise
    if password is not None:
        # Passthrough: only now has the upstream accepted the password (a fresh login, or the
        # very password a pooled connection proved), so only now is the client told so.
        fe.write(m.AUTH_OK)
    return conn


async def _apply_settings(fe: Frontend, conn: ServerConn, settings: dict[str, str]) -> None:
    """Transaction mode: a pooled connection may carry an earlier client's settings: back to
    the defaults, then the client's startup settings, applied with SQL."""
    pool = fe.pool
    assert pool is not None
    changes: dict[str, str | None] = {
        k: v for k, v in pool.defaults.items() if k not in UNSETTABLE and conn.params.get(k) != v
    }
    changes.update({k: None for k in conn.extra if k not in settings})
    changes.update(settings)
    try:
        if changes:
            await conn.run_simple(settings_sql(changes))
    except PgError:
        conn.internal = False
        pool.release(conn)  # a bad setting: the connection itself is fine
        raise
    except BaseException:
        pool.discard(conn)  # the client left mid-login: the reply may be half read
        raise
    conn.extra = {k: v for k, v in settings.items() if k not in conn.params}
    fe.set_want({k: v for k, v in conn.params.items() if k not in UNSETTABLE} | conn.extra)
    conn.applied = fe.want_key()


async def _authenticate(fe: Frontend, user: str) -> str | None:
    """Run the client's authentication exchange; the password to log in upstream with, if any."""
    auth = ClientAuthenticator(fe.app.config, user)
    fe.write(b"".join(auth.start()))
    passthrough: str | None = None
    while not auth.done:
        t, body = await fe.auth_queue.get()
        step = auth.feed(bytes([t]), body)
        if step.error is not None:
            raise step.error
        fe.write(b"".join(step.messages))
        passthrough = step.passthrough_password or passthrough
    return passthrough


async def _admin_login(fe: Frontend, user: str, password: str | None) -> None:
    """The admin database: only `proxy.admin_users` when that list is set (as PgBouncer's), and
    in passthrough mode only once the upstream has accepted the password on a login of its own."""
    admins = fe.app.config.admin_users
    if admins and user not in admins:
        raise InvalidAuthorizationSpecification(
            f'user "{user}" may not connect to the admin database "{fe.app.ADMIN_DB}"',
            hint="list the user in proxy.admin_users",
        )
    if password is not None:
        pool = fe.app.pool_for(fe.app.target.database, user)
        pool.release(await pool.acquire(password))
        fe.write(m.AUTH_OK)


def _admin_ready(fe: Frontend) -> None:
    fe.admin = True
    params = {"server_version": "16.0 (pgml-proxy admin)", "server_encoding": "UTF8",
              "client_encoding": "UTF8", "DateStyle": "ISO, MDY", "integer_datetimes": "on",
              "standard_conforming_strings": "on", "TimeZone": "UTC"}
    fe.write(b"".join(m.ParameterStatus(k, v).encode() for k, v in params.items()))
    fe.app.register_key(fe)
    fe.write(m.BackendKeyData(*fe.key).encode() + m.ReadyForQuery("I").encode())
    fe.ready()
