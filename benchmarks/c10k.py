"""C10k: can one tcpecho server hold ten thousand clients at once, and what does each cost?

It starts ``python -m tcpecho serve`` as a child process (``server_process.py``; on
127.0.0.1, a port the OS picks, ``-q``, ``--max-connections N+100``, ``--backlog 4096``,
``--max-per-address 0``), measures the server's resident memory when idle, then opens N
connections to it from an asyncio client in this process (connects run a bounded number at a
time), and, while all N are held open at once, checks an echo on every one: a payload unique
to each connection is sent and must come back byte for byte. With all N still open it
measures the server's memory again, then closes them, waits until the server has released
every one, and stops the server with SIGINT, which must exit 0.

It reports the connections held, the echo checks passed and failed, the server's RSS idle and
loaded (VmRSS, MiB) and per connection ((loaded - idle) / N, KiB), and the time to connect
all. It exits 1 when any connection failed or any echo did not match, or the server did not
stop cleanly; 2 when it cannot run (descriptor limit too low, server does not start).

Both processes need a descriptor per connection: the script raises its RLIMIT_NOFILE soft
limit (up to the hard limit, which it never changes) before it starts the server, which
inherits it. Linux only (it reads /proc). Run it from the repository, no install needed:

    python3 benchmarks/c10k.py                                  # asyncio engine, 10,000
    python3 benchmarks/c10k.py --engine asyncio --loop uvloop   # needs uvloop installed
    python3 benchmarks/c10k.py --engine threads --connections 2000
    python3 benchmarks/c10k.py --json                           # one JSON object on stdout

The server runs under the same interpreter as this script, so run it with the interpreter
that has uvloop (e.g. ``.venv/bin/python``) to measure ``--loop uvloop``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import re
import resource
import secrets
import signal
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from server_process import HOST, TAG, ServerProcess, ServerStartError

from tcpecho.config import ENGINES, LOOPS

# Descriptors either process needs besides one per connection: std streams, pipes, the
# listener, the selector, the wake-up sockets, imported modules' files.
FD_MARGIN = 256
# The server may hold this many connections above N (the brief's --max-connections N+100).
SERVER_EXTRA_CONNECTIONS = 100
# Use at most this share of the ephemeral port range per source address.
PORT_RANGE_SHARE = 0.8
# How long the server may take to release every connection after the client closed them.
RELEASE_TIMEOUT = 30.0
RELEASE_POLL = 0.05
STOPPED = re.compile(r"^\[SERVER STOPPED\] (?P<served>\d+) connections served")
# Server log lines expected under this load; every other line is shown in the report.
ROUTINE_TAGS = frozenset(
    {
        "SERVER STARTING",
        "ENGINE",
        "NEW CONNECTION",
        "DISCONNECTED",
        "SERVER STOPPING",
        "SERVER STOPPED",
    }
)
KIB = 1024
MIB = 1024 * 1024


class SetupError(Exception):
    """The benchmark cannot run here; the message says why."""


# --- the server ---------------------------------------------------------------------------


class Server(ServerProcess):
    """The server under test (``server_process.py``), its log counted by tag as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.tags: Counter[str] = Counter()
        self.notable: deque[str] = deque(maxlen=20)
        self.notable_count = 0
        super().__init__(args, on_line=self._line, keep_lines=0)

    def _line(self, line: str) -> None:
        match = TAG.match(line)
        tag = match["tag"] if match else ""
        self.tags[tag] += 1
        if tag not in ROUTINE_TAGS:
            self.notable_count += 1
            self.notable.append(line)

    @property
    def description(self) -> str:
        return self.engine

    def reading(self) -> dict[str, int]:
        """VmRSS (bytes), threads and open descriptors. Raises SetupError if the server is
        gone."""
        status = self.status()
        if status is None:
            raise SetupError(f"the server is gone (exit {self.proc.poll()})")
        return {"rss": status.rss_kib * KIB, "threads": status.threads, "fds": status.fds}


# --- the client ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    connected: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    connect_seconds: float = 0.0
    echo_passed: int = 0
    echo_mismatched: int = 0
    echo_errors: Counter[str] = field(default_factory=Counter)
    first_mismatch: str | None = None
    echo_seconds: float = 0.0
    loaded: dict[str, int] = field(default_factory=dict)
    release_seconds: float | None = None
    released: dict[str, int] = field(default_factory=dict)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def make_payload(index: int, size: int) -> bytes:
    head = f"c10k {index} {secrets.token_hex(8)} ".encode()
    return head + b"x" * max(0, size - len(head) - 1) + b"\n"


async def connect(
    port: int, source: str | None, limit: asyncio.Semaphore, timeout: float
) -> socket.socket:
    loop = asyncio.get_running_loop()
    async with limit:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if source is not None:
                # Let connect() pick the port, so each source address has the whole range.
                no_port = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
                sock.setsockopt(socket.IPPROTO_IP, no_port, 1)
                sock.bind((source, 0))
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
        except BaseException:
            sock.close()
            raise
        return sock


async def echo(sock: socket.socket, payload: bytes, limit: asyncio.Semaphore) -> bytes:
    loop = asyncio.get_running_loop()
    async with limit:
        await loop.sock_sendall(sock, payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = await loop.sock_recv(sock, len(payload) - len(received))
            if not chunk:
                raise ConnectionError(f"closed by the server after {len(received)} bytes")
            received += chunk
        return bytes(received)


async def run_load(
    server: Server, port: int, args: argparse.Namespace, sources: list[str]
) -> LoadResult:
    result = LoadResult()
    n = args.connections
    limit = asyncio.Semaphore(args.concurrency)
    say = progress(args)

    say(f"connecting {n} clients ({args.concurrency} at a time, from {', '.join(sources)})")
    use_source = len(sources) > 1 or sources[0] != HOST
    start = time.perf_counter()
    outcomes = await asyncio.gather(
        *(
            connect(port, sources[i % len(sources)] if use_source else None, limit, args.timeout)
            for i in range(n)
        ),
        return_exceptions=True,
    )
    result.connect_seconds = time.perf_counter() - start
    socks: list[socket.socket] = []
    for outcome in outcomes:
        if isinstance(outcome, socket.socket):
            socks.append(outcome)
        else:
            result.connect_errors[describe(outcome)] += 1
    result.connected = len(socks)
    try:
        say(f"connected {len(socks)} in {result.connect_seconds:.2f} s; echo on every one")
        payloads = [make_payload(i, args.payload_size) for i in range(len(socks))]
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(
                asyncio.wait_for(echo(sock, payload, limit), args.timeout)
                for sock, payload in zip(socks, payloads, strict=True)
            ),
            return_exceptions=True,
        )
        result.echo_seconds = time.perf_counter() - start
        for index, (payload, reply) in enumerate(zip(payloads, replies, strict=True)):
            if isinstance(reply, BaseException):
                result.echo_errors[describe(reply)] += 1
            elif reply == payload:
                result.echo_passed += 1
            else:
                result.echo_mismatched += 1
                if result.first_mismatch is None:
                    result.first_mismatch = f"#{index}: sent {payload[:40]!r}, got {reply[:40]!r}"
        # Every connection is still open here: this is the server's memory while it holds N.
        result.loaded = server.reading()
        say(f"echo checked in {result.echo_seconds:.2f} s; closing every connection")
    finally:
        for sock in socks:
            sock.close()
    result.release_seconds, result.released = wait_released(
        server, result.loaded.get("fds", 0), len(socks)
    )
    return result


def wait_released(
    server: Server, loaded_fds: int, held: int
) -> tuple[float | None, dict[str, int]]:
    """Poll until the server closed the ``held`` connections the client closed, or time out.

    Released means the server's descriptors fell by ``held`` from ``loaded_fds``, their count
    with every connection open.
    """
    start = time.perf_counter()
    deadline = start + RELEASE_TIMEOUT
    while True:
        status = server.reading()
        if status["fds"] <= loaded_fds - held:
            return time.perf_counter() - start, status
        if time.perf_counter() > deadline or server.proc.poll() is not None:
            return None, status
        time.sleep(RELEASE_POLL)


def progress(args: argparse.Namespace) -> Any:
    def say(message: str) -> None:
        if not args.json:
            print(f"… {message}", file=sys.stderr, flush=True)

    return say


# --- limits -------------------------------------------------------------------------------


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SetupError(
            f"the hard limit on open files (RLIMIT_NOFILE) is {hard}, too low for this run: "
            f"it needs {needed} descriptors per process. Raise it (as root: "
            f"'ulimit -Hn {needed}' in this shell, or 'prlimit --nofile={needed}:{needed} "
            f"python3 {' '.join(sys.argv)}') or pass fewer --connections."
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return int(low), int(high)


def source_addresses(connections: int, wanted: int | None) -> list[str]:
    """127.0.0.1 alone when N fits in the ephemeral port range; else 127.0.0.2, .3, …"""
    low, high = port_range()
    per_source = max(1, int((high - low + 1) * PORT_RANGE_SHARE))
    count = wanted or math.ceil(connections / per_source)
    if count <= 1:
        return [HOST]
    if count > 250:
        raise SetupError(f"{connections} connections need {count} source addresses; at most 250")
    return [f"127.0.0.{2 + i}" for i in range(count)]


# --- the report ---------------------------------------------------------------------------


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / MIB, 1)


def build_report(
    args: argparse.Namespace,
    server: Server,
    idle: dict[str, int],
    load: LoadResult,
    exit_code: int | None,
    limits: tuple[int, int],
    sources: list[str],
) -> dict[str, Any]:
    n = args.connections
    loaded_rss = load.loaded.get("rss")
    per_connection = None
    if loaded_rss is not None and load.connected:
        per_connection = round((loaded_rss - idle["rss"]) / load.connected / KIB, 2)
    stopped = STOPPED.match(server.stopped_line or "")
    echo_failed = load.echo_mismatched + sum(load.echo_errors.values())
    failures = []
    if load.connected < n:
        failures.append(f"{n - load.connected} connections failed")
    if echo_failed:
        failures.append(f"{echo_failed} echo checks failed")
    if load.release_seconds is None:
        failures.append("the server did not release every connection after the clients closed")
    if exit_code != 0:
        failures.append(f"the server exited {exit_code} after SIGINT (expected 0)")
    low, high = port_range()
    return {
        "ok": not failures,
        "failures": failures,
        "engine": args.engine,
        "loop": args.loop,
        "server": server.description,
        "python": platform.python_version(),
        "connections_requested": n,
        "connections_held": load.connected,
        "connect_failures": n - load.connected,
        "connect_errors": dict(load.connect_errors),
        "connect_seconds": round(load.connect_seconds, 3),
        "connects_per_second": round(load.connected / load.connect_seconds)
        if load.connect_seconds
        else None,
        "echo_passed": load.echo_passed,
        "echo_failed": echo_failed,
        "echo_mismatched": load.echo_mismatched,
        "echo_errors": dict(load.echo_errors),
        "first_mismatch": load.first_mismatch,
        "echo_seconds": round(load.echo_seconds, 3),
        "server_rss_idle_mib": mib(idle["rss"]),
        "server_rss_loaded_mib": mib(loaded_rss),
        "rss_per_connection_kib": per_connection,
        "server_rss_after_close_mib": mib(load.released.get("rss")),
        "server_threads_after_close": load.released.get("threads"),
        "server_fds_after_close": load.released.get("fds"),
        "server_threads_idle": idle["threads"],
        "server_threads_loaded": load.loaded.get("threads"),
        "server_fds_idle": idle["fds"],
        "server_fds_loaded": load.loaded.get("fds"),
        "release_seconds": None if load.release_seconds is None else round(load.release_seconds, 3),
        "server_exit_code": exit_code,
        "server_connections_served": int(stopped["served"]) if stopped else None,
        "server_log_counts": dict(server.tags),
        "server_notable_lines": server.notable_count,
        "server_notable_tail": list(server.notable),
        "server_stderr_tail": list(server.stderr_tail),
        "server_command": server.command,
        "rlimit_nofile": list(limits),
        "source_addresses": sources,
        "ip_local_port_range": [low, high],
        "concurrency": args.concurrency,
        "payload_bytes": args.payload_size,
    }


def print_report(report: dict[str, Any], out: TextIO) -> None:
    def line(label: str, value: object) -> None:
        print(f"  {label:<26} {value}", file=out)

    def errors(found: dict[str, int]) -> str:
        return "; ".join(f"{count}× {why}" for why, count in found.items())

    n = report["connections_requested"]
    print(f"c10k: {n} connections to tcpecho ({report['server']})", file=out)
    line("connections held", f"{report['connections_held']} of {n}")
    if report["connect_errors"]:
        line("connect errors", errors(report["connect_errors"]))
    line(
        "time to connect all",
        f"{report['connect_seconds']:.2f} s ({report['connects_per_second']} connects/s, "
        f"{report['concurrency']} at a time)",
    )
    line(
        "echo checks",
        f"{report['echo_passed']} passed, {report['echo_failed']} failed "
        f"({report['echo_mismatched']} mismatched) in {report['echo_seconds']:.2f} s",
    )
    if report["echo_errors"]:
        line("echo errors", errors(report["echo_errors"]))
    if report["first_mismatch"]:
        line("first mismatch", report["first_mismatch"])
    line("server RSS idle", f"{report['server_rss_idle_mib']} MiB")
    line("server RSS loaded", f"{report['server_rss_loaded_mib']} MiB (all connections open)")
    line("RSS per connection", f"{report['rss_per_connection_kib']} KiB")
    line(
        "server threads / fds",
        f"{report['server_threads_idle']} / {report['server_fds_idle']} idle, "
        f"{report['server_threads_loaded']} / {report['server_fds_loaded']} loaded, "
        f"{report['server_threads_after_close']} / {report['server_fds_after_close']} "
        "after the clients closed",
    )
    release = report["release_seconds"]
    line(
        "after the clients closed",
        f"all released in {release:.2f} s, RSS {report['server_rss_after_close_mib']} MiB"
        if release is not None
        else f"NOT all released in {RELEASE_TIMEOUT:g} s",
    )
    line(
        "server stop (SIGINT)",
        f"exit {report['server_exit_code']}, "
        f"{report['server_connections_served']} connections served",
    )
    if report["server_notable_lines"]:
        line("server warnings/errors", report["server_notable_lines"])
        for text in report["server_notable_tail"]:
            print(f"    {text}", file=out)
    if report["server_stderr_tail"]:
        line("server stderr", "")
        for text in report["server_stderr_tail"]:
            print(f"    {text}", file=out)
    print("PASS" if report["ok"] else "FAIL: " + "; ".join(report["failures"]), file=out)


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Hold N connections to a tcpecho server at once, check an echo on each, "
        "and measure the server's memory.",
        allow_abbrev=False,
    )
    parser.add_argument("--engine", choices=ENGINES, default="asyncio", help="(%(default)s)")
    parser.add_argument("--loop", choices=LOOPS, default="auto", help="(%(default)s)")
    parser.add_argument(
        "--connections", type=int, default=10_000, metavar="N", help="(%(default)s)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=256,
        metavar="K",
        help="connects (and echo checks) in flight at once (%(default)s)",
    )
    parser.add_argument(
        "--payload-size", type=int, default=64, metavar="BYTES", help="(%(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="for each connect and each echo (%(default)s)",
    )
    parser.add_argument(
        "--sources",
        type=int,
        default=None,
        metavar="K",
        help="source addresses 127.0.0.2… (default: 127.0.0.1 alone when N fits in the "
        "ephemeral port range)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.concurrency < 1 or args.payload_size < 32:
        parser.error("--connections and --concurrency must be ≥ 1, --payload-size ≥ 32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.connections
    server: Server | None = None
    try:
        sources = source_addresses(n, args.sources)
        limits = raise_nofile(n + SERVER_EXTRA_CONNECTIONS + FD_MARGIN)
        command = ["--engine", args.engine, "--loop", args.loop, "-q"]
        command += ["--max-connections", str(n + SERVER_EXTRA_CONNECTIONS)]
        command += ["--backlog", "4096"]
        # Every client comes from a few loopback addresses: no per-address limit (its default,
        # 256, would refuse the most of them).
        command += ["--max-per-address", "0"]
        server = Server(command)
        port = server.wait_listening()
        idle = server.reading()
        load = asyncio.run(run_load(server, port, args, sources))
        exit_code = server.stop(signal.SIGINT)
    except (SetupError, ServerStartError) as exc:
        print(f"c10k: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.kill()
    report = build_report(args, server, idle, load, exit_code, limits, sources)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, sys.stdout)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
