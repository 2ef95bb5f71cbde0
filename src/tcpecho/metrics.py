"""Prometheus metrics and health checks, made from the event stream (no engine knows of them).

``--metrics HOST:PORT`` serves, on a port of its own, in a thread of the serving process (the
supervisor's with ``--workers``):

- ``/metrics``: the Prometheus text format (or OpenMetrics, when the scraper asks for it);
- ``/healthz``: 200 while the process runs;
- ``/readyz``: 200 while listening and not stopping, 503 from the moment a stop begins, so
  that a load balancer takes the server out before it closes;
- anything else: 404.

Where the numbers come from: a `Recorder` is one more event consumer of the engine. It
counts on the per-connection events (opened, closed, refused, accept failed) and never per
read, so the echo path costs the same with or without metrics. It writes its counts into a
`CountsTable` slot: plain 64-bit integers in memory shared across fork. With ``--workers N``
the supervisor makes one table of N slots before it forks; each worker writes its own slot,
and a scrape adds up every slot (and what workers that exited had counted): one scrape shows
the whole server, with no files, no environment variable and no message on the echo path.
This module imports prometheus_client only to write the exposition format (the ``metrics``
extra); the recording needs nothing installed.

Who closes what: `open_exporter` binds and starts the HTTP threads; `Exporter.close` stops
and joins them and closes the sockets. A worker process calls `Exporter.forked` to drop its
copies of the sockets.
"""

from __future__ import annotations

import importlib.util
import logging
import mmap
import select
import selectors
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tcpecho import __version__, net
from tcpecho.config import ServerConfig
from tcpecho.engines.base import ACCEPT_RETRY_DELAY
from tcpecho.errors import MissingExtra
from tcpecho.events import (
    AcceptFailed,
    Closed,
    Consumer,
    Draining,
    Event,
    Message,
    Opened,
    Refused,
)
from tcpecho.net import Address, format_address
from tcpecho.protocol import CloseReason

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

logger = logging.getLogger("tcpecho.server")

# Upper bounds of the connection-duration histogram's buckets, in seconds. Echo connections
# last from a health check's few milliseconds to a terminal session's hours; these cover
# both ends with a bucket every factor of about three to ten (the +Inf bucket is added).
DURATION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.05,
    0.25,
    1.0,
    5.0,
    30.0,
    120.0,
    600.0,
    3600.0,
)
# A metrics request (a scrape, a probe) must be read within this long; a client that stalls
# holds one thread of the metrics server for no longer.
REQUEST_TIMEOUT = 10.0
# The listen queue of the metrics port: scrapers and probes, a handful at a time.
METRICS_BACKLOG = 64

CLOSE_REASONS: tuple[CloseReason, ...] = tuple(r for r in CloseReason if not r.refused)
REFUSE_REASONS: tuple[CloseReason, ...] = tuple(r for r in CloseReason if r.refused)

# The slot of one process in a CountsTable: these counts, then one per close reason, one per
# refusal reason and one per duration bucket (not cumulative: each observation is counted in
# the first bucket it fits, the +Inf bucket last; the exposition adds them up).
_SCALARS = (
    "opened",
    "active",
    "bytes_received",
    "bytes_sent",
    "messages_logged",
    "accept_errors",
    "duration_count",
    "duration_sum_us",  # microseconds: the table holds integers only
)
_INDEX = {name: index for index, name in enumerate(_SCALARS)}
_CLOSED = {reason: len(_SCALARS) + i for i, reason in enumerate(CLOSE_REASONS)}
_REFUSED = {reason: len(_SCALARS) + len(_CLOSED) + i for i, reason in enumerate(REFUSE_REASONS)}
_BUCKETS = len(_SCALARS) + len(_CLOSED) + len(_REFUSED)
SLOT_SIZE = _BUCKETS + len(DURATION_BUCKETS) + 1  # 64-bit integers per slot


def check_extra() -> None:
    """Raise `MissingExtra` unless prometheus_client, which writes the format, is installed."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise MissingExtra("--metrics", "prometheus-client", "metrics")


class CountsTable:
    """``slots`` rows of `SLOT_SIZE` signed 64-bit counts, in anonymous shared memory: a
    process forked after it is made writes to the same memory its parent reads.

    Each slot has one writer (a `Recorder`, in one process); readers may see a slot mid-update
    (opened counted, active not yet), off by one event for one scrape, never corrupted: each
    count is one aligned 8-byte word.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._memory = mmap.mmap(-1, slots * SLOT_SIZE * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self._view = memoryview(self._memory).cast("q")

    def slot(self, number: int) -> memoryview:
        """The counts of slot ``number`` (0 to slots - 1), to write to."""
        return self._view[number * SLOT_SIZE : (number + 1) * SLOT_SIZE]

    def read(self, number: int) -> list[int]:
        return self.slot(number).tolist()

    def clear(self, number: int) -> None:
        slot = self.slot(number)
        for index in range(SLOT_SIZE):
            slot[index] = 0


class Health:
    """What /readyz answers: ready while listening and not stopping. Set from any thread."""

    def __init__(self) -> None:
        self._listening = threading.Event()
        self._stopping = threading.Event()

    def listening(self) -> None:
        self._listening.set()

    def stopping(self) -> None:
        self._stopping.set()

    @property
    def ready(self) -> bool:
        return self._listening.is_set() and not self._stopping.is_set()

    @property
    def state(self) -> str:
        if self._stopping.is_set():
            return "stopping"
        return "ready" if self._listening.is_set() else "starting"


class Recorder:
    """The event consumer behind the metrics: counts one process's events into ``slot``.

    ``health``: told when a drain starts (None in a worker: the supervisor's is told by the
    supervisor). Called from any of the engine's threads.
    """

    def __init__(self, slot: memoryview, health: Health | None = None) -> None:
        self._slot = slot
        self._health = health
        self._lock = threading.Lock()
        # The peers of the connections counted as open. A connection closed before it opened
        # (a failed TLS handshake, a bad PROXY header) has a Closed event and no Opened one;
        # it must not lower the active count. Within one server, a peer's address:port names
        # one open connection (a PROXY header could claim a client twice: a count per peer).
        self._open: dict[str, int] = {}

    def __call__(self, event: Event) -> None:
        kind = type(event)
        if kind is Message:  # logged messages only: see docs/metrics.md
            with self._lock:
                self._slot[_INDEX["messages_logged"]] += 1
        elif kind is Opened:
            assert isinstance(event, Opened)
            with self._lock:
                self._slot[_INDEX["opened"]] += 1
                self._slot[_INDEX["active"]] += 1
                self._open[event.peer] = self._open.get(event.peer, 0) + 1
        elif kind is Closed:
            assert isinstance(event, Closed)
            self._closed(event)
        elif kind is Refused:
            assert isinstance(event, Refused)
            with self._lock:
                self._slot[_REFUSED[event.reason]] += 1
        elif kind is AcceptFailed:
            with self._lock:
                self._slot[_INDEX["accept_errors"]] += 1
        elif kind is Draining and self._health is not None:
            self._health.stopping()

    def _closed(self, event: Closed) -> None:
        bucket = _BUCKETS + next(
            (i for i, bound in enumerate(DURATION_BUCKETS) if event.duration <= bound),
            len(DURATION_BUCKETS),
        )
        slot = self._slot
        with self._lock:
            was_open = self._open.get(event.peer, 0)
            if was_open:
                slot[_INDEX["active"]] -= 1
                if was_open == 1:
                    del self._open[event.peer]
                else:
                    self._open[event.peer] = was_open - 1
            slot[_CLOSED[event.reason]] += 1
            slot[_INDEX["bytes_received"]] += event.bytes_received
            slot[_INDEX["bytes_sent"]] += event.bytes_sent - event.bytes_unsent
            slot[_INDEX["duration_count"]] += 1
            slot[_INDEX["duration_sum_us"]] += round(event.duration * 1e6)
            slot[bucket] += 1


@dataclass(frozen=True)
class BuildInfo:
    version: str
    engine: str
    loop: str  # the event loop the asyncio engine runs on; "none" for threads


def build_info(config: ServerConfig) -> BuildInfo:
    """What ``tcpecho_build_info`` says of a server run with ``config``."""
    if config.engine != "asyncio":
        return BuildInfo(__version__, config.engine, "none")
    from tcpecho.engines.aio import load_uvloop

    return BuildInfo(
        __version__, config.engine, "uvloop" if load_uvloop(config.loop) else "asyncio"
    )


class Totals:
    """The whole server's counts: every slot of a table added up, with what the workers that
    exited had counted (`retire`)."""

    def __init__(self, table: CountsTable) -> None:
        self.table = table
        self._lock = threading.Lock()  # between a scrape and a retire
        self._retired = [0] * SLOT_SIZE

    def retire(self, number: int) -> None:
        """The process that wrote slot ``number`` exited: keep its counts (but its open
        connections, gone with it), and clear the slot for the next one."""
        with self._lock:
            counts = self.table.read(number)
            counts[_INDEX["active"]] = 0
            self._retired = [a + b for a, b in zip(self._retired, counts, strict=True)]
            self.table.clear(number)

    def read(self) -> list[int]:
        with self._lock:
            total = list(self._retired)
            for number in range(self.table.slots):
                total = [a + b for a, b in zip(total, self.table.read(number), strict=True)]
        return total


class Collector:
    """The prometheus_client collector that writes `Totals` as tcpecho's metrics."""

    def __init__(self, totals: Totals, info: BuildInfo) -> None:
        self.totals = totals
        self.info = info

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        counts = self.totals.read()

        def scalar(name: str) -> int:
            return counts[_INDEX[name]]

        yield InfoMetricFamily(
            "tcpecho_build",
            "tcpecho's version, engine and event loop",
            value={
                "version": self.info.version,
                "engine": self.info.engine,
                "loop": self.info.loop,
            },
        )
        yield CounterMetricFamily(
            "tcpecho_connections_opened",
            "Connections opened (admitted, and past any PROXY header and TLS handshake)",
            value=scalar("opened"),
        )
        yield GaugeMetricFamily(
            "tcpecho_connections_active", "Connections open now", value=scalar("active")
        )
        closed = CounterMetricFamily(
            "tcpecho_connections_closed",
            "Connections closed after they were admitted, by reason",
            labels=["reason"],
        )
        for reason, index in _CLOSED.items():
            closed.add_metric([reason.label], counts[index])
        yield closed
        refused = CounterMetricFamily(
            "tcpecho_connections_refused", "Connections refused, by reason", labels=["reason"]
        )
        for reason, index in _REFUSED.items():
            refused.add_metric([reason.label], counts[index])
        yield refused
        yield CounterMetricFamily(
            "tcpecho_received_bytes",
            "Bytes received from clients, counted when their connection closes",
            value=scalar("bytes_received"),
        )
        yield CounterMetricFamily(
            "tcpecho_sent_bytes",
            "Bytes sent to clients (echoes, greetings, errors), counted when their connection "
            "closes",
            value=scalar("bytes_sent"),
        )
        yield CounterMetricFamily(
            "tcpecho_messages_logged",
            "Messages received and logged (at most 100 a connection; none with --quiet)",
            value=scalar("messages_logged"),
        )
        yield CounterMetricFamily(
            "tcpecho_accept_errors",
            "Errors accepting a connection (out of descriptors or memory, or a connection "
            "that failed before it was accepted)",
            value=scalar("accept_errors"),
        )
        cumulative, buckets = 0, []
        for i, bound in enumerate((*DURATION_BUCKETS, float("inf"))):
            cumulative += counts[_BUCKETS + i]
            buckets.append((_bucket_label(bound), float(cumulative)))
        yield HistogramMetricFamily(
            "tcpecho_connection_duration_seconds",
            "How long connections lasted, from accept to close",
            buckets=buckets,
            sum_value=scalar("duration_sum_us") / 1e6,
        )


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class _HTTPServer(ThreadingHTTPServer):
    """One listening socket (non-blocking) of the metrics port; a thread per request, joined
    on close. `serve` runs until `wake` is called: no polling, unlike socketserver's own
    serve_forever, which notices a shutdown only every half second."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, sock: socket.socket, exporter: Exporter) -> None:
        self.exporter = exporter
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the one the base made; this server serves ``sock``
        self.socket = sock
        self.address_family = sock.family
        self._wake_reader, self._wake_writer = socket.socketpair()

    def serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is self._wake_reader for key, _ in ready):
                    return
                try:
                    request, address = self.get_request()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # the client went before it was accepted
                except OSError:
                    # Out of descriptors or memory: pause as the echo accept loop does (or
                    # stop, if woken meanwhile), rather than spin on a listener still ready.
                    if select.select([self._wake_reader], [], [], ACCEPT_RETRY_DELAY)[0]:
                        return
                    continue
                self.process_request(request, address)  # a thread that answers, then closes

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = self.socket.accept()
        conn.setblocking(True)  # the handler's timeout then applies to its reads
        return conn, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A request that failed (the client went mid-answer): no traceback on stderr."""
        logger.debug("metrics request from %s failed", client_address, exc_info=True)

    def wake(self) -> None:
        self._wake_writer.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT
    server_version = f"tcpecho/{__version__}"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        exporter = self.server.exporter
        if path == "/metrics":
            status, content_type, payload = 200, *exporter.exposition(self.headers.get("Accept"))
        elif path == "/healthz":
            status, content_type, payload = 200, "text/plain; charset=utf-8", b"ok\n"
        elif path == "/readyz":
            state = exporter.health.state
            status = 200 if state == "ready" else 503
            content_type, payload = "text/plain; charset=utf-8", f"{state}\n".encode()
        else:
            status, content_type = 404, "text/plain; charset=utf-8"
            payload = b"not found: try /metrics, /healthz or /readyz\n"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: scrapes and probes come every few seconds."""


class Exporter:
    """The metrics HTTP server of one tcpecho server, and the counts it shows.

    Made by `open_exporter`. ``health`` is what /readyz answers; `recorder` makes the event
    consumer of the process writing slot ``number``; `retire` keeps the counts of a worker
    that exited.
    """

    def __init__(self, listeners: list[socket.socket], table: CountsTable, info: BuildInfo) -> None:
        from prometheus_client import CollectorRegistry

        self.health = Health()
        self.table = table
        self.totals = Totals(table)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(self.totals, info))
        self._servers = [_HTTPServer(sock, self) for sock in listeners]
        self._threads: list[threading.Thread] = []

    @property
    def addresses(self) -> list[Address]:
        return [net.plain_address(server.socket.getsockname()) for server in self._servers]

    def serve_in_threads(self) -> None:
        for server in self._servers:
            address = format_address(server.socket.getsockname())
            thread = threading.Thread(target=server.serve, name=f"metrics-{address}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def recorder(self, number: int = 0) -> Recorder:
        """The consumer for the process that writes slot ``number``: 0 for a server without
        workers (it tells ``health`` when the drain starts), N - 1 for worker N."""
        return Recorder(self.table.slot(number), None if self.table.slots > 1 else self.health)

    def retire(self, number: int) -> None:
        self.totals.retire(number)

    def exposition(self, accept: str | None) -> tuple[str, bytes]:
        """The content type and body of a scrape, in the format ``accept`` prefers."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return content_type, encoder(self.registry)

    def log_listening(self) -> None:
        addresses = self.addresses
        logger.info(
            "serving /metrics, /healthz and /readyz on %s",
            ", ".join(format_address(address) for address in addresses),
            extra={
                "tag": "METRICS",
                "event": "metrics_listening",
                "fields": {"addresses": [list(address) for address in addresses]},
            },
        )

    def forked(self) -> None:
        """In a worker process: close this process's copies of the listening sockets (the
        threads serving them stayed in the supervisor)."""
        for server in self._servers:
            server.socket.close()
            server._wake_reader.close()
            server._wake_writer.close()

    def close(self) -> None:
        """Stop serving, wait for the threads (requests under way too), close the sockets."""
        for server in self._servers:
            server.wake()
        for thread in self._threads:
            thread.join()
        for server in self._servers:
            server.server_close()


def open_exporter(config: ServerConfig, slots: int = 1) -> Exporter:
    """Listen on ``config.metrics`` and serve it in threads, with a table of ``slots``
    (one per worker process; 1 without workers).

    Raises `MissingExtra` without prometheus_client, `HostNotFound` or a `BindError` when the
    address cannot be listened on. The caller closes the exporter.
    """
    check_extra()
    host, port = config.metrics_address
    listeners = net.open_listeners([host], port, METRICS_BACKLOG)
    try:
        exporter = Exporter(listeners, CountsTable(slots), build_info(config))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    exporter.serve_in_threads()
    return exporter


def consumers_of(exporter: Exporter | None, number: int = 0) -> Iterable[Consumer]:
    """The event consumers to pass to the engine: the recorder, or none without metrics."""
    return () if exporter is None else (exporter.recorder(number),)


def parse_text(text: str) -> dict[str, float]:
    """Samples of the Prometheus text format as ``{'name{label="v"}': value}`` (for tests and
    checks: labels in the order written)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
