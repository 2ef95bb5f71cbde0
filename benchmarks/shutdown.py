"""Shutdown under load, repeated: does SIGTERM lose a byte the server had received?

Each run starts a server (``server_process.py``: ``python -m tcpecho serve``, raw framing,
``-q``, ``--drain-timeout``), opens ``--clients`` connections to it (100), and drives them
from one thread of this process with a selector:

  stream  sends without end (32 KiB at a time) and reads every echo as it comes;
  idle    (``--idle``, 10) streams like the others for the first half of the load, then sends
          nothing more and only reads;
  deaf    (``--deaf``, 10) sends without end and reads nothing before the signal, so that its
          replies fill the server's send buffer and its own data waits, acknowledged and
          unread, in the server's receive buffer.

After ``--load`` seconds (1) every client stops sending, the acknowledged bytes are read on
each client (see below), and the server gets SIGTERM. Every other run first freezes the
server for ``--stall`` seconds (SIGSTOP, then SIGCONT right after the SIGTERM), while the
clients keep sending, so that its kernel holds data it has acknowledged and not read: the
case the issue found the asyncio engine losing. After the signal every client reads, the deaf
ones too (a client that never reads cannot be sent its echo, so no server could pass the test
with it); the stream and deaf clients go back to sending, as a client that has not heard of
the stop would, until they read the end of the stream or a send fails. Each client reads
until the end of its stream (or a reset), and the run ends when every client has and the
server has exited, or at ``--drain-timeout`` + 5 s. A thread meanwhile connects to the port
every 2 ms until a connect is refused.

**When to read "acknowledged".** The issue's claim is about bytes "received before the
signal", meaning acknowledged by the server's kernel. A client sees that as bytes sent less
its socket's unacknowledged queue (SIOCOUTQ, `tcpecho.net.unsent_bytes`). The count grows on
its own while anything is unacknowledged: bytes in flight are acknowledged within
microseconds on loopback, and bytes held back by a full receive window as soon as the server
reads. So it must be read with the senders stopped, and its place beside the signal decides
what it means:

- Read only after the signal, it counts bytes the server's kernel took after the signal
  (those the server's last reads let in): the server may rightly never echo them, so they
  would be counted as lost wrongly. Too high.
- Read with the senders still running, before the signal, it misses what they send next and
  is acknowledged before the signal. Too low.
- So: stop every sender, read each client's count (``acked_before``), send SIGTERM, and read
  it again at once (``acked_after``). What the kernel had acknowledged at the signal lies
  between the two. Lost, here, is what a client received short of ``acked_before``: a sure
  loss, never a false one. Bytes between ``acked_before`` and ``acked_after`` that did not
  come back are reported apart ("around the signal"); their number is 0 whenever the two
  readings agree, which they do in the stalled runs (a stopped server reads nothing, so its
  window cannot open between the readings).

A client's received bytes must also be an exact prefix of what it sent (each client sends
its own 64 KiB random block, repeated), checked as they arrive.

Per run it measures: bytes lost, the time from SIGTERM until a new connect is refused (goal:
at most 100 ms; the poller's resolution is a few ms, it shares the interpreter with the
clients), the server's exit code (goal: 0) and the time from SIGTERM to its exit (goal: at
most the drain timeout + 1 s). It prints a table per engine and exits 1 when a goal was
missed in any run, 2 when it cannot run. For a run that lost bytes it prints the server's log
lines about the clients that lost them.

Linux only (SIOCOUTQ, pidfd, /proc). Run it from the repository, no install needed; the
server runs under this interpreter, so run it with the one that has uvloop to use uvloop:

    .venv/bin/python benchmarks/shutdown.py --runs 50
    .venv/bin/python benchmarks/shutdown.py --runs 20 --engines asyncio --loop asyncio
    .venv/bin/python benchmarks/shutdown.py --runs 5 --engines threads --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import monotonic
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from server_process import HOST, ServerProcess, ServerStartError

from tcpecho.config import DEFAULT_DRAIN_TIMEOUT, ENGINES, LOOPS
from tcpecho.net import unsent_bytes

# The goals.
REFUSE_GOAL = 0.100  # seconds from SIGTERM until a new connect is refused
EXIT_MARGIN = 1.0  # the process exits within the drain timeout + this
# What each client sends: its own random block, repeated. Two periods are kept so that any
# slice of one period's length, at any offset, is one contiguous slice.
BLOCK = 64 * 1024
SEND_SIZE = 32 * 1024
RECV_SIZE = BLOCK  # at most one period, so a read is checked with one comparison
# After the signal: how often the poller tries a connect, and for how long before it gives up.
POLL_EVERY = 0.002
REFUSE_LIMIT = 3.0
CONNECT_TIMEOUT = 10.0
# After the signal, a run ends at the drain timeout + this, whatever is left.
RUN_GRACE = 5.0
SELECT_TIMEOUT = 0.05
MB = 1_000_000


class SetupError(Exception):
    """The benchmark cannot run here; the message says why."""


def describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@dataclass
class Client:
    """One connection and what it sent and received. ``pattern``: two periods of its block."""

    number: int
    kind: str  # "stream", "idle" or "deaf"
    sock: socket.socket
    pattern: memoryview
    peer: str
    sending: bool = True
    reading: bool = True
    sent: int = 0
    received: int = 0
    mismatch_at: int | None = None  # the offset of the first byte echoed wrong
    ended: str | None = None  # "end of stream", or the error that ended the reads
    send_error: str | None = None
    acked_before: int = 0
    acked_after: int = 0
    events: int = 0  # what the selector watches now

    def send(self) -> None:
        offset = self.sent % BLOCK
        try:
            self.sent += self.sock.send(self.pattern[offset : offset + SEND_SIZE])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self.sending = False
            self.send_error = describe(exc)

    def receive(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.end(describe(exc))
            return
        if not data:
            self.end("end of stream")
            return
        offset = self.received % BLOCK
        if self.mismatch_at is None and data != self.pattern[offset : offset + len(data)]:
            self.mismatch_at = self.received
        self.received += len(data)

    def end(self, how: str) -> None:
        self.ended = how
        self.reading = self.sending = False

    def acknowledged(self) -> int:
        """Bytes sent that the server's kernel has acknowledged (sent less SIOCOUTQ)."""
        if self.ended:
            return 0  # closed: it cannot tell (a client that ended early is a failure anyway)
        return self.sent - unsent_bytes(self.sock.fileno())

    @property
    def lost(self) -> int:
        """Acknowledged before the signal, surely, and never echoed."""
        return max(0, self.acked_before - self.received)

    @property
    def around_signal(self) -> int:
        """Acknowledged between the two readings around the signal, never echoed."""
        return max(0, self.acked_after - max(self.acked_before, self.received))


class Load:
    """Every client of a run, in one selector; the server's exit is watched by its pidfd."""

    def __init__(self, clients: list[Client], pid: int) -> None:
        self.clients = clients
        self.selector = selectors.DefaultSelector()
        for client in clients:
            client.sock.setblocking(False)
            client.events = selectors.EVENT_READ | selectors.EVENT_WRITE
            self.selector.register(client.sock, client.events, client)
        self.pidfd = os.pidfd_open(pid)
        self.selector.register(self.pidfd, selectors.EVENT_READ, None)
        self.exited_at: float | None = None

    def close(self) -> None:
        self.selector.close()
        os.close(self.pidfd)
        for client in self.clients:
            client.sock.close()

    def sync(self, client: Client) -> None:
        """Watch what the client wants to do now (nothing, once it has ended)."""
        wanted = (selectors.EVENT_READ if client.reading else 0) | (
            selectors.EVENT_WRITE if client.sending else 0
        )
        if wanted == client.events:
            return
        if client.ended and client.events:
            # Ended: close, as a client does once it has read the end of the stream (a
            # server lingering for the client's end would otherwise wait its linger timeout).
            self.selector.unregister(client.sock)
            client.sock.close()
            client.events = 0
            return
        if client.events and wanted:
            self.selector.modify(client.sock, wanted, client)
        elif wanted:
            self.selector.register(client.sock, wanted, client)
        else:
            self.selector.unregister(client.sock)
        client.events = wanted

    def pump(self, until: float, *, to_the_end: bool = False) -> None:
        """Send and read until ``until`` (monotonic); with ``to_the_end``, return earlier
        once every client has ended and the server has exited."""
        while (left := until - monotonic()) > 0:
            for key, mask in self.selector.select(min(left, SELECT_TIMEOUT)):
                client = key.data
                if client is None:
                    self.exited_at = monotonic()
                    self.selector.unregister(self.pidfd)
                    continue
                if mask & selectors.EVENT_READ:
                    client.receive()
                if mask & selectors.EVENT_WRITE and client.sending:
                    client.send()
                self.sync(client)
            if to_the_end and self.exited_at is not None and all(c.ended for c in self.clients):
                return

    def set_all(self, *, sending: bool | None = None, reading: bool | None = None) -> None:
        for client in self.clients:
            if client.ended:
                continue
            if sending is not None:
                client.sending = sending
            if reading is not None:
                client.reading = reading
            self.sync(client)


# --- one run ------------------------------------------------------------------------------


@dataclass
class Run:
    number: int
    engine: str
    stalled: bool
    acked: int = 0
    acked_window: int = 0  # acknowledged between the readings before and after the signal
    lost: int = 0
    around_signal: int = 0
    corrupted_clients: int = 0
    unfinished_clients: int = 0
    ended_early: int = 0  # clients whose stream ended before the signal
    refused_after: float | None = None
    exit_code: int | None = None
    exited_after: float | None = None
    losers: list[dict[str, Any]] = field(default_factory=list)
    log_excerpt: list[str] = field(default_factory=list)
    stopped_line: str = ""

    def failures(self, drain_timeout: float) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{self.lost:,} bytes lost")
        if self.corrupted_clients:
            found.append(f"{self.corrupted_clients} clients echoed wrong")
        if self.refused_after is None or self.refused_after > REFUSE_GOAL:
            found.append(f"refused after {seconds(self.refused_after)}")
        if self.exit_code != 0:
            found.append(f"exit {self.exit_code}")
        if self.exited_after is None or self.exited_after > drain_timeout + EXIT_MARGIN:
            found.append(f"exited after {seconds(self.exited_after)}")
        if self.ended_early:
            found.append(f"{self.ended_early} clients' streams ended before the signal")
        if self.unfinished_clients:
            found.append(f"{self.unfinished_clients} clients never saw their stream end")
        return found


def server_arguments(args: argparse.Namespace, engine: str) -> list[str]:
    command = ["--engine", engine, "--framing", "raw", "-q"]
    if engine == "asyncio":
        command += ["--loop", args.loop]
    return [*command, "--drain-timeout", f"{args.drain_timeout:g}"]


def make_clients(args: argparse.Namespace, port: int, rng: random.Random) -> list[Client]:
    kinds = ["deaf"] * args.deaf + ["idle"] * args.idle
    kinds = ["stream"] * (args.clients - len(kinds)) + kinds
    clients: list[Client] = []
    try:
        for number, kind in enumerate(kinds):
            sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT)
            block = rng.randbytes(BLOCK)
            peer = "{}:{}".format(*sock.getsockname()[:2])
            clients.append(Client(number, kind, sock, memoryview(block * 2), peer))
    except BaseException:
        for client in clients:
            client.sock.close()
        raise
    return clients


def time_to_refusal(port: int, signalled: float, result: list[float | None]) -> None:
    """Connect to ``port`` every POLL_EVERY seconds until a connect is refused; append the
    time that took from ``signalled`` (None: still accepted after REFUSE_LIMIT)."""
    while monotonic() < signalled + REFUSE_LIMIT:
        try:
            probe = socket.create_connection((HOST, port), timeout=REFUSE_LIMIT)
        except ConnectionRefusedError:
            result.append(monotonic() - signalled)
            return
        except OSError:
            pass
        else:
            probe.close()
        time.sleep(POLL_EVERY)
    result.append(None)


def one_run(args: argparse.Namespace, engine: str, number: int, rng: random.Random) -> Run:
    stalled = args.stall > 0 and number % 2 == 0
    with ServerProcess(server_arguments(args, engine), name=f"{engine} run {number}") as server:
        port = server.wait_listening()
        load = Load(make_clients(args, port, rng), server.pid)
        try:
            start = monotonic()
            load.pump(start + args.load / 2)
            for client in load.clients:
                if client.kind == "idle":
                    client.sending = False
                    load.sync(client)
                elif client.kind == "deaf":
                    client.reading = False
                    load.sync(client)
            load.pump(start + args.load)
            if stalled:
                server.send_signal(signal.SIGSTOP)
                load.pump(monotonic() + args.stall)
            # Stop every sender, read what the server's kernel acknowledged, signal, read again.
            ended_early = sum(client.ended is not None for client in load.clients)
            for client in load.clients:
                client.acked_before = client.acknowledged()
            server.send_signal(signal.SIGTERM)
            signalled = monotonic()
            for client in load.clients:
                client.acked_after = client.acknowledged()
            if stalled:
                server.send_signal(signal.SIGCONT)
            refusals: list[float | None] = []
            poller = threading.Thread(
                target=time_to_refusal, args=(port, signalled, refusals), name="refusal-poller"
            )
            poller.start()
            for client in load.clients:
                if client.kind != "idle":
                    client.sending = True  # the deaf and the streaming: as if nothing happened
            load.set_all(reading=True)
            load.pump(signalled + args.drain_timeout + RUN_GRACE, to_the_end=True)
            poller.join()
            exit_code = server.wait(
                max(0.0, signalled + args.drain_timeout + RUN_GRACE - monotonic())
            )
            exited_at = load.exited_at if load.exited_at is not None else monotonic()
            run = Run(number, server.engine, stalled, ended_early=ended_early)
            run.refused_after = refusals[0] if refusals else None
            run.exit_code = exit_code
            run.exited_after = exited_at - signalled if exit_code is not None else None
            run.stopped_line = server.stopped_line
            tally(run, load.clients, server.log())
        finally:
            load.close()
    return run


def tally(run: Run, clients: list[Client], log: list[str]) -> None:
    for client in clients:
        run.acked += client.acked_before
        run.acked_window += max(0, client.acked_after - client.acked_before)
        run.lost += client.lost
        run.around_signal += client.around_signal
        run.corrupted_clients += client.mismatch_at is not None
        run.unfinished_clients += client.ended is None
        if client.lost or client.around_signal or client.mismatch_at is not None:
            run.losers.append(
                {
                    "client": client.number,
                    "kind": client.kind,
                    "peer": client.peer,
                    "sent": client.sent,
                    "acked_before": client.acked_before,
                    "acked_after": client.acked_after,
                    "received": client.received,
                    "lost": client.lost,
                    "around_signal": client.around_signal,
                    "mismatch_at": client.mismatch_at,
                    "ended": client.ended,
                    "send_error": client.send_error,
                }
            )
            run.log_excerpt += [line for line in log if f" {client.peer} " in f"{line} "]
    if run.losers:
        run.log_excerpt += [line for line in log if line.startswith("[SERVER STOP")]


# --- the report ---------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value * 1000:.0f} ms"


def summary(runs: list[Run], drain_timeout: float) -> dict[str, Any]:
    refused = [r.refused_after for r in runs if r.refused_after is not None]
    running = [r.refused_after for r in runs if r.refused_after is not None and not r.stalled]
    stalled = [r.refused_after for r in runs if r.refused_after is not None and r.stalled]
    exited = [r.exited_after for r in runs if r.exited_after is not None]
    failed = {r.number: r.failures(drain_timeout) for r in runs if r.failures(drain_timeout)}
    return {
        "engine": runs[0].engine,
        "runs": len(runs),
        "stalled_runs": sum(r.stalled for r in runs),
        "bytes_acked_at_signal": sum(r.acked for r in runs),
        "bytes_lost": sum(r.lost for r in runs),
        "runs_losing": sum(bool(r.lost) for r in runs),
        "bytes_acked_between_readings": sum(r.acked_window for r in runs),
        "bytes_around_signal_not_echoed": sum(r.around_signal for r in runs),
        "clients_echoed_wrong": sum(r.corrupted_clients for r in runs),
        "refused_ms_median": round(statistics.median(refused) * 1000, 1) if refused else None,
        "refused_ms_max": round(max(refused) * 1000, 1) if refused else None,
        "refused_ms_max_running": round(max(running) * 1000, 1) if running else None,
        "refused_ms_max_stalled": round(max(stalled) * 1000, 1) if stalled else None,
        "never_refused": len(runs) - len(refused),
        "exit_s_median": round(statistics.median(exited), 3) if exited else None,
        "exit_s_max": round(max(exited), 3) if exited else None,
        "non_zero_exits": sum(r.exit_code != 0 for r in runs),
        "failed_runs": failed,
    }


def print_table(summaries: list[dict[str, Any]], out: TextIO) -> None:
    header = (
        "| engine | runs (stalled) | MB acked at signal | bytes lost (runs) | around the signal: "
        "lost of acked "
        "| refused: median / max (running, stalled) | exit: median / max | non-zero exits "
        "| echoed wrong |"
    )
    print(header, file=out)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", file=out)
    for s in summaries:
        never = f" (never: {s['never_refused']})" if s["never_refused"] else ""
        print(
            f"| {s['engine']} | {s['runs']} ({s['stalled_runs']}) "
            f"| {s['bytes_acked_at_signal'] / MB:,.0f} "
            f"| {s['bytes_lost']:,} ({s['runs_losing']}) "
            f"| {s['bytes_around_signal_not_echoed']:,} of {s['bytes_acked_between_readings']:,} "
            f"| {s['refused_ms_median']} / {s['refused_ms_max']} ms "
            f"({s['refused_ms_max_running']}, {s['refused_ms_max_stalled']}){never} "
            f"| {s['exit_s_median']} / {s['exit_s_max']} s "
            f"| {s['non_zero_exits']} | {s['clients_echoed_wrong']} |",
            file=out,
        )


def print_failures(runs: list[Run], drain_timeout: float, out: TextIO) -> None:
    for run in runs:
        failures = run.failures(drain_timeout)
        if not failures and not run.around_signal:
            continue
        stall = ", stalled" if run.stalled else ""
        what = "; ".join(failures) or f"{run.around_signal:,} bytes around the signal"
        print(f"{run.engine}, run {run.number}{stall}: {what}", file=out)
        for loser in run.losers[:10]:
            print(f"    {loser}", file=out)
        for line in run.log_excerpt[:40]:
            print(f"      {line}", file=out)
        if run.stopped_line:
            print(f"    {run.stopped_line}", file=out)


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="SIGTERM a tcpecho server under load, many times, and count the bytes "
        "it had received and did not echo.",
        allow_abbrev=False,
    )
    parser.add_argument("--runs", type=int, default=50, help="per engine (%(default)s)")
    parser.add_argument(
        "--engines", default="threads,asyncio", help="comma-separated (%(default)s)"
    )
    parser.add_argument(
        "--loop", choices=LOOPS, default="auto", help="asyncio engine only (%(default)s)"
    )
    parser.add_argument("--clients", type=int, default=100, help="(%(default)s)")
    parser.add_argument("--idle", type=int, default=10, help="of the clients (%(default)s)")
    parser.add_argument("--deaf", type=int, default=10, help="of the clients (%(default)s)")
    parser.add_argument(
        "--load", type=float, default=1.0, metavar="SECONDS", help="before the signal (%(default)s)"
    )
    parser.add_argument(
        "--stall",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="every other run, the server is frozen this long before the signal; 0: never "
        "(%(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="the server's (%(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="(%(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or any(e not in ENGINES for e in args.engines):
        parser.error(f"--engines: a comma-separated list of {', '.join(ENGINES)}")
    if args.runs < 1 or args.idle < 0 or args.deaf < 0 or args.idle + args.deaf > args.clients:
        parser.error("--runs must be ≥ 1, and --idle + --deaf at most --clients")
    if args.load <= 0 or args.stall < 0 or args.drain_timeout < 0:
        parser.error("--load must be more than 0, --stall and --drain-timeout at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, list[Run]] = {}
    try:
        for engine in args.engines:
            runs = results.setdefault(engine, [])
            for number in range(1, args.runs + 1):
                run = one_run(args, engine, number, rng)
                runs.append(run)
                if not args.json:
                    failures = run.failures(args.drain_timeout)
                    print(
                        f"… {run.engine} run {number}/{args.runs}"
                        f"{' (stalled)' if run.stalled else ''}: acked {run.acked / MB:.0f} MB, "
                        f"lost {run.lost:,}, refused after {seconds(run.refused_after)}, "
                        f"exit {run.exit_code} after {seconds(run.exited_after)}"
                        + (f" — FAIL: {'; '.join(failures)}" if failures else ""),
                        file=sys.stderr,
                        flush=True,
                    )
    except (SetupError, ServerStartError) as exc:
        print(f"shutdown: {exc}", file=sys.stderr)
        return 2
    summaries = [summary(runs, args.drain_timeout) for runs in results.values()]
    ok = not any(s["failed_runs"] for s in summaries)
    if args.json:
        report = {
            "ok": ok,
            "date": date,
            "command": " ".join(["python", *sys.argv]),
            "options": {k: v for k, v in vars(args).items() if k != "json"},
            "summaries": summaries,
            "runs": {engine: [vars(run) for run in runs] for engine, runs in results.items()},
        }
        print(json.dumps(report))
    else:
        print(
            f"shutdown under load: {args.clients} clients ({args.idle} idle, {args.deaf} deaf), "
            f"{args.load:g} s of load, drain timeout {args.drain_timeout:g} s, {date}"
        )
        print_table(summaries, sys.stdout)
        print_failures(
            [run for runs in results.values() for run in runs], args.drain_timeout, sys.stdout
        )
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
