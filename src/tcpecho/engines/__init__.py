"""The engines, and the registry that picks one by name."""

from __future__ import annotations

from collections.abc import Iterable

from tcpecho.config import ServerConfig
from tcpecho.engines.aio import AsyncioEngine
from tcpecho.engines.base import Engine
from tcpecho.engines.threaded import ThreadedEngine
from tcpecho.events import Consumer, Summary

ENGINE_CLASSES: dict[str, type[ThreadedEngine] | type[AsyncioEngine]] = {
    "threads": ThreadedEngine,
    "asyncio": AsyncioEngine,
}


def create_engine(config: ServerConfig, consumers: Iterable[Consumer] = ()) -> Engine:
    """A new, not yet started engine of the kind ``config.engine`` names.

    ``consumers`` receive every server event besides the log and the summary (metrics, tests).
    """
    return ENGINE_CLASSES[config.engine](config, consumers)


__all__ = ["ENGINE_CLASSES", "Engine", "Summary", "create_engine"]
