"""Password authentication, both ways, as pure sans-IO state machines (no sockets, no asyncio).

`ClientAuthenticator` plays the server to a connecting client: trust, cleartext, md5,
scram-sha-256 (plain SCRAM-SHA-256 only: channel binding cannot pass a TLS-terminating
proxy), and passthrough (a cleartext password handed on to the upstream's own check).
`UpstreamAuthenticator` plays the client to the upstream Postgres: trust, cleartext, md5
and SCRAM-SHA-256. SCRAM itself is `scramp`'s; this module owns the Postgres framing and
the verifier formats Postgres stores (``md5<hex>``, ``SCRAM-SHA-256$i:salt$stored:server``).

Both take and return message *bodies* without the type byte and length for what they
read, and whole framed messages for what they send, so the caller only moves bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from scramp import ScramClient, ScramException, ScramMechanism

from core.errors import (
    InvalidAuthorizationSpecification,
    InvalidPassword,
    PgError,
    ProtocolViolation,
    SqlclientUnableToEstablishSqlconnection,
)

SCRAM = "SCRAM-SHA-256"

# Authentication request codes (protocol docs, "AuthenticationXXX" messages).
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12
_UNSUPPORTED = {2: "KerberosV5", 6: "SCM credentials", 7: "GSSAPI", 8: "GSSAPI", 9: "SSPI"}


def _frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def auth_message(code: int, data: bytes = b"") -> bytes:
    """An Authentication* message ('R') with request `code` and its trailing data."""
    return _frame(b"R", struct.pack("!I", code) + data)


AUTH_OK_MESSAGE = auth_message(AUTH_OK)


def password_message(payload: bytes) -> bytes:
    """A PasswordMessage / SASLInitialResponse / SASLResponse ('p'): they share the type byte."""
    return _frame(b"p", payload)


def md5_verifier(user: str, password: str) -> str:
    """What Postgres stores for an md5 password: ``md5`` + md5(password + user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(verifier: str, salt: bytes) -> str:
    """The client's answer to an MD5 challenge, given the stored ``md5...`` verifier."""
    return "md5" + hashlib.md5(verifier[3:].encode() + salt).hexdigest()


def scram_verifier(password: str, iterations: int = 4096, salt: bytes | None = None) -> str:
    """A ``SCRAM-SHA-256$...`` verifier in Postgres's format for `password`."""
    salt_b, stored, server, i = ScramMechanism(SCRAM).make_auth_info(password, iterations, salt)
    b64 = base64.b64encode
    return f"{SCRAM}${i}:{b64(salt_b).decode()}${b64(stored).decode()}:{b64(server).decode()}"


@dataclass(frozen=True, slots=True)
class ScramSecret:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int


def parse_scram_verifier(verifier: str) -> ScramSecret | None:
    """Split a Postgres SCRAM verifier; None when `verifier` is not one."""
    try:
        mech, rest, keys = verifier.split("$")
        iters, salt = rest.split(":")
        stored, server = keys.split(":")
        if mech != SCRAM:
            return None
        b64 = base64.b64decode
        return ScramSecret(b64(salt), b64(stored), b64(server), int(iters))
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)  # deriving a verifier costs 4096 PBKDF2 rounds; logins repeat
def _secret_for(stored: str) -> ScramSecret:
    """A SCRAM secret for a stored password: parsed from a verifier, or derived from plain text."""
    secret = parse_scram_verifier(stored)
    if secret is not None:
        return secret
    salt = hashlib.sha256(b"pgml-proxy-salt" + stored.encode()).digest()[:16]
    return parse_scram_verifier(scram_verifier(stored, salt=salt))  # type: ignore[return-value]


def _check_cleartext(user: str, stored: str, given: str) -> bool:
    """Does cleartext `given` match the stored password (plain, md5 or SCRAM verifier)?"""
    if stored.startswith("md5") and len(stored) == 35:
        return hmac.compare_digest(md5_verifier(user, given), stored)
    secret = parse_scram_verifier(stored)
    if secret is not None:
        _, stored_key, _, _ = ScramMechanism(SCRAM).make_auth_info(given, secret.iterations, secret.salt)
        return hmac.compare_digest(stored_key, secret.stored_key)
    return hmac.compare_digest(stored.encode(), given.encode())


def _cstring(body: bytes) -> str:
    end = body.find(b"\0")
    if end < 0:
        raise ProtocolViolation("password message is not NUL-terminated")
    return body[:end].decode("utf-8", "replace")


@dataclass(slots=True)
class AuthStep:
    """What to do after one client message.

    `messages`: framed messages to send, in order. `done`: authentication succeeded
    (AuthenticationOk is already among `messages`, except in passthrough). `error`: send
    it as a FATAL ErrorResponse and close. `passthrough_password`: passthrough mode only —
    log in upstream with it; on success send `AUTH_OK_MESSAGE`, on failure the upstream's error.
    """

    messages: list[bytes] = field(default_factory=list)
    done: bool = False
    error: PgError | None = None
    passthrough_password: str | None = None


class ClientAuthenticator:
    """The proxy's side of a client's login, for `config.auth_method` and `config.users`."""

    def __init__(self, config: object, user: str) -> None:
        self.method: str = getattr(config, "auth_method", "trust")
        users: Mapping[str, str] = getattr(config, "users", {})
        self.user = user
        self._stored = users.get(user)
        self._salt = os.urandom(4)
        self._scram: object | None = None  # scramp's ScramServer while a SASL exchange runs
        self.done = False
        # Postgres answers md5 with SCRAM when the stored password is a SCRAM verifier.
        if self.method == "md5" and self._stored is not None and parse_scram_verifier(self._stored):
            self.method = "scram-sha-256"

    def _fail(self) -> AuthStep:
        return AuthStep(error=InvalidPassword(f'password authentication failed for user "{self.user}"'))

    def _ok(self) -> AuthStep:
        self.done = True
        return AuthStep([AUTH_OK_MESSAGE], done=True)

    def start(self) -> list[bytes]:
        """The first messages to send after the StartupMessage."""
        if self.method == "trust":
            self.done = True
            return [AUTH_OK_MESSAGE]
        if self.method in ("cleartext", "passthrough"):
            return [auth_message(AUTH_CLEARTEXT)]
        if self.method == "md5":
            return [auth_message(AUTH_MD5, self._salt)]
        if self.method == "scram-sha-256":
            return [auth_message(AUTH_SASL, SCRAM.encode() + b"\0\0")]
        raise ValueError(f"unknown auth method {self.method!r}")

    def feed(self, msg_type: bytes, body: bytes) -> AuthStep:
        """Handle one client message (`msg_type` must be b'p'); never raises for peer input."""
        if self.done:
            return AuthStep(error=ProtocolViolation("authentication already completed"))
        if msg_type != b"p":
            return AuthStep(error=ProtocolViolation(f"expected a password message, got type {msg_type!r}"))
        try:
            if self.method in ("cleartext", "passthrough"):
                return self._cleartext(_cstring(body))
            if self.method == "md5":
                given = _cstring(body)
                if self._stored is None:
                    return self._fail()
                stored = self._stored
                verifier = stored if stored.startswith("md5") and len(stored) == 35 else md5_verifier(
                    self.user, stored
                )
                ok = hmac.compare_digest(md5_response(verifier, self._salt), given)
                return self._ok() if ok else self._fail()
            if self.method == "scram-sha-256":
                return self._sasl(body)
        except PgError as exc:
            return AuthStep(error=exc)
        problem = f"authentication method {self.method!r} cannot take a password"
        return AuthStep(error=InvalidAuthorizationSpecification(problem))

    def _cleartext(self, given: str) -> AuthStep:
        if self.method == "passthrough":
            self.done = True
            return AuthStep(done=True, passthrough_password=given)
        if self._stored is None or not _check_cleartext(self.user, self._stored, given):
            return self._fail()
        return self._ok()

    def _sasl(self, body: bytes) -> AuthStep:
        if self._scram is None:
            return self._sasl_initial(body)
        server = self._scram
        try:
            server.set_client_final(body.decode("utf-8"))  # type: ignore[attr-defined]
            final = server.get_server_final()  # type: ignore[attr-defined]
        except (ScramException, UnicodeDecodeError):
            return self._fail()
        if self._stored is None:  # the mock exchange for an unknown user always fails
            return self._fail()
        self.done = True
        return AuthStep([auth_message(AUTH_SASL_FINAL, final.encode()), AUTH_OK_MESSAGE], done=True)

    def _sasl_initial(self, body: bytes) -> AuthStep:
        mech = _cstring(body)
        if mech != SCRAM:
            return AuthStep(error=InvalidAuthorizationSpecification(
                f"client selected an invalid SASL authentication mechanism {mech!r}; only {SCRAM} is offered"
            ))
        rest = body[len(mech) + 1:]
        if len(rest) < 4:
            raise ProtocolViolation("malformed SASLInitialResponse message")
        (length,) = struct.unpack("!i", rest[:4])
        data = rest[4:4 + length] if length >= 0 else b""
        # Unknown users run a mock exchange (as Postgres does) so a login does not reveal who exists.
        secret = _secret_for(self._stored if self._stored is not None else "mock:" + self.user)
        mech_obj = ScramMechanism(SCRAM)
        server = mech_obj.make_server(
            lambda _name: (secret.salt, secret.stored_key, secret.server_key, secret.iterations)
        )
        try:
            text = data.decode("utf-8")
            gs2, bare = _split_gs2(text)
            # libpq and others send an empty user name ("n=,"), which scramp's parser refuses;
            # Postgres ignores the name. Parse a stand-in, then sign with the bytes really sent.
            server.set_client_first(gs2 + "n=*" + bare[2:] if bare.startswith("n=,") else text)
            server.client_first_bare = bare
            first = server.get_server_first()
        except (ScramException, UnicodeDecodeError) as exc:
            return AuthStep(error=ProtocolViolation(f"malformed SCRAM message: {exc}"))
        self._scram = server
        return AuthStep([auth_message(AUTH_SASL_CONTINUE, first.encode())])


def _split_gs2(client_first: str) -> tuple[str, str]:
    """(gs2 header, client-first-message-bare) of a SCRAM client-first-message."""
    first = client_first.find(",")
    second = client_first.find(",", first + 1)
    if first < 0 or second < 0:
        raise ProtocolViolation("malformed SCRAM client-first-message")
    return client_first[: second + 1], client_first[second + 1:]


@dataclass(slots=True)
class UpstreamStep:
    """What to send upstream after one Authentication message; `done` once AuthenticationOk came."""

    messages: list[bytes] = field(default_factory=list)
    done: bool = False


class UpstreamAuthenticator:
    """The proxy logging in to the upstream as `user` with `password` (None: none known)."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self._scram: ScramClient | None = None
        self.done = False

    def _need_password(self) -> str:
        if self.password is None:
            raise InvalidPassword(
                f'the upstream asks a password for user "{self.user}" and none is configured'
            )
        return self.password

    def feed(self, body: bytes) -> UpstreamStep:
        """Answer one Authentication ('R') message body. Raises PgError when it cannot go on."""
        if len(body) < 4:
            raise ProtocolViolation("upstream sent a truncated Authentication message")
        (code,) = struct.unpack("!I", body[:4])
        data = body[4:]
        if code == AUTH_OK:
            self.done = True
            return UpstreamStep(done=True)
        if code == AUTH_CLEARTEXT:
            return UpstreamStep([password_message(self._need_password().encode() + b"\0")])
        if code == AUTH_MD5:
            verifier = md5_verifier(self.user, self._need_password())
            return UpstreamStep([password_message(md5_response(verifier, data[:4]).encode() + b"\0")])
        if code == AUTH_SASL:
            return self._sasl_start(data)
        if code == AUTH_SASL_CONTINUE and self._scram is not None:
            try:
                self._scram.set_server_first(data.decode())
                final = self._scram.get_client_final()
            except ScramException as exc:
                raise ProtocolViolation(f"upstream sent a bad SCRAM message: {exc}") from None
            return UpstreamStep([password_message(final.encode())])
        if code == AUTH_SASL_FINAL and self._scram is not None:
            try:
                self._scram.set_server_final(data.decode())
            except ScramException as exc:
                raise ProtocolViolation(f"upstream's SCRAM signature did not verify: {exc}") from None
            return UpstreamStep()
        name = _UNSUPPORTED.get(code, f"request code {code}")
        raise SqlclientUnableToEstablishSqlconnection(
            f"the upstream asks for {name} authentication, which pgml-proxy does not support"
        )

    def _sasl_start(self, data: bytes) -> UpstreamStep:
        mechanisms = [m.decode() for m in data.split(b"\0") if m]
        if SCRAM not in mechanisms:
            raise SqlclientUnableToEstablishSqlconnection(
                f"the upstream offers SASL mechanisms {mechanisms}, none of them {SCRAM}"
            )
        # Postgres ignores the SCRAM user name (it has the startup user's); scramp wants one non-empty.
        self._scram = ScramClient([SCRAM], self.user or "*", self._need_password())
        first = self._scram.get_client_first().encode()
        payload = SCRAM.encode() + b"\0" + struct.pack("!i", len(first)) + first
        return UpstreamStep([password_message(payload)])
