"""One connection's life, from accept to close, with no I/O, no clock and no logging.

A `Session` owns everything an engine would otherwise decide about a connection: its state,
its deadlines, why it closed, and when to stop reading, half-close, close or abort. The
engine feeds it what happened (bytes read, the end of input, the time when its timer fired,
writes blocking or draining, the connection lost) and carries out what it answers:

- every input method returns the bytes to send now (``b""``: nothing);
- ``commands`` is a list that is empty on the common path; when it is not, the engine calls
  `take_commands` and carries each `Command` out, in order, after sending those bytes;
- `next_deadline` is when the session next needs the clock; the engine owns one timer per
  connection and calls `handle_timeout` with the time when it fires. A deadline only moves
  later on the common path (the idle timer); when one moves earlier the session asks for a
  `Command.RESCHEDULE`, so an engine may leave a timer that fires early (and re-arm it then)
  but never one that fires late.

Time is whatever monotonic clock the engine uses, in seconds.

The states, and what moves a session between them (the whole table: `_TRANSITIONS` holds the
same arrows and every change of state is checked against it)::

    PROXY_HEADER ── header read (or none, --proxy-protocol optional) ──► HANDSHAKE or OPEN
      │ └────────── a bad header, none in time, the peer's end, stop ───► CLOSING
      └──────────── refused at accept (busy) ───────────────────────────► LINGERING
    HANDSHAKE ───── the engine's TLS handshake done ────────────────────► OPEN
      │ └────────── refused at accept (no reply: TLS) ──────────────────► CLOSING
      └──────────── failed, timed out, server stopping ─────────────────► CLOSED

    OPEN ──── client's end of input, idle timeout, denied ──────────► CLOSING
      │  └─── line too long, line timeout, stop, refused (busy) ──► LINGERING
      │                                                                 │ client's end or
      │                                                                 ▼ linger timeout
      └───── reset, not reading, forced stop ──► CLOSED ◄──────────── CLOSING
                                                   ▲ (the engine reports the connection lost,
                                                     or write timeout while closing: abort)

- OPEN: reading, and replying to every byte read.
- LINGERING: the reply is complete and our side has sent its end (half-close). Input is read
  and discarded (counted) until the client closes or `LINGER_TIMEOUT`, because closing a
  socket with unread input resets it, which can destroy replies the client has not read yet.
- CLOSING: the engine was told to close once what is queued is sent. A client that never
  reads it gets `write_timeout`, then an abort.
- CLOSED: the engine reported the connection gone; ``reason`` is final.

- PROXY_HEADER (``--proxy-protocol on|optional``, from a trusted proxy): the bytes read are a
  PROXY protocol header (`proxy.parse`), within `PROXY_HEADER_TIMEOUT`. What follows it is held
  until the connection is open. An engine that must not read past the header (TLS comes next)
  peeks and calls `header_peeked` instead of `receive_data`.
- HANDSHAKE (TLS): the engine does the handshake, within ``handshake_timeout`` of the accept
  (`handshake_deadline`), and reports it done or failed.

Leaving them for OPEN, the session asks for `Command.OPEN`: the driver then admits the client
on its real address and calls `opened`, which answers what was held (and the greeting).

Raw echo stays fast: while OPEN in raw framing, `receive_data` builds nothing per read and
returns the very bytes it was given. Faster still, while `echoes_raw` is true a read changes
nothing but the byte count and the idle clock, so an engine may skip the session altogether:
send the bytes back itself and add their count to ``echoed_by_engine`` (by the time it next
calls the session: the asyncio engine takes the count from the kernel then). It then gives
`handle_timeout` the time of the client's last input from its own record (the kernel keeps one
per TCP socket), and the session reads no clock per read.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from tcpecho.protocol import proxy
from tcpecho.protocol.connection import EchoConnection
from tcpecho.protocol.connection import State as ReplyState
from tcpecho.protocol.framing import MAX_LINE_LENGTH, Framing
from tcpecho.protocol.replies import BUSY_REPLY, DEFAULT_CONFIRM_PREFIX, ReplyMode

# After the server has sent its last byte (an error reply, a stop), how long it keeps reading
# and discarding what the client still sends, so that closing does not reset the connection
# and destroy a reply the client has not read yet.
LINGER_TIMEOUT = 2.0
# A connection with nothing received and nothing to send for this long is closed. Five minutes
# is long enough for a person typing into nc, who may pause to think; a forgotten client still
# goes, so idle connections cannot pile up to --max-connections.
DEFAULT_IDLE_TIMEOUT = 300.0
# Line framing: a line must be complete this long after its first byte, however slowly its
# bytes come. This is what stops slowloris (a client holding a connection with a byte every
# few seconds). A terminal sends a whole line at once, so a person never meets it.
DEFAULT_LINE_TIMEOUT = 30.0
# A client that leaves replies unread (writes blocked) this long is cut off.
DEFAULT_WRITE_TIMEOUT = 30.0
# A proxy sends its header at once, with or before the client's first byte; this much time
# only covers a slow network. A connection that sends no header by then is closed.
PROXY_HEADER_TIMEOUT = 5.0
# The TLS handshake must be done this long after the accept: a client that opens a connection
# and never sends its ClientHello cannot hold a slot for longer.
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0

ProxyMode = Literal["off", "on", "optional"]
Greeting = Literal["off", "info"]

TOO_MANY_FROM_ADDRESS_REPLY = b"ERROR too many connections from your address\n"
STOPPING_REPLY = b"ERROR server stopping\n"


def line_timeout_reply(seconds: float) -> bytes:
    return b"ERROR line timeout: no newline within %gs\n" % seconds


class State(enum.Enum):
    PROXY_HEADER = "waiting for the PROXY header"
    HANDSHAKE = "TLS handshake"
    OPEN = "open"
    LINGERING = "lingering"
    CLOSING = "closing"
    CLOSED = "closed"


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.PROXY_HEADER: frozenset(
        {State.HANDSHAKE, State.OPEN, State.LINGERING, State.CLOSING, State.CLOSED}
    ),
    State.HANDSHAKE: frozenset({State.OPEN, State.CLOSING, State.CLOSED}),
    State.OPEN: frozenset({State.LINGERING, State.CLOSING, State.CLOSED}),
    State.LINGERING: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


# The states in which what the client sends is read and discarded, never answered.
_ANSWERS_NOTHING = frozenset({State.LINGERING, State.CLOSING, State.CLOSED})


class CloseReason(enum.Enum):
    """Why a connection ended (or was refused), with the phrase the log prints.

    ``name.lower()`` is the stable label (JSON log, metrics); the value is for people.
    """

    CLIENT_CLOSED = "closed by client"
    CLIENT_RESET = "reset by client"
    CLIENT_GONE = "client gone (broken pipe)"
    NETWORK_TIMEOUT = "network timed out"
    NETWORK_ERROR = "network error"
    LINE_TOO_LONG = "closed: line too long (--max-line-length)"
    LINE_TIMEOUT = "closed: line not finished in time (--line-timeout)"
    IDLE_TIMEOUT = "closed: idle (--idle-timeout)"
    NOT_READING = "closed: not reading (--write-timeout)"
    SERVER_STOPPING = "closed: server stopping"
    DRAIN_TIMEOUT = "closed: drain timeout (--drain-timeout)"
    FORCED_STOP = "closed: server stopped at once"
    INTERNAL_ERROR = "closed: internal error (a bug: see the [INTERNAL ERROR] line)"
    PROXY_HEADER_INVALID = "closed: bad PROXY header"
    PROXY_HEADER_TIMEOUT = "closed: no PROXY header in time"
    TLS_HANDSHAKE_FAILED = "closed: TLS handshake failed"
    TLS_HANDSHAKE_TIMEOUT = "closed: TLS handshake not done in time (--tls-handshake-timeout)"
    NO_THREAD = "closed: server busy, no thread could be started for it"
    REFUSED_BUSY = "refused: server busy (--max-connections)"
    REFUSED_PER_ADDRESS = "refused: too many connections from this address (--max-per-address)"
    REFUSED_DENIED = "refused: address denied (--allow/--deny)"
    REFUSED_STOPPING = "refused: server stopping"
    REFUSED_UNTRUSTED_PROXY = "refused: not a trusted proxy (--proxy-trusted)"

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def refused(self) -> bool:
        return self.name.startswith("REFUSED_")


# What a client the server will not serve is sent before it closes: a refused one (a denied
# one gets nothing at all), or one admitted that the engine found no thread for.
REFUSAL_REPLIES: dict[CloseReason, bytes] = {
    CloseReason.REFUSED_BUSY: BUSY_REPLY,
    CloseReason.NO_THREAD: BUSY_REPLY,
    CloseReason.REFUSED_PER_ADDRESS: TOO_MANY_FROM_ADDRESS_REPLY,
    CloseReason.REFUSED_STOPPING: STOPPING_REPLY,
}


def reason_for_error(exc: BaseException) -> CloseReason:
    """The close reason for an error that ended a connection (the one place they are sorted)."""
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError):
        return CloseReason.CLIENT_RESET
    if isinstance(exc, BrokenPipeError):
        return CloseReason.CLIENT_GONE
    if isinstance(exc, TimeoutError):
        return CloseReason.NETWORK_TIMEOUT
    return CloseReason.NETWORK_ERROR


class Command(enum.Enum):
    """What the engine must do, after sending the bytes the same call returned."""

    PAUSE_READING = "pause reading"
    RESUME_READING = "resume reading"
    SHUT_WRITE = "half-close"  # send our end after what is queued; keep reading
    CLOSE = "close"  # close once what is queued is sent
    ABORT = "abort"  # close at once, dropping what is queued (the peer sees a reset)
    RESCHEDULE = "reschedule"  # the next deadline moved earlier: re-arm the timer
    OPEN = "open"  # the states before OPEN are done: admit the client, then call `opened`


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What every session of a server shares. A timeout of 0 is off (idle and line only)."""

    framing: Framing = "raw"
    reply: ReplyMode = "echo"
    confirm_prefix: bytes = DEFAULT_CONFIRM_PREFIX.encode()
    max_line_length: int = MAX_LINE_LENGTH
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    line_timeout: float = DEFAULT_LINE_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    linger_timeout: float = LINGER_TIMEOUT
    proxy: ProxyMode = "off"
    proxy_timeout: float = PROXY_HEADER_TIMEOUT
    tls: bool = False
    handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    greeting: Greeting = "off"


class Session:
    """One connection's life. See the module's docstring for how an engine drives it.

    Read by the engine and the log: ``state``, ``reason`` (None while open), ``detail`` (the
    OS's words for an error), ``frames`` (the messages the last read completed), and the byte
    counts ``bytes_received``, ``bytes_sent`` (handed to the engine to send), ``bytes_unsent``
    (of those, dropped by an abort) and ``bytes_discarded`` (received, never answered, and why
    in ``discard_reason``).
    """

    def __init__(self, settings: SessionSettings, now: float, *, proxied: bool = False) -> None:
        """``proxied``: the peer is a trusted proxy, and ``settings.proxy`` is not off."""
        self.settings = settings
        self.state = State.OPEN
        self.proxy_header: proxy.ProxyHeader | None = None
        self.reason: CloseReason | None = None
        self.detail = ""
        self.commands: list[Command] = []
        self.bytes_unsent = 0
        self.opened_at = now
        self._conn = EchoConnection(
            settings.framing,
            settings.reply,
            max_line_length=settings.max_line_length,
            confirm_prefix=settings.confirm_prefix,
        )
        self._conn_receive = self._conn.receive_data  # bound once: the per-read path
        # True while a read needs nothing but the reply: OPEN, raw framing; _echo_raw when
        # that reply is the read itself.
        self._fast = settings.framing == "raw"
        self._echo_raw = self._fast and settings.reply == "echo"
        self._echoed_raw = 0  # bytes received and echoed while _echo_raw
        # Bytes the engine received and echoed itself (see `echoes_raw`), and how many of them
        # the idle clock has accounted for.
        self.echoed_by_engine = 0
        self._echoed_by_engine_seen = 0
        self._last_raw: bytes | None = None  # the last read, when it took that path
        self._lines = settings.framing == "line"
        self._last_input = now  # when the idle clock last started
        self._line_started: float | None = None  # first byte of an unfinished line
        self._blocked_since: float | None = None  # writes blocked (client not reading)
        self._state_since = now  # for the linger and closing deadlines
        self._announced: float | None = None  # the deadline the engine last asked for
        self._extra_sent = 0  # bytes the session itself wrote (errors, refusals)
        self._discard_reason = ""
        self._stop_after: int | None = None  # stopping: answer input up to this many bytes
        self._header = b""  # a PROXY header's bytes so far
        self._held = b""  # received before the connection was open: answered by `opened`
        if proxied:
            self.state = State.PROXY_HEADER
        elif settings.tls:
            self.state = State.HANDSHAKE
        if self.state is not State.OPEN:
            self._fast = self._echo_raw = False

    # What the engine feeds in.

    def receive_data(self, data: bytes, now: float) -> bytes:
        """Bytes read from the client (``b""``: it finished sending). Returns bytes to send."""
        if self._echo_raw and data:
            # Raw echo, open: the reply is the read itself. Counted here rather than in the
            # EchoConnection, to spare a call per read.
            self._last_input = now
            self._echoed_raw += len(data)
            self._last_raw = data
            return data
        self._last_raw = None
        if self._fast and data:
            self._last_input = now
            return self._conn_receive(data)
        return self._receive(data, now)

    def header_peeked(self, data: bytes, now: float) -> int:
        """PROXY_HEADER, when the engine must not read past the header (TLS follows it):
        ``data`` is what the kernel holds, peeked, not read. Returns how many of those bytes
        to read (and drop): the header's, never one more."""
        if self.state is not State.PROXY_HEADER:
            return 0
        return self._feed_header(data, now)

    def handshake_deadline(self) -> float:
        """When the TLS handshake must be done by."""
        return self.opened_at + self.settings.handshake_timeout

    def handshake_done(self, now: float) -> None:
        """The engine's TLS handshake succeeded: the connection opens."""
        if self.state is State.HANDSHAKE:
            self._enter(State.OPEN, now)
            self.commands.append(Command.OPEN)

    def handshake_failed(self, detail: str, *, timed_out: bool = False) -> None:
        """The TLS handshake failed (``detail``: the TLS library's words), or timed out. The
        engine closes the connection and reports it lost."""
        if self.state is State.HANDSHAKE:
            self.reason = (
                CloseReason.TLS_HANDSHAKE_TIMEOUT if timed_out else CloseReason.TLS_HANDSHAKE_FAILED
            )
            self.detail = detail
            self._enter(State.CLOSED, self._state_since)

    def opened(self, now: float, info: Mapping[str, object] | None = None) -> bytes:
        """The driver admitted the client after the states before OPEN (`Command.OPEN`):
        returns the greeting (``info`` as one JSON line, with ``--greeting info``) and the
        answer to what arrived meanwhile."""
        self._last_input = now
        self._fast = self.settings.framing == "raw"
        self._echo_raw = self._fast and self.settings.reply == "echo"
        out = b""
        if self.settings.greeting == "info" and info is not None:
            out = self._extra(json.dumps(info, separators=(", ", ": ")).encode() + b"\n")
        held, self._held = self._held, b""
        if held:
            self._fast = self._echo_raw = False
            out += self._receive_open(held, now)
            if self.state is State.OPEN and self._stop_after is None:
                self._fast = self.settings.framing == "raw"
                self._echo_raw = self._fast and self.settings.reply == "echo"
        return out

    @property
    def client(self) -> tuple[str, int] | None:
        """The real client's address from a PROXY header (None: the peer is the client)."""
        header = self.proxy_header
        return None if header is None else header.source

    def handle_timeout(self, now: float, input_at: float | None = None) -> bytes:
        """The engine's timer fired. Returns bytes to send; deadlines not yet due are kept.

        ``input_at``: when the client last sent, by the engine's record, for the reads it
        echoed itself (`echoes_raw`). Without it those reads count as input now: never early,
        but a connection idle since then is closed up to one idle timeout late.
        """
        self._announced = None
        if self.echoed_by_engine != self._echoed_by_engine_seen:
            self._echoed_by_engine_seen = self.echoed_by_engine
            seen = now if input_at is None else min(input_at, now)
            self._last_input = max(self._last_input, seen)
        state = self.state
        blocked_since = self._blocked_since
        if state is State.CLOSED:
            pass
        elif state is State.PROXY_HEADER:
            if now >= self._state_since + self.settings.proxy_timeout:
                self._close(CloseReason.PROXY_HEADER_TIMEOUT, now)
        elif state is State.HANDSHAKE:
            if now >= self.handshake_deadline():
                self._abort(CloseReason.TLS_HANDSHAKE_TIMEOUT)
        elif blocked_since is not None and now >= blocked_since + self.settings.write_timeout:
            self._abort(CloseReason.NOT_READING)
        elif state is State.OPEN:
            return self._open_timeout(now)
        elif state is State.LINGERING and now >= self._state_since + self.settings.linger_timeout:
            self._enter(State.CLOSING, now)
            self.commands.append(Command.CLOSE)
        elif state is State.CLOSING and now >= self._state_since + self.settings.write_timeout:
            self._abort(CloseReason.NOT_READING)
        return b""

    def writing_blocked(self, now: float) -> None:
        """The client does not take our replies: stop reading, start the write timeout."""
        if self._blocked_since is None and self.state is not State.CLOSED:
            self._blocked_since = now
            self.commands.append(Command.PAUSE_READING)
            self._check_deadline()

    def writing_resumed(self, now: float) -> None:
        """What was queued has gone out: read again; the idle clock starts now."""
        if self._blocked_since is not None:
            self._blocked_since = None
            self._last_input = now
            if self.state is State.OPEN or self.state is State.LINGERING:
                self.commands.append(Command.RESUME_READING)

    def refuse(self, reason: CloseReason, now: float) -> bytes:
        """Refuse a client that was just accepted (or, `CloseReason.NO_THREAD`, one that was
        admitted but cannot be served): an error line and close, or (denied) only close.
        Returns the bytes to send."""
        self._fast = self._echo_raw = False
        reply = REFUSAL_REPLIES.get(reason, b"")
        if self.state is State.HANDSHAKE:
            reply = b""  # a TLS client could not read a plain-text line
        if reply:
            self._finish(reason, now)
            return self._extra(reply)
        self.reason = reason
        self._enter(State.CLOSING, now)
        self.commands.append(Command.CLOSE)
        return b""

    def stop(self, now: float, unread: int = 0) -> bytes:
        """The server is stopping: answer what was received, then half-close and linger.

        ``unread``: bytes the client had sent before the stop that the kernel holds and the
        engine has not read yet. They were received too, so they are answered as they are
        read; the session finishes after the last of them.
        """
        if self.state is State.PROXY_HEADER:
            self._close(CloseReason.SERVER_STOPPING, now)
            return b""
        if self.state is State.HANDSHAKE:
            self._abort(CloseReason.SERVER_STOPPING)
            return b""
        if self.state is not State.OPEN or self._stop_after is not None:
            return b""
        if unread > 0:
            self._fast = self._echo_raw = False
            self._stop_after = self.bytes_received + unread
            return b""
        return self._stop_now(now)

    def _stop_now(self, now: float) -> bytes:
        out = self._conn_receive(b"")  # the end of input: an unfinished line is answered too
        self._finish(CloseReason.SERVER_STOPPING, now)
        return out

    def abort(self, reason: CloseReason) -> None:
        """Close at once (a forced stop, the drain timeout), whatever the state."""
        if self.state is not State.CLOSED:
            self._abort(reason)

    def connection_lost(self, exc: BaseException | None, unsent: int = 0) -> None:
        """The connection is gone. ``exc``: the error that ended it; ``unsent``: bytes that
        were handed to the engine but never sent."""
        self._fast = self._echo_raw = False
        self.bytes_unsent += unsent
        if exc is not None and self.reason is None:
            self.reason = reason_for_error(exc)
            self.detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if self.reason is None:
            self.reason = CloseReason.CLIENT_CLOSED
        if self.state is not State.CLOSED:
            self._enter(State.CLOSED, self._state_since)

    # What the engine reads.

    @property
    def echoes_raw(self) -> bool:
        """A read's reply is the read itself, and it changes nothing else but the counts and
        the idle clock (open, raw framing, echo, not stopping): the engine may echo it itself
        and add its length to ``echoed_by_engine``. Read it again after every other call."""
        return self._echo_raw

    def take_commands(self) -> list[Command]:
        commands = self.commands[:]
        self.commands.clear()
        return commands

    def next_deadline(self) -> float | None:
        """When the session next needs `handle_timeout` (None: not until something happens)."""
        deadline = self._deadline()
        self._announced = deadline
        return deadline

    @property
    def frames(self) -> Sequence[bytes]:
        """The messages the last `receive_data` call completed (for the log)."""
        return self._conn.frames if self._last_raw is None else (self._last_raw,)

    @property
    def bytes_received(self) -> int:
        return self._conn.bytes_received + self._echoed_raw + self.echoed_by_engine

    @property
    def bytes_sent(self) -> int:
        echoed = self._echoed_raw + self.echoed_by_engine
        return self._conn.bytes_replied + echoed + self._extra_sent

    @property
    def bytes_discarded(self) -> int:
        return self._conn.bytes_discarded

    @property
    def discard_reason(self) -> str:
        """Why the discarded bytes were never answered."""
        if self._discard_reason:
            return self._discard_reason
        if self._conn.state is ReplyState.REJECTED:
            return "line too long"
        return "sent after the end" if self.bytes_discarded else ""

    # Inside.

    def _receive(self, data: bytes, now: float) -> bytes:
        state = self.state
        if state is State.PROXY_HEADER:
            if not data:
                self._header_unfinished(now)
                return b""
            used = self._feed_header(data, now)
            if self.state is not State.PROXY_HEADER:
                self._held += data[used:]
            return b""
        if state is State.HANDSHAKE:
            self._held += data  # an engine that reads before its handshake: kept for `opened`
            return b""
        if state is State.OPEN and data and self._stop_after is not None:
            return self._receive_while_stopping(data, now)
        if state is State.OPEN:
            return self._receive_open(data, now)
        self._conn_receive(data)  # counted as discarded
        if not data and state is State.LINGERING:
            self._enter(State.CLOSING, now)
            self.commands.append(Command.CLOSE)
        return b""

    def _receive_while_stopping(self, data: bytes, now: float) -> bytes:
        """Answer up to the last byte received before the stop, then finish; the rest is
        discarded (counted)."""
        assert self._stop_after is not None
        room = self._stop_after - self.bytes_received
        if len(data) < room:
            return self._receive_open(data, now)
        out = self._receive_open(data[:room], now)
        if self.state is State.OPEN:
            out += self._stop_now(now)
        if len(data) > room:
            self._conn_receive(data[room:])
        return out

    def _receive_open(self, data: bytes, now: float) -> bytes:
        self._last_input = now
        out = self._conn_receive(data)
        conn_state = self._conn.state
        if conn_state is ReplyState.REJECTED:
            self._finish(CloseReason.LINE_TOO_LONG, now)
        elif conn_state is ReplyState.DONE:
            self.reason = CloseReason.CLIENT_CLOSED
            self._fast = self._echo_raw = False
            self._enter(State.CLOSING, now)
            self.commands.append(Command.CLOSE)
        elif self._lines:
            self._track_line(now)
        return out

    def _track_line(self, now: float) -> None:
        if not self._conn.has_partial_line:
            self._line_started = None
        elif self._line_started is None or self._conn.frames:
            # A new line began in this read (after the lines it completed, if any).
            self._line_started = now
            self._check_deadline()

    def _feed_header(self, data: bytes, now: float) -> int:
        """Bytes of a PROXY header: returns how many of ``data`` belong to it (or are held
        while it is not yet known whether a header comes)."""
        buffered = self._header + data
        if self.settings.proxy == "optional" and proxy.starts_like_header(buffered) is False:
            self._header = b""
            self._held = buffered[: len(buffered) - len(data)]
            self._after_header(now)
            return 0
        try:
            header = proxy.parse(buffered)
        except proxy.ProxyHeaderError as exc:
            self._header = b""
            self.detail = str(exc)
            self._discard_reason = "bad PROXY header"
            self._close(CloseReason.PROXY_HEADER_INVALID, now)
            return len(data)
        if header is None:
            self._header = buffered
            return len(data)
        used = header.length - len(self._header)
        self._header = b""
        self.proxy_header = header
        self._after_header(now)
        return used

    def _header_unfinished(self, now: float) -> None:
        """The peer finished sending before a whole header came (a check that connects and
        closes, a header cut short): close, answering nothing. Waiting for the header's
        deadline instead would hold the connection for nothing (and a thread that reads the
        end again and again would spin)."""
        if self._header:
            self.detail = "PROXY: the connection ended inside the header"
            self._discard_reason = "bad PROXY header"
            self._close(CloseReason.PROXY_HEADER_INVALID, now)
        else:
            self._close(CloseReason.CLIENT_CLOSED, now)

    def _after_header(self, now: float) -> None:
        if self.settings.tls:
            self._enter(State.HANDSHAKE, now)
        else:
            self._enter(State.OPEN, now)
            self.commands.append(Command.OPEN)

    def _close(self, reason: CloseReason, now: float) -> None:
        """Close once what is queued is sent (nothing was answered)."""
        self.reason = reason
        self._fast = self._echo_raw = False
        self._enter(State.CLOSING, now)
        self.commands.append(Command.CLOSE)

    def _open_timeout(self, now: float) -> bytes:
        if self._blocked_since is not None:
            return b""  # nothing but the write timeout counts while the client is not reading
        settings = self.settings
        line_started = self._line_started
        line_due = line_started is not None and now >= line_started + settings.line_timeout
        if settings.line_timeout and line_due:
            self._conn.drop_partial_line()
            self._discard_reason = "line not finished in time"
            self._finish(CloseReason.LINE_TIMEOUT, now)
            return self._extra(line_timeout_reply(settings.line_timeout))
        if settings.idle_timeout and now >= self._last_input + settings.idle_timeout:
            self.reason = CloseReason.IDLE_TIMEOUT
            self._fast = self._echo_raw = False
            self._enter(State.CLOSING, now)
            self.commands.append(Command.CLOSE)
        return b""

    def _finish(self, reason: CloseReason, now: float) -> None:
        """The reply is complete: half-close and linger."""
        self.reason = reason
        self._fast = self._echo_raw = False
        self._line_started = None
        self._enter(State.LINGERING, now)
        self.commands.append(Command.SHUT_WRITE)

    def _abort(self, reason: CloseReason) -> None:
        # The abort's reason replaces an earlier one (a client that closed its side, then
        # never read the replies, ends "not reading"): it is what ended the connection.
        self.reason = reason
        self._fast = self._echo_raw = False
        self._enter(State.CLOSED, self._state_since)
        self.commands.append(Command.ABORT)

    def _extra(self, reply: bytes) -> bytes:
        self._extra_sent += len(reply)
        return reply

    def _enter(self, state: State, now: float) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"session cannot go from {self.state.value} to {state.value}")
        if state in _ANSWERS_NOTHING:
            # From OPEN, and from the states before it (a bad PROXY header, a refusal): what
            # the client sends from now on is discarded, counted, never counted as sent.
            self._conn.end_input()
        self.state = state
        self._state_since = now
        self._check_deadline()

    def _check_deadline(self) -> None:
        """Ask for a RESCHEDULE when the next deadline is now earlier than the armed one."""
        deadline = self._deadline()
        if deadline is not None and (self._announced is None or deadline < self._announced):
            self.commands.append(Command.RESCHEDULE)

    def _deadline(self) -> float | None:
        settings = self.settings
        state = self.state
        deadlines: list[float] = []
        if self._blocked_since is not None and state is not State.CLOSED:
            deadlines.append(self._blocked_since + settings.write_timeout)
        if state is State.OPEN and self._blocked_since is None:
            if settings.line_timeout and self._line_started is not None:
                deadlines.append(self._line_started + settings.line_timeout)
            if settings.idle_timeout:
                deadlines.append(self._last_input + settings.idle_timeout)
        elif state is State.LINGERING:
            deadlines.append(self._state_since + settings.linger_timeout)
        elif state is State.CLOSING:
            deadlines.append(self._state_since + settings.write_timeout)
        elif state is State.PROXY_HEADER:
            deadlines.append(self._state_since + settings.proxy_timeout)
        elif state is State.HANDSHAKE:
            deadlines.append(self.handshake_deadline())
        return min(deadlines, default=None)
