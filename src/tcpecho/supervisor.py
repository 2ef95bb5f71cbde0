"""Runs a server in the foreground: banner, signals, summary."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from tcpecho.config import ServerConfig
from tcpecho.engines import Summary, create_engine
from tcpecho.net import format_address

logger = logging.getLogger("tcpecho.server")


def serve(config: ServerConfig) -> Summary:
    """Listen, log the banner, serve until SIGINT or SIGTERM, log the summary.

    The first signal stops accepting and drains; a second one closes every connection at
    once. Raises `HostNotFound` or a `BindError` when the server cannot listen.
    """
    engine = create_engine(config)
    addresses = engine.start()
    listening = ", ".join(format_address(address) for address in addresses)
    logger.info(
        "Listening on %s",
        listening,
        extra={"tag": "SERVER STARTING", "fields": {"addresses": [list(a) for a in addresses]}},
    )
    logger.info(
        "engine %s, %s framing, %s replies, up to %d connections",
        engine.description,
        config.framing,
        config.reply,
        config.max_connections,
        extra={"tag": "ENGINE", "fields": {"engine": engine.description}},
    )
    with stop_on_signals(engine.stop):
        summary = engine.serve()
    logger.info(
        "%d connections served, %d bytes echoed",
        summary.connections,
        summary.bytes_echoed,
        extra={
            "tag": "SERVER STOPPED",
            "fields": {"connections": summary.connections, "bytes_echoed": summary.bytes_echoed},
        },
    )
    return summary


@contextmanager
def stop_on_signals(stop: Callable[..., None]) -> Iterator[None]:
    """Call ``stop()`` on the first SIGINT/SIGTERM and ``stop(force=True)`` on the next.

    The handler only calls ``stop``, which sets an event. Outside the main thread, where
    Python cannot install handlers, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        stop(force=received > 1)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
