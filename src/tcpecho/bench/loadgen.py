"""One process's share of a benchmark: asyncio connections that send, read back and compare."""

from __future__ import annotations

import asyncio
import importlib
import math
import socket
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, cast

from tcpecho import tls as tls_
from tcpecho.bench.payload import HEADER, MIN_SIZE, Payloads, classify
from tcpecho.client import ClientTLS, ProxyVersion, proxy_header
from tcpecho.errors import ConfigError
from tcpecho.net import describe_os_error

# Latencies are recorded in microseconds, from 1 µs to an hour, to 3 significant figures.
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_SIGNIFICANT_FIGURES = 3


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. ``duration`` or ``requests`` ends it; ``rate`` makes it open-loop.

    ``tls``: speak TLS. ``send_proxy``: send a PROXY header first on each connection (before
    TLS). ``reconnect``: each connection sends one message, reads its echo, closes and
    connects again, so that connects (and TLS handshakes) per second are measured.
    """

    host: str
    port: int
    connections: int = 50
    size: int = 64
    duration: float | None = 10.0
    requests: int | None = None
    pipeline: int = 1
    warmup: float = 1.0
    rate: float | None = None
    timeout: float = 10.0
    processes: int = 1
    seed: int = 1
    tls: ClientTLS | None = None
    send_proxy: ProxyVersion | None = None
    reconnect: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.connections >= 1, "--connections", self.connections, "must be at least 1"),
            (self.size >= MIN_SIZE, "--size", self.size, f"must be at least {MIN_SIZE}"),
            (self.pipeline >= 1, "--pipeline", self.pipeline, "must be at least 1"),
            (self.warmup >= 0, "--warmup", self.warmup, "must be at least 0"),
            (self.timeout > 0, "--timeout", self.timeout, "must be more than 0"),
            (
                1 <= self.processes <= self.connections,
                "--processes",
                self.processes,
                "must be from 1 to --connections",
            ),
            (self.rate is None or self.rate > 0, "--rate", self.rate, "must be more than 0"),
            (
                self.duration is None or self.duration > 0,
                "--duration",
                self.duration,
                "must be more than 0",
            ),
            (
                self.requests is None or self.requests >= 1,
                "--requests",
                self.requests,
                "must be at least 1",
            ),
            (
                not self.reconnect or self.pipeline == 1,
                "--pipeline",
                self.pipeline,
                "must be 1 with --reconnect (one message per connection)",
            ),
            (
                not self.reconnect or self.rate is None,
                "--rate",
                self.rate,
                "cannot be combined with --reconnect",
            ),
        ]
        for ok, option, value, reason in checks:
            if not ok:
                raise ConfigError(option, value, reason)


@dataclass
class ShareResult:
    """What one process measured. ``latencies_us`` counts each latency value seen."""

    round_trips: int = 0
    bytes_echoed: int = 0
    window: float = 0.0
    latencies_us: Counter[int] = field(default_factory=Counter)
    connect_us: list[float] = field(default_factory=list)
    mismatches: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    bytes_verified: int = 0  # every echoed byte compared, warm-up and drain included
    connects: int = 0  # connects completed within the measured window
    tls_handshakes: int = 0  # TLS handshakes completed, warm-up and drain included
    tls: dict[str, str] = field(default_factory=dict)  # describe_tls of the first one


@dataclass
class _Clock:
    """The measurement window: round trips count only between ``start`` and ``end``."""

    start: float = math.inf
    end: float = math.inf
    stop_sending: bool = False


class _Member(Protocol):
    """One of the run's connections, as the run drives it: a `_Connection`, or with
    --reconnect a `_Reconnector` that makes one connection after another."""

    done: asyncio.Future[None]
    latencies: list[int]

    def begin(self) -> None: ...

    def open_transports(self) -> list[_Connection]:
        """The connections whose transports are not closed yet."""
        ...

    def close_if_idle(self) -> None: ...

    def abort(self) -> None: ...


class _Connection(asyncio.Protocol):
    """Keeps up to ``pipeline`` messages in flight and checks every echoed byte in order.

    ``one_shot`` (--reconnect): send one message, numbered ``first_sequence``, and close once
    its echo is back; ``clean`` then says whether it all came back right.
    """

    def __init__(
        self,
        number: int,
        options: BenchOptions,
        payloads: Payloads,
        clock: _Clock,
        result: ShareResult,
        quota: int | None,
        first_sequence: int = 0,
        one_shot: bool = False,
    ) -> None:
        self.number = number
        self.options = options
        self.payloads = payloads
        self.clock = clock
        self.result = result
        self.to_send = quota  # measured messages this connection has still to send, or None
        self.size = options.size
        self.first_sequence = first_sequence
        self.one_shot = one_shot
        self.clean = False
        self.sequence = first_sequence
        self.expected = bytearray()
        self.sent_at: deque[float] = deque()  # send (or intended send) time of each in flight
        self.received_in_message = 0
        self.latencies: list[int] = []
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()
        # Set once the transport is closed for good: over TLS, after the close_notify
        # exchange that close() starts.
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.interval = options.connections / options.rate if options.rate else 0.0
        self.next_intended = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._suspect: bytearray | None = None  # a wrong message whose header is not whole yet
        self._suspect_due = 0

    # -- sending ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def begin(self) -> None:
        """Start sending: called for every connection once all are open."""
        # Fewer --requests than connections: nothing for this one. One shot (--reconnect)
        # connected after the window closed: nothing either.
        if self.done.done():
            return  # already dropped: the server sent bytes before any were sent to it
        if not self._sending():
            self._finish()
        elif self.interval:
            # Spread the connections' first sends evenly over one interval.
            offset = self.interval * self.number / self.options.connections
            self.next_intended = time.perf_counter() + offset
            self._tick()
        else:
            self._send(self.options.pipeline, time.perf_counter())

    def _send(self, count: int, now: float, intended: float | None = None) -> None:
        if not self._sending() or self.transport is None:
            return
        messages = []
        for _ in range(count):
            stamp = now if intended is None else intended
            if self.to_send is not None and stamp >= self.clock.start:
                # Counted against --requests by the same time its latency is counted by.
                if self.to_send == 0:
                    break
                self.to_send -= 1
            messages.append(self.payloads.message(self.number, self.sequence))
            self.sequence += 1
            self.sent_at.append(stamp)
            if intended is not None:
                intended += self.interval
        if not messages:
            return
        data = b"".join(messages)
        self.expected += data
        self.transport.write(data)

    def _tick(self) -> None:
        """Open loop: send every message whose intended time has come, if a slot is free."""
        self._timer = None
        now = time.perf_counter()
        slots = self.options.pipeline - len(self.sent_at)
        late = now - self.next_intended
        due = int(late / self.interval) + 1 if late >= 0 else 0
        count = min(slots, due)
        if count > 0:
            self._send(count, now, intended=self.next_intended)
            self.next_intended += count * self.interval
        if len(self.sent_at) < self.options.pipeline and self._sending():
            delay = max(0.0, self.next_intended - now)
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    # -- receiving --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._suspect is not None:
            self._suspect += data
            self._classify_suspect()
            return
        size = len(data)
        expected = self.expected
        if data != expected[:size]:
            self._mismatch(data)
            return
        del expected[:size]
        self.result.bytes_verified += size
        self.received_in_message += size
        if self.received_in_message < self.size:
            return
        now = time.perf_counter()
        completed, self.received_in_message = divmod(self.received_in_message, self.size)
        clock = self.clock
        measuring = clock.start <= now <= clock.end
        for _ in range(completed):
            sent = self.sent_at.popleft()
            if measuring and sent >= clock.start:
                self.latencies.append(int((now - sent) * 1_000_000))
        if self._sending():
            if not self.interval:
                self._send(completed, now)
            elif self._timer is None:
                self._tick()
        elif not self.sent_at:
            self.clean = True
            self._finish()

    def _sending(self) -> bool:
        if self.one_shot and self.sequence > self.first_sequence:
            return False
        return not self.clock.stop_sending and (self.to_send is None or self.to_send > 0)

    def _mismatch(self, data: bytes) -> None:
        """Count what kind of wrong echo ``data`` holds, then drop the connection: once one
        byte is wrong the rest of its stream cannot be trusted."""
        expected = self.expected
        index = next(
            (i for i in range(len(data)) if i >= len(expected) or data[i] != expected[i]),
            len(data),
        )
        if index >= len(expected):
            self._count_mismatch("duplication")  # more came back than was sent
            return
        position = self.received_in_message + index
        offset = position % self.size
        self._suspect_due = self.sequence - len(self.sent_at) + position // self.size
        start = index - offset
        if start >= 0:
            self._suspect = bytearray(data[start : start + self.size])
        else:  # the message began in an earlier read, which matched what was sent
            sent = self.payloads.message(self.number, self._suspect_due)
            self._suspect = bytearray(sent[:-start] + data[: self.size + start])
        self._classify_suspect()

    def _classify_suspect(self, *, final: bool = False) -> None:
        """Classify the wrong message once its header is whole (or the stream ended)."""
        assert self._suspect is not None
        if len(self._suspect) < HEADER.size and not final:
            return  # the header is cut at a read boundary: wait for the rest of it
        kind = classify(
            bytes(self._suspect[: self.size]),
            self.number,
            self._suspect_due,
            connections=self.options.connections,
            sent=self.sequence,
        )
        self._suspect = None
        self._count_mismatch(kind)

    def _count_mismatch(self, kind: str) -> None:
        self.result.mismatches[kind] += 1
        self._finish(abort=True)

    def eof_received(self) -> bool:
        if self._suspect is not None:
            self._classify_suspect(final=True)
        elif self.sent_at:
            self.result.mismatches["truncation"] += 1
        elif self._sending() and not self.done.done():
            self.result.errors["closed by server"] += 1
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.done.done():
            self.result.errors[_error_kind(exc)] += 1
        self._finish()
        if not self.closed.done():
            self.closed.set_result(None)

    def open_transports(self) -> list[_Connection]:
        return [] if self.closed.done() or self.transport is None else [self]

    def _finish(self, abort: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def close_if_idle(self) -> None:
        if not self.sent_at:
            self._finish()

    def abort(self) -> None:
        self._finish(abort=True)


class _Reconnector:
    """--reconnect: connection number ``number`` made again and again. Each time: connect
    (PROXY header and TLS handshake included), send one message, check its echo, close. It
    stops at the end of the window, when its quota is sent, or at the first failure."""

    def __init__(
        self,
        number: int,
        options: BenchOptions,
        payloads: Payloads,
        clock: _Clock,
        result: ShareResult,
        quota: int | None,
        context: ssl.SSLContext | None,
    ) -> None:
        self.number = number
        self.options = options
        self.payloads = payloads
        self.clock = clock
        self.result = result
        self.quota = quota
        self.context = context
        self.sequence = 0  # message numbers go on across the connections, all different
        self.latencies: list[int] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.current: _Connection | None = None
        self._closing: list[_Connection] = []  # made before, their transports closing
        self._task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def open_transports(self) -> list[_Connection]:
        current = [] if self.current is None else self.current.open_transports()
        return [*self._closing, *current]

    async def _run(self) -> None:
        clock, result = self.clock, self.result
        try:
            while not clock.stop_sending and (self.quota is None or self.quota > 0):
                factory = partial(
                    _Connection,
                    self.number,
                    self.options,
                    self.payloads,
                    clock,
                    result,
                    self.quota,
                    first_sequence=self.sequence,
                    one_shot=True,
                )
                connection = await _open_connection(factory, self.options, self.context, result)
                if connection is None:
                    return  # counted in result.errors
                if clock.start <= time.perf_counter() <= clock.end:
                    result.connects += 1
                self.current = connection
                connection.begin()
                await connection.done
                self.current = None
                # Not awaited: closing (close_notify over TLS) overlaps the next connect.
                self._closing = [c for c in self._closing if not c.closed.done()]
                self._closing += connection.open_transports()
                self.latencies += connection.latencies
                self.quota, self.sequence = connection.to_send, connection.sequence
                if not connection.clean:
                    return  # a mismatch or an error, counted by the connection
        finally:
            if not self.done.done():
                self.done.set_result(None)

    def close_if_idle(self) -> None:
        # Between connections there is nothing to close: the loop sees stop_sending.
        if self.current is not None:
            self.current.close_if_idle()

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
        if self._task is not None:
            self._task.cancel()


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"  # the name the run's own timeouts are counted under
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {tls_.describe_ssl_error(exc)}"
    return describe_os_error(exc) if isinstance(exc, OSError) else type(exc).__name__


def load_uvloop() -> Any:
    """The uvloop module when installed, else None."""
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        return None


def loop_name() -> str:
    """What the load generator runs on: ``uvloop <version>`` or ``asyncio``."""
    uvloop = load_uvloop()
    return "asyncio" if uvloop is None else f"uvloop {uvloop.__version__}"


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (so the load generator is not the bottleneck), else asyncio's."""
    uvloop = load_uvloop()
    loop: asyncio.AbstractEventLoop = (
        asyncio.new_event_loop() if uvloop is None else uvloop.new_event_loop()
    )
    return loop


async def run_share(
    options: BenchOptions, first: int, count: int, progress: Any = None
) -> ShareResult:
    """Run connections ``first`` … ``first + count - 1`` of the benchmark in this process.

    ``progress``, when given, is a shared integer (multiprocessing.Value) kept at the number of
    measured round trips so far.
    """
    loop = asyncio.get_running_loop()
    result = ShareResult()
    clock = _Clock()
    context = None if options.tls is None else options.tls.context()
    connections: list[_Member]
    if options.reconnect:  # the connects are what is measured: the clock starts now
        payloads = Payloads(options.size, options.seed)
        quotas = _quotas(options, first, count)
        connections = [
            _Reconnector(first + i, options, payloads, clock, result, quotas[i], context)
            for i in range(count)
        ]
    else:
        connections = list(await _open_connections(options, first, count, clock, result, context))
    clock.start = time.perf_counter() + options.warmup
    if options.duration is not None:
        clock.end = clock.start + options.duration
    for connection in connections:
        connection.begin()
    flusher = loop.create_task(_flush_latencies(connections, result, progress))
    await _wait_until_finished(connections, options, clock, result)
    flusher.cancel()
    await _wait_closed(connections, options.timeout)
    finished = min(time.perf_counter(), clock.end)
    _collect(connections, result)
    result.round_trips = result.latencies_us.total()
    result.bytes_echoed = result.round_trips * options.size
    result.window = max(finished - clock.start, 1e-9)
    return result


async def _open_connections(
    options: BenchOptions,
    first: int,
    count: int,
    clock: _Clock,
    result: ShareResult,
    context: ssl.SSLContext | None,
) -> list[_Connection]:
    """Open this share's connections all at once; those that fail are counted in
    ``result.errors`` and left out."""
    payloads = Payloads(options.size, options.seed)
    quotas = _quotas(options, first, count)
    opened: list[_Connection] = []
    # partial, not a lambda: each factory must keep its own number and quota, and
    # create_connection calls it only once the connection is made.
    factories = [
        partial(_Connection, first + i, options, payloads, clock, result, quotas[i])
        for i in range(count)
    ]

    async def open_one(factory: Callable[[], _Connection]) -> None:
        connection = await _open_connection(factory, options, context, result)
        if connection is not None:
            opened.append(connection)  # in the order they complete

    await asyncio.gather(*(open_one(f) for f in factories))
    return opened


async def _open_connection(
    factory: Callable[[], _Connection],
    options: BenchOptions,
    context: ssl.SSLContext | None,
    result: ShareResult,
) -> _Connection | None:
    """Connect one ``factory()`` within the timeout (PROXY header and TLS handshake
    included), timing it; None when it failed, which is counted in ``result.errors``."""
    started = time.perf_counter()
    try:
        protocol = await asyncio.wait_for(_connect(factory, options, context), options.timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        result.errors[_error_kind(exc)] += 1
        return None
    transport = protocol.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    result.connect_us.append((time.perf_counter() - started) * 1_000_000)
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if isinstance(ssl_object, ssl.SSLObject):
        result.tls_handshakes += 1
        if not result.tls:
            result.tls = tls_.describe_tls(ssl_object)
    return protocol


async def _connect(
    factory: Callable[[], _Connection], options: BenchOptions, context: ssl.SSLContext | None
) -> _Connection:
    """Connect, send the PROXY header on the plain socket when asked, then start TLS over it
    when asked. Raises OSError (ssl.SSLError for a failed handshake), or ValueError for an
    address a PROXY header cannot carry."""
    loop = asyncio.get_running_loop()
    server_hostname = None
    if context is not None and options.tls is not None:
        server_hostname = options.tls.server_name or options.host
    handshake_timeout = None if context is None else options.timeout
    if options.send_proxy is None:
        _, protocol = await loop.create_connection(
            factory,
            options.host,
            options.port,
            ssl=context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
        return protocol
    sock = await _connect_socket(options.host, options.port)
    try:
        header = proxy_header(options.send_proxy, sock.getsockname(), sock.getpeername())
        await loop.sock_sendall(sock, header)
        _, protocol = await loop.create_connection(
            factory,
            sock=sock,
            ssl=context,
            server_hostname=server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
    except BaseException:
        sock.close()
        raise
    return protocol


async def _connect_socket(host: str, port: int) -> socket.socket:
    """A plain non-blocking TCP socket connected to ``host``, trying each of its addresses in
    turn. Raises OSError (the last address's), or socket.gaierror."""
    loop = asyncio.get_running_loop()
    failure: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        # Or the TLS ClientHello after the header waits for the header's ACK (Nagle), which
        # the server's delayed ACK holds back for up to 40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure


async def _flush_latencies(connections: list[_Member], result: ShareResult, progress: Any) -> None:
    """Every half second, move the connections' latencies into ``result`` so ``progress``
    (when given) shows the measured round trips so far."""
    while True:
        await asyncio.sleep(0.5)
        _collect(connections, result)
        if progress is not None:
            progress.value = result.latencies_us.total()


async def _wait_until_finished(
    connections: list[_Member], options: BenchOptions, clock: _Clock, result: ShareResult
) -> None:
    """Wait for every connection to finish: close the window at ``clock.end``, and give up
    on all of them once nothing has been echoed for a whole timeout."""
    pending = {c.done for c in connections}
    verified, progressed = -1, time.perf_counter()
    while pending:
        now = time.perf_counter()
        if result.bytes_verified != verified:
            verified, progressed = result.bytes_verified, now
        elif now - progressed >= options.timeout:  # nothing came back for a whole timeout
            _abort_unfinished(connections, result)
            break
        if not clock.stop_sending and now >= clock.end:
            _close_window(connections, clock)
        wait = progressed + options.timeout - now
        if not clock.stop_sending:
            wait = min(wait, clock.end - now)
        _, pending = await asyncio.wait(pending, timeout=max(wait, 0.001))


async def _wait_closed(connections: list[_Member], timeout: float) -> None:
    """Wait until every transport is closed, so that the loop is not closed under one that is
    still open: over TLS, close() exchanges close_notify with the server first. Those still
    open after ``timeout`` are aborted."""
    still_open = [c for member in connections for c in member.open_transports()]
    if not still_open:
        return
    _, late = await asyncio.wait([c.closed for c in still_open], timeout=timeout)
    if late:
        for connection in still_open:
            if not connection.closed.done():
                connection.abort()
        await asyncio.wait(late, timeout=timeout)


def _abort_unfinished(connections: list[_Member], result: ShareResult) -> None:
    """Abort every connection still waiting for its echo, counting each as a timeout."""
    for connection in connections:
        if not connection.done.done():
            result.errors["timeout"] += 1
            connection.abort()


def _close_window(connections: list[_Member], clock: _Clock) -> None:
    """Stop sending: collect what is in flight, then stop (idle connections close now)."""
    clock.stop_sending = True
    for connection in connections:
        connection.close_if_idle()


def _collect(connections: list[_Member], result: ShareResult) -> None:
    for connection in connections:
        if connection.latencies:
            result.latencies_us.update(connection.latencies)
            connection.latencies = []


def _quotas(options: BenchOptions, first: int, count: int) -> list[int | None]:
    if options.requests is None:
        return [None] * count
    base, extra = divmod(options.requests, options.connections)
    return [base + (1 if first + i < extra else 0) for i in range(count)]
