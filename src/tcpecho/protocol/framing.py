"""How a byte stream is cut into messages. Pure: no I/O, no logging."""

from __future__ import annotations

from typing import Literal

Framing = Literal["raw", "line"]

# A line longer than this without a newline is refused. It bounds the memory one client can make
# the server hold while it waits for the end of a line.
MAX_LINE_LENGTH = 64 * 1024


class LineTooLong(Exception):
    """A line grew past the maximum length before its newline arrived.

    ``lines`` holds the complete lines that came before it in the same data; ``discarded`` is
    how many bytes were thrown away (the long line, and what followed it in the same data).
    """

    def __init__(self, max_length: int, lines: list[bytes], discarded: int) -> None:
        super().__init__(max_length, discarded)
        self.max_length = max_length
        self.lines = lines
        self.discarded = discarded


class LineSplitter:
    """Cuts a stream into lines ending in ``\\n`` (so ``\\r\\n`` too), terminators kept.

    A line's length is counted without its terminator and may be at most ``max_length``.
    """

    def __init__(self, max_length: int = MAX_LINE_LENGTH) -> None:
        self.max_length = max_length
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Return the lines that ``data`` completes. Raises `LineTooLong`."""
        pending = self._pending
        end = data.rfind(b"\n")
        if end < 0:
            pending += data
            self._check_pending([])
            return []
        pending += data[: end + 1]
        lines = [line + b"\n" for line in bytes(pending).split(b"\n")[:-1]]
        pending.clear()
        pending += data[end + 1 :]
        for index, line in enumerate(lines):
            if _content_length(line) > self.max_length:
                discarded = sum(map(len, lines[index:])) + len(pending)
                pending.clear()
                raise LineTooLong(self.max_length, lines[:index], discarded)
        self._check_pending(lines)
        return lines

    def flush(self) -> bytes:
        """Return and forget the unterminated tail (at the end of the stream).

        Raises `LineTooLong` if the tail is longer than ``max_length``: at the end of the
        stream a final ``\r`` can no longer become part of a ``\r\n``.
        """
        rest = bytes(self._pending)
        self._pending.clear()
        if len(rest) > self.max_length:
            raise LineTooLong(self.max_length, [], len(rest))
        return rest

    @property
    def pending_length(self) -> int:
        """Bytes of the line not yet ended."""
        return len(self._pending)

    def flush_unchecked(self) -> bytes:
        """Return and forget the unterminated tail, whatever its length."""
        rest = bytes(self._pending)
        self._pending.clear()
        return rest

    def _check_pending(self, lines: list[bytes]) -> None:
        """Raise `LineTooLong` (after ``lines``) if the unterminated tail is already too long."""
        # One byte of slack: a pending "\r" may still become the "\r\n" of a full-length line.
        pending = self._pending
        if len(pending) > self.max_length + 1 or (
            len(pending) == self.max_length + 1 and not pending.endswith(b"\r")
        ):
            discarded = len(pending)
            pending.clear()
            raise LineTooLong(self.max_length, lines, discarded)


def _content_length(line: bytes) -> int:
    return len(line) - (2 if line.endswith(b"\r\n") else 1)
