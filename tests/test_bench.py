"""tcpecho bench: every echoed byte is checked, so a faulty server cannot pass."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypedDict, Unpack

import pytest

from tcpecho.bench import BenchOptions, run
from tcpecho.bench.payload import HEADER, Payloads, classify
from tcpecho.config import ServerConfig
from tcpecho.testing import RunningServer, running_server
from tests.helpers import ROOT, recv_exactly

SIZE = 64
QUICK = ["--warmup", "0"]

# A fault takes (connection index, message index, message) and returns what to send back.
Fault = Callable[[int, int, bytes], bytes]


@contextmanager
def faulty_server(
    fault: Fault, size: int = SIZE, split_at: int | None = None
) -> Iterator[tuple[str, int]]:
    """A thread-per-connection server that reads whole messages and sends back fault(...).

    ``split_at``: send each reply in two writes, cut there, 50 ms apart (so they arrive in two
    reads at the client).
    """
    listener = socket.create_server(("127.0.0.1", 0))
    threads: list[threading.Thread] = []
    connections: list[socket.socket] = []

    def handle(index: int, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            number = 0
            while message := recv_exactly(conn, size):
                if len(message) < size:
                    break
                reply = fault(index, number, message)
                number += 1
                if reply is _CLOSE:
                    return
                try:
                    if split_at is not None and len(reply) > split_at:
                        conn.sendall(reply[:split_at])
                        time.sleep(0.05)  # the fault: a reply cut in two, in time
                        reply = reply[split_at:]
                    conn.sendall(reply)
                except OSError:
                    return

    def accept() -> None:
        index = 0
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            thread = threading.Thread(target=handle, args=(index, conn), daemon=True)
            thread.start()
            threads.append(thread)
            index += 1

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(5)
        for conn in connections:
            conn.close()
        for thread in threads:
            thread.join(5)


_CLOSE = b"<close>"


def p90_us(report: dict[str, object]) -> float:
    """The report's 90th percentile latency in µs (``latency_us`` maps names to numbers)."""
    latency = report["latency_us"]
    assert isinstance(latency, dict), latency
    p90 = latency["p90"]
    assert isinstance(p90, int | float), latency
    return p90


class BenchSettings(TypedDict, total=False):
    """BenchOptions' fields after host and port: what a test may set."""

    connections: int
    size: int
    duration: float | None
    requests: int | None
    pipeline: int
    warmup: float
    rate: float | None
    timeout: float
    processes: int
    seed: int


def bench(address: tuple[str, int], **options: Unpack[BenchSettings]) -> dict[str, object]:
    settings: BenchSettings = {
        "connections": 2,
        "size": SIZE,
        "duration": None,
        "requests": 50,
        "warmup": 0.0,
        "timeout": 3.0,
    }
    settings.update(options)
    return run(BenchOptions(address[0], address[1], **settings))


def test_a_correct_server_passes_with_every_byte_checked(server: RunningServer) -> None:
    report = bench(server.address, connections=5, requests=500, pipeline=4)
    assert report["ok"] is True
    assert report["round_trips"] == 500
    assert report["bytes_verified"] == 500 * SIZE
    assert report["mismatches"] == {}
    assert report["errors"] == {}


def test_corruption_is_caught() -> None:
    def flip_a_bit(index: int, number: int, message: bytes) -> bytes:
        if number == 10:
            return message[:40] + bytes([message[40] ^ 1]) + message[41:]
        return message

    with faulty_server(flip_a_bit) as address:
        report = bench(address)
    assert report["ok"] is False
    assert report["mismatches"] == {"corruption": 2}


def test_truncation_is_caught() -> None:
    def cut_short(index: int, number: int, message: bytes) -> bytes:
        return _CLOSE if number == 5 else message

    with faulty_server(cut_short) as address:
        report = bench(address, connections=1)
    assert report["mismatches"] == {"truncation": 1}


def swap_messages_3_and_4() -> Fault:
    held: dict[int, bytes] = {}

    def swap(index: int, number: int, message: bytes) -> bytes:
        if number == 3:
            held[index] = message
            return b""
        if number == 4:
            return message + held.pop(index)
        return message

    return swap


def test_reordering_is_caught() -> None:
    with faulty_server(swap_messages_3_and_4()) as address:
        report = bench(address, connections=1, pipeline=2)
    assert report["mismatches"] == {"reordering": 1}


def test_duplication_is_caught() -> None:
    def twice(index: int, number: int, message: bytes) -> bytes:
        return message * 2 if number == 7 else message

    with faulty_server(twice) as address:
        report = bench(address, connections=1)
    assert report["mismatches"] == {"duplication": 1}


def test_cross_connection_mix_up_is_caught() -> None:
    first_messages: dict[int, bytes] = {}
    seen = threading.Event()

    def mix_up(index: int, number: int, message: bytes) -> bytes:
        first_messages.setdefault(index, message)
        if index == 0:
            seen.set()
            return message
        seen.wait(5)
        return first_messages[0] if number == 0 else message

    with faulty_server(mix_up) as address:
        report = bench(address, connections=2, requests=20)
    assert report["mismatches"] == {"cross-connection": 1}


def test_a_silent_server_counts_as_timeout_not_success() -> None:
    with faulty_server(lambda index, number, message: b"") as address:
        report = bench(address, connections=1, timeout=0.5)
    assert report["ok"] is False
    assert report["errors"] == {"timeout": 1}


def test_open_loop_latency_shows_a_stall_that_closed_loop_hides() -> None:
    """A server that stalls for 0.3 s: measured from the intended send time (open loop) the
    stall shows in the high percentiles; measured from the actual send it hardly does."""
    gate = threading.Lock()
    stalled = threading.Event()
    started = time.monotonic()

    def stall_once(index: int, number: int, message: bytes) -> bytes:
        with gate:
            if not stalled.is_set() and time.monotonic() - started > 0.5:
                stalled.set()
                time.sleep(0.3)  # the server's fault under test, not a wait for start-up
        return message

    with faulty_server(stall_once) as address:
        open_loop = bench(address, connections=4, requests=None, duration=1.5, rate=1000)
    stalled.clear()
    started = time.monotonic()
    with faulty_server(stall_once) as address:
        closed_loop = bench(address, connections=4, requests=None, duration=1.5)
    assert open_loop["ok"]
    assert closed_loop["ok"]
    open_p90 = p90_us(open_loop)
    closed_p90 = p90_us(closed_loop)
    assert open_p90 >= 50_000
    assert closed_p90 < open_p90


def test_processes_merge_into_one_exact_count(server: RunningServer) -> None:
    report = bench(server.address, connections=4, requests=400, processes=2)
    assert report["ok"] is True
    assert report["round_trips"] == 400
    assert report["connections_opened"] == 4


def test_payloads_differ_per_connection_and_message() -> None:
    payloads = Payloads(SIZE, seed=7)
    messages = {payloads.message(c, s) for c in range(20) for s in range(50)}
    assert len(messages) == 1000
    assert all(len(m) == SIZE for m in messages)
    run = {"connections": 3, "sent": 8}
    assert classify(payloads.message(1, 5), 2, 5, **run) == "cross-connection"
    assert classify(payloads.message(1, 5), 1, 6, **run) == "duplication"
    assert classify(payloads.message(1, 7), 1, 6, **run) == "reordering"
    assert classify(payloads.message(1, 6)[: HEADER.size - 1], 1, 6, **run) == "corruption"
    assert classify(payloads.message(5, 6), 1, 6, **run) == "corruption"  # no such connection
    assert classify(payloads.message(1, 9), 1, 6, **run) == "corruption"  # never sent


def test_cli_json_report_and_exit_status(server: RunningServer) -> None:
    host, port = server.address
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tcpecho",
            "bench",
            f"{host}:{port}",
            "-n",
            "200",
            "-c",
            "4",
            *QUICK,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "tcpecho.bench/1"
    assert report["round_trips"] == 200
    assert set(report["latency_us"]) == {"p50", "p90", "p99", "p99_9", "max", "mean"}


def test_cli_exits_non_zero_on_a_mismatch(tmp_path: object) -> None:
    def corrupt(index: int, number: int, message: bytes) -> bytes:
        return message[::-1]

    with faulty_server(corrupt) as (host, port):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tcpecho",
                "bench",
                f"{host}:{port}",
                "-n",
                "10",
                "-c",
                "1",
                *QUICK,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "1 corruption" in result.stdout


def test_hist_file_is_an_hdrhistogram_log(server: RunningServer, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "latency.hlog")
    host, port = server.address
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tcpecho",
            "bench",
            f"{host}:{port}",
            "-n",
            "100",
            "-c",
            "2",
            *QUICK,
            "--hist-file",
            path,
        ],
        capture_output=True,
        timeout=30,
        check=True,
    )
    with open(path) as log:
        text = log.read()
    assert "#[StartTime:" in text
    assert "HIST" in text


def test_without_the_bench_extra_one_clear_line() -> None:
    """A Python without hdrhistogram (the system's) gets one line naming the extra."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 to run without the extras")
    probe = subprocess.run([system_python, "-c", "import hdrh"], capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip("the system python has hdrhistogram installed")
    result = subprocess.run(
        [system_python, "-m", "tcpecho", "bench", "127.0.0.1:9", "-n", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    assert result.returncode == 8
    assert result.stderr.strip().count("\n") == 0
    assert "pip install 'tcpecho[bench]'" in result.stderr


def test_a_reordered_message_is_named_even_when_its_header_is_split_across_reads() -> None:
    with faulty_server(swap_messages_3_and_4(), split_at=5) as address:
        report = bench(address, connections=1, pipeline=2)
    assert report["mismatches"] == {"reordering": 1}


def test_fewer_requests_than_connections_is_not_a_failure(server: RunningServer) -> None:
    report = bench(server.address, connections=5, requests=3)
    assert report["ok"] is True
    assert report["round_trips"] == 3


def run_cli(
    args: list[str], *, without: tuple[str, ...] = (), stderr: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """``tcpecho`` in a new Python where the modules in ``without`` cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {list(without)!r}: sys.modules[name] = None\n"
        "from tcpecho.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=30,
        check=False,
    )


def read_all(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end of the pty closed
            return data
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def one_server() -> Iterator[RunningServer]:
    """One server of the default engine: for tests of the load generator, not of engines."""
    with running_server(ServerConfig(host=("127.0.0.1",), port=0)) as running:
        yield running


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_a_live_progress_line_on_a_terminal_and_none_on_a_pipe(
    one_server: RunningServer, rich: bool
) -> None:
    host, port = one_server.address
    args = ["bench", f"{host}:{port}", "-c", "2", *QUICK]
    without = () if rich else ("rich",)
    master, slave = os.openpty()
    try:
        result = run_cli([*args, "-d", "2.5"], without=without, stderr=slave)
    finally:
        os.close(slave)
    terminal = read_all(master).decode()
    os.close(master)
    assert result.returncode == 0
    assert "round trips measured" in terminal  # redrawn each second while it ran
    assert "no mismatch" in result.stdout
    assert ("━" in terminal) is rich  # rich draws a bar; the plain line has none
    on_a_pipe = run_cli([*args, "-d", "1.5"], without=without)
    assert on_a_pipe.returncode == 0
    assert on_a_pipe.stderr == ""


def test_without_uvloop_one_line_says_so_and_the_run_still_checks_every_byte(
    one_server: RunningServer,
) -> None:
    host, port = one_server.address
    args = ["bench", f"{host}:{port}", "-n", "100", "-c", "2", *QUICK]
    result = run_cli(args, without=("uvloop",))
    assert result.returncode == 0
    assert result.stderr.count("\n") == 1
    assert "uvloop is not installed" in result.stderr
    assert "pip install 'tcpecho[bench]'" in result.stderr
    assert "generator    asyncio, 1 process" in result.stdout
    assert "no mismatch" in result.stdout
