"""What `tcpecho.net` reads from the kernel about a connection, on real loopback sockets."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tcpecho import net
from tests.helpers import recv_exactly

pytestmark = pytest.mark.skipif(not net.INPUT_AGE_KNOWN, reason="no TCP_INFO on this OS")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A client and the server's end of its connection, over loopback on a port the OS picks."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_input_age_counts_from_the_last_data_that_arrived(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    client.sendall(b"first")
    assert recv_exactly(server, 5) == b"first"
    time.sleep(0.3)
    sent = time.monotonic()
    client.sendall(b"second")
    assert recv_exactly(server, 6) == b"second"
    time.sleep(0.2)
    age = net.input_age(server)
    assert age is not None
    # Counted in the kernel's ticks (4 ms at 250 Hz; 10 ms at the slowest, 100 Hz): both ends of
    # the age fall on a tick, so it can be a tick short or a tick long.
    assert 0.2 - 0.011 <= age <= time.monotonic() - sent + 0.011


def test_input_age_is_not_moved_by_what_the_server_sends(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    client.sendall(b"x")
    assert recv_exactly(server, 1) == b"x"
    time.sleep(0.2)
    server.sendall(b"reply")
    assert recv_exactly(client, 5) == b"reply"
    age = net.input_age(server)
    assert age is not None
    assert age >= 0.19


def test_input_age_of_a_closed_socket_is_unknown() -> None:
    sock = socket.socket()
    sock.close()
    assert net.input_age(sock) is None


def test_bytes_read_counts_what_was_read_not_what_is_queued(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    net.count_reads(server)
    assert net.bytes_read(server) == 0
    client.sendall(b"x" * 1000)
    assert recv_exactly(server, 400) == b"x" * 400
    assert net.bytes_read(server) == 400


def test_bytes_read_does_not_count_the_fin_read_or_not(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    net.count_reads(server)
    client.sendall(b"y" * 10)
    client.shutdown(socket.SHUT_WR)
    assert recv_exactly(server, 4) == b"y" * 4
    assert net.bytes_read(server) == 4  # the FIN has arrived, not been read
    assert recv_exactly(server, 6) == b"y" * 6
    assert net.bytes_read(server) == 10
    assert server.recv(1) == b""
    assert net.bytes_read(server) == 10


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_bytes_read_after_a_reset(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    net.count_reads(server)
    client.sendall(b"z" * 5)
    assert recv_exactly(server, 2) == b"zz"
    reset(client)
    assert net.bytes_read(server) == 2


def test_bytes_read_after_a_fin_then_a_reset_with_the_fin_unread(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """After a reset the TCP state no longer tells whether a FIN came first; the count must."""
    client, server = pair
    net.count_reads(server)
    client.sendall(b"w" * 7)
    assert recv_exactly(server, 7) == b"w" * 7
    client.shutdown(socket.SHUT_WR)
    reset(client)
    assert net.bytes_read(server) == 7


def test_bytes_read_past_urgent_data_in_line(pair: tuple[socket.socket, socket.socket]) -> None:
    """FIONREAD stops at an urgent mark; the count does not."""
    client, server = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    net.count_reads(server)
    client.sendall(b"abc")
    client.send(b"!", socket.MSG_OOB)
    client.sendall(b"def")
    assert recv_exactly(server, 2) == b"ab"
    assert net.bytes_read(server) == 2
    assert recv_exactly(server, 5) == b"c!def"
    assert net.bytes_read(server) == 7
