"""Helpers for testing code against a real tcpecho server, in this process.

with running_server(ServerConfig(host=("127.0.0.1",), port=0)) as server:
    sock = socket.create_connection(server.address)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tcpecho.config import ServerConfig
from tcpecho.engines import Engine, Summary, create_engine
from tcpecho.events import Consumer
from tcpecho.net import Address


@dataclass
class RunningServer:
    """A server serving in a background thread. ``address`` is the first bound address."""

    engine: Engine
    addresses: list[Address]
    summary: Summary | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def address(self) -> Address:
        return self.addresses[0]

    def stop(self, *, force: bool = False, timeout: float | None = None) -> Summary:
        """Stop, wait for the server thread (drain included) and return its summary."""
        self.engine.stop(force=force)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("the server did not stop in time")
        assert self.summary is not None
        return self.summary


@contextmanager
def running_server(
    config: ServerConfig | None = None, consumers: Iterable[Consumer] = ()
) -> Iterator[RunningServer]:
    """Start a server (default: 127.0.0.1, a port the OS picks), yield it, stop it on exit.

    It is listening when the block starts. On exit it stops like Ctrl-C: drain, then close.
    ``consumers`` are called with every server event (tcpecho.events), from the server's
    threads: ``running_server(consumers=[events.append])`` records them.
    """
    config = config or ServerConfig(host=("127.0.0.1",), port=0)
    engine = create_engine(config, consumers)
    server = RunningServer(engine, engine.start())

    def serve() -> None:
        server.summary = engine.serve()

    server._thread = threading.Thread(target=serve, name="tcpecho-server", daemon=True)
    server._thread.start()
    try:
        yield server
    finally:
        if server.summary is None or server._thread.is_alive():
            server.stop()
