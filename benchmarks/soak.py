"""Soak: N minutes of well-behaved and hostile clients against tcpecho, checking every byte.

It starts two servers as child processes (``server_process.py``: ``python -m tcpecho
serve``), on the same engine (127.0.0.1, ports the OS picks, ``-q``): one in raw framing and
one in line framing, both with short timeouts so that the hostile clients meet them many
times in a run (``--idle-timeout 5 --write-timeout 2``, line server ``--line-timeout 3``;
``--max-per-address 64``). Then, for ``--minutes`` minutes, one asyncio client process runs
a steady mix against them, each kind from its own source address so that the servers' own
logs can be split by kind:

well-behaved (127.0.0.1), every byte checked, in order:
  echo          raw server: 1-20 messages of 1 B-256 KiB (sent while the reply is read),
                then a half-close; a fifth send their last message with the half-close
  line-echo     line server: bursts of lines (up to 64 KiB, ``\\n`` or ``\\r\\n``), sent in
                random pieces; half the connections end with an unterminated line

hostile (127.0.0.2), each with the outcome the server promises:
  scanner       connect and close at once, or reset at once, or send a probe and reset
  resetter      send 1 MiB and close with SO_LINGER 0 (a reset) partway through the reply
  slow-reader   8 KiB receive buffer, reads 4 KiB every 10 ms: slow, but must be served
  trickle       sends without end, reads 512 B every 100 ms: cut off by --write-timeout
  never-reader  sends without end, never reads: cut off by --write-timeout
  idle          one echo, then silence: closed by --idle-timeout, with no reply
  slowloris     line server: one byte every 0.5 s, no newline: the line-timeout error
  line-never-reader  line server: sends lines without end, never reads: cut off
  oversized     line server: good lines, then 64 KiB+ without a newline: the lines, then
                the line-too-long error
flood (127.0.0.3): every 15 s, 80 connections at once: exactly 64 admitted (their echo
  checked), 16 refused with ``ERROR too many connections from your address``; then half
  are closed, half reset

It reports the bytes echoed and verified; the bytes lost (sent, never echoed) and corrupted
(echoed wrong); errors by kind, split into expected (hostile clients) and unexpected
(well-behaved clients); anomalies (a hostile client not treated as promised: a never-reader
not cut off, an idle client closed early or late, a flood admitted beyond the limit); how
long the timeouts took to act; each server's close reasons from its own log, by kind, and
whether its count of connections served matches the clients'; and each server's VmRSS, open
descriptors and threads at start (after ``--warmup`` seconds), at every minute and at the end
(under load), with the RSS drift in %, and once the clients have gone. It exits 1 when a byte
was lost or corrupted on a well-behaved client, a byte came back wrong on any client, or a
server died or did not stop cleanly on SIGINT; 2 when it cannot run (a server does not
start).

Linux only (/proc, 127.0.0.2 and .3). Run it from the repository, no install needed; the
servers run under this interpreter, so run it with the one that has uvloop to use uvloop:

    python3 benchmarks/soak.py --minutes 2 --engine threads
    .venv/bin/python benchmarks/soak.py --minutes 2 --engine asyncio --loop asyncio
    .venv/bin/python benchmarks/soak.py --minutes 10 --engine asyncio --loop uvloop --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import socket
import statistics
import struct
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import monotonic
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from server_process import HOST, ServerProcess, ServerStartError

from tcpecho.config import ENGINES, LOOPS
from tcpecho.protocol import CloseReason
from tcpecho.protocol.replies import line_too_long_reply
from tcpecho.protocol.session import TOO_MANY_FROM_ADDRESS_REPLY, line_timeout_reply

# Each kind of client connects from its own loopback address, so that the servers' own
# [DISCONNECTED] lines (which name the peer) can be counted by kind.
WELL_BEHAVED = "127.0.0.1"
HOSTILE = "127.0.0.2"
FLOOD = "127.0.0.3"
SOURCE_GROUPS = {WELL_BEHAVED: "well-behaved", HOSTILE: "hostile", FLOOD: "flood"}

# The servers' timeouts, short so that a run of minutes meets each of them many times.
IDLE_TIMEOUT = 5.0
WRITE_TIMEOUT = 2.0
LINE_TIMEOUT = 3.0
MAX_PER_ADDRESS = 64
MAX_LINE_LENGTH = 65536  # the server's default, which the line clients go up to
FLOOD_SIZE = 80  # connections per burst: MAX_PER_ADDRESS admitted, the rest refused
FLOOD_PAUSE = 15.0

# A well-behaved operation that sees no progress for this long has failed (timeout).
PROGRESS_TIMEOUT = 10.0
# How long a hostile client waits for the server to act before calling it an anomaly.
CUT_OFF_LIMIT = 30.0
# How far from the configured timeout a close may come and still count as on time: a little
# early for timer granularity, later for a busy 2-core machine.
EARLY_SLACK = 0.3
LATE_SLACK = 2.5
# After the run, how long clients may take to finish their connection before they are cut
# short, and how long the servers may take to release every descriptor.
END_GRACE = 30.0
RELEASE_TIMEOUT = 15.0

RECV_SIZE = 64 * 1024
PRIME = b"prime\n"
SEND_CHUNK = 64 * 1024
BLOCK_SIZE = 4 * 1024 * 1024  # random bytes that payloads are cut from, at random offsets
MAX_MESSAGE_LOG2 = 18  # echo messages: 1 B to 256 KiB, log-uniform
RESET_PAYLOAD = 1024 * 1024
SLOW_PAYLOAD = 1024 * 1024
SLOW_RCVBUF = 8 * 1024
SLOW_READ, SLOW_PAUSE = 4096, 0.01
TRICKLE_READ, TRICKLE_PAUSE = 512, 0.1
NEVER_RCVBUF = 4 * 1024
SLOWLORIS_DRIP = 0.5
# Between two connections of one hostile worker, and between two messages of a well-behaved
# one: the soak is about time, not throughput, and shares the machine with the servers.
HOSTILE_PAUSE = 0.2
SCANNER_PAUSE = 0.05
THINK_TIME = 0.02
# SO_LINGER on, zero seconds: close() sends a reset and drops what is queued.
LINGER_RESET = struct.pack("ii", 1, 0)
# Linux: bind() picks no port, connect() does, so TIME_WAIT ports can be reused per peer.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

TAG = re.compile(r"^\[(?P<tag>[^\]]+)\]")
STOPPED = re.compile(r"^\[SERVER STOPPED\] (?P<served>\d+) connections served")
DISCONNECTED = re.compile(r"^\[DISCONNECTED\] (?P<host>[^ ]+):\d+ (?P<rest>.*)$")
# Server log lines expected in a soak; every other line (and all of stderr) is reported.
ROUTINE_TAGS = frozenset(
    {
        "SERVER STARTING",
        "ENGINE",
        "NEW CONNECTION",
        "DISCONNECTED",
        "REFUSED",
        "SERVER STOPPING",
        "SERVER STOPPED",
    }
)
# Longest phrase first, so that no reason is taken for one that begins the same way.
REASONS = sorted(CloseReason, key=lambda reason: -len(reason.value))
KIB = 1024
MIB = 1024 * 1024


class SetupError(Exception):
    """The soak cannot run here; the message says why."""


class EchoError(Exception):
    """Echoed bytes that break the echo: ``kind`` names how, for the error counts."""

    kind = "echo error"


class Corrupted(EchoError):
    kind = "bytes echoed wrong"


class ClosedEarly(EchoError):
    kind = "closed by the server with replies owed"


class Anomaly(Exception):
    """A hostile client was not treated as the server promises. ``key`` is what is counted;
    ``detail`` an example for the report."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(key, detail)
        self.key = key
        self.detail = detail or key


# --- the servers --------------------------------------------------------------------------


class Server(ServerProcess):
    """A soak server: the shared child process, its log counted by tag and close reason as
    it comes (no line is kept: a soak's log is long)."""

    def __init__(self, name: str, args: list[str]) -> None:
        self.died_during_run: int | None = None
        self.reasons: Counter[tuple[str, str]] = Counter()  # (source group, reason)
        self.tags: Counter[str] = Counter()
        self.notable: deque[str] = deque(maxlen=20)
        self.notable_count = 0
        super().__init__(args, name=name, on_line=self._line, keep_lines=0)

    def _line(self, line: str) -> None:
        match = TAG.match(line)
        tag = match["tag"] if match else ""
        self.tags[tag] += 1
        if tag == "DISCONNECTED":
            self._disconnected(line)
        elif tag not in ROUTINE_TAGS:
            self.notable_count += 1
            self.notable.append(line)

    def _disconnected(self, line: str) -> None:
        match = DISCONNECTED.match(line)
        if match is None:
            self.notable_count += 1
            self.notable.append(line)
            return
        group = SOURCE_GROUPS.get(match["host"], match["host"])
        rest = match["rest"]
        reason = next((r.value for r in REASONS if rest.startswith(r.value)), rest[:40])
        self.reasons[group, reason] += 1

    def alive(self) -> bool:
        if self.running():
            return True
        if self.died_during_run is None:
            self.died_during_run = self.proc.returncode
        return False

    def reading(self) -> dict[str, int] | None:
        """VmRSS (KiB), threads and open descriptors; None once the server is gone."""
        status = self.status()
        return status.as_dict() if status is not None and self.alive() else None


def server_arguments(args: argparse.Namespace, framing: str) -> list[str]:
    command = ["-q", "--engine", args.engine]
    if args.engine == "asyncio":
        command += ["--loop", args.loop]
    command += ["--framing", framing, "--idle-timeout", f"{IDLE_TIMEOUT:g}"]
    command += ["--write-timeout", f"{WRITE_TIMEOUT:g}", "--max-per-address", str(MAX_PER_ADDRESS)]
    if framing == "line":
        command += ["--line-timeout", f"{LINE_TIMEOUT:g}"]
    return command


# --- what the clients saw -----------------------------------------------------------------


@dataclass
class Stats:
    """Counts by client kind, filled by every client of the run (one event loop: no lock)."""

    well_behaved: frozenset[str]
    connections: Counter[str] = field(default_factory=Counter)
    connected: Counter[str] = field(default_factory=Counter)  # server -> connects that succeeded
    refused: Counter[str] = field(default_factory=Counter)  # server -> refusals the flood saw
    verified: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    corrupted: Counter[str] = field(default_factory=Counter)
    expected_errors: Counter[str] = field(default_factory=Counter)
    unexpected_errors: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    anomalies: Counter[str] = field(default_factory=Counter)
    examples: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    timings: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def error(self, kind: str, exc: BaseException) -> None:
        what = f"{kind}: {describe(exc)}"
        if kind in self.well_behaved:
            self.unexpected_errors[what] += 1
            self.examples.append(f"{what} ({exc!r})")
        else:
            self.expected_errors[what] += 1

    def anomaly(self, kind: str, exc: Anomaly) -> None:
        self.anomalies[f"{kind}: {exc.key}"] += 1
        self.examples.append(f"{kind}: {exc.detail}")

    def outcome(self, kind: str, what: str) -> None:
        self.outcomes[f"{kind}: {what}"] += 1


# The words for the errors a client meets most, most specific first.
ERROR_WORDS: tuple[tuple[type[BaseException], str], ...] = (
    (TimeoutError, f"timeout (no progress for {PROGRESS_TIMEOUT:g} s)"),
    (ConnectionResetError, "connection reset"),
    (ConnectionRefusedError, "connection refused"),
    (BrokenPipeError, "broken pipe"),
)


def describe(exc: BaseException) -> str:
    if isinstance(exc, EchoError):
        return exc.kind
    words = next((words for kind, words in ERROR_WORDS if isinstance(exc, kind)), None)
    if words is not None:
        return words
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return type(exc).__name__


class Check:
    """One connection's echo check: the bytes owed (sent, not yet back), and every byte that
    comes back compared with them, in order."""

    def __init__(self, stats: Stats, kind: str) -> None:
        self.stats = stats
        self.kind = kind
        self.owed = bytearray()

    def expect(self, data: bytes) -> None:
        self.owed += data

    def received(self, data: bytes) -> None:
        """Compare ``data`` with the next bytes owed. Raises `Corrupted`."""
        n = len(data)
        head = self.owed[:n]
        if head == data:
            del self.owed[:n]
            self.stats.verified[self.kind] += n
            return
        same = next((i for i, (a, b) in enumerate(zip(head, data, strict=False)) if a != b), None)
        good = len(head) if same is None else same  # None: all owed matched; the rest is extra
        self.stats.verified[self.kind] += good
        self.stats.corrupted[self.kind] += n - good
        del self.owed[:n]
        self.stats.examples.append(
            f"{self.kind}: byte {good} of a {n}-byte read differs: "
            f"expected {bytes(head[good : good + 16])!r}, got {data[good : good + 16]!r}"
        )
        raise Corrupted

    def forgive(self) -> None:
        """The client broke the rules: what it is owed is not lost."""
        self.owed.clear()

    def settle(self) -> None:
        """The connection is over: what is still owed was lost."""
        self.stats.lost[self.kind] += len(self.owed)
        self.owed.clear()


# --- the clients' building blocks ---------------------------------------------------------


class Soak:
    """What every client shares: the servers' ports, the clock, the payloads, the counts."""

    def __init__(self, ports: dict[str, int], stats: Stats, seconds: float, seed: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.ports = ports
        self.stats = stats
        self.seed = seed
        self.started = monotonic()
        self.deadline = self.started + seconds
        self.block = random.Random(seed).randbytes(BLOCK_SIZE)
        self.line_block = self.block.replace(b"\n", b" ")
        # What clients that never read send, 64 KiB at a time: lines for the line server.
        self.flood_data = {
            "raw": self.block[:SEND_CHUNK],
            "line": (self.line_block[: SEND_CHUNK // 16 - 1] + b"\n") * 16,
        }

    def running(self) -> bool:
        return monotonic() < self.deadline

    async def connect(self, server: str, source: str, rcvbuf: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            if rcvbuf:  # before connect, so that the window is small from the start
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            async with asyncio.timeout(PROGRESS_TIMEOUT):
                await self.loop.sock_connect(sock, (HOST, self.ports[server]))
        except BaseException:
            sock.close()
            raise
        self.stats.connected[server] += 1
        return sock

    def payload(self, rng: random.Random, size: int) -> bytes:
        offset = rng.randrange(BLOCK_SIZE - size + 1)
        return self.block[offset : offset + size]

    def lines(
        self, rng: random.Random, *, terminated: bool, longest: int = MAX_LINE_LENGTH
    ) -> bytes:
        """1-30 lines of random bytes (no newline inside), a few of them near ``longest``."""
        parts = []
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.02:
                size = longest - rng.randint(0, 16)
            else:
                size = min(longest, int(2 ** rng.uniform(0, 13))) - 1
            offset = rng.randrange(BLOCK_SIZE - size + 1)
            parts.append(self.line_block[offset : offset + size] + rng.choice((b"\n", b"\r\n")))
        data = b"".join(parts)
        return data if terminated else data.rstrip(b"\r\n")

    async def send(
        self, sock: socket.socket, data: bytes, timeout: float = PROGRESS_TIMEOUT
    ) -> None:
        async with asyncio.timeout(timeout):
            await self.loop.sock_sendall(sock, data)

    async def send_pieces(self, sock: socket.socket, data: bytes, rng: random.Random) -> None:
        """``data`` in 1-8 pieces cut at random, a moment apart, so lines arrive split."""
        cuts = sorted(rng.sample(range(1, len(data)), min(rng.randint(0, 7), len(data) - 1)))
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            await self.send(sock, data[start:end])
            if end < len(data):
                await asyncio.sleep(0.001)

    async def recv(
        self, sock: socket.socket, size: int, timeout: float = PROGRESS_TIMEOUT
    ) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.loop.sock_recv(sock, size)

    async def receive(self, sock: socket.socket, check: Check, n: int) -> None:
        """Read and check the next ``n`` echoed bytes. Raises `ClosedEarly`, `Corrupted`."""
        while n > 0:
            data = await self.recv(sock, min(n, RECV_SIZE))
            if not data:
                raise ClosedEarly
            check.received(data)
            n -= len(data)

    async def receive_slowly(
        self, sock: socket.socket, check: Check, n: int, size: int, pause: float
    ) -> None:
        while n > 0:
            data = await self.recv(sock, min(n, size), CUT_OFF_LIMIT)
            if not data:
                raise ClosedEarly
            check.received(data)
            n -= len(data)
            await asyncio.sleep(pause)

    async def exchange(self, sock: socket.socket, check: Check, data: bytes) -> None:
        """Send ``data`` while reading its echo: a large message would otherwise fill both
        directions' buffers and block both sides."""
        check.expect(data)
        await both(self.send(sock, data), self.receive(sock, check, len(data)))

    async def finish(self, sock: socket.socket, check: Check, tail: bytes = b"") -> None:
        """Send ``tail`` and our end (half-close); every byte owed must come back, then the
        server's end, and nothing more."""
        check.expect(tail)

        async def send_and_end() -> None:
            if tail:
                await self.send(sock, tail)
            sock.shutdown(socket.SHUT_WR)

        await both(send_and_end(), self.read_to_end(sock, check))

    async def read_to_end(self, sock: socket.socket, check: Check) -> None:
        while True:
            data = await self.recv(sock, RECV_SIZE)
            if not data:
                if check.owed:
                    raise ClosedEarly
                return
            check.received(data)

    async def reply_until_end(self, sock: socket.socket, limit: float) -> bytes:
        """Every byte the server sends until its end (hostile clients: no check)."""
        chunks = []
        async with asyncio.timeout(limit):
            while data := await self.loop.sock_recv(sock, RECV_SIZE):
                chunks.append(data)
        return b"".join(chunks)

    def timing(self, name: str, seconds: float, configured: float) -> None:
        """Record how long a timeout took to act; outside its window is an anomaly."""
        self.stats.timings[name].append(seconds)
        if seconds < configured - EARLY_SLACK:
            raise Anomaly(f"{name} too early", f"{name} after {seconds:.2f} s ({configured:g} set)")
        if seconds > configured + LATE_SLACK:
            raise Anomaly(f"{name} too late", f"{name} after {seconds:.2f} s ({configured:g} set)")


async def both(first: Awaitable[None], second: Awaitable[None]) -> None:
    """Run both; the first error cancels the other and is raised once both are done."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), dropping whatever is unread or unsent."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


# --- the clients --------------------------------------------------------------------------

Client = Callable[[Soak, Check, random.Random], Coroutine[Any, Any, None]]


async def echo_client(soak: Soak, check: Check, rng: random.Random) -> None:
    with await soak.connect("raw", WELL_BEHAVED) as sock:
        for _ in range(rng.randint(1, 20)):
            size = int(2 ** rng.uniform(0, MAX_MESSAGE_LOG2))
            await soak.exchange(sock, check, soak.payload(rng, size))
            await asyncio.sleep(rng.uniform(0, THINK_TIME))
        # A fifth end with a message sent along with the half-close: the server must echo it
        # all before its own end.
        tail = soak.payload(rng, int(2 ** rng.uniform(0, MAX_MESSAGE_LOG2)))
        await soak.finish(sock, check, tail if rng.random() < 0.2 else b"")


async def line_echo_client(soak: Soak, check: Check, rng: random.Random) -> None:
    with await soak.connect("line", WELL_BEHAVED) as sock:
        for _ in range(rng.randint(1, 20)):
            data = soak.lines(rng, terminated=True)
            check.expect(data)
            await both(soak.send_pieces(sock, data, rng), soak.receive(sock, check, len(data)))
            await asyncio.sleep(rng.uniform(0, THINK_TIME))
        # Half end with an unterminated line, which the server echoes at our end of input.
        await soak.finish(sock, check, soak.lines(rng, terminated=rng.random() < 0.5))


async def scanner(soak: Soak, check: Check, rng: random.Random) -> None:
    """Connect and go at once: a third close, a third reset, a third send a probe and reset
    (the server may accept a connection that is already gone)."""
    sock = await soak.connect("raw", HOSTILE)
    how = rng.randrange(3)
    if how == 0:
        sock.close()
        soak.stats.outcome("scanner", "connected and closed")
        return
    if how == 2:
        with contextlib.suppress(OSError):
            sock.send(b"GET / HTTP/1.0\r\n\r\n")
    reset(sock)
    soak.stats.outcome("scanner", "connected and reset" + (" after a probe" if how == 2 else ""))


async def resetter(soak: Soak, check: Check, rng: random.Random) -> None:
    """Reset the connection partway through a large reply."""
    with await soak.connect("raw", HOSTILE) as sock:
        data = soak.payload(rng, RESET_PAYLOAD)
        check.expect(data)
        sender = asyncio.ensure_future(soak.send(sock, data))
        try:
            await soak.receive(sock, check, rng.randrange(1, len(data)))
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        reset(sock)
    check.forgive()
    soak.stats.outcome("resetter", "reset mid-reply")


async def slow_reader(soak: Soak, check: Check, rng: random.Random) -> None:
    """Reads slowly but steadily: writes block for well under --write-timeout at a time, so
    the whole echo must come back."""
    with await soak.connect("raw", HOSTILE, rcvbuf=SLOW_RCVBUF) as sock:
        data = soak.payload(rng, SLOW_PAYLOAD)
        check.expect(data)
        started = monotonic()
        try:
            await both(
                soak.send(sock, data, CUT_OFF_LIMIT),
                soak.receive_slowly(sock, check, len(data), SLOW_READ, SLOW_PAUSE),
            )
            await soak.finish(sock, check)
        except (ConnectionResetError, ClosedEarly) as exc:
            raise Anomaly(
                f"cut off while reading steadily ({describe(exc)})",
                f"cut off after {monotonic() - started:.1f} s, "
                f"{len(data) - len(check.owed)} of {len(data)} bytes back ({describe(exc)})",
            ) from exc
    soak.stats.timings["slow-reader: served in"].append(monotonic() - started)
    soak.stats.outcome("slow-reader", "served in full")


async def flood_sender(soak: Soak, sock: socket.socket, check: Check, server: str) -> None:
    """Send 64 KiB at a time, without end (until the server cuts the connection off)."""
    data = soak.flood_data[server]
    while True:
        check.expect(data)
        await soak.loop.sock_sendall(sock, data)


async def cut_off(soak: Soak, kind: str, work: Awaitable[None], started: float) -> None:
    """Wait for the server to cut a client that does not read off (--write-timeout)."""
    try:
        async with asyncio.timeout(CUT_OFF_LIMIT):
            await work
    except TimeoutError as exc:
        raise Anomaly(f"not cut off within {CUT_OFF_LIMIT:g} s") from exc
    except (ConnectionResetError, BrokenPipeError):
        soak.stats.timings[f"{kind}: cut off after"].append(monotonic() - started)
        soak.stats.outcome(kind, "cut off (--write-timeout)")


async def trickle_reader(soak: Soak, check: Check, rng: random.Random) -> None:
    with await soak.connect("raw", HOSTILE, rcvbuf=SLOW_RCVBUF) as sock:
        started = monotonic()
        work = both(
            flood_sender(soak, sock, check, "raw"),
            soak.receive_slowly(sock, check, 1 << 40, TRICKLE_READ, TRICKLE_PAUSE),
        )
        await cut_off(soak, "trickle", work, started)
    check.forgive()


async def never_reader(soak: Soak, check: Check, rng: random.Random) -> None:
    with await soak.connect("raw", HOSTILE, rcvbuf=NEVER_RCVBUF) as sock:
        work = flood_sender(soak, sock, check, "raw")
        await cut_off(soak, "never-reader", work, monotonic())
    check.forgive()


async def line_never_reader(soak: Soak, check: Check, rng: random.Random) -> None:
    """Sends complete lines without end and never reads: the line server's replies block."""
    with await soak.connect("line", HOSTILE, rcvbuf=NEVER_RCVBUF) as sock:
        work = flood_sender(soak, sock, check, "line")
        await cut_off(soak, "line-never-reader", work, monotonic())
    check.forgive()


async def idle_client(soak: Soak, check: Check, rng: random.Random) -> None:
    """One echo, then silence: the server must close, without a byte, after --idle-timeout."""
    with await soak.connect("raw", HOSTILE) as sock:
        # Timed from before the echo, which the server cannot have received earlier: a busy
        # client that is slow to see the echo come back must not make the close look early.
        started = monotonic()
        await soak.exchange(sock, check, soak.payload(rng, 16))
        try:
            data = await soak.recv(sock, RECV_SIZE, IDLE_TIMEOUT + CUT_OFF_LIMIT)
        except TimeoutError as exc:
            raise Anomaly("never closed") from exc
        if data:
            raise Anomaly("got bytes while idle", f"got {data[:40]!r} while idle")
        soak.timing("idle: closed after", monotonic() - started, IDLE_TIMEOUT)
    soak.stats.outcome("idle", "closed (--idle-timeout)")


async def slowloris(soak: Soak, check: Check, rng: random.Random) -> None:
    """A byte every half second, never a newline: the line-timeout error, then the end."""
    with await soak.connect("line", HOSTILE) as sock:
        started = monotonic()

        async def drip() -> None:
            while True:
                await soak.loop.sock_sendall(sock, b"x")
                await asyncio.sleep(SLOWLORIS_DRIP)

        dripping = asyncio.ensure_future(drip())
        try:
            reply = await soak.reply_until_end(sock, LINE_TIMEOUT + CUT_OFF_LIMIT)
        finally:
            dripping.cancel()
            await asyncio.gather(dripping, return_exceptions=True)
        elapsed = monotonic() - started
    if reply != line_timeout_reply(LINE_TIMEOUT):
        raise Anomaly("wrong reply", f"reply {reply[:80]!r} after {elapsed:.1f} s")
    soak.timing("slowloris: cut off after", elapsed, LINE_TIMEOUT)
    soak.stats.outcome("slowloris", "line-timeout error, then closed")


async def oversized(soak: Soak, check: Check, rng: random.Random) -> None:
    """Good lines, then one too long: the good lines' echo, the error, then the end."""
    with await soak.connect("line", HOSTILE) as sock:
        good = soak.lines(rng, terminated=True, longest=1024)
        long = soak.line_block[: MAX_LINE_LENGTH + rng.randint(2, MAX_LINE_LENGTH)]
        sender = asyncio.ensure_future(soak.send(sock, good + long))
        try:
            reply = await soak.reply_until_end(sock, PROGRESS_TIMEOUT)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    expected = good + line_too_long_reply(MAX_LINE_LENGTH)
    if reply != expected:
        raise Anomaly("wrong reply", f"reply ends {reply[-80:]!r}, expected {expected[-80:]!r}")
    soak.stats.verified["oversized"] += len(good)
    soak.stats.outcome("oversized", "good lines echoed, then line-too-long error")


async def probe(soak: Soak, sock: socket.socket, index: int) -> str:
    """Admitted (its echo came back) or refused (the per-address error, then the end)."""
    message = b"flood probe %05d" % index
    await soak.send(sock, message)
    reply = b""
    while data := await soak.recv(sock, RECV_SIZE):
        reply += data
        if reply == message:
            return "admitted"
    return "refused" if reply == TOO_MANY_FROM_ADDRESS_REPLY else f"replied {reply[:60]!r}"


async def flood(soak: Soak, check: Check, rng: random.Random) -> None:
    """FLOOD_SIZE connections at once from one address: exactly MAX_PER_ADDRESS admitted."""
    socks: list[socket.socket] = []
    try:
        for _ in range(FLOOD_SIZE):
            socks.append(await soak.connect("raw", FLOOD))
        results = Counter(
            await asyncio.gather(*(probe(soak, sock, i) for i, sock in enumerate(socks)))
        )
    finally:
        for i, sock in enumerate(socks):
            (reset if i % 2 else socket.socket.close)(sock)  # half go with a reset
    expected = Counter({"admitted": MAX_PER_ADDRESS, "refused": FLOOD_SIZE - MAX_PER_ADDRESS})
    soak.stats.refused["raw"] += results["refused"]
    if results != expected:
        shown = ", ".join(f"{n} {what}" for what, n in sorted(results.items()))
        raise Anomaly("admitted other than --max-per-address", f"burst of {FLOOD_SIZE}: {shown}")
    soak.stats.outcome(
        "flood", f"{MAX_PER_ADDRESS} admitted, {FLOOD_SIZE - MAX_PER_ADDRESS} refused"
    )


@dataclass(frozen=True)
class Kind:
    name: str
    client: Client
    workers: int
    pause: float  # between two connections of one worker


KINDS = (
    Kind("echo", echo_client, 6, 0.0),
    Kind("line-echo", line_echo_client, 4, 0.0),
    Kind("scanner", scanner, 1, SCANNER_PAUSE),
    Kind("resetter", resetter, 2, HOSTILE_PAUSE),
    Kind("slow-reader", slow_reader, 2, HOSTILE_PAUSE),
    Kind("trickle", trickle_reader, 1, HOSTILE_PAUSE),
    Kind("never-reader", never_reader, 2, HOSTILE_PAUSE),
    Kind("idle", idle_client, 2, HOSTILE_PAUSE),
    Kind("slowloris", slowloris, 2, HOSTILE_PAUSE),
    Kind("line-never-reader", line_never_reader, 1, HOSTILE_PAUSE),
    Kind("oversized", oversized, 1, 1.0),
    Kind("flood", flood, 1, FLOOD_PAUSE),
)
WELL_BEHAVED_KINDS = frozenset({"echo", "line-echo"})


async def one_connection(soak: Soak, kind: Kind, rng: random.Random) -> None:
    check = Check(soak.stats, kind.name)
    soak.stats.connections[kind.name] += 1
    try:
        await kind.client(soak, check, rng)
    except Anomaly as exc:
        soak.stats.anomaly(kind.name, exc)
    except (OSError, EchoError) as exc:  # TimeoutError is an OSError
        soak.stats.error(kind.name, exc)
    except asyncio.CancelledError:
        check.forgive()  # the run ended while this client was still at it
        soak.stats.outcome(kind.name, "cut short by the end of the run")
        raise
    finally:
        check.settle()


async def worker(soak: Soak, kind: Kind, index: int) -> None:
    rng = random.Random(f"{soak.seed}-{kind.name}-{index}")
    await asyncio.sleep(rng.uniform(0, 1))  # spread the workers' starts
    while soak.running():
        await one_connection(soak, kind, rng)
        await asyncio.sleep(kind.pause)


# --- the run ------------------------------------------------------------------------------


def sample(servers: dict[str, Server], label: str, at: float) -> dict[str, Any]:
    return {"label": label, "t": round(at, 1)} | {
        name: server.reading() for name, server in servers.items()
    }


def marks(seconds: float, warmup: float) -> list[tuple[str, float]]:
    """When to read the servers: after the warm-up, at every whole minute, at the end."""
    points = [("start", warmup)]
    points += [(f"{m} min", 60.0 * m) for m in range(1, int(seconds // 60) + 1) if 60 * m > warmup]
    if points[-1][1] >= seconds:
        points.pop()
    return [*points, ("end", seconds)]


async def watch(servers: dict[str, Server], until: float) -> bool:
    """Wait until ``until`` (monotonic); False as soon as a server has died, since every
    client after that would only count refusals."""
    while (left := until - monotonic()) > 0:
        await asyncio.sleep(min(left, 1.0))
        if not all(server.alive() for server in servers.values()):
            return False
    return True


async def run_soak(
    args: argparse.Namespace, servers: dict[str, Server], stats: Stats
) -> list[dict[str, Any]]:
    seconds = args.minutes * 60
    soak = Soak({name: s.port for name, s in servers.items()}, stats, seconds, args.seed)
    tasks = [
        asyncio.create_task(worker(soak, kind, i)) for kind in KINDS for i in range(kind.workers)
    ]
    samples = []
    for label, at in marks(seconds, args.warmup):
        if not await watch(servers, soak.started + at):
            say(args, "a server died: ending the run")
            soak.deadline = monotonic()
            break
        samples.append(sample(servers, label, monotonic() - soak.started))
        say(args, f"{label}: " + status_text(samples[-1], servers))
    say(args, "letting the clients finish")
    _, unfinished = await asyncio.wait(tasks, timeout=END_GRACE)
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return samples


def wait_released(servers: dict[str, Server], idle: dict[str, Any]) -> dict[str, Any]:
    """Once the clients have gone: poll until each server is back to its idle descriptors."""
    deadline = monotonic() + RELEASE_TIMEOUT
    while True:
        after = sample(servers, "after", 0.0)
        released = all(
            after[name] is None or after[name]["fds"] <= idle[name]["fds"] for name in servers
        )
        if released or monotonic() > deadline:
            return after
        time.sleep(0.2)


def say(args: argparse.Namespace, message: str) -> None:
    if not args.json:
        print(f"… {message}", file=sys.stderr, flush=True)


def status_text(point: dict[str, Any], servers: dict[str, Server]) -> str:
    parts = []
    for name in servers:
        status = point[name]
        if status is None:
            parts.append(f"{name} server GONE")
        else:
            parts.append(
                f"{name} RSS {status['rss_kib'] / KIB:.1f} MiB, {status['fds']} fds, "
                f"{status['threads']} threads"
            )
    return "; ".join(parts)


# --- the report ---------------------------------------------------------------------------


def drift(samples: list[dict[str, Any]], name: str) -> float | None:
    first, last = samples[0].get(name), samples[-1].get(name)
    if not first or not last or samples[-1]["label"] != "end":
        return None
    start, end = int(first["rss_kib"]), int(last["rss_kib"])
    return round((end - start) / start * 100, 1)


def timing_summary(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def server_report(server: Server, stats: Stats, run: dict[str, Any]) -> dict[str, Any]:
    reasons: dict[str, dict[str, int]] = defaultdict(dict)
    for (group, reason), count in sorted(server.reasons.items()):
        reasons[group][reason] = count
    idle, samples, after = run["idle"], run["samples"], run["after"]
    stopped = STOPPED.match(server.stopped_line)
    return {
        # What the server counted, against the connects that succeeded (and the priming one)
        # less the refusals the flood saw: the two differ only if a count went astray.
        "connections_served": int(stopped["served"]) if stopped else None,
        "connections_admitted_by_clients": stats.connected[server.name]
        + 1
        - stats.refused[server.name],
        "command": server.command,
        "engine_line": server.engine_line,
        "idle": idle[server.name],
        "samples": [{"label": s["label"], "t": s["t"], **(s[server.name] or {})} for s in samples],
        "after_clients_left": after[server.name],
        "rss_drift_percent": drift(samples, server.name),
        "died_during_run": server.died_during_run,
        "exit_code": server.proc.returncode,
        "stopped_line": server.stopped_line,
        "close_reasons": dict(reasons),
        "notable_lines": server.notable_count,
        "notable_tail": list(server.notable),
        "stderr_tail": list(server.stderr_tail),
    }


def failures_of(
    stats: Stats, servers: dict[str, Server], exit_codes: dict[str, int | None]
) -> list[str]:
    failures = []
    lost = sum(stats.lost[kind] for kind in WELL_BEHAVED_KINDS)
    corrupted_well = sum(stats.corrupted[kind] for kind in WELL_BEHAVED_KINDS)
    if lost or corrupted_well:
        failures.append(f"well-behaved clients: {lost} bytes lost, {corrupted_well} corrupted")
    corrupted_hostile = sum(stats.corrupted.values()) - corrupted_well
    if corrupted_hostile:
        failures.append(f"hostile clients: {corrupted_hostile} bytes echoed wrong")
    for name, server in servers.items():
        if server.died_during_run is not None:
            failures.append(f"the {name} server died (exit {server.died_during_run})")
        elif exit_codes[name] != 0:
            failures.append(f"the {name} server exited {exit_codes[name]} after SIGINT (not 0)")
    return failures


def build_report(
    args: argparse.Namespace,
    stats: Stats,
    servers: dict[str, Server],
    run: dict[str, Any],
) -> dict[str, Any]:
    failures = failures_of(stats, servers, run["exit_codes"])
    kinds = {
        kind.name: {
            "connections": stats.connections[kind.name],
            "bytes_verified": stats.verified[kind.name],
            "bytes_lost": stats.lost[kind.name],
            "bytes_corrupted": stats.corrupted[kind.name],
        }
        for kind in KINDS
    }
    return {
        "ok": not failures,
        "failures": failures,
        "date": run["date"],
        "command": " ".join(["python3", *sys.argv]),
        "engine": args.engine,
        "loop": args.loop if args.engine == "asyncio" else None,
        "minutes": args.minutes,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "bytes_verified": sum(stats.verified.values()),
        "well_behaved_bytes_lost": sum(stats.lost[k] for k in WELL_BEHAVED_KINDS),
        "bytes_corrupted": sum(stats.corrupted.values()),
        "clients": kinds,
        "outcomes": dict(sorted(stats.outcomes.items())),
        "errors_expected": dict(sorted(stats.expected_errors.items())),
        "errors_unexpected": dict(sorted(stats.unexpected_errors.items())),
        "anomalies": dict(sorted(stats.anomalies.items())),
        "examples": list(stats.examples),
        "timings_s": {name: timing_summary(v) for name, v in sorted(stats.timings.items())},
        "servers": {name: server_report(server, stats, run) for name, server in servers.items()},
    }


def print_counts(title: str, counts: dict[str, int], out: TextIO) -> None:
    print(f"{title}: {'none' if not counts else ''}", file=out)
    for what, count in counts.items():
        print(f"    {count:>7,}  {what}", file=out)


def print_server(name: str, report: dict[str, Any], out: TextIO) -> None:
    print(f"{name} server: {report['engine_line'].removeprefix('[ENGINE] ')}", file=out)
    print(f"    {'when':<8} {'t (s)':>6} {'RSS MiB':>8} {'fds':>5} {'threads':>7}", file=out)
    rows = [{"label": "idle", "t": 0.0, **report["idle"]}, *report["samples"]]
    rows.append({"label": "after", "t": None, **(report["after_clients_left"] or {})})
    for row in rows:
        if "rss_kib" not in row:
            print(f"    {row['label']:<8} (server gone)", file=out)
            continue
        t = "" if row["t"] is None else f"{row['t']:.0f}"
        print(
            f"    {row['label']:<8} {t:>6} {row['rss_kib'] / KIB:>8.1f} {row['fds']:>5} "
            f"{row['threads']:>7}",
            file=out,
        )
    print(f"    RSS drift start → end: {report['rss_drift_percent']} %", file=out)
    for group, reasons in report["close_reasons"].items():
        shown = "; ".join(f"{n:,}× {reason}" for reason, n in reasons.items())
        print(f"    closed ({group}): {shown}", file=out)
    print(f"    stop: exit {report['exit_code']}; {report['stopped_line']}", file=out)
    served, admitted = report["connections_served"], report["connections_admitted_by_clients"]
    verdict = "the same" if served == admitted else "MISMATCH"
    print(f"    connections: server counted {served}, clients {admitted}: {verdict}", file=out)
    if report["notable_lines"] or report["stderr_tail"]:
        print(f"    other log lines: {report['notable_lines']}", file=out)
        for line in [*report["notable_tail"], *report["stderr_tail"]]:
            print(f"      {line}", file=out)


def print_report(report: dict[str, Any], out: TextIO) -> None:
    loop = f" ({report['loop']} loop)" if report["loop"] else ""
    print(
        f"soak: {report['minutes']:g} min, engine {report['engine']}{loop}, {report['date']}",
        file=out,
    )
    print(
        f"bytes echoed and verified: {report['bytes_verified']:,}; lost on well-behaved "
        f"clients: {report['well_behaved_bytes_lost']:,}; corrupted: {report['bytes_corrupted']:,}",
        file=out,
    )
    print(
        f"    {'client':<17} {'conns':>7} {'verified':>15} {'lost':>12} {'corrupted':>9}", file=out
    )
    for kind, row in report["clients"].items():
        print(
            f"    {kind:<17} {row['connections']:>7,} {row['bytes_verified']:>15,} "
            f"{row['bytes_lost']:>12,} {row['bytes_corrupted']:>9,}",
            file=out,
        )
    print_counts("outcomes (hostile clients, as promised)", report["outcomes"], out)
    print_counts("errors, expected (hostile clients)", report["errors_expected"], out)
    print_counts("errors, UNEXPECTED (well-behaved clients)", report["errors_unexpected"], out)
    print_counts("anomalies (hostile clients not treated as promised)", report["anomalies"], out)
    for example in report["examples"]:
        print(f"    e.g. {example}", file=out)
    print("time for the server to act (s): n, min / median / max", file=out)
    for name, t in report["timings_s"].items():
        print(f"    {name:<34} {t['n']:>5}  {t['min']} / {t['median']} / {t['max']}", file=out)
    for name, server in report["servers"].items():
        print_server(name, server, out)
    print("PASS" if report["ok"] else "FAIL: " + "; ".join(report["failures"]), file=out)


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run well-behaved and hostile clients against tcpecho for N minutes, "
        "checking every echoed byte and watching the server's memory and descriptors.",
        allow_abbrev=False,
    )
    parser.add_argument("--minutes", type=float, required=True, metavar="N")
    parser.add_argument("--engine", choices=ENGINES, default="threads", help="(%(default)s)")
    parser.add_argument(
        "--loop", choices=LOOPS, default="auto", help="asyncio engine only (%(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the first reading of the servers, part of the N minutes (%(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="(%(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.minutes * 60:
        parser.error("--warmup must be more than 0 and less than the run")
    return args


def prime(server: Server) -> None:
    """One echo before the idle reading: uvloop opens a descriptor of its own on the first
    connection (libuv's spare for running out of descriptors), which is not a leak."""
    with socket.create_connection((HOST, server.port), timeout=PROGRESS_TIMEOUT) as sock:
        sock.sendall(PRIME)
        reply = b""
        while len(reply) < len(PRIME) and (data := sock.recv(RECV_SIZE)):
            reply += data
    if reply != PRIME:
        raise SetupError(f"the {server.name} server answered {reply!r} to {PRIME!r}")
    time.sleep(0.5)  # the server has closed it by the idle reading


def start_servers(args: argparse.Namespace) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    try:
        for framing in ("raw", "line"):
            server = Server(framing, server_arguments(args, framing))
            servers[framing] = server
            server.wait_listening()
    except BaseException:
        for server in servers.values():
            server.kill()
        raise
    return servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stats = Stats(well_behaved=WELL_BEHAVED_KINDS)
    servers: dict[str, Server] = {}
    try:
        servers = start_servers(args)
        for server in servers.values():
            prime(server)
        run: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
        run["idle"] = sample(servers, "idle", 0.0)
        say(args, "idle: " + status_text(run["idle"], servers))
        run["samples"] = asyncio.run(run_soak(args, servers, stats))
        run["after"] = wait_released(servers, run["idle"])
        say(args, "after the clients left: " + status_text(run["after"], servers))
        for server in servers.values():
            server.alive()  # note a death before the stop
        run["exit_codes"] = {name: server.stop(signal.SIGINT) for name, server in servers.items()}
    except (SetupError, ServerStartError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    finally:
        for server in servers.values():
            server.kill()
    report = build_report(args, stats, servers, run)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, sys.stdout)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
