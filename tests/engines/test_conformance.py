"""One suite, every engine: what a client of any tcpecho engine can rely on.

Each test takes the ``server`` or ``serve`` fixture, so it runs once per engine.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading

import pytest

from tcpecho.protocol import BUSY_REPLY
from tcpecho.testing import RunningServer
from tests.helpers import (
    ServerFactory,
    connect,
    recv_exactly,
    recv_until_closed,
    require_peer,
)


def test_echo_is_exact_and_binary_safe(server: RunningServer) -> None:
    payload = bytes(range(256)) * 4 + b"\r\n\x00\xff"
    with connect(server.address) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload), chunk=10) == payload


def test_many_messages_come_back_in_order(server: RunningServer) -> None:
    messages = [f"message {i}\n".encode() for i in range(500)]
    with connect(server.address) as sock:
        for message in messages:
            sock.sendall(message)
        expected = b"".join(messages)
        assert recv_exactly(sock, len(expected), chunk=7) == expected


def test_one_megabyte_sent_while_reading_comes_back_whole(server: RunningServer) -> None:
    payload = os.urandom(1024 * 1024)
    with connect(server.address) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        received = recv_exactly(sock, len(payload))
        sender.join()
    assert received == payload


def test_two_hundred_clients_at_once_are_each_served(server: RunningServer) -> None:
    clients = [connect(server.address) for _ in range(200)]
    try:
        for number, sock in enumerate(clients):
            sock.sendall(b"client %d\n" % number)
        for number, sock in enumerate(clients):
            expected = b"client %d\n" % number
            assert recv_exactly(sock, len(expected)) == expected
    finally:
        for sock in clients:
            sock.close()


def test_half_close_echoes_everything_then_closes(server: RunningServer) -> None:
    payload = os.urandom(200_000)
    with connect(server.address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == payload


def test_reset_and_instant_close_leave_other_clients_served(server: RunningServer) -> None:
    with connect(server.address) as steady:
        steady.sendall(b"before\n")
        assert recv_exactly(steady, 7) == b"before\n"
        connect(server.address).close()
        resetter = connect(server.address)
        resetter.sendall(b"x" * 1000)
        resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetter.close()  # RST
        steady.sendall(b"after\n")
        assert recv_exactly(steady, 6) == b"after\n"
    with connect(server.address) as fresh:
        fresh.sendall(b"new\n")
        assert recv_exactly(fresh, 4) == b"new\n"


def test_line_framing_echoes_each_line_as_received(serve: ServerFactory) -> None:
    server = serve(framing="line")
    with connect(server.address) as sock:
        sock.sendall(b"one\r\ntw")
        assert recv_exactly(sock, 5) == b"one\r\n"
        sock.sendall(b"o\nthree")
        assert recv_exactly(sock, 4) == b"two\n"
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b"three"


def test_too_long_line_gets_a_readable_error_then_close(serve: ServerFactory) -> None:
    server = serve(framing="line", max_line_length=1000)
    with connect(server.address) as sock:
        sock.sendall(b"fine\n" + b"x" * 5000)
        received = recv_until_closed(sock)
    assert received == b"fine\nERROR line too long: more than 1000 bytes without a newline\n"
    with connect(server.address) as other:
        other.sendall(b"still here\n")
        assert recv_exactly(other, 11) == b"still here\n"


def test_error_survives_a_client_that_keeps_sending(serve: ServerFactory) -> None:
    """The error must not be destroyed by a reset when the client sends more after it."""
    server = serve(framing="line", max_line_length=100)
    with connect(server.address) as sock:
        sock.sendall(b"y" * 300)
        sock.sendall(b"z" * 100_000)
        received = b""
        while not received.endswith(b"\n"):
            received += sock.recv(100)
    assert received == b"ERROR line too long: more than 100 bytes without a newline\n"


def test_confirm_replies_one_line_per_line(serve: ServerFactory) -> None:
    server = serve(framing="line", reply="confirm", confirm_prefix="OK ")
    with connect(server.address) as sock:
        sock.sendall(b"a\r\nbb\n")
        assert recv_exactly(sock, 11) == b"OK a\nOK bb\n"


def test_confirm_in_raw_framing_prefixes_each_read(serve: ServerFactory) -> None:
    server = serve(reply="confirm")
    with connect(server.address) as sock:
        sock.sendall(b"hello")
        expected = b"Server received: hello"
        assert recv_exactly(sock, len(expected)) == expected


def test_stop_echoes_what_was_sent_then_closes(server: RunningServer) -> None:
    with connect(server.address) as sock:
        sock.sendall(b"last words\n")
        assert recv_exactly(sock, 11) == b"last words\n"
        summary = server.stop(timeout=10)
        assert recv_until_closed(sock) == b""
    assert summary.connections == 1
    assert summary.bytes_sent == 11


def test_stop_with_no_client_returns_at_once(server: RunningServer) -> None:
    summary = server.stop(timeout=5)
    assert summary.connections == 0


def test_forced_stop_closes_a_client_that_does_not_read(serve: ServerFactory) -> None:
    server = serve(drain_timeout=60)
    sock = connect(server.address)
    try:
        sock.setblocking(False)
        sent = 0
        while True:  # fill every buffer between us and the server's blocked reply
            try:
                sent += sock.send(b"x" * 65536)
            except BlockingIOError:
                break
        server.engine.stop()
        server.stop(force=True, timeout=10)
    finally:
        sock.close()
    assert sent > 0


def test_over_max_connections_a_client_is_told_busy(serve: ServerFactory) -> None:
    server = serve(max_connections=2)
    first, second = connect(server.address), connect(server.address)
    try:
        for sock in (first, second):  # both are being served before the third arrives
            sock.sendall(b"hi\n")
            assert recv_exactly(sock, 3) == b"hi\n"
        with connect(server.address) as third:
            assert recv_until_closed(third) == BUSY_REPLY
        first.sendall(b"still\n")
        assert recv_exactly(first, 6) == b"still\n"
    finally:
        first.close()
        second.close()


def test_ipv6_loopback(serve: ServerFactory) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = serve(host=("::1",))
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot listen on ::1: {exc}")
    with socket.create_connection(server.address[:2], timeout=10) as sock:
        sock.sendall(b"six\n")
        assert recv_exactly(sock, 4) == b"six\n"


def test_netcat_gets_its_lines_back(server: RunningServer) -> None:
    nc = require_peer("nc")
    host, port = server.address
    result = subprocess.run(
        [nc, "-N", host, str(port)],
        input=b"hello\nworld\n",
        capture_output=True,
        timeout=10,
        check=True,
    )
    assert result.stdout == b"hello\nworld\n"


def test_socat_gets_a_binary_file_back(server: RunningServer) -> None:
    socat = require_peer("socat")
    host, port = server.address
    payload = os.urandom(300_000)
    result = subprocess.run(
        [socat, "-t", "5", "-", f"TCP:{host}:{port},shut-down"],
        input=payload,
        capture_output=True,
        timeout=20,
        check=True,
    )
    assert result.stdout == payload


def test_two_thousand_clients_connecting_at_once_are_all_served(serve: ServerFactory) -> None:
    """The listen backlog holds a burst: every connect succeeds, every client gets its echo."""
    server = serve(max_connections=2100, max_per_address=0)
    clients = []
    try:
        for _ in range(2000):  # connect() returns once the kernel queued us, accepted or not
            clients.append(connect(server.address, timeout=30))
        for number, sock in enumerate(clients):
            sock.sendall(b"%d\n" % number)
        for number, sock in enumerate(clients):
            expected = b"%d\n" % number
            assert recv_exactly(sock, len(expected)) == expected
    finally:
        for sock in clients:
            sock.close()
