"""One event loop for every connection: asyncio, or uvloop when installed.

Each connection is an asyncio protocol and a `Driver`, feeding the same `Session` as the threads
engine; this module only moves bytes, owns the transports and keeps the timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import importlib
import itertools
import os
import resource
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from time import monotonic
from types import ModuleType
from typing import Any, Protocol, cast

from tcpecho import net
from tcpecho.config import LoopName, ServerConfig
from tcpecho.engines.base import (
    ACCEPT_BATCH,
    MAX_WAIT,
    RECV_SIZE,
    WRITE_BUFFER_HIGH_WATER,
    Driver,
    EngineCore,
    signals_wake,
)
from tcpecho.errors import ConfigError
from tcpecho.events import Consumer, Summary
from tcpecho.net import Address
from tcpecho.protocol import MAX_V2_LENGTH
from tcpecho.protocol.session import State

# Descriptors kept free for everything but the connections' own (listeners, the loop's, log
# files, the metrics server, refused clients still closing) when direct echo counts whether
# each connection can have a second one.
DESCRIPTOR_RESERVE = 64


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

    def __init__(self, config: ServerConfig, consumers: Iterable[Consumer] = ()) -> None:
        self.config = config
        self.core: EngineCore[LoopConnection] = EngineCore(config, consumers, threaded=False)
        self.live: set[LoopConnection] = set()  # admitted, and refused ones still closing
        self.direct = 0  # connections in direct echo, each with a second descriptor
        self._uvloop = load_uvloop(config.loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: TimerThread | None = None  # the stdlib loop's connection timers
        self._listeners: list[socket.socket] = []
        self._retries: dict[int, asyncio.TimerHandle] = {}  # listener fd → paused accept
        self._handshakes: set[asyncio.Task[tuple[asyncio.BaseTransport, LoopConnection]]] = set()
        self._tls_handshakes: set[asyncio.Task[None]] = set()
        self._stop_requested: asyncio.Event | None = None
        self._all_closed: asyncio.Event | None = None
        self._forced = False
        self._pending_stop: bool | None = None  # force flag of a stop() that came before serve()
        # Every connection reads into this one buffer (a loop runs one callback at a time). As
        # a plain Protocol, the stdlib loop would allocate a fresh 256 KiB bytes for every read,
        # which glibc serves with mmap, mremap and munmap: three system calls and a page fault
        # per read, which made that loop's throughput half of what it is now.
        # uvloop reads into a buffer of its own and hands a plain Protocol one bytes object,
        # which costs less than the two Python calls and the copy of a BufferedProtocol.
        self.read_buffer = memoryview(bytearray(RECV_SIZE))
        self._connection_class: type[LoopConnection] = (
            LoopConnection if self._uvloop else BufferedLoopConnection
        )
        # Direct echo (see LoopConnection) on uvloop only: the stdlib loop would allocate a
        # fresh bytes for every read of a plain Protocol, as above.
        self.direct_echo = self._uvloop is not None

    @property
    def description(self) -> str:
        if self._uvloop is not None:
            return f"asyncio on uvloop {getattr(self._uvloop, '__version__', '')}".rstrip()
        return "asyncio on the stdlib loop"

    def start(self) -> list[Address]:
        loop = self._uvloop.new_event_loop() if self._uvloop else asyncio.new_event_loop()
        self._loop = loop
        if self._uvloop is None:
            self._timers = TimerThread(loop)
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
        if listener.fileno() == -1:  # closed by a stop earlier in this turn of the loop
            return
        for _ in range(ACCEPT_BATCH):
            accepted = self.core.accept(listener)
            if accepted is None:
                return
            if isinstance(accepted, float):
                if not accepted:
                    continue
                loop.remove_reader(listener.fileno())
                self._retries[listener.fileno()] = loop.call_later(
                    accepted, self._resume_accepting, listener
                )
                return
            sock, address = accepted
            sock.setblocking(False)
            protocol = self._connection_class(self, address)
            if self.core.tls_context is not None:
                tls_task = loop.create_task(protocol.open_tls(sock, self.core.tls_context))
                self._tls_handshakes.add(tls_task)
                tls_task.add_done_callback(self._tls_handshakes.discard)
                continue
            task = loop.create_task(loop.connect_accepted_socket(_factory(protocol), sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume_accepting(self, listener: socket.socket) -> None:
        del self._retries[listener.fileno()]
        if not self.core.stopping:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def stop(self, *, force: bool = False) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if loop.is_running() and _running_loop() is loop:
            # A signal handler, run by the loop's own thread between two callbacks: refuse new
            # clients now, not a turn or two later (a loop that is behind takes long over each
            # turn). The drain starts on the next turn, once this one's reads are answered.
            self._close_listeners()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._request_stop, force)

    def serve(self) -> Summary:
        loop = self._loop
        if loop is None:
            raise RuntimeError("start() first")
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        loop.add_reader(wake_r.fileno(), _drain, wake_r)
        try:
            with signals_wake(wake_w):
                loop.run_until_complete(self._serve())
        finally:
            if self._timers is not None:
                self._timers.close()  # before the loop: it hands what is due to the loop
            loop.remove_reader(wake_r.fileno())
            wake_r.close()
            wake_w.close()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        return self.core.stopped()

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` on the loop at ``deadline`` (`time.monotonic`), or soon after."""
        if self._timers is not None:
            return self._timers.call_at(deadline, callback)
        delay = max(deadline - monotonic(), 0.0)
        return asyncio.get_running_loop().call_later(delay, callback)

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        self._all_closed = asyncio.Event()
        if self._pending_stop is not None:
            self._request_stop(self._pending_stop)
        await self._stop_requested.wait()
        self._close_listeners()
        if self._handshakes:
            await asyncio.wait(self._handshakes)
        for tls_task in list(self._tls_handshakes):
            tls_task.cancel()  # the connection closes, "server stopping"
        if self._tls_handshakes:
            await asyncio.wait(self._tls_handshakes)
        for conn in self.core.drain_started():
            conn.stop()
        self.connection_ended()
        try:
            await asyncio.wait_for(self._all_closed.wait(), self.config.drain_timeout)
        except TimeoutError:
            for conn in self.core.drain_timed_out():
                conn.drain_expired()
        for conn in list(self.live):
            conn.stop_at_once()
        for _ in range(10):  # an abort calls connection_lost on a later turn of the loop
            if not self.live:
                break
            await asyncio.sleep(0)

    def _request_stop(self, force: bool) -> None:
        if self._stop_requested is None:  # stop() before serve(): remember it
            self._pending_stop = force or bool(self._pending_stop)
            return
        # At once, not when _serve next runs: a loop that is behind serves every connection
        # once per turn, and new clients would be accepted until then.
        self._close_listeners()
        self._stop_requested.set()
        if force and self._all_closed is not None:
            self._all_closed.set()

    def _close_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for sock in self._listeners:
            if sock.fileno() != -1:
                loop.remove_reader(sock.fileno())
                sock.close()

    def descriptors_to_spare(self) -> bool:
        """Is there room for one more of direct echo's second descriptors (see
        `LoopConnection`)? They may take half of what the soft RLIMIT_NOFILE leaves beyond one
        descriptor for each of ``--max-connections`` and a reserve: a full server still has one
        for every client it admits, and the other half for clients it refuses (each held for
        the linger). The limit is read each time: it can be changed from outside (prlimit)."""
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        spare = limit - self.config.max_connections - DESCRIPTOR_RESERVE
        return limit == resource.RLIM_INFINITY or 2 * (self.direct + 1) <= spare

    def connection_ended(self) -> None:
        if self.core.stopping and not self.core.drivers and self._all_closed is not None:
            self._all_closed.set()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.core.log.logger.error(
            "%s", context.get("message", "unexpected error"), exc_info=exc, extra={"tag": "ERROR"}
        )


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class TimerThread:
    """The stdlib loop's connection timers, kept off the loop.

    asyncio's selector loop pays on every turn for any timer it holds: it reads the clock
    twice more and waits in ``epoll`` with a timeout. With one timer an hour away, the minimal
    ``Protocol`` peer spent 5 % more CPU a round trip (docs/benchmarks.md). Here one thread
    sleeps until the earliest deadline, then hands what is due to the loop
    (``call_soon_threadsafe``); a sleeping thread costs the loop about 1 %. uvloop's timers,
    libuv's, cost nothing like that, and stay on the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Timer]] = []  # cancelled ones too, until due
        self._cancelled = 0  # how many in the heap are cancelled, or a few more: cancelling
        # a timer the thread has popped counts it too; that only clears the heap a bit early
        self._order = itertools.count()  # ties in time: first armed, first run
        self._thread: threading.Thread | None = None
        self._closed = False

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self, callback)
        with self._lock:
            if self._thread is None:  # started with the lock held: it waits for the push
                thread = threading.Thread(target=self._run, name="timers", daemon=True)
                thread.start()
                self._thread = thread
            heapq.heappush(self._heap, (deadline, next(self._order), timer))
            if self._heap[0][2] is timer:  # sooner than the thread sleeps for
                self._changed.notify()
        return timer

    def cancelled(self) -> None:
        """A timer was cancelled: once they are most of the heap, clear them out (many
        connections that open and close would otherwise leave one each until its deadline)."""
        with self._lock:
            self._cancelled += 1
            if self._cancelled > len(self._heap) // 2 and len(self._heap) > 64:
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._changed.notify()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                now = monotonic()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    timer = heapq.heappop(self._heap)[2]
                    if timer.cancelled:
                        self._cancelled -= 1
                    else:
                        due.append(timer)
                if due:
                    self._loop.call_soon_threadsafe(self._run_due, due)
                wait = min(self._heap[0][0] - now, MAX_WAIT) if self._heap else None
                self._changed.wait(wait)

    def _run_due(self, due: list[Timer]) -> None:
        for timer in due:  # each a callback of its own: one that fails stops none of the others
            self._loop.call_soon(timer.run)


class Timer:
    """One timer of a `TimerThread`. Cancelled and run on the loop's thread only."""

    __slots__ = ("callback", "cancelled", "timers")

    def __init__(self, timers: TimerThread, callback: Callable[[], None]) -> None:
        self.timers = timers
        self.callback: Callable[[], None] | None = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.callback = None  # the heap may hold this until its deadline: not its connection
            self.timers.cancelled()

    def run(self) -> None:
        if self.callback is not None:  # else cancelled since the thread took it
            self.callback()


class LoopConnection(Driver, asyncio.Protocol):
    """One connection: the transport's callbacks fed to the `Driver`, its commands carried out
    on the transport, and the one timer from `AsyncioEngine.call_at`. As a plain Protocol, the
    loop calls `data_received` with each read.

    Direct echo (uvloop): while the driver may echo a read without the session
    (`Driver.echo_fast`) on a plain TCP transport, the transport's protocol is a `DirectEcho`,
    whose ``data_received`` is the transport's own ``write``: the loop hands each read straight
    back, and no Python runs per read. The kernel
    counts those bytes instead: `count_echoed` asks it (`net.bytes_read`) through a duplicate
    of the socket, which still answers after the loop has closed its own after an error. That
    is a second descriptor, taken only where there is room for it beside one for every client
    the server may admit and some it refuses (`AsyncioEngine.descriptors_to_spare`); else raw
    echo takes the Python fast path.
    """

    transport: asyncio.Transport  # set by connection_made, before any other call

    def __init__(self, engine: AsyncioEngine, address: Address) -> None:
        super().__init__(engine.core, address)
        self.engine = engine
        self._timer: Cancellable | None = None
        self._timer_at: float | None = None
        self._unsent = 0
        self._counter: socket.socket | None = None  # while direct: the socket's duplicate
        self._read_before_direct = 0  # the kernel's count of bytes read, when direct began
        self._nothing_read = True  # until connection_made returns: the loop reads after it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but offer the same methods.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.write = transport.write
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_WATER)
        self.engine.live.add(self)
        if self.session.state is State.HANDSHAKE:  # admitted by open_tls; the handshake is done
            self.handshake_done(transport.get_extra_info("ssl_object"))
        else:
            self.admit()
        self._nothing_read = False

    async def open_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """Admit, read a PROXY header that TLS follows (peeked: not a byte of TLS is read),
        then the TLS handshake; `connection_made` follows it. Until then there is no
        transport: the session's commands are not carried out, every way out closes ``sock``
        (a refused TLS client is sent nothing: it could not read a plain-text line)."""
        session = self.session
        try:
            refusal = self.core.admit(self)
            if refusal is None:
                self.admitted = True
                if session.state is State.PROXY_HEADER:
                    await self._read_header(sock)
            else:
                session.refuse(refusal, monotonic())
            session.commands.clear()
            if session.state is State.HANDSHAKE:
                timeout = max(session.handshake_deadline() - monotonic(), 0.001)
                loop = asyncio.get_running_loop()
                await loop.connect_accepted_socket(
                    _factory(self),
                    sock,
                    ssl=context,
                    ssl_handshake_timeout=timeout,
                )
                return
        except (OSError, asyncio.CancelledError, TimeoutError) as exc:
            # The loop's ssl_handshake_timeout ends a handshake with ConnectionAbortedError
            # ("SSL handshake is taking longer than …"), in asyncio and uvloop alike: the only
            # ConnectionAbortedError their TLS protocols raise.
            timed_out = not isinstance(exc, OSError) or isinstance(exc, ConnectionAbortedError)
            self.handshake_failed(TimeoutError() if timed_out else exc)
        if sock.fileno() != -1:
            sock.close()
        self.lost(None)
        self.engine.connection_ended()

    async def _read_header(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        session = self.session
        while session.state is State.PROXY_HEADER:
            remaining = (session.next_deadline() or monotonic()) - monotonic()
            try:
                await asyncio.wait_for(_readable(loop, sock), max(remaining, 0.0))
            except TimeoutError:
                session.handle_timeout(monotonic())
                continue
            try:
                peeked = sock.recv(MAX_V2_LENGTH, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not peeked:
                session.receive_data(b"", monotonic())
                continue
            used = session.header_peeked(peeked, monotonic())
            if used:
                sock.recv(used)  # all there: peeked

    def eof_received(self) -> bool:
        self.input_ended()
        # The session says when to close; a TLS transport closes at the client's end anyway
        # (after what is queued), and warns when told otherwise.
        return not self.tls_info

    def pause_writing(self) -> None:
        self.writing_blocked()

    def resume_writing(self) -> None:
        self.writing_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.live.discard(self)
        self.lost(exc, self._unsent)
        self.engine.connection_ended()

    def _follow_session(self) -> None:
        super()._follow_session()
        if (
            self.echo_fast
            and self._counter is None
            and self.engine.direct_echo
            and not self.tls_info
            and self.engine.descriptors_to_spare()
        ):
            self._echo_direct()

    def _echo_direct(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is None or self.transport.is_closing():
            return
        try:
            counter = socket.socket(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
        except OSError:
            return  # out of descriptors: the Python fast path does as well
        try:
            net.count_reads(counter)
            self._read_before_direct = 0 if self._nothing_read else net.bytes_read(counter)
        except OSError:
            counter.close()
            return
        self._counter = counter
        self.engine.direct += 1
        self.transport.set_protocol(DirectEcho(self))

    def count_echoed(self) -> None:
        counter = self._counter
        if counter is None:
            return
        self._counter = None
        self.engine.direct -= 1
        if not self.transport.is_closing():
            self.transport.set_protocol(self)
        with counter:
            try:
                read = net.bytes_read(counter)
            except OSError as exc:  # it answered when direct echo began: a bug, not the client
                self.core.failed(self, exc)
                return
            self.session.echoed_by_engine += read - self._read_before_direct

    # The mechanisms the session's commands use.

    def shut_write(self) -> None:
        if self.transport.can_write_eof() and not self.transport.is_closing():
            try:
                self.transport.write_eof()  # after what is queued
            except OSError:  # the client is gone already (the stdlib loop shuts down at once)
                self.transport.abort()

    def close(self) -> None:
        self.transport.close()  # after what is queued

    def abort(self) -> None:
        self._unsent = self.transport.get_write_buffer_size()
        self.transport.abort()

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def local_address(self) -> str:
        return net.format_address(self.transport.get_extra_info("sockname"))

    def input_age(self) -> float | None:
        sock = self.transport.get_extra_info("socket")
        return None if sock is None else net.input_age(sock)

    def unread(self) -> int:
        if self.tls_info:
            # The kernel holds TLS records, whose plain text is shorter by an unknown amount:
            # waiting for that many bytes would wait for the drain timeout.
            return 0
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            return net.unread_bytes(sock.fileno())
        except OSError:
            return 0

    def set_timer(self, deadline: float | None) -> None:
        if deadline is None:
            self._cancel_timer()
        elif self._timer_at is None or deadline < self._timer_at:
            # A later deadline keeps the armed timer: it fires early, and is re-armed then.
            self._cancel_timer()
            self._timer = self.engine.call_at(deadline, self._timer_fired)
            self._timer_at = deadline

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        self.timer_fired()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None


class DirectEcho(asyncio.Protocol):
    """The transport's protocol while its connection is in direct echo: each read goes straight
    to the transport's ``write`` (a slot that hides the method); every other callback goes to
    the connection, which takes the transport back (`LoopConnection.count_echoed`)."""

    __slots__ = ("connection", "data_received")

    def __init__(self, connection: LoopConnection) -> None:
        self.connection = connection
        self.data_received = connection.transport.write  # type: ignore[method-assign]

    def eof_received(self) -> bool:
        return self.connection.eof_received()

    def pause_writing(self) -> None:
        self.connection.pause_writing()

    def resume_writing(self) -> None:
        self.connection.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost(exc)


class BufferedLoopConnection(LoopConnection, asyncio.BufferedProtocol):
    """A `LoopConnection` that reads into the engine's one buffer (the stdlib loop's choice)."""

    def __init__(self, engine: AsyncioEngine, address: Address) -> None:
        super().__init__(engine, address)
        self.read_buffer = engine.read_buffer

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out at once: the next connection's read reuses the buffer.
        self.data_received(self.read_buffer[:nbytes].tobytes())


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def woken() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), woken)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.recv(4096)


def _factory(protocol: LoopConnection) -> Callable[[], LoopConnection]:
    return lambda: protocol
