"""TLS contexts (tcpecho.tls), and the client side of TLS, PROXY and IPv6: ``tcpecho client`` and
``tcpecho bench`` against a small TLS echo peer that records what it received.

Certificates come from trustme, written to the test's temporary directory (no key is
committed). The peer is a real TLS server on a socket bound to port 0, built on the stdlib
``ssl`` module through `tls.server_context`, in threads owned and joined by the test.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tcpecho import tls
from tcpecho.errors import TLSConfigError


@dataclass(frozen=True)
class Pki:
    """PEM files of one run: a CA, a server certificate for localhost, 127.0.0.1 and ::1, a
    client certificate from the same CA, and a second CA that signed nothing used here."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_key: str  # the key of a certificate from the other CA: matches no cert here
    directory: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("client.example", common_name="client.example")
    stranger = other.issue_cert("stranger.example")

    def write(name: str, blob: trustme.Blob) -> str:
        path = directory / name
        blob.write_to_path(str(path))
        return str(path)

    return Pki(
        ca=write("ca.pem", ca.cert_pem),
        server_cert=write("server.pem", server.cert_chain_pems[0]),
        server_key=write("server.key", server.private_key_pem),
        client_cert=write("client.pem", client.cert_chain_pems[0]),
        client_key=write("client.key", client.private_key_pem),
        other_ca=write("other-ca.pem", other.cert_pem),
        other_key=write("stranger.key", stranger.private_key_pem),
        directory=directory,
    )


# The contexts


def test_server_context_is_tls_1_2_at_least_and_asks_no_client_cert_by_default(pki: Pki) -> None:
    context = tls.server_context(pki.server_cert, pki.server_key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE
    mutual = tls.server_context(pki.server_cert, pki.server_key, client_ca=pki.ca)
    assert mutual.verify_mode == ssl.CERT_REQUIRED


def test_client_context_verifies_by_default_and_insecure_turns_both_checks_off(pki: Pki) -> None:
    context = tls.client_context(ca=pki.ca)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    insecure = tls.client_context(insecure=True)
    assert insecure.verify_mode == ssl.CERT_NONE
    assert not insecure.check_hostname


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            ("server_cert", "other_key"),
            "cannot load --tls-cert {server_cert} / --tls-key {other_key}: key values mismatch",
        ),
        (
            ("server_cert", "missing"),
            "cannot load --tls-key {missing}: No such file or directory",
        ),
        (("garbage", "server_key"), "cannot load --tls-cert {garbage}: no PEM certificate in it"),
        (("server_cert", "garbage"), "cannot load --tls-key {garbage}: no PEM private key in it"),
        (
            ("server_cert", "server_key", "garbage"),
            "cannot load --tls-client-ca {garbage}: no PEM certificate in it",
        ),
        (
            ("server_cert", "encrypted"),
            "cannot load --tls-key {encrypted}: the private key is encrypted; give it unencrypted",
        ),
    ],
    ids=["mismatch", "missing", "not-a-cert", "not-a-key", "bad-ca", "encrypted-key"],
)
def test_a_server_file_that_cannot_be_used_is_one_line_naming_option_file_and_reason(
    pki: Pki, files: tuple[str, ...], message: str
) -> None:
    """Exit code 10; never an OpenSSL prompt for a passphrase, never "PEM lib"."""
    paths = _odd_files(pki)
    with pytest.raises(TLSConfigError) as raised:
        tls.server_context(*(paths[name] for name in files))
    assert str(raised.value) == message.format(**paths)
    assert raised.value.exit_code == 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ca": "missing"}, "cannot load --ca {missing}: No such file or directory"),
        ({"ca": "garbage"}, "cannot load --ca {garbage}: no PEM certificate in it"),
        (
            {"cert": "client_cert"},
            "cannot load --cert {client_cert}: no PEM private key in it (give the key with --key)",
        ),
        ({"key": "client_key"}, "cannot load --key {client_key}: needs --cert, the certificate"),
    ],
    ids=["missing-ca", "bad-ca", "cert-without-key", "key-without-cert"],
)
def test_a_client_file_that_cannot_be_used_names_the_clients_option(
    pki: Pki, options: dict[str, str], message: str
) -> None:
    paths = _odd_files(pki)
    chosen = {option: paths[name] for option, name in options.items()}
    with pytest.raises(TLSConfigError) as raised:
        tls.client_context(ca=chosen.get("ca"), cert=chosen.get("cert"), key=chosen.get("key"))
    assert str(raised.value).startswith(message.format(**paths))


def _odd_files(pki: Pki) -> dict[str, str]:
    """The pki's files by field name, and a missing file, a file of garbage and an encrypted
    key (written on first use)."""
    garbage = pki.directory / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    key = serialization.load_pem_private_key(Path(pki.server_key).read_bytes(), password=None)
    encrypted = pki.directory / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    paths = {name: value for name, value in vars(pki).items() if isinstance(value, str)}
    return {
        **paths,
        "missing": str(pki.directory / "missing.pem"),
        "garbage": str(garbage),
        "encrypted": str(encrypted),
    }
