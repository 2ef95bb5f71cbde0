"""Floods that would grow the server's memory if it buffered them: a line that never ends,
and clients that send without reading their replies."""

from __future__ import annotations

import errno
import select
import socket
import time
from dataclasses import dataclass, field

import pytest

from tcpecho.engines.base import RECV_SIZE, WRITE_BUFFER_HIGH_WATER
from tcpecho.protocol.framing import MAX_LINE_LENGTH
from tests.faults.harness import FaultServer, StartServer, flood_until_reset, peer_of
from tests.helpers import connect, recv_until_closed

KIB = 1024
MIB = 1024 * KIB
# The endless line: 100 MB without a newline, in sends of 1 MiB.
FLOOD_BYTES = 100 * 1000 * 1000
FLOOD_SEND = b"x" * MIB
# The server may grow by less than this while it discards the endless line: it holds at most
# one line (64 KiB) and one read, so 10 MB is allocator slack, not a buffer.
LINE_FLOOD_RSS_LIMIT = 10 * MIB
# Sample the server's RSS after every this many bytes sent.
RSS_SAMPLE_EVERY = 4 * MIB


@dataclass(slots=True)
class LineFlood:
    reply: bytearray = field(default_factory=bytearray)
    sent: int = 0
    peak_rss: int = 0


def flood_one_line(sock: socket.socket, server: FaultServer) -> LineFlood:
    """Send FLOOD_BYTES without a newline, reading what comes back, until all is sent or the
    server resets the connection; then send our end and read until the server's."""
    flood = LineFlood(peak_rss=server.rss())
    sock.setblocking(False)
    reading = True  # until the server's end (after the error line)
    next_sample = 0
    deadline = time.monotonic() + 30
    while flood.sent < FLOOD_BYTES:
        assert time.monotonic() < deadline, f"only {flood.sent} bytes sent in 30 s"
        readable, writable, _ = select.select([sock] if reading else [], [sock], [], 5.0)
        try:
            if readable:
                data = sock.recv(65536)
                flood.reply += data
                reading = bool(data)
            if writable:
                flood.sent += sock.send(FLOOD_SEND[: FLOOD_BYTES - flood.sent])
        except (BrokenPipeError, ConnectionResetError):
            break  # the linger ended with our bytes unread: the server reset
        except BlockingIOError:
            pass
        if flood.sent >= next_sample:
            flood.peak_rss = max(flood.peak_rss, server.rss())
            next_sample = flood.sent + RSS_SAMPLE_EVERY
    flood.peak_rss = max(flood.peak_rss, server.rss())
    sock.settimeout(10.0)
    try:
        sock.shutdown(socket.SHUT_WR)
        flood.reply += recv_until_closed(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # reset: nothing more to read
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:  # shutdown after a reset
            raise
    return flood


def test_a_line_that_never_ends_is_refused_at_the_limit_and_never_buffered(
    fault_server: StartServer,
) -> None:
    """The client sends 100 MB without a newline, reading as it goes. The server answers
    the error after 64 KiB and sends its end, then lingers, reading and discarding, for up to
    2 s: the client goes on sending through that, until it has sent it all or the server
    resets the connection, so that a server which buffered what it discards would show."""
    server = fault_server("-q", "--framing=line")
    idle_rss = server.rss()
    mark = server.mark()
    with connect(server.address) as sock:
        peer = peer_of(sock)
        flood = flood_one_line(sock, server)
    growth = flood.peak_rss - idle_rss
    server.record("bytes_sent", flood.sent)
    server.record("rss_idle", idle_rss)
    server.record("rss_growth", growth)

    def expected() -> None:
        assert bytes(flood.reply) == (
            b"ERROR line too long: more than %d bytes without a newline\n" % MAX_LINE_LENGTH
        )
        assert growth < LINE_FLOOD_RSS_LIMIT, f"RSS grew {growth / MIB:.1f} MiB"
        line = server.wait_for("[DISCONNECTED]", peer, since=mark)[0].text
        assert "closed: line too long (--max-line-length)" in line
        assert "discarded (line too long)" in line

    server.check(expected)


# The server's memory per client that sends and never reads, and why:
# - asyncio: the transport's buffer stops the reading at WRITE_BUFFER_HIGH_WATER (256 KiB),
#   and may pass it by the one read (RECV_SIZE, 64 KiB) whose echo crossed it; one more
#   read's copy may be in hand;
# - threads: one read (64 KiB) held in a blocked send;
# - either: 64 KiB for the connection's objects, the thread's stack pages, and malloc's
#   headers and rounding around 64 KiB blocks.
# Socket buffers (the "kernel buffers": here up to several MiB a connection, as loopback
# autotunes them) are kernel memory, not part of the process's RSS.
# Measured on the 2-core test VM with 200 clients: 29-52 MiB for threads, 64-75 MiB for
# asyncio on either loop (up to ~380 KiB a client), under a bound of 103.5 MiB; a server
# that read on would buffer what the clients send, GiBs.
PER_FLOODING_CLIENT = WRITE_BUFFER_HIGH_WATER + 2 * RECV_SIZE + 64 * KIB
# Whatever the number of clients: the allocator's arenas and free lists, which keep memory
# once used rather than return it.
FLOOD_RSS_SLACK = 16 * MIB
WRITE_TIMEOUT = 1.0


@pytest.mark.parametrize("clients", [1, 200])
def test_clients_that_never_read_cannot_grow_the_server(
    fault_server: StartServer, clients: int
) -> None:
    """Each client sends as fast as the server takes it and never reads. The server stops
    reading from each once its writes block, so its RSS stays within a bound per client,
    and cuts each off --write-timeout later."""
    server = fault_server("-q", f"--write-timeout={WRITE_TIMEOUT:g}")
    idle_rss = server.rss()
    mark = server.mark()
    result = flood_until_reset(server, clients, timeout=WRITE_TIMEOUT + 20)
    growth = result.peak_rss - idle_rss
    bound = clients * PER_FLOODING_CLIENT + FLOOD_RSS_SLACK
    server.record("rss_idle", idle_rss)
    server.record("rss_growth", growth)
    server.record("rss_bound", bound)
    server.record("max_sent_by_one_client", max(flood.sent for flood in result.floods))

    def expected() -> None:
        assert all(flood.reset_at is not None for flood in result.floods), "not all cut off"
        assert growth < bound, f"RSS grew {growth / MIB:.1f} MiB, bound {bound / MIB:.1f} MiB"
        server.wait_for(
            "[DISCONNECTED]", "closed: not reading (--write-timeout)", count=clients, since=mark
        )

    server.check(expected)
