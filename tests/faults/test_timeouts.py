"""Clients that hold a connection without using it: idle, slowloris, not reading. Each is
closed on time, with the [DISCONNECTED] line that names why."""

from __future__ import annotations

import select
import time

from tests.faults.harness import StartServer, flood_until_reset, peer_of
from tests.helpers import connect, recv_exactly, recv_until_closed

TIMEOUT = 1.0
# A timeout is enforced within this long after it is due (the promise).
LATE = 0.5
# The client measures from moments a little after the server's own (its echo, its first
# byte, its first send travel first), so it may see a timeout slightly early; a timer that
# really fired early would be off by far more than this.
EARLY = 0.1
# Slowloris: one byte this often, well inside the line timeout.
DRIP_INTERVAL = 0.3


def test_an_idle_client_is_closed_on_time(fault_server: StartServer) -> None:
    server = fault_server("-q", f"--idle-timeout={TIMEOUT:g}")
    mark = server.mark()
    with connect(server.address) as sock:
        peer = peer_of(sock)
        sock.sendall(b"hello\n")
        assert recv_exactly(sock, 6) == b"hello\n"
        quiet_since = time.monotonic()
        rest = recv_until_closed(sock)
        idle = time.monotonic() - quiet_since
    server.record("closed_after_s", round(idle, 3))

    def expected() -> None:
        assert rest == b""  # no reply: in raw framing one would corrupt the echo
        assert TIMEOUT - EARLY <= idle <= TIMEOUT + LATE
        server.wait_for("[DISCONNECTED]", f"{peer} closed: idle (--idle-timeout)", since=mark)

    server.check(expected)


def test_a_slowloris_line_is_cut_off_on_time(fault_server: StartServer) -> None:
    """One byte every 0.3 s and never a newline: the line timeout counts from the first."""
    server = fault_server("-q", "--framing=line", f"--line-timeout={TIMEOUT:g}")
    mark = server.mark()
    with connect(server.address) as sock:
        peer = peer_of(sock)
        started = time.monotonic()
        sock.sendall(b"s")
        # Wait for the reply, one drip at a time: select returns at once when the reply comes.
        while not select.select([sock], [], [], DRIP_INTERVAL)[0]:
            assert time.monotonic() - started < TIMEOUT + LATE + DRIP_INTERVAL, "no reply"
            sock.sendall(b"s")
        answered = time.monotonic() - started
        reply = recv_until_closed(sock)  # the error line, then the server's end
    server.record("answered_after_s", round(answered, 3))

    def expected() -> None:
        assert reply == b"ERROR line timeout: no newline within 1s\n"
        assert TIMEOUT - EARLY <= answered <= TIMEOUT + LATE
        line = server.wait_for(
            "[DISCONNECTED]", f"{peer} closed: line not finished in time", since=mark
        )[0]
        assert "discarded (line not finished in time)" in line.text

    server.check(expected)


def test_a_client_that_does_not_read_is_cut_off_on_time(fault_server: StartServer) -> None:
    """It sends without reading until the server's writes block; --write-timeout later the
    server aborts it. The server's writes block after the client's first send and (but for a
    moment of slow reading) before the client's send buffer is first full: the server stops
    reading once its own writes block, and then the client's buffer fills. So the cut-off is
    checked never early from the first, and never more than LATE late from the second; under
    load the buffers take long to fill, which would count against the server from the first."""
    server = fault_server("-q", f"--write-timeout={TIMEOUT:g}")
    mark = server.mark()
    [flood] = flood_until_reset(server, 1, timeout=TIMEOUT + 10).floods
    assert flood.reset_at is not None, "never cut off"
    since_first_send = flood.reset_at - flood.started
    since_blocked = flood.reset_at - (flood.blocked_at or flood.started)
    server.record("cut_off_after_s", round(since_first_send, 3))
    server.record("cut_off_after_blocked_s", round(since_blocked, 3))
    server.record("sent_before_cut_off", flood.sent)

    def expected() -> None:
        assert since_first_send >= TIMEOUT - EARLY
        assert since_blocked <= TIMEOUT + LATE
        server.wait_for("[DISCONNECTED]", "closed: not reading (--write-timeout)", since=mark)

    server.check(expected)
