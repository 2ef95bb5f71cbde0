"""The connection lifecycle on every engine: timeouts, admission and the drain, as a client
sees them and as the server's events tell them."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from typing import Any

import pytest

from tcpecho.config import ServerConfig
from tcpecho.events import Closed, Draining, Event, InternalError, Opened, Refused
from tcpecho.protocol import BUSY_REPLY, CloseReason
from tcpecho.protocol.session import TOO_MANY_FROM_ADDRESS_REPLY, line_timeout_reply
from tcpecho.testing import RunningServer, running_server
from tests.helpers import (
    captured_server_log,
    connect,
    engine_options,
    recv_exactly,
    recv_until_closed,
)

# A timeout is enforced within this long after it is due (the promise).
SLACK = 0.5


class Observed:
    """A server and the events it emitted."""

    def __init__(self, server: RunningServer, events: list[Event]) -> None:
        self.server = server
        self.events = events

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def wait_for(self, kind: type[Any], count: int = 1, timeout: float = 10.0) -> list[Any]:
        """The events of ``kind``, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [event for event in self.events if isinstance(event, kind)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.01)


Start = Callable[..., Observed]


@pytest.fixture
def observe(engine: str) -> Iterator[Start]:
    """Start a server of each engine with ServerConfig options; record its events."""
    with ExitStack() as stack:

        def start(**options: Any) -> Observed:
            settings: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "drain_timeout": 2.0}
            settings.update(engine_options(engine), **options)
            config = ServerConfig(**settings)
            events: list[Event] = []
            server = stack.enter_context(running_server(config, [events.append]))
            return Observed(server, events)

        yield start


def closed_reasons(observed: Observed, count: int = 1) -> list[CloseReason]:
    return [event.reason for event in observed.wait_for(Closed, count)]


# quiet: no message is logged, so raw echo takes the engine's fast path (the engine echoes
# each read itself and asks the kernel when the client last sent); else every read goes through
# the session. Both must keep the same time.
QUIET = pytest.mark.parametrize("quiet", [False, True], ids=["logged", "quiet"])


@QUIET
def test_an_idle_client_is_closed_after_the_idle_timeout(observe: Start, quiet: bool) -> None:
    observed = observe(idle_timeout=1.0, quiet=quiet)
    with connect(observed.address) as sock:
        for _ in range(3):  # past the first deadline: the timer must learn of these
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
            time.sleep(0.4)
        sock.sendall(b"hello")
        quiet_since = time.monotonic()
        assert recv_exactly(sock, 5) == b"hello"
        assert recv_until_closed(sock) == b""
        idle = time.monotonic() - quiet_since
    assert 1.0 - 0.05 <= idle <= 1.0 + SLACK
    assert closed_reasons(observed) == [CloseReason.IDLE_TIMEOUT]


@QUIET
def test_a_client_that_keeps_talking_is_never_idle(observe: Start, quiet: bool) -> None:
    observed = observe(idle_timeout=0.5, quiet=quiet)
    with connect(observed.address) as sock:
        for _ in range(8):  # 2 s in all, four idle timeouts
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
            time.sleep(0.25)
    assert closed_reasons(observed) == [CloseReason.CLIENT_CLOSED]


def test_slowloris_gets_an_error_line_after_the_line_timeout_then_the_end(
    observe: Start,
) -> None:
    """A byte every 0.2 s never finishes a line: the line timeout counts from its first byte."""
    observed = observe(framing="line", line_timeout=1.0)
    received = bytearray()
    with connect(observed.address) as sock:
        sock.sendall(b"done\n")
        assert recv_exactly(sock, 5) == b"done\n"
        first_byte = time.monotonic()
        sock.setblocking(False)
        while time.monotonic() - first_byte < 3.0:
            try:
                sock.send(b"s")
                chunk = sock.recv(1024)
            except BlockingIOError:
                time.sleep(0.2)
                continue
            except OSError:
                break
            received += chunk
            if not chunk:
                break
        ended = time.monotonic() - first_byte
    assert bytes(received) == line_timeout_reply(1.0)
    assert 1.0 <= ended <= 1.0 + SLACK + 0.2
    assert closed_reasons(observed) == [CloseReason.LINE_TIMEOUT]


def flood_until_reset(sock: socket.socket, deadline: float) -> None:
    """Send without ever reading, until the server resets the connection (or ``deadline``)."""
    while time.monotonic() < deadline:
        try:
            sock.send(b"x" * 65536)
        except BlockingIOError:
            time.sleep(0.01)


def test_a_client_that_never_reads_is_cut_off_not_reading(observe: Start) -> None:
    observed = observe(write_timeout=1.0)
    sock = connect(observed.address)
    try:
        sock.setblocking(False)
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):  # the server's abort ends the flood
            flood_until_reset(sock, started + 20)
        [closed] = observed.wait_for(Closed)
    finally:
        sock.close()
    assert closed.reason is CloseReason.NOT_READING
    assert closed.duration < 10


def test_over_max_per_address_a_client_is_told_why_and_a_freed_place_is_reused(
    observe: Start,
) -> None:
    observed = observe(max_per_address=2)
    first, second = connect(observed.address), connect(observed.address)
    try:
        for sock in (first, second):
            sock.sendall(b"hi")
            assert recv_exactly(sock, 2) == b"hi"
        with connect(observed.address) as third:
            assert recv_until_closed(third) == TOO_MANY_FROM_ADDRESS_REPLY
        [refused] = observed.wait_for(Refused)
        assert refused.reason is CloseReason.REFUSED_PER_ADDRESS
        first.close()
        observed.wait_for(Closed)
        with connect(observed.address) as fourth:
            fourth.sendall(b"again")
            assert recv_exactly(fourth, 5) == b"again"
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    "access", [{"deny": ("127.0.0.0/8",)}, {"allow": ("10.0.0.0/8", "::1")}], ids=["deny", "allow"]
)
def test_a_denied_client_is_closed_at_once_with_no_reply(
    observe: Start, access: dict[str, tuple[str, ...]]
) -> None:
    observed = observe(**access)
    with connect(observed.address) as sock:
        sock.sendall(b"let me in")
        # Closed with our bytes unread, the kernel may reset: no reply either way.
        with suppress(ConnectionResetError):
            assert recv_until_closed(sock) == b""
    [refused] = observed.wait_for(Refused)
    assert refused.reason is CloseReason.REFUSED_DENIED
    assert not [event for event in observed.events if isinstance(event, Opened)]


def test_stopping_logs_how_many_connections_it_drains(observe: Start) -> None:
    observed = observe()
    clients = [connect(observed.address) for _ in range(3)]
    try:
        for sock in clients:
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        stopper = threading.Thread(target=observed.server.stop)
        stopper.start()
        for sock in clients:
            assert recv_until_closed(sock) == b""
            # Closed as a client should: the server lingers for this until its linger timeout,
            # which here is the drain timeout too (2 s), and which of the two comes first is a
            # race (the stdlib loop's connection timers run in their own thread).
            sock.close()
        stopper.join(10)
    finally:
        for sock in clients:
            sock.close()
    [draining] = observed.wait_for(Draining)
    assert draining.connections == 3
    assert closed_reasons(observed, 3) == [CloseReason.SERVER_STOPPING] * 3


@pytest.mark.parametrize("never", [float("inf"), 1e100], ids=["inf", "1e100"])
def test_timeouts_too_long_for_the_os_still_leave_the_others_working(
    observe: Start, never: float
) -> None:
    """The timeouts accept any number: one the OS cannot wait for (its waits refuse infinity
    and far-off times) must not break the connection, the line timeout or the drain."""
    observed = observe(
        framing="line",
        line_timeout=0.5,
        idle_timeout=never,
        write_timeout=never,
        drain_timeout=never,
    )
    with connect(observed.address) as slow, connect(observed.address) as open_one:
        open_one.sendall(b"kept\n")
        assert recv_exactly(open_one, 5) == b"kept\n"
        slow.sendall(b"hi\nabc")
        assert recv_exactly(slow, 3) == b"hi\n"
        assert recv_until_closed(slow) == line_timeout_reply(0.5)
        stopper = threading.Thread(target=observed.server.stop)
        stopper.start()
        assert recv_until_closed(open_one) == b""
        stopper.join(10)
    assert not stopper.is_alive()
    assert set(closed_reasons(observed, 2)) == {
        CloseReason.LINE_TIMEOUT,
        CloseReason.SERVER_STOPPING,
    }
    assert not [event for event in observed.events if isinstance(event, InternalError)]


def test_waits_cut_short_by_max_wait_are_armed_again_not_taken_for_the_deadline(
    observe: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engines wait at most MAX_WAIT (a day) at a time, so that a timeout of inf is no
    error; a longer timeout must still end at its own deadline. With MAX_WAIT at 0.1 s: an
    idle client is closed at its 0.8 s idle timeout, and one that never reads at its 0.8 s
    write timeout (a blocked send's wait)."""
    monkeypatch.setattr("tcpecho.engines.base.MAX_WAIT", 0.1)
    monkeypatch.setattr("tcpecho.engines.threaded.MAX_WAIT", 0.1)
    monkeypatch.setattr("tcpecho.engines.aio.MAX_WAIT", 0.1)
    observed = observe(idle_timeout=0.8, write_timeout=0.8)
    with connect(observed.address) as idle:
        idle.sendall(b"x")
        assert recv_exactly(idle, 1) == b"x"
        started = time.monotonic()
        assert recv_until_closed(idle) == b""
        waited = time.monotonic() - started
    assert 0.8 - 0.05 <= waited <= 0.8 + SLACK
    assert closed_reasons(observed) == [CloseReason.IDLE_TIMEOUT]
    flooder = connect(observed.address)
    try:
        flooder.setblocking(False)
        with pytest.raises(ConnectionResetError):
            flood_until_reset(flooder, time.monotonic() + 20)
    finally:
        flooder.close()
    not_reading = observed.wait_for(Closed, 2)[1]
    assert not_reading.reason is CloseReason.NOT_READING
    assert not_reading.duration >= 0.8  # its sends blocked after it opened: not cut at 0.1


def test_every_refused_and_closed_connection_is_counted_in_the_summary(observe: Start) -> None:
    observed = observe(max_connections=1)
    with connect(observed.address) as sock:
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"abc"
        for _ in range(3):
            with connect(observed.address) as refused:
                recv_until_closed(refused)
    observed.wait_for(Closed)
    summary = observed.server.stop(timeout=10)
    assert (summary.connections, summary.refused, summary.bytes_sent) == (1, 3, 3)


def test_the_reason_text_reaches_the_log_line(observe: Start) -> None:
    with captured_server_log() as log:
        observed = observe(idle_timeout=0.3)
        with connect(observed.address) as sock:
            assert recv_until_closed(sock) == b""
        observed.wait_for(Closed)
    lines = [r.getMessage() for r in log.records if getattr(r, "tag", "") == "DISCONNECTED"]
    assert len(lines) == 1
    assert "closed: idle (--idle-timeout)" in lines[0]


def test_ipv6_clients_are_admitted_and_denied_by_their_address(observe: Start) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        observed = observe(host=("::1",), deny=("::1/128",))
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot listen on ::1: {exc}")
    with (
        socket.create_connection(observed.address[:2], timeout=10) as sock,
        suppress(ConnectionResetError),
    ):
        assert recv_until_closed(sock) == b""
    [refused] = observed.wait_for(Refused)
    assert refused.reason is CloseReason.REFUSED_DENIED


def test_a_refused_client_that_keeps_sending_still_reads_the_whole_reason(
    observe: Start,
) -> None:
    """The refusal lingers (reads and discards) on every engine, so the reply is not destroyed
    by a reset when the client sent something first."""
    observed = observe(max_connections=1)
    with connect(observed.address) as holder:
        holder.sendall(b"x")
        assert recv_exactly(holder, 1) == b"x"
        for _ in range(20):
            with connect(observed.address) as refused:
                refused.sendall(b"please" * 1000)
                got = recv_exactly(refused, len(BUSY_REPLY))
                refused.sendall(b"still here")
                assert got == BUSY_REPLY
                assert recv_until_closed(refused) == b""
    assert len(observed.wait_for(Refused, 20)) == 20


def test_a_bug_in_one_connection_closes_it_alone_with_one_log_line(
    observe: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply policy that raises (a test double) on one message: that connection is closed
    and reported; the other client is served on, before and after."""

    def make_faulty_reply(*args: object) -> Callable[[bytes], bytes]:
        def reply(data: bytes) -> bytes:
            if b"boom" in data:
                raise ValueError("the reply policy broke")
            return b"ok: " + data

        return reply

    monkeypatch.setattr("tcpecho.protocol.connection.make_reply", make_faulty_reply)
    observed = observe(reply="confirm")
    with connect(observed.address) as steady, connect(observed.address) as victim:
        steady.sendall(b"one")
        assert recv_exactly(steady, 7) == b"ok: one"
        victim.sendall(b"boom")
        with suppress(ConnectionResetError):
            assert recv_until_closed(victim) == b""
        steady.sendall(b"two")
        assert recv_exactly(steady, 7) == b"ok: two"
    [error] = observed.wait_for(InternalError)
    assert isinstance(error.error, ValueError)
    reasons = closed_reasons(observed, 2)
    assert reasons.count(CloseReason.INTERNAL_ERROR) == 1
    assert reasons.count(CloseReason.CLIENT_CLOSED) == 1


# Reads of many sizes, each echoed before the next is sent: 71,206 bytes in all.
CHUNKS = [b"a", b"b" * 100, bytes(range(256)) * 20, b"c" * 65536]
ECHOED = sum(map(len, CHUNKS))


def send_chunks(sock: socket.socket) -> None:
    for chunk in CHUNKS:
        sock.sendall(chunk)
        assert recv_exactly(sock, len(chunk)) == chunk


def reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def end_by_closing(observed: Observed, sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)
    assert recv_until_closed(sock) == b""


def end_by_resetting(observed: Observed, sock: socket.socket) -> None:
    reset(sock)


def end_by_closing_then_resetting(observed: Observed, sock: socket.socket) -> None:
    sock.shutdown(socket.SHUT_WR)
    reset(sock)


def end_by_falling_idle(observed: Observed, sock: socket.socket) -> None:
    assert recv_until_closed(sock) == b""


def end_by_stopping(observed: Observed, sock: socket.socket) -> None:
    stopper = threading.Thread(target=observed.server.stop)
    stopper.start()
    assert recv_until_closed(sock) == b""
    stopper.join(10)


@pytest.mark.parametrize(
    ("end", "reasons"),
    [
        (end_by_closing, {CloseReason.CLIENT_CLOSED}),
        (end_by_resetting, {CloseReason.CLIENT_RESET}),
        (end_by_closing_then_resetting, {CloseReason.CLIENT_CLOSED, CloseReason.CLIENT_RESET}),
        (end_by_falling_idle, {CloseReason.IDLE_TIMEOUT}),
        (end_by_stopping, {CloseReason.SERVER_STOPPING}),
    ],
    ids=["closed", "reset", "closed-then-reset", "idle", "server-stopping"],
)
def test_quiet_raw_echo_counts_every_byte_however_the_connection_ends(
    observe: Start, end: Callable[[Observed, socket.socket], None], reasons: set[CloseReason]
) -> None:
    """Quiet raw echo is the engines' fast path, where a read can bypass the session (and, on
    the asyncio engine, Python: the kernel counts): the close still reports every byte."""
    observed = observe(quiet=True, idle_timeout=0.5)
    sock = connect(observed.address)
    try:
        send_chunks(sock)
        end(observed, sock)
    finally:
        sock.close()
    [closed] = observed.wait_for(Closed)
    assert closed.reason in reasons
    assert (closed.bytes_received, closed.bytes_sent) == (ECHOED, ECHOED)


@QUIET
def test_urgent_data_is_echoed_in_line_and_counted(observe: Start, quiet: bool) -> None:
    """A byte sent as TCP urgent data (MSG_OOB) is a byte like any other: echoed in its place."""
    observed = observe(quiet=quiet)
    with connect(observed.address) as sock:
        sock.sendall(b"abc")
        sock.send(b"!", socket.MSG_OOB)
        sock.sendall(b"def")
        assert recv_exactly(sock, 7) == b"abc!def"
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b""
    [closed] = observed.wait_for(Closed)
    assert (closed.bytes_received, closed.bytes_sent) == (7, 7)
