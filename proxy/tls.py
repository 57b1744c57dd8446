"""TLS contexts for both sides of the proxy, and a self-signed certificate maker for tests.

`client_context(config)` is what answers a client's SSLRequest with 'S' (None: answer
'N'); `upstream_context(sslmode)` is what the proxy uses towards the upstream, verifying
nothing for prefer/require exactly as libpq does (verify-ca/verify-full are not offered).
`sslmode_from_dsn` picks the sslmode a DSN asks for, falling back to the configured one.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from core.errors import ConfigError

SSLMODES = ("disable", "prefer", "require")


def client_context(config: object) -> ssl.SSLContext | None:
    """The server-side context for clients, from `tls_cert`/`tls_key`; None when TLS is off.

    Raises ConfigError naming the key when the certificate or key cannot be loaded.
    """
    cert = getattr(config, "tls_cert", "")
    key = getattr(config, "tls_key", "")
    if not cert or not key:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls_cert", f"cannot load {cert} with key {key}: {exc}") from None
    return ctx


def upstream_context(sslmode: str) -> ssl.SSLContext | None:
    """The client-side context towards the upstream; None for sslmode=disable.

    prefer and require encrypt without checking the certificate, as libpq does for them.
    """
    if sslmode not in SSLMODES:
        raise ConfigError("upstream_sslmode", f"expected one of {SSLMODES}, got {sslmode!r}")
    if sslmode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def sslmode_from_dsn(dsn: str, default: str) -> str:
    """The sslmode the upstream DSN names, else `default`; ConfigError for modes we do not offer."""
    mode = conninfo_to_dict(dsn).get("sslmode") if dsn else None
    if mode is None:
        return default
    mode = str(mode)
    if mode == "allow":  # allow = try plain first; the nearest we offer without a second attempt
        return "prefer"
    if mode not in SSLMODES:
        raise ConfigError("upstream", f"sslmode={mode} is not supported; use one of {SSLMODES}")
    return mode


def make_self_signed(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """Write a self-signed certificate and its key (PEM) into `directory`; returns (cert, key).

    For tests and local setups only: an EC P-256 key, valid for a day, for `common_name`,
    localhost and 127.0.0.1.
    """
    # Imported here: only tests and local setups need certificate generation.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName(common_name),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
