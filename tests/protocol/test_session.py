"""Session: a connection's whole life, driven with bytes and times alone (no socket, no clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpecho.protocol import BUSY_REPLY, CloseReason, Command, Session, SessionSettings
from tcpecho.protocol.session import (
    _TRANSITIONS,
    TOO_MANY_FROM_ADDRESS_REPLY,
    State,
    line_timeout_reply,
    reason_for_error,
)

IDLE, LINE, WRITE, LINGER = 300.0, 30.0, 30.0, 2.0
RAW = SessionSettings(idle_timeout=IDLE, line_timeout=LINE, write_timeout=WRITE)
LINES = SessionSettings(framing="line", idle_timeout=IDLE, line_timeout=LINE, write_timeout=WRITE)


def feed(session: Session, chunks: list[bytes], now: float = 1.0) -> bytes:
    return b"".join(session.receive_data(chunk, now) for chunk in chunks)


def drive_timer(session: Session, until: float) -> bytes:
    """Fire the timer at every deadline the session announces, up to ``until``, as an engine
    whose client reads everything would: a close or an abort ends the connection at once.
    Returns the replies."""
    out = b""
    while (deadline := session.next_deadline()) is not None and deadline <= until:
        out += session.handle_timeout(deadline)
        closes = {Command.CLOSE, Command.ABORT} & set(session.take_commands())
        if closes and session.state is not State.CLOSED:
            session.connection_lost(None)
    return out


# Raw echo


@given(st.lists(st.binary(min_size=1, max_size=100), max_size=30))
def test_raw_echo_returns_every_read_as_it_came_and_builds_no_command(chunks: list[bytes]) -> None:
    session = Session(RAW, 0.0)
    for chunk in chunks:
        assert session.receive_data(chunk, 1.0) is chunk
    assert session.commands == []
    assert session.state is State.OPEN
    assert session.bytes_received == session.bytes_sent == sum(map(len, chunks))


def test_the_clients_end_closes_after_the_replies_with_closed_by_client() -> None:
    session = Session(RAW, 0.0)
    feed(session, [b"abc"])
    assert session.receive_data(b"", 2.0) == b""
    assert session.take_commands() == [Command.RESCHEDULE, Command.CLOSE]
    assert session.state is State.CLOSING
    session.connection_lost(None)
    assert (session.state, session.reason) == (State.CLOSED, CloseReason.CLIENT_CLOSED)


# Timeouts


def test_idle_timeout_closes_only_after_that_long_without_input() -> None:
    session = Session(RAW, 0.0)
    assert session.next_deadline() == IDLE
    feed(session, [b"x"], now=100.0)
    # The armed timer fires at the old deadline: too early now, nothing happens.
    assert session.handle_timeout(IDLE) == b""
    assert session.take_commands() == []
    assert session.next_deadline() == 100.0 + IDLE
    session.handle_timeout(100.0 + IDLE)
    assert session.take_commands()[-1] is Command.CLOSE
    assert session.reason is CloseReason.IDLE_TIMEOUT


def engine_echo(session: Session, data: bytes) -> bytes:
    """What an engine's fast path does with a read while `echoes_raw`: count it, echo it."""
    assert session.echoes_raw
    session.echoed_by_engine += len(data)
    return data


def test_reads_the_engine_echoed_count_as_input_at_the_time_the_engine_gives() -> None:
    session = Session(RAW, 0.0)
    assert session.next_deadline() == IDLE
    for _ in range(3):
        engine_echo(session, b"abc")
    # The timer fires at the old deadline; the engine says the last input came at 100.
    assert session.handle_timeout(IDLE, input_at=100.0) == b""
    assert session.take_commands() == []
    assert session.next_deadline() == 100.0 + IDLE
    session.handle_timeout(100.0 + IDLE - 0.001)
    assert session.state is State.OPEN  # not a moment early
    session.handle_timeout(100.0 + IDLE)
    assert session.take_commands()[-1] is Command.CLOSE
    assert session.reason is CloseReason.IDLE_TIMEOUT
    assert session.bytes_received == session.bytes_sent == 9


def test_without_the_engines_time_reads_it_echoed_count_as_input_when_the_timer_fires() -> None:
    """Never early: the session cannot know when they came, so it takes the latest time."""
    session = Session(RAW, 0.0)
    engine_echo(session, b"x")
    session.handle_timeout(IDLE)
    assert session.state is State.OPEN
    assert session.next_deadline() == 2 * IDLE


def test_a_time_given_with_no_new_engine_echo_changes_nothing() -> None:
    session = Session(RAW, 0.0)
    engine_echo(session, b"x")
    session.handle_timeout(IDLE, input_at=50.0)
    session.handle_timeout(50.0 + IDLE, input_at=60.0)  # no read since: the time is stale
    assert session.reason is CloseReason.IDLE_TIMEOUT


@given(st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=20)), max_size=30))
def test_engine_echo_and_receive_data_mixed_count_every_byte_once(
    reads: list[tuple[bool, bytes]],
) -> None:
    session = Session(RAW, 0.0)
    out = b"".join(
        engine_echo(session, data) if by_engine else session.receive_data(data, 1.0)
        for by_engine, data in reads
    )
    sent = b"".join(data for _, data in reads)
    assert out == sent
    assert session.bytes_received == session.bytes_sent == len(sent)


def test_only_an_open_raw_echo_lets_the_engine_echo() -> None:
    assert Session(RAW, 0.0).echoes_raw
    assert not Session(LINES, 0.0).echoes_raw
    assert not Session(SessionSettings(reply="confirm"), 0.0).echoes_raw
    assert not Session(SessionSettings(tls=True), 0.0).echoes_raw  # until the handshake
    session = Session(RAW, 0.0)
    session.receive_data(b"", 1.0)
    assert not session.echoes_raw
    stopping = Session(RAW, 0.0)
    stopping.stop(1.0, unread=10)  # what the kernel holds goes the common way
    assert not stopping.echoes_raw


def test_a_timeout_of_zero_is_off() -> None:
    session = Session(SessionSettings(framing="line", idle_timeout=0, line_timeout=0), 0.0)
    feed(session, [b"never ends"])
    assert session.next_deadline() is None
    assert session.handle_timeout(1e9) == b""
    assert session.state is State.OPEN


def test_slowloris_cannot_keep_a_line_open_past_the_line_timeout() -> None:
    """A byte every second does not move the line's deadline: it counts from the first byte."""
    session = Session(LINES, 0.0)
    out = b""
    for second in range(1, 40):
        out += session.receive_data(b"x", float(second))
        out += drive_timer(session, float(second))
    assert out == line_timeout_reply(LINE)
    assert session.reason is CloseReason.LINE_TIMEOUT
    assert session.state is State.CLOSED  # after the linger
    assert session.bytes_discarded == session.bytes_received == 39
    assert session.discard_reason == "line not finished in time"


def test_a_line_timeout_asks_for_an_earlier_timer() -> None:
    session = Session(LINES, 0.0)
    session.next_deadline()  # the engine armed the idle timer
    session.receive_data(b"part", 5.0)
    assert session.take_commands() == [Command.RESCHEDULE]
    assert session.next_deadline() == 5.0 + LINE


def test_each_complete_line_restarts_the_line_clock() -> None:
    session = Session(LINES, 0.0)
    out = b""
    for second in range(1, 100):
        out += session.receive_data(b"ab\n", float(second))
        out += drive_timer(session, float(second))
    assert out == b"ab\n" * 99
    assert session.state is State.OPEN


def test_writes_blocked_pause_reading_then_abort_after_the_write_timeout() -> None:
    session = Session(RAW, 0.0)
    session.next_deadline()
    session.writing_blocked(10.0)
    assert session.take_commands() == [Command.PAUSE_READING, Command.RESCHEDULE]
    assert session.next_deadline() == 10.0 + WRITE  # idle does not count while blocked
    session.handle_timeout(10.0 + WRITE)
    assert session.take_commands() == [Command.ABORT]
    assert (session.state, session.reason) == (State.CLOSED, CloseReason.NOT_READING)


def test_writes_resumed_read_again_and_restart_the_idle_clock() -> None:
    session = Session(RAW, 0.0)
    session.writing_blocked(10.0)
    session.writing_resumed(20.0)
    assert session.take_commands()[-1] is Command.RESUME_READING
    assert session.next_deadline() == 20.0 + IDLE


# Errors, stop, refusals: reply, half-close, linger


def test_a_line_too_long_is_answered_then_half_closed_and_lingers() -> None:
    session = Session(SessionSettings(framing="line", max_line_length=4), 0.0)
    out = session.receive_data(b"ok\n123456\nlater\n", 1.0)
    assert out.startswith(b"ok\nERROR line too long")
    assert session.take_commands() == [Command.RESCHEDULE, Command.SHUT_WRITE]
    assert (session.state, session.reason) == (State.LINGERING, CloseReason.LINE_TOO_LONG)
    # Input while lingering is read and discarded, counted.
    assert session.receive_data(b"more", 1.5) == b""
    assert session.bytes_discarded == len(b"123456\nlater\nmore")
    # The client's end closes; so does the linger timeout.
    session.receive_data(b"", 2.0)
    assert session.take_commands() == [Command.RESCHEDULE, Command.CLOSE]


def test_the_linger_ends_at_its_timeout_and_closing_at_the_write_timeout() -> None:
    session = Session(RAW, 0.0)
    session.stop(1.0)
    session.take_commands()
    assert session.next_deadline() == 1.0 + LINGER
    session.handle_timeout(1.0 + LINGER)
    assert session.take_commands() == [Command.RESCHEDULE, Command.CLOSE]
    session.handle_timeout(1.0 + LINGER + WRITE)
    assert session.take_commands() == [Command.ABORT]
    assert session.reason is CloseReason.NOT_READING


def test_stopping_answers_an_unfinished_line_then_lingers() -> None:
    session = Session(LINES, 0.0)
    assert session.receive_data(b"a\nhalf", 1.0) == b"a\n"
    assert session.stop(2.0) == b"half"
    assert session.reason is CloseReason.SERVER_STOPPING
    assert Command.SHUT_WRITE in session.take_commands()
    assert session.stop(3.0) == b""  # a second stop changes nothing


@pytest.mark.parametrize(
    ("reason", "reply"),
    [
        (CloseReason.REFUSED_BUSY, BUSY_REPLY),
        (CloseReason.REFUSED_PER_ADDRESS, TOO_MANY_FROM_ADDRESS_REPLY),
        (CloseReason.NO_THREAD, BUSY_REPLY),  # admitted, then no thread could be started
    ],
)
def test_a_refused_client_gets_its_reason_then_a_half_close(
    reason: CloseReason, reply: bytes
) -> None:
    session = Session(RAW, 0.0)
    assert session.refuse(reason, 0.0) == reply
    assert Command.SHUT_WRITE in session.take_commands()
    assert session.receive_data(b"hello?", 0.1) == b""  # discarded
    assert session.reason is reason


def test_a_denied_client_is_closed_with_no_reply() -> None:
    session = Session(RAW, 0.0)
    assert session.refuse(CloseReason.REFUSED_DENIED, 0.0) == b""
    assert session.take_commands()[-1] is Command.CLOSE
    assert session.bytes_sent == 0


def test_a_forced_stop_aborts_in_any_state_but_closed() -> None:
    session = Session(RAW, 0.0)
    session.stop(1.0)
    session.abort(CloseReason.DRAIN_TIMEOUT)
    assert session.take_commands()[-1] is Command.ABORT
    assert session.reason is CloseReason.DRAIN_TIMEOUT
    session.connection_lost(None)
    session.abort(CloseReason.FORCED_STOP)  # closed already: nothing
    assert session.commands == []


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionResetError(104, "Connection reset by peer"), CloseReason.CLIENT_RESET),
        (BrokenPipeError(32, "Broken pipe"), CloseReason.CLIENT_GONE),
        (TimeoutError(110, "Connection timed out"), CloseReason.NETWORK_TIMEOUT),
        (OSError(113, "No route to host"), CloseReason.NETWORK_ERROR),
    ],
)
def test_an_error_that_ends_a_connection_has_one_reason_and_the_os_words(
    error: OSError, reason: CloseReason
) -> None:
    assert reason_for_error(error) is reason
    session = Session(RAW, 0.0)
    session.connection_lost(error)
    assert session.reason is reason
    assert session.detail == error.strerror


def test_an_error_after_the_session_ended_does_not_change_why() -> None:
    session = Session(RAW, 0.0)
    session.handle_timeout(IDLE)
    session.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert session.reason is CloseReason.IDLE_TIMEOUT


def test_every_close_reason_has_a_phrase_and_a_label() -> None:
    for reason in CloseReason:
        assert reason.value
        assert reason.label == reason.name.lower()
    assert {r for r in CloseReason if r.refused} == {
        CloseReason.REFUSED_BUSY,
        CloseReason.REFUSED_PER_ADDRESS,
        CloseReason.REFUSED_DENIED,
        CloseReason.REFUSED_STOPPING,
        CloseReason.REFUSED_UNTRUSTED_PROXY,
    }


# Properties: any chunking, any interleaving of time and bytes


def test_the_transition_table_is_closed_and_ends_in_closed() -> None:
    assert set(_TRANSITIONS) == set(State)
    assert all(targets <= set(State) for targets in _TRANSITIONS.values())
    assert _TRANSITIONS[State.CLOSED] == frozenset()


TOKENS = [b"a", b"xyz", b"\n", b"\r\n", b"\x00", b"\xff"]
streams = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)


@st.composite
def chunked_with_times(draw: st.DrawFn, stream: bytes) -> list[tuple[bytes, float]]:
    """``stream`` cut into non-empty reads, each at a non-decreasing time (gaps of 0 to 40 s)."""
    cuts = sorted(draw(st.sets(st.integers(1, max(len(stream) - 1, 1)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    now, timed = 0.0, []
    for piece in filter(None, pieces):
        now += draw(st.floats(0, 40))
        timed.append((piece, now))
    return timed


def run_timed(settings: SessionSettings, timed: list[tuple[bytes, float]]) -> tuple[bytes, Session]:
    """Feed each read at its time, firing the timer at every deadline that comes first."""
    session = Session(settings, 0.0)
    out = b""
    for chunk, now in timed:
        out += drive_timer(session, now)
        if session.state is State.OPEN or session.state is State.LINGERING:
            out += session.receive_data(chunk, now)
        session.take_commands()
    return out, session


@given(st.data(), streams, st.sampled_from(["raw", "line"]))
def test_without_timeouts_any_chunking_and_timing_gives_an_exact_echo(
    data: st.DataObject, stream: bytes, framing: str
) -> None:
    settings = SessionSettings(
        framing="line" if framing == "line" else "raw",
        idle_timeout=0,
        line_timeout=0,
        max_line_length=1000,
    )
    for _ in range(2):
        out, session = run_timed(settings, data.draw(chunked_with_times(stream)))
        assert out + session.receive_data(b"", 1e6) == stream
        assert session.state is State.CLOSING
        assert session.reason is CloseReason.CLIENT_CLOSED


MAX_LINE, LINE_TIMEOUT, IDLE_TIMEOUT = 8, 20.0, 50.0


def model(timed: list[tuple[bytes, float]]) -> tuple[bytes, CloseReason | None]:
    """What line echo with these limits must send, and why it ends (None: still open), written
    the plain way: byte by byte, checking both deadlines before each read."""
    out, line, last, line_start = b"", b"", 0.0, None
    for chunk, now in timed:
        line_due = line_start + LINE_TIMEOUT if line_start is not None else float("inf")
        if min(line_due, last + IDLE_TIMEOUT) <= now:
            if line_due <= last + IDLE_TIMEOUT:
                return out + line_timeout_reply(LINE_TIMEOUT), CloseReason.LINE_TIMEOUT
            return out, CloseReason.IDLE_TIMEOUT
        last, completed = now, False
        for byte in chunk:
            line += bytes([byte])
            if byte == ord("\n"):
                if len(line.removesuffix(b"\n").removesuffix(b"\r")) > MAX_LINE:
                    return out + TOO_LONG, CloseReason.LINE_TOO_LONG
                out, line, completed = out + line, b"", True
        if len(line) > MAX_LINE + 1 or (len(line) == MAX_LINE + 1 and not line.endswith(b"\r")):
            return out + TOO_LONG, CloseReason.LINE_TOO_LONG
        line_start = None if not line else (now if completed or line_start is None else line_start)
    return out, None


TOO_LONG = b"ERROR line too long: more than %d bytes without a newline\n" % MAX_LINE


@given(st.data(), streams)
def test_any_timing_gives_the_replies_and_the_close_reason_of_a_plain_model(
    data: st.DataObject, stream: bytes
) -> None:
    """Line echo with a line timeout, an idle timeout and a line limit, over any chunking and
    any pauses: the same bytes and the same reason as the model; and every byte received is
    answered, discarded (counted) or still an unfinished line."""
    settings = SessionSettings(
        framing="line",
        idle_timeout=IDLE_TIMEOUT,
        line_timeout=LINE_TIMEOUT,
        max_line_length=MAX_LINE,
    )
    timed = data.draw(chunked_with_times(stream))
    out, session = run_timed(settings, timed)
    assert (out, session.reason) == model(timed)
    assert len(out) == session.bytes_sent
    error = len(line_timeout_reply(LINE_TIMEOUT)) if b"ERROR line timeout" in out else 0
    error += len(TOO_LONG) if out.endswith(TOO_LONG) else 0
    unfinished = session._conn.partial_line_length
    assert session.bytes_received == len(out) - error + session.bytes_discarded + unfinished
