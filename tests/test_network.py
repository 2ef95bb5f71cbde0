"""A real bad network: the server and `tcpecho bench` on two ends of a link that loses packets,
is slow, or goes down, each in a network namespace of its own (tests/netns.py).

The kernel's own TCP carries every byte across: what these tests show is that each engine
echoes exactly through loss, a slow link and an outage that TCP rides out, and that the
server's own timeouts still close a connection on time when the peer vanishes for longer.
See docs/network.md. Root, iproute2, nftables and tc are needed; without them the tests are
skipped (failed in CI).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypedDict

import pytest

from tests.helpers import ServerProcess, engine_arguments, recv_exactly
from tests.netns import SERVER_ADDRESS, Link, veth_link


class BenchReport(TypedDict):
    """The figures of `tcpecho bench --json` these tests read (docs/bench.md)."""

    round_trips: int
    duration_s: float
    megabytes_per_s: float
    latency_us: dict[str, float]
    connections_opened: int
    bytes_verified: int
    mismatches: dict[str, int]
    errors: dict[str, int]
    ok: bool


LOSS_PERCENT = 5
LOSS_ROUND_TRIPS = 3000

THROTTLE_RATE_BITS = 1_000_000  # "1mbit" to tc: 10^6 bits per second
THROTTLE_BURST_BITS = 32_000  # "32kbit"
THROTTLE_SIZE = 8192

OUTAGE = 2.0  # seconds the link is down while bench runs: TCP rides it out
LONG_OUTAGE = 4.0  # longer than the server's --idle-timeout below
IDLE_TIMEOUT = 1.0


@pytest.fixture
def link() -> Iterator[Link]:
    """A veth pair between two new namespaces, deleted with every process in them afterwards."""
    with veth_link() as made:
        yield made


@contextmanager
def server_on(link: Link, engine: str, *options: str) -> Iterator[tuple[ServerProcess, int]]:
    """A server of ``engine`` in the server's namespace, and the port its banner names."""
    with ServerProcess(
        "--host", SERVER_ADDRESS, "--port", "0", *engine_arguments(engine), "-q", *options,
        launcher=link.in_server(),
    ) as server:  # fmt: skip
        yield server, server.wait_listening()


def bench_command(link: Link, port: int, *options: str) -> list[str]:
    """`tcpecho bench --json` in the client's namespace, against the server's port."""
    bench = [sys.executable, "-m", "tcpecho", "bench", f"{SERVER_ADDRESS}:{port}", "--json"]
    return [*link.in_client(), *bench, *options]


def passed(returncode: int, stdout: str, stderr: str) -> BenchReport:
    """The report of a bench run that found every byte right and no connection failed."""
    assert returncode == 0, (returncode, stdout, stderr)
    report: BenchReport = json.loads(stdout)
    assert report["ok"] is True, report
    assert report["mismatches"] == {}, report
    assert report["errors"] == {}, report
    return report


def bench(link: Link, port: int, *options: str, timeout: float = 50) -> BenchReport:
    result = subprocess.run(
        bench_command(link, port, *options),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return passed(result.returncode, result.stdout, result.stderr)


def test_random_loss_both_ways_every_byte_echoed(link: Link, engine: str) -> None:
    """5 % of the packets each way are dropped: TCP retransmits, the echo is exact."""
    link.drop_randomly(LOSS_PERCENT)
    with server_on(link, engine) as (_, port):
        # Pipelined, so that losses are also repaired out of order (SACK) and not only by
        # timeouts; a loss can cost a connection seconds (the SYN's first retry is after 1 s,
        # then backoff), hence the long --timeout: it is "nothing came back", not an error.
        report = bench(
            link, port, "-c", "32", "-p", "4", "-n", str(LOSS_ROUND_TRIPS),
            "--warmup", "0", "--timeout", "30",
        )  # fmt: skip
    assert report["round_trips"] == LOSS_ROUND_TRIPS
    assert report["bytes_verified"] >= LOSS_ROUND_TRIPS * 64
    # The loss was really there, in each direction, at the rate asked for: each packet is an
    # independent draw, so the drops are binomial; 5 standard deviations is a false failure
    # in millions of runs.
    for count in link.loss_counts():
        assert count.arrived > 500, count
        expected = count.arrived * LOSS_PERCENT / 100
        spread = math.sqrt(expected * (1 - LOSS_PERCENT / 100))
        assert abs(count.dropped - expected) < 5 * spread, (count, expected, spread)


def test_a_1_mbit_link_echoes_exactly_and_no_faster(link: Link, engine: str) -> None:
    """Both ends send at most 1 Mbit/s (tbf): 8 KiB messages come back exact, and the payload
    rate measured is within what the link allows, which shows the throttle was in place."""
    link.throttle(rate="1mbit", burst="32kbit", latency="400ms")
    with server_on(link, engine) as (_, port):
        report = bench(
            link, port, "-c", "4", "-s", str(THROTTLE_SIZE), "-d", "2", "--warmup", "0.5"
        )
    seconds = report["duration_s"]
    # At most the rate plus one full bucket, counting the payload alone (headers and the
    # other direction's ACKs take their share of the same bits); 1 MB is 10^6 bytes.
    allowed = (THROTTLE_RATE_BITS * seconds + THROTTLE_BURST_BITS) / 8 / seconds / 1e6
    assert report["megabytes_per_s"] <= round(allowed, 3), (allowed, report)
    # The report rounds to 3 places; the same figure unrounded, from the counts.
    payload_rate = report["round_trips"] * THROTTLE_SIZE / seconds / 1e6
    assert payload_rate <= allowed, (payload_rate, allowed, report)
    # And not trickling: the link was used (4 connections keep it busy).
    assert payload_rate > allowed / 4, (payload_rate, allowed, report)


def test_link_down_for_2_seconds_no_byte_lost_no_connection_failed(link: Link, engine: str) -> None:
    """The link goes down for 2 s under load and comes back: TCP retransmits across the gap,
    every byte is echoed and no connection fails."""
    connections = 8
    with server_on(link, engine) as (server, port):
        client = subprocess.Popen(
            bench_command(link, port, "-c", str(connections), "-d", "4", "--warmup", "0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(connections):
                server.wait_for("[NEW CONNECTION]")
            time.sleep(0.3)  # messages in flight on every connection when the link goes
            link.down()
            try:
                time.sleep(OUTAGE)
            finally:
                link.up()
            stdout, stderr = client.communicate(timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()
    report = passed(client.returncode, stdout, stderr)
    assert report["connections_opened"] == connections
    # Messages sent just before the outage waited it out, and were counted.
    assert report["latency_us"]["max"] >= OUTAGE * 1e6, report


@pytest.mark.timeout(30)
def test_link_down_past_the_idle_timeout_closes_on_time_then_serves(
    link: Link, engine: str
) -> None:
    """The link goes down for 4 s under a client; the server cannot tell a dead link from a
    silent client and closes it at --idle-timeout (1 s), with one line saying so; when the link
    is back, a new client is served."""
    with server_on(link, engine, f"--idle-timeout={IDLE_TIMEOUT:g}") as (server, port):
        with link.connect_from_client((SERVER_ADDRESS, port), timeout=10) as client:
            peer = " {}:{} ".format(*client.getsockname())  # spaces: :5000 is not :50001
            started = time.monotonic()
            client.sendall(b"before the outage\n")
            assert recv_exactly(client, 18) == b"before the outage\n"
            link.down()
            down_at = time.monotonic()
            try:
                # Taken by the kernel's send buffer, never delivered: the server sees nothing.
                client.sendall(b"into the dead link\n")
                line = server.wait_for("[DISCONNECTED]")
                closed_at = time.monotonic()
                time.sleep(max(0.0, down_at + LONG_OUTAGE - time.monotonic()))
            finally:
                link.up()
        assert peer in line, line
        assert "closed: idle (--idle-timeout)" in line, line
        # Not early (its last byte came after `started`), and on time: within a second of the
        # deadline, while the link was still down.
        assert closed_at - started >= IDLE_TIMEOUT, line
        assert closed_at - down_at < IDLE_TIMEOUT + 1.0, line
        bench(link, port, "-c", "2", "-n", "100", "--warmup", "0")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0, server.stderr()
        assert server.proc.stdout is not None
        lines = "".join([*server.lines, server.proc.stdout.read()]).splitlines()
    closes = [each for each in lines if "[DISCONNECTED]" in each and peer in each]
    assert closes == [line.rstrip("\n")], lines
