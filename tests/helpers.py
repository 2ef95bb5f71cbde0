"""Plain helpers shared by the tests: real peer programs, engine variants, sockets, servers.

Fixtures and pytest settings stay in conftest.py; everything a test module imports by name
lives here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

from tcpecho.testing import RunningServer

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
# The fault suite scales a few counts down to stay inside the suite's time budget; set
# FULL_COUNTS=1 to run the counts the issue names (minutes, not seconds).
FULL_COUNTS = os.environ.get("FULL_COUNTS", "") == "1"


def unavailable(message: str) -> NoReturn:
    """Skip the test for want of ``message``; in CI fail instead, where everything is installed
    on purpose and a skip would hide a test that never ran."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_peer(name: str) -> str:
    """The path of the real program ``name``: skipped locally when missing, failed in CI."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"the real peer {name!r} is not installed (.ci/run installs it)")
    return path


def require_root(why: str) -> None:
    """Skipped locally (failed in CI) unless running as root, which ``why`` needs."""
    if os.geteuid() != 0:
        unavailable(f"{why} needs root")


# Every way tcpecho can serve: the engine, and for asyncio the event loop.
ENGINE_VARIANTS: dict[str, dict[str, str]] = {
    "threads": {"engine": "threads"},
    "asyncio": {"engine": "asyncio", "loop": "asyncio"},
    "uvloop": {"engine": "asyncio", "loop": "uvloop"},
}


def require_variant(variant: str) -> None:
    """Whether ``variant`` can run here: skipped (failed in CI) when uvloop is missing."""
    if variant == "uvloop" and importlib.util.find_spec("uvloop") is None:
        unavailable("uvloop is not installed (it is in the test extras)")


def engine_options(variant: str) -> dict[str, str]:
    """ServerConfig options for ``variant``; skipped (failed in CI) when uvloop is missing."""
    require_variant(variant)
    return ENGINE_VARIANTS[variant]


def engine_arguments(variant: str) -> list[str]:
    """The same as command-line arguments of tcp_server.py."""
    return [f"--{name}={value}" for name, value in engine_options(variant).items()]


# What the ``serve`` fixture yields: start a server with any ServerConfig options.
ServerFactory = Callable[..., RunningServer]


def connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``address``, its operations bounded by ``timeout`` seconds."""
    return socket.create_connection(address, timeout=timeout)


def recv_exactly(sock: socket.socket, size: int, chunk: int = 65536) -> bytes:
    """Read ``size`` bytes, in reads of at most ``chunk``; fewer only if the peer closed."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = sock.recv(min(chunk, size - got))
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def recv_until_closed(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until the peer closes."""
    parts: list[bytes] = []
    while data := sock.recv(65536):
        parts.append(data)
    return b"".join(parts)


class ServerProcess(AbstractContextManager["ServerProcess"]):
    """``python3 tcp_server.py ARGS`` as a child process, its output read line by line.

    ``launcher`` runs it, such as ``ip netns exec NS``; it must exec the server (not fork it), so
    that ``proc`` is the server itself and killing it leaves nothing behind. ``env``: variables
    to set, beside this process's.
    """

    def __init__(
        self,
        *args: str,
        python: str = sys.executable,
        script: str = "tcp_server.py",
        launcher: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [*launcher, python, "-u", str(ROOT / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        self.lines: list[str] = []

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.lines.append(line)
        return line

    def wait_for(self, text: str) -> str:
        """Read lines until one contains ``text``; fails if the output ends first."""
        while line := self.readline():
            if text in line:
                return line
        raise AssertionError(f"{text!r} never printed; output: {self.lines}")

    def wait_listening(self) -> int:
        """Read the banner (the first line) and return the port it names."""
        banner = self.readline()
        assert banner.startswith("[SERVER STARTING] Listening on "), (banner, self.stderr())
        return int(banner.rsplit(":", 1)[1])

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


class CapturedRecords(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


HandlerT = TypeVar("HandlerT", bound=logging.Handler)


@contextmanager
def attached_to_server_log(handler: HandlerT) -> Iterator[HandlerT]:
    """``handler`` on the ``tcpecho.server`` logger, at INFO and above, while the block runs."""
    logger = logging.getLogger("tcpecho.server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def captured_server_log() -> Iterator[CapturedRecords]:
    """The records of the ``tcpecho.server`` logger at INFO and above, while the block runs.

    (pytest's caplog sees nothing once the CLI has configured tcpecho's logger not to
    propagate, as the in-process CLI tests do.)
    """
    with attached_to_server_log(CapturedRecords()) as handler:
        yield handler
