"""The PROXY protocol on every engine, with real sockets: the header names the client that the
echo, the log, admission and the greeting then use; a bad or untrusted header is one log line
and a close. This process plays the proxy (headers from tcpecho.protocol's encoders)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tcpecho.config import ServerConfig
from tcpecho.protocol import PROXY_HEADER_TIMEOUT, encode_proxy_v1, encode_proxy_v2
from tcpecho.protocol.session import TOO_MANY_FROM_ADDRESS_REPLY
from tcpecho.testing import RunningServer, running_server
from tests.helpers import (
    CapturedRecords,
    captured_server_log,
    connect,
    engine_options,
    recv_exactly,
    require_peer,
)

CLIENT = ("203.0.113.5", 4000)
OTHER_CLIENT = ("203.0.113.6", 4001)
DESTINATION = ("198.51.100.1", 80)
LOG_WAIT = 5.0  # seconds a log line may take to appear after what caused it


def header(version: str, source: tuple[str, int] = CLIENT) -> bytes:
    destination = DESTINATION if ":" not in source[0] else ("2001:db8::1", 80)
    if version == "v1":
        return encode_proxy_v1(source, destination)
    return encode_proxy_v2(source, destination)


def local_peer(sock: socket.socket) -> str:
    """How the server names this socket's end: the proxy's address in its log."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def reply_until_closed(sock: socket.socket) -> bytes:
    """What the server sends until it closes; a reset (the server closed with our bytes
    unread) counts as the close."""
    parts: list[bytes] = []
    try:
        while data := sock.recv(65536):
            parts.append(data)
    except ConnectionResetError:
        pass
    return b"".join(parts)


class Proxied:
    """A server behind "this process as its proxy", and its log lines."""

    def __init__(self, server: RunningServer, records: CapturedRecords) -> None:
        self.server = server
        self.records = records

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def lines(self, tag: str) -> list[str]:
        return [
            record.getMessage()
            for record in list(self.records.records)
            if getattr(record, "tag", None) == tag
        ]

    def wait_for(self, tag: str, count: int = 1) -> list[str]:
        """The lines tagged ``tag``, once there are ``count`` of them (or LOG_WAIT passed)."""
        deadline = time.monotonic() + LOG_WAIT
        while len(found := self.lines(tag)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return found

    def echo_through(
        self, data: bytes, version: str = "v2", source: tuple[str, int] = CLIENT
    ) -> None:
        """A canary: a proxied client that still gets an exact echo."""
        with connect(self.address) as sock:
            sock.sendall(header(version, source) + data)
            assert recv_exactly(sock, len(data)) == data


Start = Callable[..., Proxied]


@pytest.fixture
def start(engine: str) -> Iterator[Start]:
    """Start servers of each engine behind this process as a trusted proxy (127.0.0.0/8,
    ``--proxy-protocol on``), with any other ServerConfig options; capture the log."""
    with ExitStack() as stack:
        records = stack.enter_context(captured_server_log())

        def start(**options: Any) -> Proxied:
            settings: dict[str, Any] = {
                "host": "127.0.0.1",
                "port": 0,
                "drain_timeout": 1.0,
                "proxy_protocol": "on",
                "proxy_trusted": ("127.0.0.0/8",),
            }
            settings.update(engine_options(engine), **options)
            server = stack.enter_context(running_server(ServerConfig(**settings)))
            return Proxied(server, records)

        yield start


# A header, then data


@pytest.mark.parametrize(
    ("version", "source", "logged"),
    [
        ("v1", CLIENT, "203.0.113.5:4000"),
        ("v2", CLIENT, "203.0.113.5:4000"),
        ("v1", ("2001:db8::5", 4000), "[2001:db8::5]:4000"),
        ("v2", ("2001:db8::5", 4000), "[2001:db8::5]:4000"),
    ],
    ids=["v1", "v2", "v1-tcp6", "v2-inet6"],
)
# quiet: after the header, raw echo takes the engine's fast path (on uvloop, direct echo, whose
# byte count, from the kernel, must leave the header out).
@pytest.mark.parametrize("quiet", [False, True], ids=["logged", "quiet"])
def test_a_header_then_data_is_echoed_exactly_and_logged_as_the_client_via_the_proxy(
    start: Start, version: str, source: tuple[str, int], logged: str, quiet: bool
) -> None:
    server = start(quiet=quiet)
    payload = bytes(range(256)) * 40
    with connect(server.address) as sock:
        proxy = local_peer(sock)
        raw = header(version, source)
        sock.sendall(raw[:7])  # the header in two pieces, the second with the first data
        sock.sendall(raw[7:] + payload[:1000])
        assert recv_exactly(sock, 1000, chunk=10) == payload[:1000]
        sock.sendall(payload[1000:])
        assert recv_exactly(sock, len(payload) - 1000) == payload[1000:]
    [opened] = server.wait_for("NEW CONNECTION")
    assert opened.startswith(f"{logged} connected (via {proxy}). Active connections: 1")
    [closed] = server.wait_for("DISCONNECTED")
    assert closed.startswith(f"{logged} closed by client")
    assert f"({len(payload)} bytes received, {len(payload)} sent" in closed


def test_data_in_the_same_read_as_the_header_is_logged_once(start: Start) -> None:
    """A message that arrives with the header is held until the connection opens, then logged
    once (opening logs it; the read that brought it must not log it again)."""
    server = start()
    with connect(server.address) as sock:
        sock.sendall(header("v2") + b"hello\n")  # one write, one read on loopback
        assert recv_exactly(sock, 6) == b"hello\n"
    server.wait_for("DISCONNECTED")
    assert server.lines("203.0.113.5:4000") == ["hello\\n"]


def test_greeting_info_is_one_json_line_naming_the_client_server_and_proxy(start: Start) -> None:
    server = start(greeting="info")
    with connect(server.address) as sock:
        sock.sendall(header("v2") + b"after the greeting\n")
        greeting = json.loads(sock.makefile("rb").readline())
        assert greeting["client"] == "203.0.113.5:4000"
        assert greeting["server"] == f"127.0.0.1:{server.address[1]}"
        assert greeting["proxy"] == local_peer(sock)
        assert greeting["proxy_destination"] == "198.51.100.1:80"
        assert greeting["tls"] is None
        assert greeting["server_id"] == socket.gethostname()


def test_greeting_info_without_a_proxy_names_the_peer_itself(start: Start) -> None:
    """A connection that is open at once (no header, no handshake) is greeted too, before it
    sends anything."""
    server = start(proxy_protocol="off", proxy_trusted=(), greeting="info")
    with connect(server.address) as sock:
        reader = sock.makefile("rb")
        greeting = json.loads(reader.readline())
        assert greeting["client"] == local_peer(sock)
        assert greeting["server"] == f"127.0.0.1:{server.address[1]}"
        assert greeting["proxy"] is None
        sock.sendall(b"then echo\n")
        assert reader.readline() == b"then echo\n"


# Who may send a header


def test_on_refuses_an_untrusted_peer_with_no_reply_and_one_line(start: Start) -> None:
    server = start(proxy_trusted=("192.0.2.0/24",))
    with connect(server.address) as sock:
        peer = local_peer(sock)
        sock.sendall(header("v1") + b"hello")
        assert reply_until_closed(sock) == b""
    [refused] = server.wait_for("REFUSED")
    assert refused == f"{peer} refused: not a trusted proxy (--proxy-trusted)"
    assert server.lines("NEW CONNECTION") == []
    assert server.lines("DISCONNECTED") == []


@pytest.mark.parametrize("pieces", [[b"plain hello\n"], [b"PRO", b"BLEM\n"], [b"\r\n", b"hi"]])
def test_optional_serves_a_trusted_peer_without_a_header_as_plain_echo(
    start: Start, pieces: list[bytes]
) -> None:
    server = start(proxy_protocol="optional")
    data = b"".join(pieces)
    with connect(server.address) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.02)  # separate reads, as far as the network goes
        assert recv_exactly(sock, len(data)) == data
        peer = local_peer(sock)
    [opened] = server.wait_for("NEW CONNECTION")
    assert opened.startswith(f"{peer} connected. ")


def test_optional_still_takes_a_header(start: Start) -> None:
    server = start(proxy_protocol="optional")
    server.echo_through(b"proxied\n", "v1")
    [opened] = server.wait_for("NEW CONNECTION")
    assert opened.startswith("203.0.113.5:4000 connected (via 127.0.0.1:")


def test_optional_with_socat_as_a_real_peer_that_sends_no_header(start: Start) -> None:
    socat = require_peer("socat")
    server = start(proxy_protocol="optional")
    host, port = server.address
    done = subprocess.run(
        [socat, "-t", "2", "-", f"TCP:{host}:{port}"],
        input=b"from socat\n",
        capture_output=True,
        timeout=10,
        check=True,
    )
    assert done.stdout == b"from socat\n"


# Bad headers

V2 = encode_proxy_v2(CLIENT, DESTINATION)
BAD_HEADERS = {
    "no signature": (b"GET / HTTP/1.0\r\n\r\n", "no PROXY v1 or v2 signature"),
    "v1 bad address": (
        b"PROXY TCP4 203.0.113.500 198.51.100.1 4000 80\r\n",
        "PROXY v1: bad TCP4 address",
    ),
    "v1 no CRLF": (b"PROXY TCP4 " + b"1" * 120, "PROXY v1: no CRLF within 107 bytes"),
    "v2 bad version": (V2[:12] + b"\x11" + V2[13:], "PROXY v2: bad version 0x1"),
    "v2 over the cap": (V2[:14] + b"\xff\xff" + V2[16:], "PROXY v2: address block of 65535"),
}


@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
def test_a_bad_header_is_one_line_and_a_close_and_others_are_still_served(
    start: Start, kind: str
) -> None:
    bad, message = BAD_HEADERS[kind]
    server = start()
    with connect(server.address) as sock:
        peer = local_peer(sock)
        sock.sendall(bad + b"data after it")
        assert reply_until_closed(sock) == b""
    server.echo_through(b"canary\n")
    disconnected = server.wait_for("DISCONNECTED", 2)
    bad_lines = [line for line in disconnected if "bad PROXY header" in line]
    assert len(bad_lines) == 1
    assert bad_lines[0].startswith(f"{peer} closed: bad PROXY header: {message}")
    assert "0 sent" in bad_lines[0]


def test_the_proxys_end_inside_a_header_closes_at_once(start: Start) -> None:
    """Not at the header's deadline (PROXY_HEADER_TIMEOUT): a header cut short by the end."""
    server = start()
    with connect(server.address) as sock:
        peer = local_peer(sock)
        sock.sendall(header("v1")[:10])
        sock.shutdown(socket.SHUT_WR)
        began = time.monotonic()
        assert reply_until_closed(sock) == b""
        assert time.monotonic() - began < PROXY_HEADER_TIMEOUT / 2
    [closed] = server.wait_for("DISCONNECTED")
    assert closed.startswith(
        f"{peer} closed: bad PROXY header: PROXY: the connection ended inside the header"
    )


def test_a_connect_only_health_check_is_closed_at_once_as_closed_by_client(start: Start) -> None:
    server = start()
    with connect(server.address) as sock:
        peer = local_peer(sock)
        sock.shutdown(socket.SHUT_WR)
        began = time.monotonic()
        assert reply_until_closed(sock) == b""
        assert time.monotonic() - began < PROXY_HEADER_TIMEOUT / 2
    [closed] = server.wait_for("DISCONNECTED")
    assert closed.startswith(f"{peer} closed by client")
    server.echo_through(b"canary")


def test_a_stop_closes_connections_still_waiting_for_their_header_at_once(start: Start) -> None:
    server = start(drain_timeout=3.0)
    with connect(server.address) as partial, connect(server.address) as silent:
        partial.sendall(header("v2")[:9])
        server.echo_through(b"canary")  # both connections are accepted by now
        server.wait_for("DISCONNECTED")  # the canary's, before the stop
        began = time.monotonic()
        server.server.stop(timeout=5.0)
        assert time.monotonic() - began < 1.0  # not the drain timeout
        assert reply_until_closed(partial) == reply_until_closed(silent) == b""
    closed = server.wait_for("DISCONNECTED", 3)
    assert sum("closed: server stopping" in line for line in closed) == 2


# Admission applies to the client the header names


def test_deny_applies_to_the_client_in_the_header(start: Start) -> None:
    server = start(deny=("198.18.0.0/15",))
    with connect(server.address) as sock:
        proxy = local_peer(sock)
        sock.sendall(header("v2", ("198.18.0.7", 5000)) + b"let me in")
        assert reply_until_closed(sock) == b""
    [refused] = server.wait_for("REFUSED")
    assert refused == f"198.18.0.7:5000 (via {proxy}) refused: address denied (--allow/--deny)"
    server.echo_through(b"served", source=CLIENT)
    # A refused connection has its REFUSED line only: the one DISCONNECTED is the served one.
    [closed] = server.wait_for("DISCONNECTED")
    assert closed.startswith("203.0.113.5:4000 closed by client")


def test_max_per_address_counts_the_client_not_the_proxy(start: Start) -> None:
    server = start(max_per_address=1)
    with ExitStack() as stack:
        first = stack.enter_context(connect(server.address))
        first.sendall(header("v1") + b"one")
        assert recv_exactly(first, 3) == b"one"
        # The same client through the same proxy: refused, with the per-address line.
        second = stack.enter_context(connect(server.address))
        second.sendall(header("v2") + b"two")
        assert reply_until_closed(second) == TOO_MANY_FROM_ADDRESS_REPLY
        # Another client through the same proxy: served beside the first.
        third = stack.enter_context(connect(server.address))
        third.sendall(header("v2", OTHER_CLIENT) + b"three")
        assert recv_exactly(third, 5) == b"three"
        first.sendall(b"still")
        assert recv_exactly(first, 5) == b"still"
    [refused] = server.wait_for("REFUSED")
    assert refused.startswith("203.0.113.5:4000 (via 127.0.0.1:")
    assert refused.endswith("refused: too many connections from this address (--max-per-address)")
    # The refused client's place is given back: the same client is served once alone.
    server.wait_for("DISCONNECTED", 2)
    server.echo_through(b"again")


def test_a_local_header_health_check_is_served_as_the_proxys_own_connection(
    start: Start,
) -> None:
    """HAProxy's check with send-proxy-v2: a LOCAL header; the peer is the client."""
    server = start(max_per_address=1)
    with ExitStack() as stack:
        socks = [stack.enter_context(connect(server.address)) for _ in range(2)]
        for sock in socks:
            sock.sendall(encode_proxy_v2(None, None) + b"check")
        for sock in socks:
            assert recv_exactly(sock, 5) == b"check"
        peers = [local_peer(sock) for sock in socks]
    opened = server.wait_for("NEW CONNECTION", 2)
    assert sorted(line.split(" ")[0] for line in opened) == sorted(peers)
    assert all("via" not in line for line in opened)


# The real client


def test_the_client_sends_a_v1_header_and_prints_the_greeting(start: Start) -> None:
    """``tcpecho client --send-proxy v1 --greeting``: the server names the client from the
    header, greets it, and the client prints the greeting, then the echo."""
    server = start(greeting="info")
    host, port = server.address
    command = [sys.executable, "-m", "tcpecho", "client", "--host", host, "--port", str(port)]
    done = subprocess.run(
        [*command, "--send-proxy", "v1", "--greeting"],
        input="through the client\n",
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    greeting_line, echo = done.stdout.splitlines()
    greeting = json.loads(greeting_line)
    assert echo == "through the client"
    assert greeting["proxy"].startswith("127.0.0.1:")
    assert greeting["proxy_destination"] == f"127.0.0.1:{port}"
    [opened] = server.wait_for("NEW CONNECTION")
    assert " (via 127.0.0.1:" in opened
