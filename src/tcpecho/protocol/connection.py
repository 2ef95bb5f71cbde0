"""EchoConnection: the echo protocol as a small state machine, with no I/O (like h11).

An engine feeds it what it reads and sends what it returns::

    out = conn.receive_data(data)   # b"" when the peer finished sending
    send(out)
    if conn.state is not State.OPEN: close after sending

It never touches a socket, a clock or a logger, so both engines share every behaviour here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from tcpecho.protocol.framing import MAX_LINE_LENGTH, Framing, LineSplitter, LineTooLong
from tcpecho.protocol.replies import (
    DEFAULT_CONFIRM_PREFIX,
    ReplyMode,
    line_too_long_reply,
    make_reply,
)


class State(enum.Enum):
    """What the connection does next. OPEN is the only state that reads more."""

    OPEN = "open"  # reading and replying
    DONE = "done"  # the peer finished sending: send what is left, then close
    REJECTED = "rejected"  # the peer broke a limit: send the error, then close; input discarded


class EchoConnection:
    """One client's echo session.

    Attributes an engine reads after each `receive_data` call:

    - ``state``: see `State`.
    - ``frames``: the messages that call completed (for logging).
    - ``error``: the `LineTooLong` that moved the state to REJECTED, else None.
    - ``bytes_received`` and ``bytes_discarded``: totals for the log; every byte received is
      replied to unless it is counted in ``bytes_discarded``.
    """

    def __init__(
        self,
        framing: Framing = "raw",
        reply: ReplyMode = "echo",
        *,
        max_line_length: int = MAX_LINE_LENGTH,
        confirm_prefix: bytes = DEFAULT_CONFIRM_PREFIX.encode(),
    ) -> None:
        self.state = State.OPEN
        self._frames: Sequence[bytes] | None = ()
        self._read = b""
        self.error: LineTooLong | None = None
        self.bytes_received = 0
        self.bytes_discarded = 0
        self._confirmed = 0  # bytes of confirmations sent (echo needs no count: see bytes_replied)
        self._errors = 0  # bytes of error replies sent
        self._reply = make_reply(reply, framing, confirm_prefix)
        self._exact = reply == "echo"
        self._lines = LineSplitter(max_line_length) if framing == "line" else None

    def receive_data(self, data: bytes) -> bytes:
        """Take bytes from the peer (``b""``: it finished sending); return the bytes to send."""
        if self.state is _OPEN and data and self._lines is None:
            # Raw framing, the common case: every engine calls this once per read, so it is
            # kept to the few steps that raw framing needs.
            # No container is built here (a tuple per read would make the garbage collector
            # run every few hundred reads): `frames` builds one only when asked.
            self.bytes_received += len(data)
            self._frames = None
            self._read = data
            return data if self._exact else self._confirm(data)
        return self._receive(data)

    @property
    def bytes_replied(self) -> int:
        """Bytes returned for sending. An exact echo returns every byte it received, but for
        those discarded and those of an unfinished line, so it needs no count per read."""
        if self._exact:
            replied = self.bytes_received - self.bytes_discarded - self.partial_line_length
            return replied + self._errors
        return self._confirmed + self._errors

    @property
    def partial_line_length(self) -> int:
        """Bytes of a line that has not ended yet (line framing; else 0)."""
        return self._lines.pending_length if self._lines is not None else 0

    @property
    def has_partial_line(self) -> bool:
        return self.partial_line_length > 0

    def drop_partial_line(self) -> int:
        """Forget the unfinished line (counted as discarded); return its length."""
        dropped = self.partial_line_length
        if self._lines is not None:
            self._lines.flush_unchecked()
        self.bytes_discarded += dropped
        return dropped

    def end_input(self) -> None:
        """Answer nothing more: what comes now is discarded (an unfinished line too)."""
        if self.state is State.OPEN:
            self.drop_partial_line()
            self.state = State.DONE

    def _confirm(self, data: bytes) -> bytes:
        out = self._reply(data)
        self._confirmed += len(out)
        return out

    @property
    def frames(self) -> Sequence[bytes]:
        """The messages the last `receive_data` call completed (for logging)."""
        return (self._read,) if self._frames is None else self._frames

    def _receive(self, data: bytes) -> bytes:
        if self.state is not State.OPEN:
            self._frames = ()
            self.bytes_received += len(data)
            self.bytes_discarded += len(data)
            return b""
        lines = self._lines
        if not data:
            self.state = State.DONE
            try:
                rest = lines.flush() if lines is not None else b""
            except LineTooLong as exc:
                return self._reject(exc)
            self._frames = (rest,) if rest else ()
            return self._replies(self._frames)
        self.bytes_received += len(data)
        if lines is None:
            self._frames = (data,)
            return self._replies(self._frames)
        try:
            self._frames = lines.feed(data)
        except LineTooLong as exc:
            return self._reject(exc)
        return self._replies(self._frames)

    def _reject(self, exc: LineTooLong) -> bytes:
        self.state = State.REJECTED
        self.error = exc
        self.bytes_discarded += exc.discarded
        self._frames = exc.lines
        error = line_too_long_reply(exc.max_length)
        self._errors += len(error)
        return self._replies(exc.lines) + error

    def _replies(self, frames: Sequence[bytes]) -> bytes:
        reply = self._reply
        out = b"".join([reply(frame) for frame in frames])
        if not self._exact:
            self._confirmed += len(out)
        return out


_OPEN = State.OPEN
