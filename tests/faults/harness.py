"""The fault suite's harness: a server in a child process, what it logs and uses, and the
check every case ends with.

Every case runs a fault against a real ``tcp_server.py`` process, then calls
`FaultServer.check`, which asserts three things: (a) the case's expected behaviour, (b) that
a canary client still gets an exact echo, and (c) that the server holds as many descriptors
as before the case (±2). The numbers a case observes (RSS growth, CPU use,
descriptor counts) are recorded with `FaultServer.record` as the test's user properties, so
that ``pytest --junitxml`` keeps them.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest

from tcpecho.net import format_address
from tests.helpers import IN_CI, ROOT, engine_arguments, recv_exactly

# The server's descriptor count after a case may differ from its baseline by this many: the
# runtime may open a descriptor lazily on first use and keep it (an eventfd, /dev/urandom).
FD_TOLERANCE = 2
# How long the server may take to start (an interpreter start and imports, on a busy machine).
START_TIMEOUT = 15.0
# How long the server may take to release what a case left behind: closes are asynchronous,
# a refused client lingers up to LINGER_TIMEOUT (2 s), and thousands of closes queue up.
SETTLE_TIMEOUT = 15.0
# How long to wait for an expected log line: far above any timeout a case sets.
LOG_TIMEOUT = 15.0
# Between two reads of /proc while waiting for the descriptor count to settle.
POLL_INTERVAL = 0.02
# Every canary's payload is different, so that an echo from an earlier connection can not pass.
_canaries = count(1)


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of the server's stdout, without its newline, and when this process read it.

    Only ``\\n`` ends a line (a raw ``\\r`` stays in the text), and bytes that are not UTF-8
    stay as surrogate escapes, so that the log-escaping case sees exactly what was printed.
    """

    text: str
    at: float  # time.monotonic()


def _has_all(line: LogLine, texts: tuple[str, ...]) -> bool:
    return all(text in line.text for text in texts)


def peer_of(sock: socket.socket) -> str:
    """How the server's log names this client: its ``host:port``."""
    return format_address(sock.getsockname())


def _status_field(pid: int, name: str) -> int:
    """A number of /proc/PID/status (``VmRSS``, in KiB; ``Threads``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} for {pid}")


def rss_bytes(pid: int) -> int:
    """The process's resident set size (VmRSS)."""
    return _status_field(pid, "VmRSS") * 1024


def thread_count(pid: int) -> int:
    """How many threads process ``pid`` runs now."""
    return _status_field(pid, "Threads")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used (utime + stime of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(needed: int) -> None:
    """Let this process open ``needed`` descriptors (soft RLIMIT_NOFILE up to the hard one);
    skipped, or failed in CI, when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        message = f"needs {needed} open files; the hard RLIMIT_NOFILE is {hard}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _pids_hierarchy() -> Path | None:
    """Where the kernel's pids controller can be written to: cgroup v1's own hierarchy, or
    cgroup v2's with the controller on for its children; None when neither is."""
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").exists():
        return v1
    v2 = Path("/sys/fs/cgroup")
    with suppress(OSError):
        if "pids" in (v2 / "cgroup.controllers").read_text().split():
            (v2 / "cgroup.subtree_control").write_text("+pids")
            return v2
    return None


@contextmanager
def task_limit(pid: int) -> Iterator[Callable[[str], None]]:
    """Put process ``pid`` in a cgroup of its own and yield a function that sets how many
    tasks (threads) it may have, as systemd's TasksMax and a container's pids limit do
    (``"max"``: no limit). Skipped where no pids controller can be written to (inside a
    container, say): that is the kernel's setup, not a peer .ci/run could install."""
    hierarchy = _pids_hierarchy()
    if hierarchy is None:
        pytest.skip("no writable cgroup pids controller to limit the server's threads")
    group = hierarchy / f"tcpecho-test-{os.getpid()}-{pid}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup in {hierarchy}: {exc.strerror}")
    try:
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        group.rmdir()
        pytest.skip(f"cannot move the server into a cgroup of {hierarchy}: {exc.strerror}")

    def limit_tasks(limit: str) -> None:
        (group / "pids.max").write_text(limit)

    try:
        yield limit_tasks
    finally:
        with suppress(OSError):  # the process may be gone
            (hierarchy / "cgroup.procs").write_text(str(pid))
        group.rmdir()


class FaultServer:
    """``tcp_server.py`` on 127.0.0.1, a port the OS picks (or ``port``), in a child process.

    stdout and stderr are read by threads from the start, so that a server logging thousands
    of lines never blocks on a full pipe. ``nofile`` sets the server's RLIMIT_NOFILE (soft
    and hard) once it listens, with prlimit(2). ``canary_source`` is the address the canary
    connects from (a case that denies 127.0.0.1 needs another one).
    """

    def __init__(
        self,
        engine: str,
        flags: Iterable[str],
        *,
        port: int = 0,
        nofile: int | None = None,
        canary_source: str = "127.0.0.1",
        record: Callable[[str, object], None] = lambda name, value: None,
    ) -> None:
        self.flags = [*engine_arguments(engine), *flags]
        self.canary_source = canary_source
        self.record = record
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-u",
                str(ROOT / "tcp_server.py"),
                "--host=127.0.0.1",
                f"--port={port}",
                *self.flags,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._lines: list[LogLine] = []
        self._stderr: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stdout, name=f"stdout-{self.pid}", daemon=True),
            threading.Thread(target=self._read_stderr, name=f"stderr-{self.pid}", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        try:
            self.port = self._wait_listening()
            self.address = ("127.0.0.1", self.port)
            if nofile is not None:
                resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
            self.canary()
            self.baseline_fds = self._measure_baseline()
        except BaseException:
            self.close()
            raise

    # Output.

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = LogLine(raw.rstrip(b"\n").decode("utf-8", "surrogateescape"), time.monotonic())
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self._stderr.append(raw.decode("utf-8", "replace"))

    @property
    def lines(self) -> list[LogLine]:
        """Every line logged so far."""
        with self._changed:
            return list(self._lines)

    def mark(self) -> int:
        """Where the log is now: pass it as ``since`` to look only at what comes after."""
        with self._changed:
            return len(self._lines)

    def found(self, *texts: str, since: int = 0) -> list[LogLine]:
        """The lines after ``since`` that contain every one of ``texts``, as of now."""
        with self._changed:
            return [line for line in self._lines[since:] if _has_all(line, texts)]

    def wait_for(
        self, *texts: str, count: int = 1, since: int = 0, timeout: float = LOG_TIMEOUT
    ) -> list[LogLine]:
        """The lines after ``since`` containing every one of ``texts``, once there are
        ``count`` of them. Fails when ``timeout`` passes or the server's output ends first.
        """
        deadline = time.monotonic() + timeout
        found: list[LogLine] = []
        scanned = since
        with self._changed:
            while True:
                lines = self._lines
                found.extend(line for line in lines[scanned:] if _has_all(line, texts))
                scanned = len(lines)
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._ended:
                    tail = [line.text for line in lines[-10:]]
                    raise AssertionError(
                        f"{count} lines with {texts!r} expected, {len(found)} logged; "
                        f"last lines: {tail}; stderr: {self.stderr()!r}"
                    )
                self._changed.wait(remaining)

    def stderr(self) -> str:
        return "".join(self._stderr)

    def _wait_listening(self) -> int:
        banner = self.wait_for("SERVER STARTING", timeout=START_TIMEOUT)[0].text
        if banner.startswith("{"):  # --log-format json
            return int(json.loads(banner)["addresses"][0][1])
        return int(banner.rsplit(":", 1)[1])

    # The process.

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def fd_count(self) -> int:
        return fd_count(self.pid)

    def terminate(self) -> None:
        self.proc.terminate()

    def close(self) -> None:
        """Kill the server if it still runs, and reap it and its readers."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    # The checks.

    def canary(self) -> None:
        """A new client gets an exact echo of a line of its own, and closes cleanly."""
        payload = b"canary %d\n" % next(_canaries)
        since = self.mark()
        with socket.create_connection(
            self.address, timeout=5.0, source_address=(self.canary_source, 0)
        ) as sock:
            peer = peer_of(sock)
            sock.sendall(payload)
            echoed = recv_exactly(sock, len(payload))
        assert echoed == payload, f"the canary got {echoed!r} for {payload!r}"
        # Its last log line is out before the case looks at the log.
        self.wait_for("DISCONNECTED", f"{peer} closed by client", since=since)

    def _measure_baseline(self) -> int:
        """The descriptors the server holds with no connection open.

        Measured after a first canary, so that the server is serving (its event loop goes on
        making descriptors after the banner) and has opened what it opens lazily, and while
        a second connection is open, less that one: by the time the server writes this
        connection's echo, the first canary's socket is closed, whichever engine (the
        asyncio engine logs a close just before it closes the socket; the others just after).
        """
        since = self.mark()
        with socket.create_connection(
            self.address, timeout=5.0, source_address=(self.canary_source, 0)
        ) as sock:
            peer = peer_of(sock)
            sock.sendall(b"baseline\n")
            assert recv_exactly(sock, 9) == b"baseline\n"
            baseline = self.fd_count() - 1
        self.wait_for("DISCONNECTED", f"{peer} closed by client", since=since)
        return baseline

    def wait_descriptors(self, timeout: float = SETTLE_TIMEOUT) -> int:
        """Wait until the server holds its baseline number of descriptors (±FD_TOLERANCE)."""
        deadline = time.monotonic() + timeout
        while True:
            held = self.fd_count()
            if abs(held - self.baseline_fds) <= FD_TOLERANCE:
                return held
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the server holds {held} descriptors {timeout}s after the case, "
                    f"{self.baseline_fds} before it: {self._describe_fds()}"
                )
            time.sleep(POLL_INTERVAL)  # polling /proc with a deadline: closes are asynchronous

    def _describe_fds(self) -> str:
        kinds: dict[str, int] = {}
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{name}").split(":")[0]
            except FileNotFoundError:
                continue  # closed meanwhile
            kinds[target] = kinds.get(target, 0) + 1
        return ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))

    def check(self, expected: Callable[[], object] | None = None) -> None:
        """The three checks every case ends with, once its own clients are closed.

        (a) ``expected()``, the case's own assertions; (b) a canary client gets an exact echo;
        (c) the descriptor count is back to the baseline. The descriptors are waited for
        before the canary as well as after it: until the server has released what the case
        left, a canary could be refused for a reason that is not a fault (a --max-connections
        or --max-per-address slot not yet freed). The server must still be running, with
        nothing on stderr (a thread's traceback lands there).
        """
        if expected is not None:
            expected()
        self.wait_descriptors()
        self.canary()
        held = self.wait_descriptors()
        self.record("fds_baseline", self.baseline_fds)
        self.record("fds_after", held)
        assert self.proc.poll() is None, f"the server exited: {self.stderr()!r}"
        assert not self.stderr(), self.stderr()


StartServer = Callable[..., FaultServer]


# Clients.


@dataclass(slots=True)
class Flood:
    """A client that sends as fast as the server takes it and never reads."""

    sock: socket.socket
    started: float
    sent: int = 0
    blocked_at: float | None = None  # its first send that would block (the server stopped reading)
    reset_at: float | None = None  # when the server's reset arrived


@dataclass(slots=True)
class FloodResult:
    floods: list[Flood] = field(default_factory=list)
    peak_rss: int = 0


# What a flooding client offers per send: the server's own read size.
FLOOD_CHUNK = b"f" * 65536
# Small client socket buffers: the client's side of the pipe fills after a few hundred KiB
# rather than after the many MiB that loopback autotuning allows.
CLIENT_BUFFER = 64 * 1024
# How often a flood samples the server's RSS.
RSS_SAMPLE_INTERVAL = 0.02


def small_buffer_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_BUFFER)
    return sock


def flood_until_reset(server: FaultServer, clients: int, timeout: float) -> FloodResult:
    """``clients`` connections that send without ever reading, until the server resets each
    (or ``timeout`` passes); the server's RSS is sampled all along and the peak kept."""
    result = FloodResult()
    poller = select.poll()
    by_fd: dict[int, Flood] = {}
    for _ in range(clients):
        sock = small_buffer_socket()
        sock.settimeout(5.0)
        sock.connect(server.address)
        sock.setblocking(False)
        flood = Flood(sock, time.monotonic())
        result.floods.append(flood)
        by_fd[sock.fileno()] = flood
        poller.register(sock, select.POLLOUT)
    deadline = time.monotonic() + timeout
    next_sample = 0.0
    try:
        while by_fd and time.monotonic() < deadline:
            if time.monotonic() >= next_sample:
                result.peak_rss = max(result.peak_rss, server.rss())
                next_sample = time.monotonic() + RSS_SAMPLE_INTERVAL
            for fd, events in poller.poll(RSS_SAMPLE_INTERVAL * 1000):
                flood = by_fd[fd]
                now = time.monotonic()
                if not events & (select.POLLERR | select.POLLHUP):
                    try:
                        sent = flood.sock.send(FLOOD_CHUNK)
                    except BlockingIOError:
                        sent = 0
                    except (ConnectionResetError, BrokenPipeError):
                        sent = -1
                    if sent >= 0:
                        flood.sent += sent
                        if sent < len(FLOOD_CHUNK) and flood.blocked_at is None:
                            flood.blocked_at = now  # its send buffer is full
                        continue
                # POLLERR/POLLHUP: the server's reset arrived (RST), or a send met it.
                flood.reset_at = now
                poller.unregister(fd)
                del by_fd[fd]
        result.peak_rss = max(result.peak_rss, server.rss())
    finally:
        for flood in result.floods:
            flood.sock.close()
    return result


def send_and_half_close(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and then our end of the stream, while reading everything the server
    sends until it closes; returns what it sent.

    The sending runs in a thread of its own: a client that sent a MiB before reading would
    deadlock against a server that stops reading while its replies are not taken.
    """
    failure: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    sender = threading.Thread(target=send, name="sender", daemon=True)
    sender.start()
    parts: list[bytes] = []
    try:
        while data := sock.recv(65536):
            parts.append(data)
    finally:
        sender.join(timeout=10)
    if failure:
        raise failure[0]
    return b"".join(parts)


def start_connects(
    address: tuple[str, int],
    count: int,
    selector: selectors.BaseSelector,
    socks: list[socket.socket],
) -> None:
    """Start ``count`` non-blocking connects (appended to ``socks``), each registered for
    writing with its index as data: every connect starts before the first completes."""
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks.append(sock)
        sock.setblocking(False)
        error = sock.connect_ex(address)
        assert error in {0, errno.EINPROGRESS}, os.strerror(error)
        selector.register(sock, selectors.EVENT_WRITE, len(socks) - 1)


def open_and_echo(address: tuple[str, int], count: int, timeout: float) -> list[socket.socket]:
    """``count`` clients that connect at once (every connect is started before the first
    completes), each then sending a line of its own; returns them, all still open, once
    every one has its exact echo back. Fails after ``timeout``."""
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    received: dict[int, bytearray] = {}
    try:
        start_connects(address, count, selector, socks)
        deadline = time.monotonic() + timeout
        waiting = count
        while waiting:
            left = deadline - time.monotonic()
            assert left > 0, f"{waiting} of {count} clients without their echo after {timeout}s"
            for key, _ in selector.select(min(left, 1.0)):
                index = key.data
                sock = socks[index]
                payload = b"client %d\n" % index
                if index not in received:  # connected (or failed)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert not error, f"client {index}: {os.strerror(error)}"
                    assert sock.send(payload) == len(payload)  # a few bytes: sent at once
                    received[index] = bytearray()
                    selector.modify(sock, selectors.EVENT_READ, index)
                    continue
                data = sock.recv(4096)
                received[index] += data
                assert data, f"client {index} closed after {bytes(received[index])!r}"
                if len(received[index]) >= len(payload):
                    assert received[index] == payload, (index, bytes(received[index]))
                    selector.unregister(sock)
                    waiting -= 1
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    finally:
        selector.close()
    for sock in socks:
        sock.settimeout(10.0)  # blocking again, for the caller's plain reads and writes
    return socks


def connect_and_close_at_once(address: tuple[str, int], count: int, timeout: float = 10.0) -> None:
    """A burst of ``count`` connects, every one started before the first completes, each
    closed as soon as it is connected, as a scanner does."""
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        start_connects(address, count, selector, socks)
        deadline = time.monotonic() + timeout
        waiting = count
        while waiting:
            left = deadline - time.monotonic()
            assert left > 0, f"{waiting} of {count} connects unfinished after {timeout}s"
            for key, _ in selector.select(min(left, 1.0)):
                selector.unregister(key.fileobj)
                socks[key.data].close()
                waiting -= 1
    finally:
        for sock in socks:
            sock.close()
        selector.close()
