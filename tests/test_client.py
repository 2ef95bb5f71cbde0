"""The client, as the tutorial's user runs it (on a terminal, on a pipe) and as a library."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tcpecho.client import EchoClient
from tcpecho.testing import running_server
from tests.helpers import ROOT, ServerProcess

PYTHON = sys.executable
CLIENT = str(ROOT / "tcp_client.py")
# Lets ``python -m tcpecho`` find the package whether or not it is installed in the venv.
SRC_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
PROMPT = "Enter message (or 'exit' to quit): "
# Longer than the seed's recv(1024), so a client that reads once would cut it.
LONG_LINE = b"0123456789" * 10_000
# A terminal in canonical mode takes at most 4095 characters a line (Linux N_TTY_BUF_SIZE), so
# a typed line is bounded by that, not by the client.
LONG_TYPED_LINE = "abcdefghij" * 400
DEADLINE = 10.0


@pytest.fixture
def port() -> Iterator[int]:
    """The port of a tcp_server.py on 127.0.0.1 (raw echo), stopped after the test."""
    with ServerProcess("--host", "127.0.0.1", "--port", "0", "-q") as server:
        yield server.wait_listening()


class Terminal:
    """A process whose stdin, stdout and stderr are a pseudo-terminal that the test types on."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(
                [PYTHON, "-u", CLIENT, *args], stdin=slave, stdout=slave, stderr=slave
            )
        finally:
            os.close(slave)
        self.transcript = b""
        self.seen = 0  # how much of the transcript `expect` has matched
        self.closed = False

    def text(self) -> str:
        """What the screen showed, with the terminal's CR LF as LF."""
        return self.transcript.decode("utf-8", "replace").replace("\r\n", "\n")

    def _read(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([self.master], [], [], max(remaining, 0))
        if not ready:
            raise AssertionError(f"timed out; the screen shows {self.text()!r}")
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every process closed the terminal
            data = b""
        if not data:
            self.closed = True
        self.transcript += data

    def expect(self, text: str, timeout: float = DEADLINE) -> None:
        """Wait until ``text`` appears on the screen after what was already matched."""
        deadline = time.monotonic() + timeout
        while (found := self.text().find(text, self.seen)) < 0:
            if self.closed:
                raise AssertionError(f"{text!r} never shown; the screen shows {self.text()!r}")
            self._read(deadline)
        self.seen = found + len(text)

    def type(self, line: str) -> None:
        data = (line + "\n").encode()
        while data:
            data = data[os.write(self.master, data) :]

    def wait(self, timeout: float = DEADLINE) -> int:
        """Read the screen until the process closes the terminal; return its exit code."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            self._read(deadline)
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        os.close(self.master)


@contextmanager
def terminal(*args: str) -> Iterator[Terminal]:
    term = Terminal(*args)
    try:
        yield term
    finally:
        term.close()


def run_client(
    *args: str, stdin: bytes, command: tuple[str, ...] = (PYTHON, "-u", CLIENT)
) -> subprocess.CompletedProcess[bytes]:
    """Run the client with ``stdin`` on a pipe."""
    return subprocess.run(
        [*command, *args],
        input=stdin,
        capture_output=True,
        timeout=DEADLINE * 2,
        check=False,
        env=SRC_ENV,
    )


# On a terminal: the seed's session


def test_the_seeds_interactive_session_on_a_terminal(port: int) -> None:
    """Connected, prompt, hello comes back, exit says goodbye and exits 0: the screen is
    exactly the tutorial's session."""
    with terminal("--port", str(port)) as term:
        term.expect(f"Connected to 127.0.0.1:{port}\n{PROMPT}")
        term.type("hello")
        term.expect(f"Received from server: hello\n{PROMPT}")
        term.type("exit")
        term.expect("Client disconnected.\n")
        assert term.wait() == 0
        assert term.text() == (
            f"Connected to 127.0.0.1:{port}\n"
            f"{PROMPT}hello\n"
            "Received from server: hello\n"
            f"{PROMPT}exit\n"
            "Client disconnected.\n"
        )


def test_a_typed_line_longer_than_1024_bytes_comes_back_whole_on_a_terminal(port: int) -> None:
    """The seed's recv(1024) showed the first 1024 bytes; the whole 4000-byte line shows."""
    with terminal("--port", str(port)) as term:
        term.expect(PROMPT)
        term.type(LONG_TYPED_LINE)
        term.expect(f"Received from server: {LONG_TYPED_LINE}\n{PROMPT}")
        term.type("hello")  # the next reply is not the rest of the long one
        term.expect(f"Received from server: hello\n{PROMPT}")
        term.type("exit")
        assert term.wait() == 0
        assert term.text().endswith("Client disconnected.\n")


# Nothing listening


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it), not
    listening, for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_with_nothing_listening_the_client_prints_the_seeds_error(refusing_port: int) -> None:
    result = run_client("--port", str(refusing_port), stdin=b"hello\n")
    assert result.stdout.decode().splitlines()[0] == (
        f"Error: Connection refused. Is the server running on 127.0.0.1:{refusing_port}?"
    )
    assert result.returncode == 7
    assert b"Traceback" not in result.stderr


def test_with_nothing_listening_a_terminal_shows_the_seeds_error(refusing_port: int) -> None:
    with terminal("--port", str(refusing_port)) as term:
        assert term.wait() == 7
        assert term.text().startswith(
            f"Error: Connection refused. Is the server running on 127.0.0.1:{refusing_port}?\n"
        )
        assert "Traceback" not in term.text()


def test_a_client_port_out_of_range_is_an_invalid_option_like_the_servers() -> None:
    """--port 70000: exit 2 and one line about --port, never a connection to another port."""
    result = run_client("--port", "70000", stdin=b"hello\n")
    assert result.returncode == 2, result.stdout
    assert b"--port" in result.stderr
    assert b"Connection refused" not in result.stdout


# On a pipe


def test_on_a_pipe_each_line_is_sent_and_each_reply_printed_exactly(port: int) -> None:
    """printf 'a\\nb\\n' | tcp_client.py prints exactly a, b: no prompt, no banner."""
    result = run_client("--port", str(port), stdin=b"a\nb\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"a\nb\n"
    assert result.stderr == b""


def test_python_m_tcpecho_client_works_on_a_pipe_too(port: int) -> None:
    result = run_client(
        "client", "--port", str(port), stdin=b"a\nb\n", command=(PYTHON, "-m", "tcpecho")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"a\nb\n"


def test_a_100000_byte_line_comes_back_whole_on_a_pipe(port: int) -> None:
    """Not the seed's first 1024 bytes: the whole line, then the next one."""
    result = run_client("--port", str(port), stdin=LONG_LINE + b"\nafter\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == LONG_LINE + b"\nafter\n"


# The library


def test_echo_client_request_returns_the_exact_line_from_an_in_process_server() -> None:
    with running_server() as server, EchoClient(*server.address) as client:
        assert client.request(b"ping") == b"ping\n"
        assert client.request(LONG_LINE) == LONG_LINE + b"\n"
        assert client.request(b"\x00\xff binary \x1b") == b"\x00\xff binary \x1b\n"
