"""``--metrics``: the Prometheus text after known traffic, the health endpoints, a drain seen by
/readyz, workers summed, the missing extra, and the JSON log's events beside the counters."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tcpecho.config import ServerConfig
from tcpecho.events import Closed, Opened
from tcpecho.metrics import (
    DURATION_BUCKETS,
    BuildInfo,
    Collector,
    CountsTable,
    Exporter,
    Recorder,
    Totals,
    open_exporter,
    parse_text,
)
from tcpecho.protocol import CloseReason
from tcpecho.testing import running_server
from tests.helpers import (
    ROOT,
    ServerProcess,
    connect,
    engine_options,
    recv_exactly,
    recv_until_closed,
)

# Bound for what should happen at once: a drain seen by /readyz, a worker restarted.
PROMPTLY = 10.0
# A client that has sent this much without the server pushing back: something is wrong.
STUCK_AFTER = 256 * 1024 * 1024
METRICS_LINE = re.compile(r"^\[METRICS\] serving /metrics, /healthz and /readyz on (\S+)$")


def get(address: tuple[str, int], path: str) -> tuple[int, str, str]:
    """GET ``path`` from the metrics port: the status, the content type and the body."""
    url = f"http://{address[0]}:{address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=PROMPTLY) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


def scrape(address: tuple[str, int]) -> dict[str, float]:
    status, _, body = get(address, "/metrics")
    assert status == 200
    return parse_text(body)


def scrape_when(
    address: tuple[str, int], settled: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    """Scrape until ``settled`` holds (a client's close reaches the server a moment after the
    client has moved on), or PROMPTLY has passed: then the last scrape, for the asserts."""
    deadline = time.monotonic() + PROMPTLY
    while not settled(metrics := scrape(address)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return metrics


@contextmanager
def exporter_for(config: ServerConfig) -> Iterator[Exporter]:
    exporter = open_exporter(config)
    try:
        yield exporter
    finally:
        exporter.close()


def echo_once(address: tuple[str, int], payload: bytes) -> bytes:
    """Connect, send ``payload``, half-close, read what comes back."""
    with connect(address) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_until_closed(sock)


def denied_once(address: tuple[str, int]) -> None:
    """Connect from 127.0.0.2 (denied in these tests): closed at once, with nothing sent."""
    with (
        socket.create_connection(
            address, timeout=PROMPTLY, source_address=("127.0.0.2", 0)
        ) as sock,
        suppress(ConnectionResetError),
    ):
        assert sock.recv(100) == b""


def test_metrics_count_known_traffic(engine: str) -> None:
    """5 connections of 1000 bytes each and one denied client: opened 5, closed by client 5,
    refused (denied) 1, 5000 bytes each way, 5 durations, none active; every series of a
    reason is there from the start, at 0."""
    options: dict[str, Any] = {"metrics": "127.0.0.1:0", "deny": ("127.0.0.2",)}
    options.update(engine_options(engine))
    config = ServerConfig(host=("127.0.0.1",), port=0, **options)
    with exporter_for(config) as exporter:
        [metrics] = exporter.addresses
        before = scrape(metrics)
        assert before['tcpecho_connections_closed_total{reason="idle_timeout"}'] == 0
        assert before['tcpecho_connections_refused_total{reason="refused_busy"}'] == 0
        with running_server(config, [exporter.recorder()]) as server:
            for _ in range(5):
                assert echo_once(server.address, b"x" * 1000) == b"x" * 1000
            denied_once(server.address)
            server.stop()
        after = scrape(metrics)
    loop = {"threads": "none"}.get(engine, engine)
    assert after[
        f'tcpecho_build_info{{engine="{config.engine}",loop="{loop}",version="0.1.0"}}'
    ] == (1)
    assert after["tcpecho_connections_opened_total"] == 5
    assert after["tcpecho_connections_active"] == 0
    assert after['tcpecho_connections_closed_total{reason="client_closed"}'] == 5
    assert after['tcpecho_connections_refused_total{reason="refused_denied"}'] == 1
    assert after["tcpecho_received_bytes_total"] == 5000
    assert after["tcpecho_sent_bytes_total"] == 5000
    assert after["tcpecho_accept_errors_total"] == 0
    assert after['tcpecho_connection_duration_seconds_bucket{le="+Inf"}'] == 5
    assert after["tcpecho_connection_duration_seconds_count"] == 5
    assert 0 < after["tcpecho_connection_duration_seconds_sum"] < PROMPTLY * 5


def test_active_counts_open_connections_only() -> None:
    """A connection closed before it opened (a failed TLS handshake has a Closed event and no
    Opened one) leaves the active count alone; the histogram puts each duration in the first
    bucket it fits."""
    table = CountsTable(1)
    record = Recorder(table.slot(0))
    record(Opened("192.0.2.1:1000", 1))
    record(Opened("192.0.2.1:1001", 2))
    closed = Closed("192.0.2.1:1000", CloseReason.CLIENT_CLOSED, "", 10, 10, 0, "", 0, 0.1)
    record(closed)
    never_opened = Closed(
        "192.0.2.9:5", CloseReason.TLS_HANDSHAKE_FAILED, "bad", 3, 0, 0, "", 0, 7200.0
    )
    record(never_opened)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(Totals(table), BuildInfo("0", "threads", "none")))
    samples = parse_text(generate_latest(registry).decode())
    assert samples["tcpecho_connections_active"] == 1
    assert samples["tcpecho_connections_opened_total"] == 2
    assert samples['tcpecho_connections_closed_total{reason="tls_handshake_failed"}'] == 1
    assert samples["tcpecho_connection_duration_seconds_count"] == 2
    buckets = {
        float(bound): count
        for name, count in samples.items()
        for bound in re.findall(r'_bucket\{le="([^"]+)"\}', name)
    }
    assert buckets[0.05] == 0
    assert buckets[0.25] == 1  # 0.1 s
    assert buckets[DURATION_BUCKETS[-1]] == 1
    assert buckets[float("inf")] == 2  # and two hours


def test_health_endpoints_and_not_found() -> None:
    """/healthz 200; /readyz 503 before listening, 200 while listening; HEAD too; other
    paths 404; /metrics in the Prometheus text format, or OpenMetrics when asked."""
    config = ServerConfig(host=("127.0.0.1",), port=0, metrics="127.0.0.1:0")
    with exporter_for(config) as exporter:
        [metrics] = exporter.addresses
        assert get(metrics, "/healthz")[0] == 200
        assert get(metrics, "/readyz")[:3:2] == (503, "starting\n")
        exporter.health.listening()
        assert get(metrics, "/readyz")[:3:2] == (200, "ready\n")
        assert get(metrics, "/readyz?verbose=1")[0] == 200
        assert get(metrics, "/")[0] == 404
        assert get(metrics, "/metrics/x")[0] == 404
        head = urllib.request.Request(f"http://127.0.0.1:{metrics[1]}/readyz", method="HEAD")
        with urllib.request.urlopen(head, timeout=PROMPTLY) as response:
            assert response.status == 200
            assert response.read() == b""
        _, content_type, body = get(metrics, "/metrics")
        assert content_type.startswith("text/plain; version=0.0.4")
        assert "# TYPE tcpecho_connections_opened_total counter" in body
        assert "# TYPE tcpecho_connection_duration_seconds histogram" in body
        wants = {"Accept": "application/openmetrics-text; version=1.0.0"}
        request = urllib.request.Request(f"http://127.0.0.1:{metrics[1]}/metrics", headers=wants)
        with urllib.request.urlopen(request, timeout=PROMPTLY) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert response.read().decode().endswith("# EOF\n")
        exporter.health.stopping()
        assert get(metrics, "/readyz")[:3:2] == (503, "stopping\n")


@contextmanager
def stuck_client(port: int) -> Iterator[tuple[socket.socket, int]]:
    """A client of 127.0.0.1:``port`` that sent until the server stopped reading, because the
    server's echo waits on this client, which does not read: a stop's drain waits on it too.
    Yields the socket and how many bytes it sent."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        held.connect(("127.0.0.1", port))
        held.settimeout(0.5)
        sent = 0
        with suppress(TimeoutError):
            while sent < STUCK_AFTER:
                sent += held.send(b"z" * 65536)
        assert sent < STUCK_AFTER, "the server never stopped reading"
        yield held, sent


def metrics_address(server: ServerProcess) -> tuple[str, int]:
    """The metrics address from the [METRICS] line, which follows the banner."""
    line = server.wait_for("[METRICS]").rstrip("\n")
    match = METRICS_LINE.match(line)
    assert match is not None, line
    host, _, port = match.group(1).rpartition(":")
    return host, int(port)


def test_readyz_turns_503_as_the_drain_starts_and_the_port_closes_after() -> None:
    """SIGTERM while a client that does not read keeps the drain waiting: /readyz answers 503
    while the connection drains, /healthz 200, the connection still counts as active; once
    the client reads its echo the server stops, and the metrics port with it."""
    with ServerProcess(
        *("--host", "127.0.0.1", "--port", "0", "-q"),
        *("--metrics", "127.0.0.1:0", "--drain-timeout", "20"),
    ) as server:
        port = server.wait_listening()
        metrics = metrics_address(server)
        assert get(metrics, "/readyz")[:3:2] == (200, "ready\n")
        with stuck_client(port) as (held, sent):
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for("[SERVER STOPPING]")
            deadline = time.monotonic() + PROMPTLY
            while get(metrics, "/readyz")[0] != 503:
                assert time.monotonic() < deadline, "/readyz never turned 503"
                time.sleep(0.02)
            assert get(metrics, "/readyz")[2] == "stopping\n"
            assert get(metrics, "/healthz")[0] == 200
            assert scrape(metrics)["tcpecho_connections_active"] == 1
            held.settimeout(PROMPTLY)
            echoed = recv_until_closed(held)  # what the server had received when it stopped
            assert 0 < len(echoed) <= sent
        assert server.proc.wait(timeout=PROMPTLY) == 0, server.stderr()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(metrics, timeout=PROMPTLY).close()


def test_two_workers_show_as_one_server_and_keep_the_counts_of_a_worker_that_died() -> None:
    """--workers 2: one scrape sums both workers; after worker 1 is killed and restarted, the
    totals still hold what it counted, and none of its connections count as active."""
    with ServerProcess(
        "--host", "127.0.0.1", "--port", "0", "--workers", "2", "--metrics", "127.0.0.1:0", "-q"
    ) as server:
        port = server.wait_listening()
        metrics = metrics_address(server)
        pids = {}
        for _ in range(2):
            line = server.wait_for("listening, ")
            number, pid = re.findall(r"worker (\d) \(pid (\d+)\)", line)[0]
            pids[int(number)] = int(pid)
        connections = 20
        with connect(("127.0.0.1", port)) as held:
            held.sendall(b"held")
            assert recv_exactly(held, 4) == b"held"
            for _ in range(connections):
                assert echo_once(("127.0.0.1", port), b"y" * 100) == b"y" * 100
            totals = scrape_when(metrics, lambda m: m["tcpecho_connections_active"] == 1)
            assert totals["tcpecho_connections_opened_total"] == connections + 1
            assert totals["tcpecho_connections_active"] == 1
            assert totals["tcpecho_received_bytes_total"] == connections * 100
            # Kill both workers in turn: whichever held the connection, the totals stay.
            for number in (1, 2):
                subprocess.run(["kill", "-KILL", str(pids[number])], check=True)
                server.wait_for(f"worker {number} (pid {pids[number]}) was killed by SIGKILL")
                server.wait_for(f"[WORKER] worker {number} (pid")
        after = scrape_when(metrics, lambda m: m["tcpecho_connections_active"] == 0)
        assert after["tcpecho_connections_opened_total"] == connections + 1
        assert after["tcpecho_connections_active"] == 0
        assert after["tcpecho_received_bytes_total"] == connections * 100
        assert after['tcpecho_connections_closed_total{reason="client_closed"}'] == connections
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=PROMPTLY) == 0, server.stderr()


def test_without_prometheus_client_one_line_and_exit_8() -> None:
    """prometheus_client hidden: one line naming the extra, exit 8, nothing listening."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None; "
        "from tcpecho.cli import main; "
        "sys.exit(main(['serve', '--host', '127.0.0.1', '--port', '0', "
        "'--metrics', '127.0.0.1:0']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=PROMPTLY * 2,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 8, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "Error: --metrics needs prometheus-client, which is not installed: "
        "pip install 'tcpecho[metrics]'."
    ]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("9100", "give it as HOST:PORT"),
        ("::1:9100", "put an IPv6 address in brackets"),
        ("127.0.0.1:70000", "the port must be 0 to 65535"),
        ("127.0.0.1:65432", "the metrics port must not be the echo port"),
    ],
)
def test_a_bad_metrics_address_is_a_config_error(value: str, reason: str) -> None:
    """Exit 2 with the option and the reason; the echo port is never the metrics port."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tcp_server.py"), "--metrics", value],
        capture_output=True,
        text=True,
        timeout=PROMPTLY * 2,
        check=False,
    )
    assert result.returncode == 2, result
    assert f"invalid --metrics {value!r}: {reason}" in result.stderr


def test_the_json_log_names_the_events_the_metrics_count() -> None:
    """A closed record's reason is the label of tcpecho_connections_closed_total; a refused
    one's the label of tcpecho_connections_refused_total; bytes match the byte counters."""
    with ServerProcess(
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--deny",
        "127.0.0.2",
    ) as server:
        listening = json.loads(server.readline())
        assert listening["event"] == "listening"
        port = listening["addresses"][0][1]
        metrics_record = json.loads(server.readline())
        assert metrics_record["event"] == "metrics_listening"
        metrics = tuple(metrics_record["addresses"][0])
        assert echo_once(("127.0.0.1", port), b"abc") == b"abc"
        denied_once(("127.0.0.1", port))
        records: list[dict[str, Any]] = []
        while not any(r["event"] == "refused" for r in records):
            records.append(json.loads(server.readline()))
        while not any(r["event"] == "closed" for r in records):
            records.append(json.loads(server.readline()))
        # The log is written before the metrics count the same event: wait for the count.
        samples = scrape_when(
            (str(metrics[0]), int(metrics[1])),
            lambda m: (
                m["tcpecho_connections_opened_total"] == 1 and m["tcpecho_connections_active"] == 0
            ),
        )
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=PROMPTLY) == 0
    closed = next(r for r in records if r["event"] == "closed")
    refused = next(r for r in records if r["event"] == "refused")
    assert samples[f'tcpecho_connections_closed_total{{reason="{closed["reason"]}"}}'] == 1
    assert samples[f'tcpecho_connections_refused_total{{reason="{refused["reason"]}"}}'] == 1
    assert samples["tcpecho_received_bytes_total"] == closed["bytes_received"] == 3
    assert samples["tcpecho_sent_bytes_total"] == closed["bytes_sent"] - closed["bytes_unsent"]
