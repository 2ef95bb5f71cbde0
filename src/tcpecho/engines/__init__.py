"""The engines, and the registry that picks one by name."""

from __future__ import annotations

from tcpecho.config import ServerConfig
from tcpecho.engines.aio import AsyncioEngine
from tcpecho.engines.base import Engine, Summary
from tcpecho.engines.threaded import ThreadedEngine

ENGINE_CLASSES: dict[str, type[ThreadedEngine] | type[AsyncioEngine]] = {
    "threads": ThreadedEngine,
    "asyncio": AsyncioEngine,
}


def create_engine(config: ServerConfig) -> Engine:
    """A new, not yet started engine of the kind ``config.engine`` names."""
    return ENGINE_CLASSES[config.engine](config)


__all__ = ["ENGINE_CLASSES", "Engine", "Summary", "create_engine"]
