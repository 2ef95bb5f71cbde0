"""tcpecho: a TCP echo server and client toolkit.

The names below load on first use, so that ``import tcpecho.protocol`` pulls in no sockets,
threads or event loops.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "EchoClient": "tcpecho.client",
    "EchoConnection": "tcpecho.protocol",
    "Engine": "tcpecho.engines",
    "ServerConfig": "tcpecho.config",
    "Summary": "tcpecho.engines",
    "TcpEchoError": "tcpecho.errors",
    "create_engine": "tcpecho.engines",
}

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

if TYPE_CHECKING:
    from tcpecho.client import EchoClient
    from tcpecho.config import ServerConfig
    from tcpecho.engines import Engine, Summary, create_engine
    from tcpecho.errors import TcpEchoError
    from tcpecho.protocol import EchoConnection


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tcpecho' has no attribute {name!r}")
