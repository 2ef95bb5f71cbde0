"""Limits and defences that need a server of their own: memory, descriptors, workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    ROOT,
    ServerProcess,
    connect,
    engine_arguments,
    recv_exactly,
    require_peer,
)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited one nobody reaped yet is a zombie: no)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_client_that_never_reads_cannot_grow_server_memory(engine: str) -> None:
    """200 MiB sent without reading: RSS stays within 64 MiB of idle, others are served,
    and the stuck client is cut off after --write-timeout with one log line."""
    with ServerProcess(
        "--host", "127.0.0.1", "--port", "0", *engine_arguments(engine), "-q", "--write-timeout=3"
    ) as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as warm:  # idle RSS includes one served client
            warm.sendall(b"warm\n")
            assert recv_exactly(warm, 5) == b"warm\n"
        idle = rss_bytes(server.proc.pid)
        hog = connect(("127.0.0.1", port), timeout=2)
        chunk = b"x" * (1024 * 1024)
        sent = 0
        try:
            for _ in range(200):
                hog.sendall(chunk)  # blocks once the server stops reading from us
                sent += len(chunk)
        except TimeoutError:
            pass
        try:
            assert sent < 200 * 1024 * 1024, "the server buffered all 200 MiB"
            assert rss_bytes(server.proc.pid) - idle < 64 * 1024 * 1024
            with connect(("127.0.0.1", port)) as other:
                other.sendall(b"served meanwhile\n")
                assert recv_exactly(other, 17) == b"served meanwhile\n"
            line = server.wait_for("not reading (--write-timeout)")
            assert "[DISCONNECTED]" in line
        finally:
            hog.close()


def test_out_of_descriptors_the_server_waits_then_serves_again(engine: str) -> None:
    """EMFILE neither ends the accept loop nor spins the CPU; freed descriptors serve again."""
    server = [sys.executable, "-u", str(ROOT / "tcp_server.py"), *engine_arguments(engine), "-q"]
    proc = subprocess.Popen(
        [require_peer("prlimit"), "--nofile=40:40", *server, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        held = [connect(("127.0.0.1", port)) for _ in range(60)]  # more than 40 descriptors
        for sock in held[:5]:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        lines = []
        while "ACCEPT ERROR" not in (line := proc.stdout.readline()):
            lines.append(line)
        assert "Too many open files" in line
        before, start = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.5)  # a window to measure CPU use in, not a wait for start-up
        busy = (cpu_seconds(proc.pid) - before) / (time.monotonic() - start)
        assert busy < 0.5, f"accept loop spins: {busy:.0%} CPU"
        for sock in held:
            sock.close()
        with connect(("127.0.0.1", port)) as fresh:
            fresh.sendall(b"back\n")
            assert recv_exactly(fresh, 5) == b"back\n"
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_workers_share_the_port_and_a_dead_worker_is_replaced() -> None:
    with ServerProcess("--host", "127.0.0.1", "--port", "0", "--workers", "2") as server:
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
        assert server.wait_for("all 2 workers stopped")
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_supervisor_banner_is_printed_once() -> None:
    with ServerProcess("--host", "127.0.0.1", "--port", "0", "--workers", "2") as server:
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
    with ServerProcess("--host", "127.0.0.1", "--port", "0", "--workers", "2") as server:
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
