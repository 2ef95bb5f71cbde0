"""One event loop for every connection: asyncio, or uvloop when installed.

Each connection is an `asyncio.Protocol` that feeds the same `EchoConnection` core as the
threads engine; this module only moves bytes, owns the transports and keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
from types import ModuleType
from typing import Any, cast

from tcpecho import net
from tcpecho.config import LoopName, ServerConfig
from tcpecho.engines.base import (
    ACCEPT_BATCH,
    ACCEPT_RETRY_DELAY,
    ACCEPT_RETRY_ERRNOS,
    LINGER_TIMEOUT,
    WRITE_BUFFER_HIGH_WATER,
    ConnectionLog,
    Summary,
    describe_os_error,
    new_connection,
)
from tcpecho.errors import ConfigError
from tcpecho.net import Address
from tcpecho.protocol import BUSY_REPLY, State


def load_uvloop(choice: LoopName) -> ModuleType | None:
    """The uvloop module when ``choice`` asks for it and it imports, else None.

    Raises `ConfigError` when ``choice`` is "uvloop" and uvloop is not installed.
    """
    if choice == "asyncio":
        return None
    try:
        return importlib.import_module("uvloop")
    except ImportError as exc:
        if choice == "uvloop":
            raise ConfigError(
                "--loop", choice, "uvloop is not installed (pip install 'tcpecho[fast]')"
            ) from exc
        return None


class AsyncioEngine:
    """Serves every connection from one event loop, in the thread that calls `serve`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.log = ConnectionLog(config)
        self.summary = Summary()
        self.connections: set[EchoProtocol] = set()
        self.stopping = False
        self._uvloop = load_uvloop(config.loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[socket.socket] = []
        self._retries: list[asyncio.TimerHandle] = []
        self._handshakes: set[asyncio.Task[tuple[asyncio.BaseTransport, EchoProtocol]]] = set()
        self._stop_requested: asyncio.Event | None = None
        self._all_closed: asyncio.Event | None = None
        self._pending_stop: bool | None = None  # force flag of a stop() that came before serve()

    @property
    def description(self) -> str:
        if self._uvloop is not None:
            return f"asyncio on uvloop {getattr(self._uvloop, '__version__', '')}".rstrip()
        return "asyncio on the stdlib loop"

    def start(self) -> list[Address]:
        loop = self._uvloop.new_event_loop() if self._uvloop else asyncio.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(self._loop_exception)
        try:
            self._listeners = net.open_listeners(
                self.config.host,
                self.config.port,
                self.config.backlog,
                reuse_port=self.config.reuse_port,
            )
        except BaseException:
            loop.close()
            raise
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        return [sock.getsockname()[:2] for sock in self._listeners]

    def _accept(self, listener: socket.socket) -> None:
        # Our own accept loop rather than loop.create_server(): both loops then treat running
        # out of descriptors alike (uvloop would accept and drop such clients silently).
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                self.log.accept_failed(
                    "cannot accept a connection: %s; retrying", exc.strerror or str(exc)
                )
                loop.remove_reader(listener.fileno())
                self._retries.append(
                    loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting, listener)
                )
                return
            sock.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(self._new_protocol, sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if not self.stopping:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def _new_protocol(self) -> EchoProtocol:
        return EchoProtocol(self)

    def stop(self, *, force: bool = False) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._request_stop, force)

    def serve(self) -> Summary:
        loop = self._loop
        if loop is None:
            raise RuntimeError("start() first")
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        return self.summary

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        self._all_closed = asyncio.Event()
        if self._pending_stop is not None:
            self._request_stop(self._pending_stop)
        await self._stop_requested.wait()
        loop = asyncio.get_running_loop()
        for handle in self._retries:
            handle.cancel()
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        if self._handshakes:
            await asyncio.wait(self._handshakes)
        self._drain_started()
        try:
            await asyncio.wait_for(self._all_closed.wait(), self.config.drain_timeout)
        except TimeoutError:
            self.log.logger.warning(
                "drain timeout (%gs) reached: closing %d connections",
                self.config.drain_timeout,
                len(self.connections),
                extra={"tag": "SERVER STOPPING"},
            )
        for protocol in list(self.connections):
            protocol.abort()
        await asyncio.sleep(0)  # let the aborted transports call connection_lost

    def _request_stop(self, force: bool) -> None:
        if self._stop_requested is None:  # stop() before serve(): remember it
            self._pending_stop = force or bool(self._pending_stop)
            return
        self.stopping = True
        self._stop_requested.set()
        if force and self._all_closed is not None:
            self._all_closed.set()

    def _drain_started(self) -> None:
        for protocol in list(self.connections):
            protocol.finish("closed: server stopping", linger=False)
        self.connection_closed()

    def connection_closed(self) -> None:
        if self.stopping and not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.log.logger.error(
            "%s", context.get("message", "unexpected error"), exc_info=exc, extra={"tag": "ERROR"}
        )


class EchoProtocol(asyncio.Protocol):
    """One connection: bytes in, `EchoConnection`, bytes out."""

    def __init__(self, engine: AsyncioEngine) -> None:
        self.engine = engine
        self.log = engine.log
        self.conn = new_connection(engine.config)
        self.peer = "?"
        self.sent = 0
        self.reason = "closed by client"
        self.transport: asyncio.Transport  # set by connection_made, before any other call
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but offer the same methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        engine = self.engine
        self.peer = net.format_address(transport.get_extra_info("peername") or ("?", 0))
        if engine.stopping or len(engine.connections) >= engine.config.max_connections:
            self.log.busy(
                "refused %s: %d connections open (--max-connections)",
                self.peer,
                engine.config.max_connections,
            )
            transport.write(BUSY_REPLY)
            transport.close()
            return
        self._counted = True
        engine.connections.add(self)
        engine.summary.connections += 1
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_WATER)
        self.log.opened(self.peer, len(engine.connections))

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.state is not State.OPEN:
            conn.receive_data(data)  # lingering: counted as discarded
            return
        out = conn.receive_data(data)
        if self.log.log_messages:
            self.log.messages(self.peer, conn.frames)
        if out:
            self.transport.write(out)
            self.sent += len(out)
        if conn.state is not State.OPEN:
            if conn.state is State.REJECTED:
                self.reason = "closed: line too long"
                self.log.rejected(self.peer, conn)
            self._close_after_linger()

    def eof_received(self) -> bool:
        self.finish(self.reason, linger=False)
        return True  # close() below flushes our last replies first

    def finish(self, reason: str, *, linger: bool) -> None:
        """The end of input: reply to what is left, then close once it is sent.

        ``linger``: half-close and wait for the client's end first (see `_close_after_linger`);
        pointless when the client has finished sending, and skipped when the server stops.
        """
        if self.conn.state is State.OPEN:
            self.reason = reason
            out = self.conn.receive_data(b"")
            self.log.messages(self.peer, self.conn.frames)
            if out:
                self.transport.write(out)
                self.sent += len(out)
        if linger:
            self._close_after_linger()
        else:
            self._close_now()

    def pause_writing(self) -> None:
        # The client is not reading: stop reading from it too, and give it write_timeout.
        self.transport.pause_reading()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.engine.config.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        self._cancel_timer()
        if self.conn.state is State.OPEN:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if not self._counted:
            return
        if isinstance(exc, OSError) and self.reason == "closed by client":
            self.reason = describe_os_error(exc)
        engine = self.engine
        engine.connections.discard(self)
        engine.summary.bytes_received += self.conn.bytes_received
        engine.summary.bytes_echoed += self.sent
        self.log.closed(self.peer, self.conn, self.sent, self.reason)
        engine.connection_closed()

    def abort(self) -> None:
        self.transport.abort()

    def _write_timed_out(self) -> None:
        self.reason = "closed: not reading (--write-timeout)"
        self.abort()

    def _close_after_linger(self) -> None:
        # Half-close once the replies are out; keep reading (discarding) until the client closes
        # or LINGER_TIMEOUT, so that closing does not reset replies it has not read yet.
        transport = self.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(LINGER_TIMEOUT, self._close_now)

    def _close_now(self) -> None:
        self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
