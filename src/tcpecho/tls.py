"""TLS: the `ssl.SSLContext` builders for the server and the client, and their words for a
connection and for a failed handshake.

Only the standard library's `ssl`. Both contexts start from `ssl.create_default_context` (its
secure defaults: no SSLv3, no compression, strong ciphers) and refuse anything below TLS 1.2.
A file that cannot be read or used raises `TLSConfigError` naming the option and the file.
"""

from __future__ import annotations

import re
import ssl

from tcpecho.errors import TLSConfigError

# TLS 1.0 and 1.1 are deprecated (RFC 8996); browsers and OpenSSL 3's default level refuse them.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# OpenSSL's names of the attributes a subject holds, as RFC 4514 abbreviates them.
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
# "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)" → "wrong version number"
_OPENSSL_LIBRARY = re.compile(r"^\[[^\]]*\]\s*")
_OPENSSL_SOURCE_LINE = re.compile(r"\s*\(_ssl\.c:\d+\)$")

Files = tuple[tuple[str, str], ...]


class _EncryptedKey(Exception):
    """The key asked for a passphrase: raised from the password callback so that OpenSSL
    never prompts on the terminal."""


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A context for serving TLS with the certificate chain ``cert`` and its ``key`` (PEM).

    With ``client_ca``, every client must present a certificate signed by a CA in that file
    (mutual TLS). Raises `TLSConfigError` naming ``--tls-cert``, ``--tls-key`` or
    ``--tls-client-ca``.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = MINIMUM_VERSION
    # An end of stream without close_notify (a client that just closes, or the threads
    # engine shutting a connection's read side to drain it) ends the input like close_notify,
    # instead of a fatal error that sends a decode_error alert and leaves no way to send our
    # own close_notify. An echo server has nothing a truncation could falsify. The handshake
    # is unaffected: an end of stream there still fails it.
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    _load_chain(context, ("--tls-cert", cert), ("--tls-key", key))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, ("--tls-client-ca", client_ca))
    return context


def client_context(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A context for connecting over TLS that checks the server's certificate and name.

    ``ca``: trust the CAs in this PEM file instead of the system's store. ``cert`` (and
    ``key``, unless the key is in ``cert``'s file): present this client certificate.
    ``insecure``: check neither the certificate nor the name (the caller warns the user).
    Raises `TLSConfigError` naming ``--ca``, ``--cert`` or ``--key``.
    """
    context = ssl.create_default_context()
    if ca is not None:
        _load_ca(context, ("--ca", ca))
    context.minimum_version = MINIMUM_VERSION
    if cert is not None:
        _load_chain(context, ("--cert", cert), None if key is None else ("--key", key))
    elif key is not None:
        raise TLSConfigError((("--key", key),), "needs --cert, the certificate it belongs to")
    if insecure:
        context.check_hostname = False  # first: CERT_NONE is refused while it is on
        context.verify_mode = ssl.CERT_NONE
    return context


def describe_tls(connection: ssl.SSLSocket | ssl.SSLObject) -> dict[str, str]:
    """What was negotiated on a connection whose handshake is done: ``version``
    (``TLSv1.3``), ``cipher``, ``alpn`` and ``peer_subject``, the verified peer certificate's
    subject as ``CN=…,O=…`` (most specific first, as RFC 4514 writes it). A value is ``""``
    when there is none: no ALPN, or no verified peer certificate (a server not asking for
    client certificates, a client with ``insecure``)."""
    cipher = connection.cipher()
    return {
        "version": connection.version() or "",
        "cipher": cipher[0] if cipher else "",
        "alpn": connection.selected_alpn_protocol() or "",
        "peer_subject": format_subject(connection.getpeercert()),
    }


def format_subject(certificate: object) -> str:
    """The subject of a certificate as `ssl` decodes it (``getpeercert()``), as
    ``CN=…,O=…``; ``""`` for none. ``,``, ``+``, ``=`` and ``\\`` in a value are escaped."""
    if not isinstance(certificate, dict):
        return ""
    parts = []
    for rdn in reversed(certificate.get("subject", ())):
        parts.append(
            "+".join(f"{_SHORT_NAMES.get(name, name)}={_escape(value)}" for name, value in rdn)
        )
    return ",".join(parts)


def describe_ssl_error(exc: OSError) -> str:
    """A short reason for a failed handshake, or for a TLS connection that broke, without
    OpenSSL's codes: ``certificate verify failed: self-signed certificate``, ``wrong version
    number`` (the peer does not speak TLS), ``tlsv13 alert certificate required``, …"""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) or (
        # What asyncio's and uvloop's TLS protocols raise for an end of stream during the
        # handshake: a bare ConnectionResetError, without errno or text (a reset has both).
        isinstance(exc, ConnectionResetError) and not exc.args
    ):
        return "the peer closed the connection during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        return _openssl_reason(exc)
    if isinstance(exc, TimeoutError):
        return "the TLS handshake timed out"
    return exc.strerror or str(exc)


def _load_chain(
    context: ssl.SSLContext, cert: tuple[str, str], key: tuple[str, str] | None
) -> None:
    """Load the certificate chain and key, or raise `TLSConfigError` blaming the right file."""
    files: Files = (cert,) if key is None else (cert, key)
    for option, path in files:
        _check_readable(option, path)

    def no_passphrase() -> str:
        raise _EncryptedKey

    try:
        context.load_cert_chain(cert[1], None if key is None else key[1], password=no_passphrase)
    except _EncryptedKey:
        raise TLSConfigError(
            (files[-1],), "the private key is encrypted; give it unencrypted"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason is not None:  # OpenSSL named it: key values mismatch, …
            raise TLSConfigError(files, _openssl_reason(exc)) from exc
        # "PEM lib": one of the two files holds no PEM certificate, or no PEM key.
        if not _has_certificate(cert[1]):
            raise TLSConfigError((cert,), "no PEM certificate in it") from exc
        reason = "no PEM private key in it" + (" (give the key with --key)" if key is None else "")
        raise TLSConfigError((files[-1],), reason) from exc


def _load_ca(context: ssl.SSLContext, ca: tuple[str, str]) -> None:
    _check_readable(*ca)
    try:
        context.load_verify_locations(cafile=ca[1])
    except ssl.SSLError as exc:
        # OpenSSL's words for it are "no certificate or crl found".
        reason = "no PEM certificate in it" if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND" else None
        raise TLSConfigError((ca,), reason or _openssl_reason(exc)) from exc


def _check_readable(option: str, path: str) -> None:
    """OpenSSL's errors for a file it cannot open do not say which file: open it first."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSConfigError(((option, path),), exc.strerror or str(exc)) from exc


def _has_certificate(path: str) -> bool:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=path)
    except (OSError, ValueError):
        return False
    return True


def _openssl_reason(exc: ssl.SSLError) -> str:
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    text = _OPENSSL_SOURCE_LINE.sub("", _OPENSSL_LIBRARY.sub("", text))
    return text or exc.reason or "TLS error"


def _escape(value: str) -> str:
    return re.sub(r'([,+="\\<>;])', r"\\\1", value)
