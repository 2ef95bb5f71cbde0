"""The sans-I/O echo protocol: framing, replies, admission, the PROXY protocol header and the
connection's life.

The PROXY protocol's functions are here with ``proxy`` in their names (`parse_proxy_header`
is `tcpecho.protocol.proxy.parse`).

Nothing in this package imports socket, ssl, asyncio, threading or logging, nor reads a clock.
"""

from __future__ import annotations

from tcpecho.protocol.admission import (
    DEFAULT_IPV6_PREFIX,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_ADDRESS,
    AccessList,
    Admission,
    Network,
    parse_network,
)
from tcpecho.protocol.connection import EchoConnection, State
from tcpecho.protocol.framing import MAX_LINE_LENGTH, Framing, LineSplitter, LineTooLong
from tcpecho.protocol.proxy import (
    MAX_V1_LENGTH,
    MAX_V2_BLOCK_LENGTH,
    MAX_V2_LENGTH,
    PROXY_V1_SIGNATURE,
    PROXY_V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
)
from tcpecho.protocol.proxy import encode_v1 as encode_proxy_v1
from tcpecho.protocol.proxy import encode_v2 as encode_proxy_v2
from tcpecho.protocol.proxy import parse as parse_proxy_header
from tcpecho.protocol.proxy import starts_like_header as starts_like_proxy_header
from tcpecho.protocol.replies import BUSY_REPLY, DEFAULT_CONFIRM_PREFIX, ReplyMode
from tcpecho.protocol.session import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LINE_TIMEOUT,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
    LINGER_TIMEOUT,
    PROXY_HEADER_TIMEOUT,
    CloseReason,
    Command,
    Greeting,
    ProxyMode,
    Session,
    SessionSettings,
)

__all__ = [
    "BUSY_REPLY",
    "DEFAULT_CONFIRM_PREFIX",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_IPV6_PREFIX",
    "DEFAULT_LINE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PER_ADDRESS",
    "DEFAULT_TLS_HANDSHAKE_TIMEOUT",
    "DEFAULT_WRITE_TIMEOUT",
    "LINGER_TIMEOUT",
    "MAX_LINE_LENGTH",
    "MAX_V1_LENGTH",
    "MAX_V2_BLOCK_LENGTH",
    "MAX_V2_LENGTH",
    "PROXY_HEADER_TIMEOUT",
    "PROXY_V1_SIGNATURE",
    "PROXY_V2_SIGNATURE",
    "AccessList",
    "Admission",
    "CloseReason",
    "Command",
    "EchoConnection",
    "Framing",
    "Greeting",
    "LineSplitter",
    "LineTooLong",
    "Network",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyMode",
    "ReplyMode",
    "Session",
    "SessionSettings",
    "State",
    "encode_proxy_v1",
    "encode_proxy_v2",
    "parse_network",
    "parse_proxy_header",
    "starts_like_proxy_header",
]
