"""Shared fixtures: real servers on ports the OS picks, and real peer programs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tcpecho.config import ServerConfig
from tcpecho.testing import RunningServer, running_server

# Property tests run beside servers under load: a slow example is not a failure.
settings.register_profile("tcpecho", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tcpecho")

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_peer(name: str) -> str:
    """The path of the real program ``name``: skipped locally when missing, failed in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"the real peer {name!r} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


# Every way tcpecho can serve: the engine, and for asyncio the event loop.
ENGINE_VARIANTS: dict[str, dict[str, str]] = {
    "threads": {"engine": "threads"},
    "asyncio": {"engine": "asyncio", "loop": "asyncio"},
    "uvloop": {"engine": "asyncio", "loop": "uvloop"},
}


def engine_options(variant: str) -> dict[str, str]:
    """ServerConfig options for ``variant``; skipped (failed in CI) when uvloop is missing."""
    if variant == "uvloop" and importlib.util.find_spec("uvloop") is None:
        message = "uvloop is not installed (it is in the test extras)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return ENGINE_VARIANTS[variant]


def engine_arguments(variant: str) -> list[str]:
    """The same as command-line arguments of tcp_server.py."""
    return [f"--{name}={value}" for name, value in engine_options(variant).items()]


@pytest.fixture(params=list(ENGINE_VARIANTS))
def engine(request: pytest.FixtureRequest) -> str:
    """Each engine variant in turn: a test that takes it runs once per engine and loop."""
    name: str = request.param
    return name


ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def serve(engine: str) -> Iterator[ServerFactory]:
    """Start a server on 127.0.0.1, port 0, with the ``engine`` and any ServerConfig options."""
    with ExitStack() as stack:

        def start(**options: Any) -> RunningServer:
            options.setdefault("host", "127.0.0.1")
            options.setdefault("port", 0)
            options.setdefault("drain_timeout", 2.0)
            options = {**engine_options(engine), **options}
            config = ServerConfig(**options)
            return stack.enter_context(running_server(config))

        yield start


@pytest.fixture
def server(serve: ServerFactory) -> RunningServer:
    """A default server (raw framing, exact echo) of each engine."""
    return serve()


def connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
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
    parts = []
    while data := sock.recv(65536):
        parts.append(data)
    return b"".join(parts)


class ServerProcess(AbstractContextManager["ServerProcess"]):
    """``python3 tcp_server.py ARGS`` as a child process, its output read line by line."""

    def __init__(self, *args: str, python: str = sys.executable, script: str = "tcp_server.py"):
        self.proc = subprocess.Popen(
            [python, "-u", str(ROOT / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
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
