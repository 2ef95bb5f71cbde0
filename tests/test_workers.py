"""``--workers N``: the supervisor's shared listening socket, restarts, summaries, signals."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import (
    ServerFactory,
    ServerProcess,
    connect,
    engine_arguments,
    recv_exactly,
)

LOCAL = ("--host", "127.0.0.1", "--port", "0")
# The two engines; the asyncio one on the stdlib loop (uvloop accepts through the same code).
ENGINES = ["threads", "asyncio"]
TOTAL = re.compile(r"^\[SERVER STOPPED\] (\d+) connections served, \d+ bytes received, (\d+) sent$")
WORKER_TOTAL = re.compile(r"^\[WORKER STOPPED\] worker \d \(pid \d+\): (\d+) connections served")
ACCEPTED = re.compile(r"^\[NEW CONNECTION\] 127\.0\.0\.1:(\d+) connected\..*\(worker (\d)\)$")
# Bound for what should happen at once: a signal taking effect, a worker restarted.
PROMPTLY = 10.0


class Output:
    """A server's output after its banner, read by a thread as it comes: a busy server's log
    would otherwise fill the pipe and block the server while the test is busy being its client.
    ``port`` is the port the banner names."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.port = server.wait_listening()
        self.lines: list[str] = []
        self._next = 0  # wait_for looks from here on
        self._ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="server-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stdout = self.server.proc.stdout
        assert stdout is not None
        with contextlib.suppress(ValueError, OSError):  # closed under us when a test failed
            for line in stdout:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = PROMPTLY) -> str:
        """The first line containing ``text`` after the line this last returned."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(self._next, len(self.lines)):
                    if text in self.lines[index]:
                        self._next = index + 1
                        return self.lines[index]
                self._next = len(self.lines)
                remaining = deadline - time.monotonic()
                assert not self._ended, f"{text!r} never printed; output: {self.lines}"
                assert remaining > 0, f"{text!r} not printed within {timeout}s"
                self._changed.wait(remaining)

    def worker_pids(self, count: int) -> dict[int, int]:
        """Worker number → pid, from the next ``count`` "listening" lines."""
        pids = {}
        for _ in range(count):
            match = re.search(r"worker (\d) \(pid (\d+)\) listening", self.wait_for("listening"))
            assert match
            pids[int(match[1])] = int(match[2])
        return pids

    def stop_server(self, sig: int = signal.SIGTERM) -> list[str]:
        """Signal the server, wait for it to exit 0, and return all its output."""
        self.server.proc.send_signal(sig)
        assert self.server.proc.wait(timeout=PROMPTLY * 2) == 0, self.server.stderr()
        self._thread.join(PROMPTLY)
        return self.lines

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.server.proc.poll() is None:
            self.server.proc.kill()  # its workers follow (PR_SET_PDEATHSIG), ending the output
        self._thread.join(PROMPTLY)


def total_line(lines: list[str]) -> tuple[int, int]:
    """(connections, bytes sent) of the one [SERVER STOPPED] line, which must be the last."""
    totals = [match for line in lines if (match := TOTAL.match(line))]
    assert len(totals) == 1, lines
    assert TOTAL.match(lines[-1]), lines[-1]
    return int(totals[0][1]), int(totals[0][2])


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited one nobody reaped yet is a zombie: no)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it has stopped: from then on it accepts,
    reads and writes nothing, and its descriptors can be listed without a race."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + PROMPTLY
    while not all(
        Path(task, "stat").read_text().rsplit(")", 1)[1].split()[0] in {"T", "t"}
        for task in Path(f"/proc/{pid}/task").iterdir()
    ):
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.001)


def thaw(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def accepted_client_ports(pid: int, server_port: int) -> set[int]:
    """The client ports of the IPv4 connections to ``server_port`` that ``pid`` holds: the
    connections it has accepted and not yet closed. ``pid`` must be frozen."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return {
        remote_port
        for local_port, remote_port, inode in tcp_sockets()
        if inode in inodes and local_port == server_port and remote_port  # not the listener
    }


# The kernel's socket table through sock_diag netlink, as ss(8) reads it. Unlike
# /proc/net/tcp it leaves out TIME_WAIT sockets in the kernel: a run of the tests leaves tens of
# thousands, and reading past them took long enough for the client loop to run to its end.
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_TIME_WAIT = 6
_NETLINK_SOCK_DIAG = 4  # not in the socket module


def tcp_sockets() -> list[tuple[int, int, int]]:
    """(local port, remote port, inode) of every IPv4 TCP socket not in TIME_WAIT."""
    states = 0xFFFFFFFF & ~(1 << _TCP_TIME_WAIT)
    # struct inet_diag_req_v2: family, protocol, extensions, pad, states, then a socket id
    # (ports, addresses, interface; 48 bytes) that a dump ignores; its cookie: "none".
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, states)
    request += bytes(40) + struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)
    header = struct.pack(
        "=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
    )
    found: list[tuple[int, int, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.sendall(header + request)
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset < len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_DONE:
                    return found
                assert kind != _NLMSG_ERROR, "sock_diag refused the request"
                # struct inet_diag_msg: 4 bytes, then the socket id (ports big-endian first),
                # then expires, queues and uid (16 bytes), then the inode.
                ports = struct.unpack_from("!HH", data, offset + 16 + 4)
                (inode,) = struct.unpack_from("=I", data, offset + 16 + 4 + 48 + 16)
                found.append((*ports, inode))
                offset += (length + 3) & ~3


def payload(index: int) -> bytes:
    """Connection ``index``'s message: its number, then 1 to 200 bytes of a pattern, so that
    the byte total depends on which connections were counted."""
    return b"%d:" % index + (bytes(range(65, 91)) * 8)[: 1 + index * 37 % 200]


# The shared listening socket


@pytest.mark.parametrize("engine", ["threads", "asyncio", "uvloop"])
def test_an_engine_given_listen_fds_accepts_on_that_socket_and_closes_only_its_descriptor(
    serve: ServerFactory,
) -> None:
    """``listen_fds``: no bind of its own; stopping closes the engine's descriptor, not the
    socket, which still listens through the descriptor its owner kept."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = serve(listen_fds=(os.dup(listener.fileno()),))
        assert server.addresses == [listener.getsockname()]
        with connect(listener.getsockname()) as sock:
            sock.sendall(b"inherited\n")
            assert recv_exactly(sock, 10) == b"inherited\n"
        assert server.stop(timeout=PROMPTLY).connections == 1
        with connect(listener.getsockname()):
            accepted, _ = listener.accept()  # the owner's descriptor still listens
            accepted.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_connections_queued_when_a_worker_is_killed_are_served_by_another(engine: str) -> None:
    """The accept queue is the supervisor's: connections waiting in it outlive a worker.

    Both workers are frozen, so 50 connections wait in the queue, accepted by nobody; worker 1
    is killed with SIGKILL, worker 2 thawed: every connection is echoed. (With a socket per
    worker, SO_REUSEPORT, about half of them waited in worker 1's queue and were reset.)
    """
    with (
        ServerProcess(*LOCAL, *engine_arguments(engine), "--workers", "2", "-q") as server,
        Output(server) as output,
    ):
        port = output.port
        pids = output.worker_pids(2)
        frozen = [pids[1], pids[2]]
        try:
            for pid in frozen:
                freeze(pid)
            queued = [connect(("127.0.0.1", port)) for _ in range(50)]
            for index, sock in enumerate(queued):
                sock.sendall(payload(index))
            os.kill(frozen.pop(0), signal.SIGKILL)
            output.wait_for("was killed by SIGKILL")
            thaw(frozen.pop())
            for index, sock in enumerate(queued):
                with sock:
                    assert recv_exactly(sock, len(payload(index))) == payload(index), index
        finally:
            thaw(*frozen)  # a failed test leaves no worker stopped, or the output never ends
        connections, _ = total_line(output.stop_server())
    assert connections == 50


@dataclass
class KillLoop:
    """The record of `test_kill_9_of_a_worker_during_a_connect_loop`."""

    outcomes: dict[int, tuple[int | None, str]] = field(default_factory=dict)  # i → port, what
    frozen_during: int = -1  # the connection the client was on when the victim was frozen
    killed_during: int = -1  # ... and when it was killed
    victim_held: set[int] = field(default_factory=set)  # client ports it had accepted, open
    killer_error: BaseException | None = None


CONNECTS = 1000
KILL_AFTER = 300


@pytest.mark.parametrize("engine", ["threads", "asyncio", "uvloop"])
def test_kill_9_of_a_worker_during_a_connect_loop(engine: str) -> None:
    """1,000 connects in a row, each a short echo checked byte for byte before the next
    connect, across a SIGKILL of worker 1 made after about 300 by another thread.

    At most one connection is in flight at a time, so the kill can catch at most one that
    worker 1 had accepted: that one is lost by nature. To tell it from a connection that was
    waiting in the accept queue, the killer freezes worker 1 (SIGSTOP) and lists the
    connections it holds (its descriptors, the kernel's socket table) before it kills it
    (frozen, it accepts nothing more). Asserted: no connect fails, no echo is
    wrong, every connection not held by the dying worker is echoed in full (so none waiting
    in the queue was reset), at most one held by it broke; and the summary counts exactly the
    connections and bytes of the workers that reported: all but the killed one's.
    """
    record = KillLoop()
    reached_kill_point = threading.Event()
    with (
        ServerProcess(*LOCAL, *engine_arguments(engine), "--workers", "2", "-q") as server,
        Output(server) as output,
    ):
        port = output.port
        victim = output.worker_pids(2)[1]

        def kill_victim() -> None:
            try:
                assert reached_kill_point.wait(PROMPTLY * 2)
                record.frozen_during = len(record.outcomes)
                freeze(victim)
                record.victim_held = accepted_client_ports(victim, port)
                record.killed_during = len(record.outcomes)
                os.kill(victim, signal.SIGKILL)
            except BaseException as exc:
                record.killer_error = exc
                thaw(victim)

        killer = threading.Thread(target=kill_victim, name="killer")
        killer.start()
        try:
            for index in range(CONNECTS):
                record.outcomes[index] = echo_once(("127.0.0.1", port), payload(index))
                if index + 1 == KILL_AFTER:
                    reached_kill_point.set()
        finally:
            reached_kill_point.set()
            killer.join(PROMPTLY)
        assert record.killer_error is None, record.killer_error
        assert "not counted in the summary" in output.wait_for("was killed by SIGKILL")
        lines = output.stop_server()

    outcomes = record.outcomes
    connect_failed = {i: what for i, (port_, what) in outcomes.items() if port_ is None}
    wrong_bytes = {i: what for i, (_, what) in outcomes.items() if what.startswith("wrong")}
    broke = {i: (p, what) for i, (p, what) in outcomes.items() if p is not None and what != "ok"}
    lost_with_worker = {i: p for i, (p, _) in broke.items() if p in record.victim_held}
    ports = [p for p, _ in outcomes.values() if p is not None]
    assert len(set(ports)) == len(ports), "a client port was used twice: attribution fails"
    print(
        f"{engine}: worker 1 frozen during connection {record.frozen_during}, killed during "
        f"{record.killed_during}; it held {len(record.victim_held)} open; broken: "
        f"{broke or 'none'}"
    )
    assert KILL_AFTER <= record.frozen_during <= record.killed_during < CONNECTS
    assert connect_failed == {}
    assert wrong_bytes == {}
    assert set(broke) == set(lost_with_worker), "a connection the dying worker never had broke"
    assert len(lost_with_worker) <= 1

    # The summary: every worker but the killed one reported; it had taken the connections that
    # it logged before it died, and those it held without having logged them yet.
    killed_line = next(n for n, line in enumerate(lines) if "was killed by SIGKILL" in line)
    victim_ports = record.victim_held | {
        int(match[1])
        for line in lines[:killed_line]
        if (match := ACCEPTED.match(line)) and match[2] == "1"
    }
    counted = {i for i, (p, _) in outcomes.items() if p not in victim_ports}
    assert total_line(lines) == (len(counted), sum(len(payload(i)) for i in counted))
    assert sum(int(m[1]) for line in lines if (m := WORKER_TOTAL.match(line))) == len(counted)


def echo_once(address: tuple[str, int], message: bytes) -> tuple[int | None, str]:
    """Connect, send ``message``, read its echo, close: (the client port, "ok") when every
    byte came back; (None, why) when the connect failed; else (port, what went wrong)."""
    try:
        sock = connect(address, timeout=PROMPTLY)
    except OSError as exc:
        return None, f"connect failed: {exc!r}"
    with sock:
        port: int = sock.getsockname()[1]
        try:
            sock.sendall(message)
            echoed = recv_exactly(sock, len(message))
        except OSError as exc:
            return port, f"broken: {exc!r}"
    if echoed == message:
        return port, "ok"
    if message.startswith(echoed):
        return port, f"broken: closed after {len(echoed)} of {len(message)} bytes"
    return port, f"wrong bytes: {echoed!r}"


# Summaries, restarts, signals


@pytest.mark.parametrize("engine", ENGINES)
def test_the_summary_is_the_sum_of_every_workers_traffic(engine: str) -> None:
    with (
        ServerProcess(*LOCAL, *engine_arguments(engine), "--workers", "2", "-q") as server,
        Output(server) as output,
    ):
        port = output.port
        output.worker_pids(2)
        for index in range(40):
            assert echo_once(("127.0.0.1", port), payload(index))[1] == "ok"
        lines = output.stop_server(signal.SIGINT)
    assert total_line(lines) == (40, sum(len(payload(i)) for i in range(40)))
    per_worker = [int(m[1]) for line in lines if (m := WORKER_TOTAL.match(line))]
    assert len(per_worker) == 2
    assert sum(per_worker) == 40


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stopping_supervisor_stops_listening_while_its_workers_drain(engine: str) -> None:
    """The listening socket is closed at the first signal, as a single server closes its own:
    a connect then is refused rather than queued where no worker will accept it. (Were it
    closed only when the supervisor exits, connects would queue until the drain ended.)"""
    arguments = (*engine_arguments(engine), "--workers", "2", "-q", "--drain-timeout", "10")
    with ServerProcess(*LOCAL, *arguments) as server, Output(server) as output:
        output.worker_pids(2)
        with connect(("127.0.0.1", output.port), timeout=1) as hog:
            # Sent and never read: its worker cannot finish echoing it, so it drains for the
            # whole drain timeout.
            with contextlib.suppress(TimeoutError):
                for _ in range(500):
                    hog.sendall(bytes(1024 * 1024))
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5  # half the drain timeout
            while True:
                try:
                    connect(("127.0.0.1", output.port)).close()
                except ConnectionRefusedError:
                    break
                except ConnectionResetError:  # the socket closed during this handshake
                    pass
                assert time.monotonic() < deadline, "still accepting connects 5 s into the drain"
                time.sleep(0.01)
            assert server.proc.poll() is None, "the test needs the server still draining"
        assert server.proc.wait(timeout=PROMPTLY) == 0


def test_workers_share_the_port_and_a_dead_worker_is_replaced() -> None:
    with ServerProcess(*LOCAL, "--workers", "2") as server:
        port = server.wait_listening()
        pids = {}
        for _ in range(2):
            match = re.search(r"worker (\d) \(pid (\d+)\) listening", server.wait_for("listening"))
            assert match
            pids[int(match[1])] = int(match[2])
        seen: set[str] = set()
        for attempt in range(200):
            with connect(("127.0.0.1", port)) as sock:
                sock.sendall(b"%d\n" % attempt)
                assert recv_exactly(sock, len(b"%d\n" % attempt)) == b"%d\n" % attempt
            seen.add(server.wait_for("[NEW CONNECTION]").rsplit("(", 1)[1])
            if len(seen) == 2:
                break
        assert seen == {"worker 1)\n", "worker 2)\n"}
        os.kill(pids[1], signal.SIGKILL)
        assert "restarting" in server.wait_for("was killed by SIGKILL")
        assert "worker 1 (pid" in server.wait_for("listening")  # its replacement
        for _ in range(20):
            with connect(("127.0.0.1", port)) as sock:
                sock.sendall(b"after\n")
                assert recv_exactly(sock, 6) == b"after\n"
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=20) == 0
        assert server.wait_for("[SERVER STOPPED]")
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_supervisor_banner_is_printed_once() -> None:
    with ServerProcess(*LOCAL, "--workers", "2") as server:
        server.wait_listening()
        server.wait_for("listening")
        server.wait_for("listening")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0
        assert server.proc.stdout is not None
        rest = server.proc.stdout.read()
    assert "SERVER STARTING" not in rest


def test_workers_do_not_outlive_a_killed_supervisor() -> None:
    """SIGKILL to the supervisor: its workers stop too, and nobody is left on the port."""
    with ServerProcess(*LOCAL, "--workers", "2") as server:
        port = server.wait_listening()
        pids = [int(re.findall(r"pid (\d+)", server.wait_for("listening"))[0]) for _ in range(2)]
        server.proc.kill()
        server.proc.wait(timeout=10)
        assert server.proc.stdout is not None
        server.proc.stdout.read()  # end of file once every worker has exited
    # End of file comes when a worker closes its files, a moment before it is a zombie.
    deadline = time.monotonic() + 5
    while [pid for pid in pids if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not [pid for pid in pids if running(pid)]
    with pytest.raises(ConnectionRefusedError):
        connect(("127.0.0.1", port)).close()
