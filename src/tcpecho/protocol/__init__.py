"""The sans-I/O echo protocol: framing, replies, admission and the connection's life.

Nothing in this package imports socket, ssl, asyncio, threading or logging, nor reads a clock.
"""

from __future__ import annotations

from tcpecho.protocol.admission import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_ADDRESS,
    AccessList,
    Admission,
    Network,
    parse_network,
)
from tcpecho.protocol.connection import EchoConnection, State
from tcpecho.protocol.framing import MAX_LINE_LENGTH, Framing, LineSplitter, LineTooLong
from tcpecho.protocol.replies import BUSY_REPLY, DEFAULT_CONFIRM_PREFIX, ReplyMode
from tcpecho.protocol.session import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LINE_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
    LINGER_TIMEOUT,
    CloseReason,
    Command,
    Session,
    SessionSettings,
)

__all__ = [
    "BUSY_REPLY",
    "DEFAULT_CONFIRM_PREFIX",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_LINE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PER_ADDRESS",
    "DEFAULT_WRITE_TIMEOUT",
    "LINGER_TIMEOUT",
    "MAX_LINE_LENGTH",
    "AccessList",
    "Admission",
    "CloseReason",
    "Command",
    "EchoConnection",
    "Framing",
    "LineSplitter",
    "LineTooLong",
    "Network",
    "ReplyMode",
    "Session",
    "SessionSettings",
    "State",
    "parse_network",
]
