"""One event loop for every connection: asyncio, or uvloop when installed.

Each connection is an `asyncio.BufferedProtocol` that feeds the same `EchoConnection` core as the
threads engine; this module only moves bytes, owns the transports and keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

from tcpecho import net
from tcpecho.config import LoopName, ServerConfig
from tcpecho.engines.base import (
    ACCEPT_BATCH,
    ACCEPT_RETRY_DELAY,
    ACCEPT_RETRY_ERRNOS,
    LINGER_TIMEOUT,
    RECV_SIZE,
    WRITE_BUFFER_HIGH_WATER,
    ConnectionLog,
    Summary,
    new_connection,
)
from tcpecho.errors import ConfigError
from tcpecho.net import Address, describe_os_error
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
        self._retries: dict[int, asyncio.TimerHandle] = {}  # listener fd → paused accept
        self._handshakes: set[asyncio.Task[tuple[asyncio.BaseTransport, EchoProtocol]]] = set()
        self._stop_requested: asyncio.Event | None = None
        self._all_closed: asyncio.Event | None = None
        self._pending_stop: bool | None = None  # force flag of a stop() that came before serve()
        # Every connection reads into this one buffer (a loop runs one callback at a time). As
        # a plain Protocol, the stdlib loop would allocate a fresh 256 KiB bytes for every read,
        # which glibc serves with mmap, mremap and munmap: three system calls and a page fault
        # per read, which made that loop's throughput half of what it is now.
        self.read_buffer = memoryview(bytearray(RECV_SIZE))

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
            self._listeners = net.listening_sockets(self.config)
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
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    # The connection failed before we took it (reset, aborted, unreachable).
                    self.log.accept_failed("a connection failed before it was accepted: %s", exc)
                    continue
                self.log.accept_failed(
                    "cannot accept a connection: %s; retrying", exc.strerror or str(exc)
                )
                loop.remove_reader(listener.fileno())
                self._retries[listener.fileno()] = loop.call_later(
                    ACCEPT_RETRY_DELAY, self._resume_accepting, listener
                )
                return
            sock.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(self._new_protocol, sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume_accepting(self, listener: socket.socket) -> None:
        del self._retries[listener.fileno()]
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
        for handle in self._retries.values():
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
            self.log.drain_timed_out(self.config.drain_timeout, len(self.connections))
        for protocol in list(self.connections):
            protocol.abort()
        for _ in range(10):  # an abort calls connection_lost on a later turn of the loop
            if not self.connections:
                break
            await asyncio.sleep(0)

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
            protocol.stop()
        self.connection_closed()

    def connection_closed(self) -> None:
        if self.stopping and not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.log.logger.error(
            "%s", context.get("message", "unexpected error"), exc_info=exc, extra={"tag": "ERROR"}
        )


class EchoProtocol(asyncio.BufferedProtocol):
    """One connection: bytes in, `EchoConnection`, bytes out."""

    def __init__(self, engine: AsyncioEngine) -> None:
        self.engine = engine
        self.log = engine.log
        self.conn = new_connection(engine.config)
        self.receive = self.conn.receive_data  # bound once: this is the per-message path
        self.read_buffer = engine.read_buffer
        self.log_messages = engine.log.log_messages
        self.peer = "?"
        self.sent = 0
        self.reason = "closed by client"
        self.transport: asyncio.Transport  # set by connection_made, before any other call
        self.write: Callable[[bytes], object]
        self.closing = False  # no more input will be answered
        self._write_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but offer the same methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.write = transport.write
        engine = self.engine
        self.peer = net.format_address(transport.get_extra_info("peername") or ("?", 0))
        if engine.stopping or len(engine.connections) >= engine.config.max_connections:
            if engine.stopping:
                self.log.busy("refused %s: the server is stopping", self.peer)
            else:
                self.log.busy(
                    "refused %s: %d connections open (--max-connections)",
                    self.peer,
                    engine.config.max_connections,
                )
            transport.write(BUSY_REPLY)
            transport.close()
            return
        engine.connections.add(self)
        engine.summary.connections += 1
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_WATER)
        self.log.opened(self.peer, len(engine.connections))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out at once: the next connection's read reuses the buffer.
        self.data_received(self.read_buffer[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        out = self.receive(data)
        if self.log_messages:
            self.log.messages(self.peer, self.conn)
        if out:
            self.write(out)
            self.sent += len(out)
        if self.conn.state is not OPEN and not self.closing:
            self._input_ended(linger=True)

    def eof_received(self) -> bool:
        if self.conn.state is OPEN:
            self.data_received(b"")  # the end of input: answer what is left
        if self.closing:
            self._close()  # the client's end was what the linger waited for
        else:
            self._input_ended(linger=False)
        return True  # _close() sends our last replies before it closes

    def stop(self) -> None:
        """The server is stopping: answer what was received, then close as after an error."""
        if self.conn.state is OPEN:
            self.reason = "closed: server stopping"
            self.data_received(b"")
        self._input_ended(linger=True)

    def pause_writing(self) -> None:
        # The client is not reading: stop reading from it too, and give it write_timeout.
        self.transport.pause_reading()
        if self._write_timer is None:
            self._write_timer = asyncio.get_running_loop().call_later(
                self.engine.config.write_timeout, self._write_timed_out
            )

    def resume_writing(self) -> None:
        self._write_timer = _cancel(self._write_timer)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._write_timer = _cancel(self._write_timer)
        self._linger_timer = _cancel(self._linger_timer)
        if self not in self.engine.connections:  # refused at connection_made
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

    def _input_ended(self, *, linger: bool) -> None:
        """No more input will be answered: say why, then close once the replies are out.

        ``linger``: half-close and read (discarding, counted) until the client closes or
        `LINGER_TIMEOUT`, so that closing does not reset replies the client has not read yet.
        Pointless when the client has finished sending.
        """
        self.closing = True
        if self.conn.state is State.REJECTED:
            self.reason = "closed: line too long"
            self.log.rejected(self.peer, self.conn)
        transport = self.transport
        if linger and transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
            transport.resume_reading()
            self._linger_timer = asyncio.get_running_loop().call_later(LINGER_TIMEOUT, self._close)
        else:
            self._close()

    def _close(self) -> None:
        transport = self.transport
        transport.close()  # after the queued replies are sent
        if transport.get_write_buffer_size() and self._write_timer is None:
            # A client that never reads them would hold the connection forever.
            self._write_timer = asyncio.get_running_loop().call_later(
                self.engine.config.write_timeout, self._write_timed_out
            )

    def _write_timed_out(self) -> None:
        self.reason = "closed: not reading (--write-timeout)"
        self.abort()


OPEN = State.OPEN  # a module constant: quicker than State.OPEN on the per-message path


def _cancel(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """Cancel ``timer`` if there is one; returns None, to be stored in its place."""
    if timer is not None:
        timer.cancel()
    return None
