"""The sans-I/O echo protocol: framing, replies and the connection state machine.

Nothing in this package imports socket, ssl, asyncio, threading or logging.
"""

from __future__ import annotations

from tcpecho.protocol.connection import EchoConnection, State
from tcpecho.protocol.framing import MAX_LINE_LENGTH, Framing, LineSplitter, LineTooLong
from tcpecho.protocol.replies import BUSY_REPLY, DEFAULT_CONFIRM_PREFIX, ReplyMode

__all__ = [
    "BUSY_REPLY",
    "DEFAULT_CONFIRM_PREFIX",
    "MAX_LINE_LENGTH",
    "EchoConnection",
    "Framing",
    "LineSplitter",
    "LineTooLong",
    "ReplyMode",
    "State",
]
