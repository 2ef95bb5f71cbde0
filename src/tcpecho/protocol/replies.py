"""What a message gets back. Pure: no I/O, no logging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from tcpecho.protocol.framing import Framing

ReplyMode = Literal["echo", "confirm"]

# The seed's server "sends back a confirmation message"; this is the text it starts with.
DEFAULT_CONFIRM_PREFIX = "Server received: "

BUSY_REPLY = b"ERROR server busy\n"

Reply = Callable[[bytes], bytes]


def make_reply(mode: ReplyMode, framing: Framing, confirm_prefix: bytes) -> Reply:
    """The function that turns one message into the bytes sent back.

    ``echo`` sends the message back exactly (RFC 862). ``confirm`` sends the prefix and the
    message: in line framing one line per line received (terminator normalised to ``\\n``); in
    raw framing the prefix followed by whatever one read returned, as it came.
    """
    if mode == "echo":
        return _echo
    if framing == "line":
        return lambda line: confirm_prefix + strip_terminator(line) + b"\n"
    return lambda data: confirm_prefix + data


def strip_terminator(line: bytes) -> bytes:
    """``line`` without its one ``\n`` or ``\r\n`` (other ``\r`` are content)."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def line_too_long_reply(max_length: int) -> bytes:
    return b"ERROR line too long: more than %d bytes without a newline\n" % max_length


def _echo(data: bytes) -> bytes:
    return data
