"""tcpecho: a TCP echo server and client toolkit."""

from __future__ import annotations

from tcpecho.client import EchoClient
from tcpecho.config import ServerConfig
from tcpecho.engines import Engine, Summary, create_engine
from tcpecho.errors import TcpEchoError
from tcpecho.protocol import EchoConnection

__version__ = "0.1.0"

__all__ = [
    "EchoClient",
    "EchoConnection",
    "Engine",
    "ServerConfig",
    "Summary",
    "TcpEchoError",
    "__version__",
    "create_engine",
]
