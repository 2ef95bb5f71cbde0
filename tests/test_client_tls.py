"""TLS contexts (tcpecho.tls), and the client side of TLS, PROXY and IPv6: ``tcpecho client`` and
``tcpecho bench`` against a small TLS echo peer that records what it received.

Certificates come from trustme, written to the test's temporary directory (no key is
committed). The peer is a real TLS server on a socket bound to port 0, built on the stdlib
``ssl`` module through `tls.server_context`, in threads owned and joined by the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tcpecho import tls
from tcpecho.bench import BenchOptions, run
from tcpecho.cli import main
from tcpecho.client import ClientTLS, EchoClient, run_interactive
from tcpecho.errors import TLSConfigError
from tcpecho.protocol.proxy import encode_v1, encode_v2, parse
from tests.helpers import ROOT, ServerFactory

# Bound for anything that should happen at once.
PROMPTLY = 10.0


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
    self_signed_cert: str  # the CA's own certificate, served as a server's: self-signed
    self_signed_key: str
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
        self_signed_cert=write("self-signed.pem", ca.cert_pem),
        self_signed_key=write("self-signed.key", ca.private_key_pem),
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


def test_an_end_of_stream_during_the_handshake_reads_the_same_on_every_engine() -> None:
    """The threads engine gets SSLEOFError; asyncio's and uvloop's TLS protocols a bare
    ConnectionResetError. A real reset keeps the OS's words."""
    closed = "the peer closed the connection during the TLS handshake"
    assert tls.describe_ssl_error(ssl.SSLEOFError(8, "EOF occurred")) == closed
    assert tls.describe_ssl_error(ConnectionResetError()) == closed
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert tls.describe_ssl_error(reset) == "Connection reset by peer"


# A TLS echo peer that records what it received


@dataclass
class Received:
    """What the peer saw on one connection."""

    peer: tuple[str, int]  # the TCP connection's remote address (the client's local one)
    local: tuple[str, int]  # the address the client connected to
    proxy_header: bytes = b""  # the bytes of the PROXY header, when the peer expected one
    tls: dict[str, str] = field(default_factory=dict)  # tls.describe_tls after the handshake
    server_name: str | None = None  # the SNI the client sent
    error: str = ""  # why the handshake failed, if it did


class EchoPeer:
    """An echo server on ``host``, port 0, a thread per connection, all owned and joined.

    With ``context``, it speaks TLS (``None``: plain TCP). With ``expect_proxy``, each
    connection must begin with a PROXY header, read byte by byte (so that none of the TLS
    handshake behind it is consumed) and recorded. Use it as a context manager.
    """

    def __init__(
        self,
        context: ssl.SSLContext | None,
        host: str = "127.0.0.1",
        expect_proxy: bool = False,
    ) -> None:
        self.context = context
        self.expect_proxy = expect_proxy
        self.received: list[Received] = []
        self._names: dict[int, str | None] = {}
        if context is not None:
            context.sni_callback = self._record_name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, name="peer-accept")

    def __enter__(self) -> EchoPeer:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._acceptor.join(PROMPTLY)
        for sock in list(self._open):  # wake each handler blocked in recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(PROMPTLY)

    def _record_name(self, connection: object, name: str | None, _: ssl.SSLContext) -> None:
        # ``connection`` is the SSLSocket that wrap_socket is about to return.
        self._names[id(connection)] = name

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            record = Received(peer=peer[:2], local=conn.getsockname()[:2])
            self.received.append(record)
            thread = threading.Thread(
                target=self._serve, args=(conn, record), name=f"peer-{peer[0]}:{peer[1]}"
            )
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, record: Received) -> None:
        conn.settimeout(PROMPTLY)
        # Or an echo behind TLS 1.3's session tickets waits for their ACK (Nagle).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.append(conn)
        try:
            if self.expect_proxy:
                record.proxy_header = _read_proxy_header(conn)
            if self.context is not None:
                raw = conn.dup()  # still open if the handshake fails and closes conn
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except OSError as exc:
                    record.error = tls.describe_ssl_error(exc)
                    _close_gently(raw)
                    return
                raw.close()
                self._open.append(conn)
                assert isinstance(conn, ssl.SSLSocket)
                record.tls = tls.describe_tls(conn)
                record.server_name = self._names.pop(id(conn), None)
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()


def _close_gently(sock: socket.socket) -> None:
    """Close after reading what the client sent, so that the kernel does not answer its
    unread bytes with a reset, which can discard our alert before the client reads it."""
    with contextlib.suppress(OSError), sock:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


def _read_proxy_header(conn: socket.socket) -> bytes:
    """The PROXY header at the start of ``conn``, read a byte at a time; raises if the bytes
    are not one."""
    data = b""
    while parse(data) is None:
        byte = conn.recv(1)
        if not byte:
            raise ConnectionError("closed before the PROXY header ended")
        data += byte
    return data


# tcpecho client, in this process: main() with stdin and stdout swapped for buffers


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: bytes
    stderr: str


def tcpecho(monkeypatch: pytest.MonkeyPatch, *args: str, stdin: bytes = b"hello\n") -> Ran:
    """``tcpecho ARGS`` with ``stdin`` on a pipe; what it printed and its exit code."""
    stdout, stderr = io.BytesIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    out = io.TextIOWrapper(stdout, write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(stderr):
        code = main(list(args))
    out.flush()
    return Ran(code, stdout.getvalue(), stderr.getvalue())


def client_args(address: tuple[str, int], *more: str) -> list[str]:
    return ["client", "--host", address[0], "--port", str(address[1]), "--timeout", "5", *more]


def served(pki: Pki, client_ca: str | None = None) -> ssl.SSLContext:
    """The peer's context: the trustme server certificate (localhost, 127.0.0.1, ::1)."""
    return tls.server_context(pki.server_cert, pki.server_key, client_ca)


def test_an_untrusted_self_signed_server_is_refused_in_one_line_with_exit_7(pki: Pki) -> None:
    """The client verifies by default: ``python -m tcpecho client --tls`` against a
    self-signed certificate prints the reason on one line, no traceback, nothing sent."""
    with EchoPeer(tls.server_context(pki.self_signed_cert, pki.self_signed_key)) as peer:
        host, port = peer.address
        result = subprocess.run(
            [sys.executable, "-m", "tcpecho", *client_args(peer.address, "--tls")],
            input=b"hello\n",
            capture_output=True,
            timeout=PROMPTLY * 2,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
    assert result.returncode == 7
    assert result.stdout == b""
    assert result.stderr.decode() == (
        f"Error: cannot connect to {host}:{port}: TLS handshake failed: "
        "certificate verify failed: self-signed certificate.\n"
    )


def test_the_system_store_does_not_trust_a_private_ca_and_ca_makes_it_pass(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EchoPeer(served(pki)) as peer:
        untrusted = tcpecho(monkeypatch, *client_args(peer.address, "--tls"))
        trusted = tcpecho(monkeypatch, *client_args(peer.address, "--tls", "--ca", pki.ca))
    assert untrusted.code == 7
    assert "certificate verify failed: unable to get local issuer certificate" in untrusted.stderr
    assert (trusted.code, trusted.stdout, trusted.stderr) == (0, b"hello\n", "")
    assert peer.received[-1].tls["version"] in {"TLSv1.2", "TLSv1.3"}


def test_server_name_is_sent_as_sni_and_checked_against_the_certificate(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EchoPeer(served(pki)) as peer:
        right = tcpecho(
            monkeypatch,
            *client_args(peer.address, "--tls", "--ca", pki.ca, "--server-name", "localhost"),
        )
        wrong = tcpecho(
            monkeypatch,
            *client_args(peer.address, "--tls", "--ca", pki.ca, "--server-name", "wrong.example"),
        )
    assert (right.code, right.stdout) == (0, b"hello\n")
    assert peer.received[0].server_name == "localhost"
    assert wrong.code == 7
    assert wrong.stderr.count("\n") == 1
    assert (
        "TLS handshake failed: certificate verify failed: Hostname mismatch, certificate is "
        "not valid for 'wrong.example'." in wrong.stderr
    )


def test_insecure_must_be_asked_for_and_warns_on_one_line(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EchoPeer(tls.server_context(pki.self_signed_cert, pki.self_signed_key)) as peer:
        result = tcpecho(monkeypatch, *client_args(peer.address, "--tls", "--insecure"))
    assert (result.code, result.stdout) == (0, b"hello\n")
    assert result.stderr == (
        "tcpecho client: warning: --insecure: the server's certificate and name are not checked\n"
    )


def test_a_client_certificate_is_presented_when_given_and_the_server_sees_its_subject(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer requires a client certificate from the CA (mutual TLS)."""
    trusting = ("--tls", "--ca", pki.ca)
    with EchoPeer(served(pki, client_ca=pki.ca)) as peer:
        mutual = tcpecho(
            monkeypatch,
            *client_args(
                peer.address, *trusting, "--cert", pki.client_cert, "--key", pki.client_key
            ),
        )
        without = tcpecho(monkeypatch, *client_args(peer.address, *trusting))
    assert (mutual.code, mutual.stdout, mutual.stderr) == (0, b"hello\n", "")
    subject = peer.received[0].tls["peer_subject"]
    assert subject.startswith("CN=client.example,OU=Testing cert #"), subject
    assert ",O=trustme v" in subject
    # Without one, the server refuses. Over TLS 1.3 the client's side of the handshake is
    # over before the server has checked; its alert comes at the first read: exit 1.
    assert (without.code, without.stdout) == (1, b"")
    assert without.stderr == "Error: tlsv13 alert certificate required\n"


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("over_tls", [True, False], ids=["tls", "plain"])
def test_send_proxy_sends_exactly_the_header_for_the_connections_addresses_first(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, version: str, over_tls: bool
) -> None:
    """The header comes before the TLS handshake, naming the client's real local address as
    the source and the address it connected to as the destination."""
    with EchoPeer(served(pki) if over_tls else None, expect_proxy=True) as peer:
        tls_args = ("--tls", "--ca", pki.ca) if over_tls else ()
        result = tcpecho(
            monkeypatch, *client_args(peer.address, *tls_args, "--send-proxy", version)
        )
    assert (result.code, result.stdout, result.stderr) == (0, b"hello\n", "")
    [received] = peer.received
    encode = encode_v1 if version == "v1" else encode_v2
    assert received.proxy_header == encode(received.peer, received.local)
    assert bool(received.tls) is over_tls


def test_echo_client_takes_tls_and_proxy_as_keyword_arguments(pki: Pki) -> None:
    """The library: ssl_context, server_hostname and send_proxy; tls_info describes the
    connection (an SSLSocket) with the server certificate's subject."""
    with (
        EchoPeer(served(pki), expect_proxy=True) as peer,
        EchoClient(
            *peer.address,
            ssl_context=tls.client_context(ca=pki.ca),
            server_hostname="localhost",
            send_proxy="v2",
        ) as client,
    ):
        assert client.request(b"ping") == b"ping\n"
        info = client.tls_info()
    assert info is not None
    assert info["version"] in {"TLSv1.2", "TLSv1.3"}
    assert info["cipher"]
    assert info["peer_subject"].startswith("OU=Testing cert #")
    assert peer.received[0].proxy_header == encode_v2(peer.received[0].peer, peer.address)


def test_the_interactive_session_says_which_tls_version_and_cipher_it_got(pki: Pki) -> None:
    with EchoPeer(served(pki)) as peer:
        client = EchoClient(*peer.address, ssl_context=tls.client_context(ca=pki.ca))
        client.connect()
        screen = io.StringIO()
        code = run_interactive(client, io.StringIO("hello\nexit\n"), screen)
    host, port = peer.address
    info = peer.received[0].tls
    assert code == 0
    assert screen.getvalue().startswith(
        f"Connected to {host}:{port} over {info['version']} ({info['cipher']})\n"
    )
    assert "Received from server: hello\n" in screen.getvalue()


def test_an_option_of_tls_without_tls_is_an_invalid_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """--ca alone would be ignored silently: it is refused instead (exit 2)."""
    result = tcpecho(monkeypatch, "client", "--port", "9", "--ca", "ca.pem")
    assert result.code == 2
    assert result.stderr == "Error: invalid --ca 'ca.pem': it applies only with --tls.\n"


def test_a_tls_file_that_cannot_be_read_is_exit_10_before_connecting(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(pki.directory / "nowhere.pem")
    result = tcpecho(monkeypatch, "client", "--port", "9", "--tls", "--ca", missing)
    assert result.code == 10
    assert result.stderr == f"Error: cannot load --ca {missing}: No such file or directory.\n"


# tcpecho bench


def bench_args(address: tuple[str, int], *more: str) -> list[str]:
    host, port = address
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ["bench", target, "-c", "2", "-n", "40", "--warmup", "0", "--timeout", "5", *more]


def bench_json(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, dict[str, Any]]:
    result = tcpecho(monkeypatch, *args, "--json", stdin=b"")
    assert result.stderr == "", result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return result.code, report


def test_bench_over_tls_checks_every_byte_and_counts_the_handshakes(pki: Pki) -> None:
    with EchoPeer(served(pki)) as peer:
        report = run(
            BenchOptions(
                *peer.address,
                connections=4,
                requests=400,
                duration=None,
                pipeline=4,
                warmup=0.0,
                timeout=5.0,
                tls=ClientTLS(ca=pki.ca),
            )
        )
    assert report["ok"] is True, report["errors"]
    assert (report["round_trips"], report["bytes_verified"]) == (400, 400 * 64)
    assert report["mismatches"] == {}
    assert report["tls_handshakes"] == 4
    assert report["tls"]["version"] in {"TLSv1.2", "TLSv1.3"}
    assert report["options"]["tls"]["ca"] == pki.ca
    assert all(received.tls for received in peer.received)


def test_bench_reconnect_makes_a_connection_per_round_trip_and_reports_connects_per_second(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 round trips on 2 connection slots: 20 connects, each with its TLS handshake."""
    with EchoPeer(served(pki)) as peer:
        code, report = bench_json(
            monkeypatch,
            *bench_args(peer.address, "-n", "20", "--reconnect", "--tls", "--ca", pki.ca),
        )
    assert code == 0, report
    assert report["round_trips"] == 20
    assert report["connects"] == report["connections_opened"] == report["tls_handshakes"] == 20
    assert report["connects_per_second"] > 0
    assert len({received.peer for received in peer.received}) == 20  # 20 connections


def test_bench_send_proxy_sends_each_connections_own_header_before_tls(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EchoPeer(served(pki), expect_proxy=True) as peer:
        code, report = bench_json(
            monkeypatch,
            *bench_args(peer.address, "--send-proxy", "v2", "--tls", "--ca", pki.ca),
        )
    assert code == 0, report
    assert report["options"]["send_proxy"] == "v2"
    assert len(peer.received) == 2
    for received in peer.received:
        assert received.proxy_header == encode_v2(received.peer, received.local)
        assert received.tls


def test_bench_counts_a_failed_handshake_as_an_error_with_its_reason(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EchoPeer(tls.server_context(pki.self_signed_cert, pki.self_signed_key)) as peer:
        code, report = bench_json(monkeypatch, *bench_args(peer.address, "--tls"))
    assert code == 1
    assert report["errors"] == {"TLS: certificate verify failed: self-signed certificate": 2}
    assert report["connections_opened"] == 0


def test_bench_reconnect_takes_no_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    result = tcpecho(monkeypatch, *bench_args(("127.0.0.1", 9), "--reconnect", "-p", "2"))
    assert result.code == 2
    assert "--pipeline 2: must be 1 with --reconnect" in result.stderr


# IPv6


@pytest.fixture
def ipv6_loopback() -> None:
    """Skipped (with the reason) where this machine has no IPv6 loopback."""
    if not socket.has_ipv6:
        pytest.skip("Python was built without IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback (::1) here: {exc.strerror}")


@pytest.mark.usefixtures("ipv6_loopback")
def test_client_host_1_and_bench_target_in_brackets_work_over_ipv6(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate names ::1, so the name check passes on the IPv6 literal too."""
    with EchoPeer(served(pki), host="::1") as peer:
        client = tcpecho(monkeypatch, *client_args(peer.address, "--tls", "--ca", pki.ca))
        code, report = bench_json(monkeypatch, *bench_args(peer.address, "--tls", "--ca", pki.ca))
    assert (client.code, client.stdout, client.stderr) == (0, b"hello\n", "")
    assert code == 0, report
    assert report["target"] == f"[::1]:{peer.address[1]}"
    assert report["round_trips"] == 40
    assert all(received.peer[0] == "::1" for received in peer.received)


# Against tcpecho's own server


def test_client_and_bench_with_tls_and_a_proxy_header_against_tcpecho_serve(
    pki: Pki, serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On every engine: a server with --tls-cert and --proxy-protocol on reads the header the
    client and the bench send before TLS, and echoes every byte over TLS."""
    server = serve(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        proxy_protocol="on",
        proxy_trusted=("127.0.0.1/32",),
    )
    tls_args = ("--tls", "--ca", pki.ca, "--send-proxy", "v2")
    client = tcpecho(monkeypatch, *client_args(server.address, *tls_args))
    code, report = bench_json(
        monkeypatch, *bench_args(server.address, "-n", "20", "--reconnect", *tls_args)
    )
    assert (client.code, client.stdout, client.stderr) == (0, b"hello\n", "")
    assert code == 0, report
    assert (report["round_trips"], report["tls_handshakes"], report["mismatches"]) == (20, 20, {})
