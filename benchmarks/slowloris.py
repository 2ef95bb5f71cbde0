"""Slowloris beside a well-behaved client: what do 500 half-sent lines cost everyone else?

For each engine it starts a server in line framing (``server_process.py``: ``python -m
tcpecho serve --framing line -q``, ``--max-connections`` raised above the slowloris clients,
``--max-per-address 0`` since every client comes from 127.0.0.1, and ``--line-timeout`` left
at its default of 30 s unless the run is longer, so that the slowloris clients stay connected
while the latency is measured). Then, in one run:

1. without: one well-behaved client does echo round trips for ``--seconds`` seconds, one
   64-byte line at a time (``--line-size``), each echo checked byte for byte;
2. with: a child process opens ``--slowloris`` connections (500), sends each one byte, then
   one byte a second on each (spread evenly over the second), never a newline; once they are
   all connected, the same well-behaved client does the same for the same time.

It reports the well-behaved client's round trips and their latency (p50, p99, max) in both
phases side by side, how many slowloris connections were open through the second phase (a
connection the server closed or answered is counted), and the server's open descriptors
during it. The goal of issue 10: 500 slowloris clients do not raise the well-behaved client's
p99 above 100 ms. It exits 1 when an echo was wrong, a slowloris connection failed or was
closed during the measurement, or the server did not stop cleanly; 2 when it cannot run.

The measuring client runs in this process alone; the slowloris clients in a child process, so
that the measuring process does the same work in both phases. Both processes need a
descriptor per connection: the script raises its RLIMIT_NOFILE soft limit to the hard limit,
and the server and the child inherit it. Linux only (/proc). Run it from the repository, no
install needed, with the interpreter that has uvloop to serve on uvloop:

    .venv/bin/python benchmarks/slowloris.py --seconds 10
    .venv/bin/python benchmarks/slowloris.py --engines asyncio --loop asyncio --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import resource
import selectors
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from time import monotonic, perf_counter_ns
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from server_process import HOST, ServerProcess, ServerStartError

from tcpecho.config import ENGINES, LOOPS
from tcpecho.protocol.session import DEFAULT_LINE_TIMEOUT

P99_GOAL_MS = 100.0  # issue 10: the well-behaved client's p99 with 500 slowloris clients
# Descriptors either process needs besides one per connection: std streams, pipes, the
# listener, the selector, imported modules' files.
FD_MARGIN = 256
# The server admits this many more than the slowloris clients: the well-behaved client, and
# room to spare.
EXTRA_CONNECTIONS = 100
# Slowloris lines must still be open when the run ends: the server's line timeout must exceed
# the time from their first byte to the end of the second phase, with this to spare.
LINE_TIMEOUT_MARGIN = 20.0
DRIP_INTERVAL = 1.0  # each slowloris connection sends one byte this often
CONNECT_TIMEOUT = 10.0
ECHO_TIMEOUT = 10.0  # a round trip slower than this fails the run
READY_TIMEOUT = 60.0  # for the child to connect every slowloris client
STOP_TIMEOUT = 30.0
# How long the server may take to accept every slowloris connection, and how often to look.
HOLD_TIMEOUT = 30.0
HOLD_POLL = 0.05
NS_PER_MS = 1_000_000


class SetupError(Exception):
    """The benchmark cannot run here; the message says why."""


class EchoMismatch(Exception):
    """The well-behaved client's echo came back wrong."""


# --- the slowloris child ------------------------------------------------------------------


def slowloris(port: int, count: int, conn: Connection) -> None:
    """In the child: open ``count`` connections, send each a byte, tell the parent ("ready"),
    then drip a byte a second on each until the parent sends anything; then report and close.

    A connection the server answers or closes is noted and dropped from the drip."""
    socks: list[socket.socket] = []
    errors: dict[str, int] = {}
    selector = selectors.DefaultSelector()
    answered = 0
    sent = 0
    try:
        for _ in range(count):
            try:
                sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT)
                sock.sendall(b"x")
                sent += 1
            except OSError as exc:
                why = exc.strerror or type(exc).__name__
                errors[why] = errors.get(why, 0) + 1
                continue
            sock.setblocking(False)
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ)
        conn.send({"connected": len(socks), "errors": errors})
        live = {sock.fileno(): sock for sock in socks}
        step = DRIP_INTERVAL / max(1, len(socks))
        next_send = monotonic()
        index = 0
        while not conn.poll():
            for key, _ in selector.select(max(0.0, next_send - monotonic())):
                # The server sent something (an error line) or closed: slowloris is over here.
                answered += 1
                selector.unregister(key.fileobj)
                live.pop(key.fd, None)
            if monotonic() < next_send or not socks:
                continue
            sock = socks[index % len(socks)]
            index += 1
            next_send += step
            if sock.fileno() in live:
                try:
                    sock.send(b"x")
                    sent += 1
                except OSError as exc:
                    why = exc.strerror or type(exc).__name__
                    errors[why] = errors.get(why, 0) + 1
                    live.pop(sock.fileno(), None)
        conn.send(
            {"open_at_end": len(live), "answered": answered, "bytes_sent": sent, "errors": errors}
        )
    finally:
        selector.close()
        for sock in socks:
            sock.close()
        conn.close()


# --- the well-behaved client --------------------------------------------------------------


def round_trips(port: int, seconds: float, line_size: int) -> list[int]:
    """Echo round trips of one line for ``seconds`` seconds, one at a time; each one's
    latency in ns. Raises EchoMismatch if an echo is wrong, OSError if the connection fails."""
    latencies: list[int] = []
    with socket.create_connection((HOST, port), timeout=ECHO_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = monotonic() + seconds
        number = 0
        while monotonic() < deadline:
            head = b"%d " % number
            line = head + b"w" * (line_size - len(head) - 1) + b"\n"
            start = perf_counter_ns()
            sock.sendall(line)
            reply = b""
            while len(reply) < len(line):
                data = sock.recv(len(line) - len(reply))
                if not data:
                    raise EchoMismatch(f"closed by the server after {len(reply)} bytes")
                reply += data
            latencies.append(perf_counter_ns() - start)
            if reply != line:
                raise EchoMismatch(f"sent {line[:20]!r}…, got {reply[:20]!r}…")
            number += 1
    return latencies


def percentiles(latencies: list[int]) -> dict[str, float | int]:
    ordered = sorted(latencies)

    def at(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] / NS_PER_MS, 3)

    return {
        "round_trips": len(ordered),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] / NS_PER_MS, 3),
    }


# --- one engine ---------------------------------------------------------------------------


def server_arguments(args: argparse.Namespace, engine: str) -> list[str]:
    command = ["--engine", engine, "--framing", "line", "-q"]
    if engine == "asyncio":
        command += ["--loop", args.loop]
    command += ["--max-connections", str(args.slowloris + EXTRA_CONNECTIONS)]
    command += ["--max-per-address", "0"]
    if args.line_timeout != DEFAULT_LINE_TIMEOUT:
        command += ["--line-timeout", f"{args.line_timeout:g}"]
    return command


def measure(args: argparse.Namespace, engine: str) -> dict[str, Any]:
    with ServerProcess(server_arguments(args, engine), name=engine) as server:
        port = server.wait_listening()
        result: dict[str, Any] = {"engine": server.engine, "command": server.command}
        status = server.status()
        result["server_fds_idle"] = status.fds if status else None
        result["without"] = percentiles(round_trips(port, args.seconds, args.line_size))
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(
            target=slowloris, args=(port, args.slowloris, theirs), name="slowloris"
        )
        child.start()
        theirs.close()
        try:
            if not ours.poll(READY_TIMEOUT):
                raise SetupError(f"the slowloris clients did not connect in {READY_TIMEOUT:g} s")
            ready = ours.recv()
            result["slowloris_connected"] = ready["connected"]
            result["slowloris_connect_errors"] = ready["errors"]
            held = wait_held(server, result["server_fds_idle"] + ready["connected"])
            result["server_fds_with_slowloris"] = held
            result["with"] = percentiles(round_trips(port, args.seconds, args.line_size))
            ours.send("stop")
            if not ours.poll(STOP_TIMEOUT):
                raise SetupError("the slowloris child did not report")
            done = ours.recv()
        finally:
            ours.close()
            child.join(STOP_TIMEOUT)
            if child.is_alive():
                child.kill()
                child.join()
        result["slowloris_open_at_end"] = done["open_at_end"]
        result["slowloris_answered"] = done["answered"]
        result["slowloris_bytes_sent"] = done["bytes_sent"]
        result["slowloris_errors"] = done["errors"]
        result["exit_code"] = server.stop(signal.SIGTERM)
        result["stopped_line"] = server.stopped_line
        result["stderr_tail"] = list(server.stderr_tail)
    result["failures"] = failures_of(args, result)
    return result


def wait_held(server: ServerProcess, fds: int | None) -> int | None:
    """Once the child has connected: wait until the server has accepted every connection
    (its open descriptors reach ``fds``) or HOLD_TIMEOUT, and return its descriptors. The
    kernel completes a connect before the server accepts it; measuring before the server
    holds them all would measure the accepting."""
    deadline = monotonic() + HOLD_TIMEOUT
    while True:
        status = server.status()
        if status is None or fds is None or status.fds >= fds or monotonic() > deadline:
            return status.fds if status else None
        time.sleep(HOLD_POLL)


def failures_of(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    found = []
    if result["slowloris_connected"] < args.slowloris:
        found.append(f"only {result['slowloris_connected']} slowloris clients connected")
    if result["slowloris_open_at_end"] < result["slowloris_connected"]:
        closed = result["slowloris_connected"] - result["slowloris_open_at_end"]
        found.append(f"{closed} slowloris connections closed or answered during the run")
    expected_fds = (result["server_fds_idle"] or 0) + result["slowloris_connected"]
    if (result["server_fds_with_slowloris"] or 0) < expected_fds:
        found.append(
            f"the server held {result['server_fds_with_slowloris']} descriptors, "
            f"not {expected_fds}, when the measurement began"
        )
    if result["exit_code"] != 0:
        found.append(f"the server exited {result['exit_code']} after SIGTERM")
    return found


# --- the report ---------------------------------------------------------------------------


def print_report(report: dict[str, Any], out: TextIO) -> None:
    options = report["options"]
    print(
        f"slowloris: {options['slowloris']} clients, one byte a second each, beside one client "
        f"doing {options['line_size']}-byte line round trips for {options['seconds']:g} s per "
        f"phase; {report['date']}",
        file=out,
    )
    print(
        "| engine | round trips without / with | p50 ms without / with "
        "| p99 ms without / with | max ms without / with | slowloris open at end "
        "| server fds idle / with |",
        file=out,
    )
    print("|---|---:|---:|---:|---:|---:|---:|", file=out)
    for r in report["engines"]:
        if "error" in r:
            print(f"| {r['engine']} | {r['error']} | | | | | |", file=out)
            continue
        a, b = r["without"], r["with"]
        print(
            f"| {r['engine']} | {a['round_trips']:,} / {b['round_trips']:,} "
            f"| {a['p50_ms']} / {b['p50_ms']} | {a['p99_ms']} / {b['p99_ms']} "
            f"| {a['max_ms']} / {b['max_ms']} "
            f"| {r['slowloris_open_at_end']} of {r['slowloris_connected']} "
            f"| {r['server_fds_idle']} / {r['server_fds_with_slowloris']} |",
            file=out,
        )
    for r in report["engines"]:
        goal = "met" if r.get("with", {}).get("p99_ms", 1e9) <= P99_GOAL_MS else "NOT met"
        print(f"{r['engine']}: p99 ≤ {P99_GOAL_MS:g} ms with slowloris: {goal}", file=out)
        for failure in r.get("failures", []):
            print(f"    FAIL: {failure}", file=out)
        if r.get("stopped_line"):
            print(f"    exit {r['exit_code']}; {r['stopped_line']}", file=out)
    print("PASS" if report["ok"] else "FAIL", file=out)


# --- main ---------------------------------------------------------------------------------


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SetupError(
            f"the hard limit on open files (RLIMIT_NOFILE) is {hard}; this run needs {needed} "
            "per process. Raise it or pass fewer --slowloris."
        )
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure a well-behaved client's echo latency without and with slowloris "
        "clients, on each engine.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--engines", default="threads,asyncio", help="comma-separated (%(default)s)"
    )
    parser.add_argument(
        "--loop", choices=LOOPS, default="auto", help="asyncio engine only (%(default)s)"
    )
    parser.add_argument("--slowloris", type=int, default=500, metavar="N", help="(%(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="of round trips per phase (%(default)s)"
    )
    parser.add_argument("--line-size", type=int, default=64, metavar="BYTES", help="(%(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or any(e not in ENGINES for e in args.engines):
        parser.error(f"--engines: a comma-separated list of {', '.join(ENGINES)}")
    if args.slowloris < 1 or args.seconds <= 0 or args.line_size < 16:
        parser.error("--slowloris ≥ 1, --seconds > 0, --line-size ≥ 16")
    # The slowloris lines start just before the second phase and must outlive it.
    args.line_timeout = max(DEFAULT_LINE_TIMEOUT, args.seconds + LINE_TIMEOUT_MARGIN)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        limits = raise_nofile(args.slowloris + EXTRA_CONNECTIONS + FD_MARGIN)
        results = []
        for engine in args.engines:
            if not args.json:
                print(f"… {engine}: {args.seconds:g} s without, then with", file=sys.stderr)
            try:
                results.append(measure(args, engine))
            except (EchoMismatch, OSError) as exc:
                results.append({"engine": engine, "error": f"{type(exc).__name__}: {exc}"})
    except (SetupError, ServerStartError) as exc:
        print(f"slowloris: {exc}", file=sys.stderr)
        return 2
    ok = all("error" not in r and not r["failures"] for r in results)
    report = {
        "ok": ok,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "rlimit_nofile": list(limits),
        "engines": results,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
