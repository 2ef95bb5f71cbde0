"""Limits and defences that need a server of their own: memory, descriptors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
