"""The server's command line, run as a user runs it: ``python -u tcp_server.py ...``.

Every server listens on 127.0.0.1 with ``--port 0`` and is found through its banner; the
peers are real sockets and the real ``nc``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tcpecho
from tests.helpers import (
    ROOT,
    ServerProcess,
    connect,
    engine_arguments,
    recv_exactly,
    recv_until_closed,
    require_peer,
)

PYTHON = sys.executable
LOCAL = ("--host", "127.0.0.1", "--port", "0")
# Lets ``python -m tcpecho`` find the package whether or not it is installed in the venv.
SRC_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
NOBODY = 65534
# States in /proc/net/tcp.
LISTEN = "0A"
TIME_WAIT = "06"
# Bound for anything that should happen at once (a start-up error, a forced stop).
PROMPTLY = 10.0


class ModuleServerProcess(ServerProcess):
    """``python -u -m tcpecho serve ARGS``: the installed form of tcp_server.py."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-u", "-m", "tcpecho", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=SRC_ENV,
        )
        self.lines = []


def run_to_exit(
    *args: str, command: tuple[str, ...] = (PYTHON, "-u", str(ROOT / "tcp_server.py"))
) -> subprocess.CompletedProcess[str]:
    """Run a command that exits by itself (a start-up error, --help, --version)."""
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=PROMPTLY * 2,
        check=False,
        env=SRC_ENV,
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], exit_code: int, *texts: str
) -> str:
    """Exit ``exit_code``, stderr exactly one line holding each of ``texts``, no banner."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr == lines[0] + "\n"
    for text in texts:
        assert text in lines[0]
    assert result.stdout == ""
    return lines[0]


def stop(server: ServerProcess, sig: int = signal.SIGTERM, timeout: float = PROMPTLY) -> list[str]:
    """Send ``sig``, wait for the exit (code 0) and return every stdout line, without ``\\n``."""
    server.proc.send_signal(sig)
    assert server.proc.wait(timeout=timeout) == 0, server.stderr()
    return output_lines(server)


def output_lines(server: ServerProcess) -> list[str]:
    """All of an exited server's stdout (the lines already read, then the rest)."""
    assert server.proc.stdout is not None
    rest = server.proc.stdout.read()
    return "".join([*server.lines, rest]).splitlines()


def wait_until_not_listening(port: int, deadline: float) -> None:
    """Wait until nothing listens on 127.0.0.1:``port``: the server has begun to stop.

    No output reports this, so the kernel's table is polled; a probe connection would be
    accepted, counted and drained by the server under test.
    """
    while port in tcp_ports(LISTEN):
        assert time.monotonic() < deadline, f"port {port} is still listening"
        time.sleep(0.01)


def fill_until_blocked(sock: socket.socket) -> int:
    """Send without ever reading until a send blocks for 1 s; return the bytes sent.

    A blocked send means the server stopped reading us, which it only does while it cannot
    send us its echo: from then on it has replies that we will never read.
    """
    chunk = b"x" * (1024 * 1024)
    sock.settimeout(1.0)
    sent = 0
    for _ in range(500):
        try:
            sock.sendall(chunk)
        except TimeoutError:
            return sent
        sent += len(chunk)
    raise AssertionError("500 MiB sent and the server still reads: no backpressure")


def tcp_ports(state: str) -> set[int]:
    """Local ports of the IPv4 sockets in ``state`` (a hex code of /proc/net/tcp)."""
    ports = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == state:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# The banner


def test_banner_is_exactly_the_seeds_line_with_the_port_the_os_picked() -> None:
    """--port 0: the first line names 127.0.0.1 and a real port, which echoes."""
    with ServerProcess(*LOCAL) as server:
        banner = server.readline()
        match = re.fullmatch(r"\[SERVER STARTING\] Listening on 127\.0\.0\.1:(\d+)\n", banner)
        assert match, banner
        port = int(match[1])
        assert port != 0
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"are you there?\n")
            assert recv_exactly(sock, 15) == b"are you there?\n"
        stop(server)


def test_python_m_tcpecho_serve_prints_the_same_banner_and_echoes() -> None:
    with ModuleServerProcess(*LOCAL) as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"module\n")
            assert recv_exactly(sock, 7) == b"module\n"
        assert stop(server)[-1] == "[SERVER STOPPED] 1 connections served, 7 bytes received, 7 sent"


def test_without_options_the_banner_is_the_seeds_0_0_0_0_65432() -> None:
    """``python tcp_server.py`` listens where the tutorial says (checked only if 65432 is free)."""
    with socket.socket() as probe:
        # The same options as the server, so a TIME_WAIT left on 65432 does not count as busy.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", 65432))
        except OSError as exc:
            pytest.skip(f"port 65432 is taken on this machine ({exc.strerror})")
    with ServerProcess() as server:
        banner = server.readline()
        if not banner and server.proc.wait(timeout=PROMPTLY) == 3:
            pytest.skip("another program took port 65432 after it was checked")
        assert banner == "[SERVER STARTING] Listening on 0.0.0.0:65432\n"
        with connect(("127.0.0.1", 65432)) as sock:
            sock.sendall(b"seed\n")
            assert recv_exactly(sock, 5) == b"seed\n"
        stop(server)


# Start-up errors: one line on stderr, a distinct exit code, never a traceback


def test_address_in_use_exits_3_with_one_line_naming_the_address_and_port_option() -> None:
    with ServerProcess(*LOCAL) as first:
        port = first.wait_listening()
        result = run_to_exit("--host", "127.0.0.1", "--port", str(port))
        line = assert_one_line_error(result, 3, f"127.0.0.1:{port}", "Address already in use")
        assert "--port" in line
        # The first server is unharmed.
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"still here\n")
            assert recv_exactly(sock, 11) == b"still here\n"
        stop(first)


@pytest.mark.parametrize("first_workers", ["1", "2"])
def test_workers_on_a_port_in_use_exit_3_with_one_line_before_any_worker_starts(
    first_workers: str,
) -> None:
    """The supervisor binds before it forks, without SO_REUSEPORT: a second ``--workers``
    server cannot join the first one's port (with SO_REUSEPORT it could)."""
    with ServerProcess(*LOCAL, "--workers", first_workers) as first:
        port = first.wait_listening()
        result = run_to_exit("--host", "127.0.0.1", "--port", str(port), "--workers", "2")
        assert_one_line_error(result, 3, f"127.0.0.1:{port}", "Address already in use")
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"still here\n")
            assert recv_exactly(sock, 11) == b"still here\n"
        stop(first)


def nobody_python() -> str:
    """A Python interpreter that the user nobody can run, or skip."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the server as the user nobody")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        check = subprocess.run(
            [*as_nobody(setpriv), candidate, "-c", "pass"],
            capture_output=True,
            timeout=PROMPTLY * 2,
            check=False,
        )
        if check.returncode == 0:
            return candidate
    pytest.skip("no Python interpreter here can be run by the user nobody")


def as_nobody(setpriv: str) -> list[str]:
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@contextmanager
def world_readable_copy() -> Iterator[Path]:
    """tcp_server.py and src/tcpecho copied to a fresh directory under /tmp anyone can read."""
    top = Path(tempfile.mkdtemp(prefix="tcpecho-nobody-", dir="/tmp"))
    try:
        shutil.copy(ROOT / "tcp_server.py", top / "tcp_server.py")
        shutil.copytree(
            ROOT / "src" / "tcpecho",
            top / "src" / "tcpecho",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for directory, _, files in os.walk(top):
            os.chmod(directory, 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        yield top
    finally:
        shutil.rmtree(top)


def test_port_80_as_an_unprivileged_user_exits_4_with_permission_denied() -> None:
    """Run as nobody for real: binding port 80 is refused by the kernel."""
    python = nobody_python()
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as setting:
        if int(setting.read()) <= 80:
            pytest.skip("net.ipv4.ip_unprivileged_port_start lets anyone bind port 80")
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    with world_readable_copy() as copy:
        result = subprocess.run(
            [
                *as_nobody(setpriv),
                python,
                "-B",  # nobody cannot write __pycache__ in the copy
                "-u",
                str(copy / "tcp_server.py"),
                "--port",
                "80",
                "--host",
                "127.0.0.1",
            ],
            capture_output=True,
            text=True,
            cwd=copy,
            timeout=PROMPTLY * 2,
            check=False,
        )
    line = assert_one_line_error(result, 4, "Permission denied", "127.0.0.1:80")
    assert "--port" in line


def can_bind(host: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def test_an_address_not_on_this_machine_exits_5_with_one_line() -> None:
    """--host 192.0.2.1 (TEST-NET-1): the kernel cannot assign it."""
    if can_bind("192.0.2.1"):
        pytest.skip("192.0.2.1 is an address of this machine")
    result = run_to_exit("--host", "192.0.2.1", "--port", "0")
    assert_one_line_error(result, 5, "192.0.2.1", "Cannot assign requested address")


def test_a_host_name_that_does_not_resolve_exits_6_with_one_line() -> None:
    result = run_to_exit("--host", "no-such-host.invalid", "--port", "0")
    assert_one_line_error(result, 6, "no-such-host.invalid", "--host")


def test_a_port_out_of_range_exits_2_with_one_line() -> None:
    result = run_to_exit("--host", "127.0.0.1", "--port", "70000")
    assert_one_line_error(result, 2, "--port", "70000", "0 to 65535")


# Stopping


@pytest.fixture(params=[signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def sig(request: pytest.FixtureRequest) -> signal.Signals:
    """Each stopping signal in turn (a fixture, like ``engine``, so the ids read SIG-engine)."""
    signum: signal.Signals = request.param
    return signum


def test_a_signal_echoes_what_a_client_sent_then_exits_0_with_the_summary(
    sig: signal.Signals, engine: str
) -> None:
    """Signalled right after a client sent a message: the client gets its echo, then EOF;
    the server exits 0 within --drain-timeout, its last line the right summary."""
    message = b"sent just before the signal\n"
    with ServerProcess(*LOCAL, *engine_arguments(engine), "--drain-timeout", "5") as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as sock:
            server.wait_for("[NEW CONNECTION]")
            sock.sendall(message)
            signalled = time.monotonic()
            server.proc.send_signal(sig)
            assert recv_until_closed(sock) == message  # the whole echo, then EOF
        assert server.proc.wait(timeout=PROMPTLY) == 0
        assert time.monotonic() - signalled < 5
        lines = output_lines(server)
        stderr = server.stderr()
    size = len(message)
    assert lines[-1] == f"[SERVER STOPPED] 1 connections served, {size} bytes received, {size} sent"
    assert "Traceback" not in "\n".join(lines)
    assert stderr == ""


def test_a_second_sigint_stops_a_draining_server_at_once(engine: str) -> None:
    """With --drain-timeout 30 and a client that never reads its echo, the first Ctrl-C
    leaves the server draining; the second ends it within seconds, exit 0, no traceback."""
    args = (*LOCAL, *engine_arguments(engine), "--drain-timeout", "30", "-q")
    with ServerProcess(*args) as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as hog:
            server.wait_for("[NEW CONNECTION]")
            assert fill_until_blocked(hog) > 0
            first = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            wait_until_not_listening(port, first + PROMPTLY)
            if server.proc.poll() is not None:
                raise AssertionError(f"the first SIGINT did not drain: {output_lines(server)}")
            second = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            assert server.proc.wait(timeout=PROMPTLY) == 0
            assert time.monotonic() - second < 5
            assert time.monotonic() - first < 15  # far from the 30 s drain
        lines = output_lines(server)
        stderr = server.stderr()
    assert re.fullmatch(
        r"\[SERVER STOPPED\] 1 connections served, \d+ bytes received, \d+ sent", lines[-1]
    )
    assert "drain timeout" not in "\n".join(lines)
    assert "Traceback" not in stderr


def test_a_restarted_server_binds_the_port_its_predecessor_left_in_time_wait() -> None:
    """SIGTERM with a client connected leaves TIME_WAIT on the port; a new server still
    binds it at once (SO_REUSEADDR)."""
    with ServerProcess(*LOCAL) as first:
        port = first.wait_listening()
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"before\n")
            assert recv_exactly(sock, 7) == b"before\n"
            first.proc.send_signal(signal.SIGTERM)
            assert recv_until_closed(sock) == b""
        assert first.proc.wait(timeout=PROMPTLY) == 0
    assert port in tcp_ports(TIME_WAIT), "no TIME_WAIT on the port: the test proves nothing"
    with ServerProcess("--host", "127.0.0.1", "--port", str(port)) as second:
        assert second.wait_listening() == port
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"after\n")
            assert recv_exactly(sock, 6) == b"after\n"
        stop(second)


# Help and version


def test_python_m_tcpecho_version_prints_tcpecho_and_the_version() -> None:
    result = run_to_exit("--version", command=(PYTHON, "-m", "tcpecho"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tcpecho {tcpecho.__version__}\n"


def test_tcp_server_py_version_prints_tcpecho_and_the_version() -> None:
    result = run_to_exit("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tcpecho {tcpecho.__version__}\n"


def test_tcp_server_py_help_exits_0_and_lists_port_and_engine() -> None:
    result = run_to_exit("--help")
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout
    assert "--engine" in result.stdout
    assert "--drain-timeout" in result.stdout


def test_tcp_client_py_help_exits_0_and_lists_port_and_timeout() -> None:
    result = run_to_exit("--help", command=(PYTHON, str(ROOT / "tcp_client.py")))
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout
    assert "--timeout" in result.stdout


# Logging


def test_json_log_format_prints_one_json_object_per_line() -> None:
    """--log-format json: every stdout line parses; the first is the listening event, and each
    record names its event for machines (docs/metrics.md) and keeps the console's tag."""
    with ServerProcess(*LOCAL, "--log-format", "json") as server:
        first = json.loads(server.readline())
        assert first["event"] == "listening"
        assert first["tag"] == "SERVER STARTING"
        [[host, port]] = first["addresses"]
        assert host == "127.0.0.1"
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(b"json\n")
            assert recv_exactly(sock, 5) == b"json\n"
        server.wait_for('"event": "closed"')
        lines = stop(server)
    entries = [json.loads(line) for line in lines]
    events = [entry["event"] for entry in entries]
    assert events[0] == "listening"
    assert {"engine", "opened", "message", "closed", "draining"} <= set(events)
    assert events[-1] == "stopped"
    closed = next(entry for entry in entries if entry["event"] == "closed")
    assert closed["reason"] == "client_closed"
    assert (closed["bytes_received"], closed["bytes_sent"]) == (5, 5)
    assert entries[-1]["connections"] == 1
    assert entries[-1]["bytes_sent"] == 5


def test_a_client_cannot_forge_a_log_line_or_send_escape_sequences_to_the_console() -> None:
    """The ESC shows as \\x1b, CR LF as \\r\\n, and no line starts with the forged tag."""
    payload = b"hi\x1b[31m\r\n[DISCONNECTED] forged"
    with ServerProcess(*LOCAL) as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as sock:
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
        server.wait_for("[DISCONNECTED]")
        lines = stop(server)
    assert any("hi\\x1b[31m\\r\\n[DISCONNECTED] forged" in line for line in lines), lines
    assert not any(line.startswith("[DISCONNECTED] forged") for line in lines)
    assert not any("\x1b" in line or "\r" in line for line in lines)


def test_quiet_hides_the_line_per_message_but_keeps_connects_and_disconnects() -> None:
    with ServerProcess(*LOCAL, "-q") as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as sock:
            peer = f"127.0.0.1:{sock.getsockname()[1]}"
            sock.sendall(b"secret message\n")
            assert recv_exactly(sock, 15) == b"secret message\n"
        server.wait_for("[DISCONNECTED]")
        lines = stop(server)
    assert any(line.startswith(f"[NEW CONNECTION] {peer} ") for line in lines), lines
    assert any(line.startswith(f"[DISCONNECTED] {peer} ") for line in lines), lines
    assert not any("secret message" in line or line.startswith(f"[{peer}]") for line in lines)


def test_console_lines_for_a_real_nc_session() -> None:
    """``nc -N`` gets its echo; the console shows [NEW CONNECTION] with the active count,
    the message, and [DISCONNECTED], all naming nc's address."""
    nc = require_peer("nc")
    with ServerProcess(*LOCAL) as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port)) as other:
            server.wait_for("Active connections: 1")
            session = subprocess.run(
                [nc, "-N", "127.0.0.1", str(port)],
                input=b"hello from nc\n",
                capture_output=True,
                timeout=PROMPTLY,
                check=False,
            )
            assert session.returncode == 0, session.stderr
            assert session.stdout == b"hello from nc\n"
            opened = server.wait_for("[NEW CONNECTION]")
            match = re.fullmatch(
                r"\[NEW CONNECTION\] (127\.0\.0\.1:\d+) connected\. Active connections: 2\n",
                opened,
            )
            assert match, opened
            nc_address = match[1]
            assert nc_address != f"127.0.0.1:{other.getsockname()[1]}"
            assert server.wait_for(f"[{nc_address}]") == f"[{nc_address}] hello from nc\\n\n"
            closed = server.wait_for("[DISCONNECTED]")
            assert closed.startswith(f"[DISCONNECTED] {nc_address} closed by client ")
            assert "(14 bytes received, 14 sent, " in closed
        stop(server)


def test_each_fault_during_a_session_is_one_log_line_and_the_server_goes_on(engine: str) -> None:
    """A reset, a client that connects and closes at once, one that half-closes, and one that
    leaves while its echo is on the way (broken pipe): one [DISCONNECTED] line each, no
    traceback, and a later client is served."""
    with ServerProcess(*LOCAL, *engine_arguments(engine), "-q") as server:
        port = server.wait_listening()
        address = ("127.0.0.1", port)
        resetter = connect(address)
        resetter.sendall(b"about to reset\n")
        assert recv_exactly(resetter, 15) == b"about to reset\n"
        resetter.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        resetter.close()
        connect(address).close()
        with connect(address) as half:
            half.sendall(b"half\n")
            half.shutdown(socket.SHUT_WR)
            assert recv_until_closed(half) == b"half\n"
        leaver = connect(address)
        fill_until_blocked(leaver)  # the server's echo of it is on its way, unread
        leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        leaver.close()
        with connect(address) as later:
            later.sendall(b"still serving\n")
            assert recv_exactly(later, 14) == b"still serving\n"
        lines = stop(server)
        errors = server.stderr()
    disconnected = [line for line in lines if line.startswith("[DISCONNECTED]")]
    assert len(disconnected) == 5, lines
    assert any("reset by peer" in line or "broken pipe" in line for line in disconnected)
    assert not [line for line in lines if "Traceback" in line or line.startswith(" ")]
    assert errors == ""


def test_a_stop_right_after_the_banner_drains_and_exits_0(engine: str) -> None:
    """The signal handlers are in place before the banner: a script that stops the server as
    soon as it reads the banner gets a drain and exit 0, never a kill."""
    for sig in (signal.SIGTERM, signal.SIGINT) * 3:
        with ServerProcess(*LOCAL, *engine_arguments(engine), "-q") as server:
            server.wait_listening()
            server.proc.send_signal(sig)
            assert server.proc.wait(timeout=PROMPTLY) == 0
            assert "[SERVER STOPPED]" in server.proc.communicate(timeout=PROMPTLY)[0]
