"""One process's share of a benchmark: asyncio connections that send, read back and compare."""

from __future__ import annotations

import asyncio
import importlib
import math
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from tcpecho.bench.payload import HEADER, MIN_SIZE, Payloads, classify
from tcpecho.errors import ConfigError
from tcpecho.net import describe_os_error

# Latencies are recorded in microseconds, from 1 µs to an hour, to 3 significant figures.
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_SIGNIFICANT_FIGURES = 3


@dataclass(frozen=True)
class BenchOptions:
    """One benchmark run. ``duration`` or ``requests`` ends it; ``rate`` makes it open-loop."""

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


@dataclass
class _Clock:
    """The measurement window: round trips count only between ``start`` and ``end``."""

    start: float = math.inf
    end: float = math.inf
    stop_sending: bool = False


class _Connection(asyncio.Protocol):
    """Keeps up to ``pipeline`` messages in flight and checks every echoed byte in order."""

    def __init__(
        self,
        number: int,
        options: BenchOptions,
        payloads: Payloads,
        clock: _Clock,
        result: ShareResult,
        quota: int | None,
    ) -> None:
        self.number = number
        self.options = options
        self.payloads = payloads
        self.clock = clock
        self.result = result
        self.to_send = quota  # measured messages this connection has still to send, or None
        self.size = options.size
        self.sequence = 0
        self.expected = bytearray()
        self.sent_at: deque[float] = deque()  # send (or intended send) time of each in flight
        self.received_in_message = 0
        self.latencies: list[int] = []
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()
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
        if self.to_send == 0:  # fewer --requests than connections: nothing for this one
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
            self._finish()

    def _sending(self) -> bool:
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


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"  # the name the run's own timeouts are counted under
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
    connections = await _open_connections(options, first, count, clock, result)
    clock.start = time.perf_counter() + options.warmup
    if options.duration is not None:
        clock.end = clock.start + options.duration
    for connection in connections:
        connection.begin()
    flusher = loop.create_task(_flush_latencies(connections, result, progress))
    await _wait_until_finished(connections, options, clock, result)
    flusher.cancel()
    finished = min(time.perf_counter(), clock.end)
    _collect(connections, result)
    result.round_trips = result.latencies_us.total()
    result.bytes_echoed = result.round_trips * options.size
    result.window = max(finished - clock.start, 1e-9)
    return result


async def _open_connections(
    options: BenchOptions, first: int, count: int, clock: _Clock, result: ShareResult
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
    await asyncio.gather(*(_open_connection(f, options, result, opened) for f in factories))
    return opened


async def _open_connection(
    factory: Callable[[], _Connection],
    options: BenchOptions,
    result: ShareResult,
    opened: list[_Connection],
) -> None:
    """Connect one ``factory()`` within the timeout, timing the connect, and append it to
    ``opened`` as it completes; a failure is counted in ``result.errors`` instead."""
    started = time.perf_counter()
    try:
        _, protocol = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(factory, options.host, options.port),
            options.timeout,
        )
    except (OSError, TimeoutError) as exc:
        result.errors[_error_kind(exc)] += 1
        return
    sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    result.connect_us.append((time.perf_counter() - started) * 1_000_000)
    opened.append(protocol)


async def _flush_latencies(
    connections: list[_Connection], result: ShareResult, progress: Any
) -> None:
    """Every half second, move the connections' latencies into ``result`` so ``progress``
    (when given) shows the measured round trips so far."""
    while True:
        await asyncio.sleep(0.5)
        _collect(connections, result)
        if progress is not None:
            progress.value = result.latencies_us.total()


async def _wait_until_finished(
    connections: list[_Connection], options: BenchOptions, clock: _Clock, result: ShareResult
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


def _abort_unfinished(connections: list[_Connection], result: ShareResult) -> None:
    """Abort every connection still waiting for its echo, counting each as a timeout."""
    for connection in connections:
        if not connection.done.done():
            result.errors["timeout"] += 1
            connection.abort()


def _close_window(connections: list[_Connection], clock: _Clock) -> None:
    """Stop sending: collect what is in flight, then stop (idle connections close now)."""
    clock.stop_sending = True
    for connection in connections:
        connection.close_if_idle()


def _collect(connections: list[_Connection], result: ShareResult) -> None:
    for connection in connections:
        if connection.latencies:
            result.latencies_us.update(connection.latencies)
            connection.latencies = []


def _quotas(options: BenchOptions, first: int, count: int) -> list[int | None]:
    if options.requests is None:
        return [None] * count
    base, extra = divmod(options.requests, options.connections)
    return [base + (1 if first + i < extra else 0) for i in range(count)]
