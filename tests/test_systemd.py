"""systemd: socket activation (LISTEN_FDS) and readiness notification (NOTIFY_SOCKET).

Socket activation is tested for real with ``systemd-socket-activate``, which listens, waits
for the first connection and execs the server with the socket as descriptor 3. It needs a port
and cannot report one the OS picked, so it runs in a network namespace of the test's own,
where a fixed port on 127.0.0.1 belongs to nobody else. Notification is tested with a unix
datagram socket the test binds and names in NOTIFY_SOCKET, as systemd does.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpecho import net
from tcpecho.config import ServerConfig, forget_systemd, read_systemd, resolve, to_toml
from tcpecho.errors import ConfigError, InheritedSocketError
from tcpecho.systemd import Notifier
from tests.helpers import (
    ROOT,
    CapturedRecords,
    ServerProcess,
    connect,
    engine_arguments,
    recv_exactly,
    require_peer,
)
from tests.netns import Namespace, loopback_namespace

# The port systemd-socket-activate listens on, inside the test's own namespace.
ACTIVATED_PORT = 65432
# Bound for what should happen at once: a datagram after a banner, an exit after SIGTERM.
PROMPT = 10.0


# Reading the environment


def test_listen_fds_for_this_process_are_the_descriptors_from_3() -> None:
    environ = {"LISTEN_PID": "4242", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "echo:echo6"}
    assert read_systemd(environ, pid=4242) == {"listen_fds": (3, 4)}


@pytest.mark.parametrize(
    "environ",
    [
        {"LISTEN_PID": "4241", "LISTEN_FDS": "1"},  # meant for another process (our parent)
        {"LISTEN_FDS": "1"},  # no LISTEN_PID: sd_listen_fds(3) passes nothing
        {"LISTEN_PID": "4242", "LISTEN_FDS": "0"},
        {},
    ],
)
def test_listen_fds_not_meant_for_this_process_are_ignored(environ: dict[str, str]) -> None:
    assert read_systemd(environ, pid=4242) == {}


@pytest.mark.parametrize(
    ("environ", "var"),
    [
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "two"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "4242", "LISTEN_FDS": "99999999"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, "NOTIFY_SOCKET"),
    ],
)
def test_a_malformed_systemd_variable_is_a_config_error_naming_it(
    environ: dict[str, str], var: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        read_systemd(environ, pid=4242)
    assert caught.value.option == var
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith(f"invalid {var} ")


@pytest.mark.parametrize("address", ["/run/systemd/notify", "@tcpecho-notify"])
def test_notify_socket_is_read_as_a_path_or_an_abstract_name(address: str) -> None:
    assert read_systemd({"NOTIFY_SOCKET": address}, pid=1) == {"notify_socket": address}


def test_resolve_puts_systemd_sockets_in_the_config_and_print_config_says_so() -> None:
    environ = {"LISTEN_PID": "4242", "LISTEN_FDS": "1", "NOTIFY_SOCKET": "@n", "TCPECHO_PORT": "7"}
    resolved = resolve({}, environ, pid=4242)
    assert resolved.config.listen_fds == (3,)
    assert resolved.config.notify_socket == "@n"
    assert resolved.config.port == 7  # still resolved, though not used for listening
    printed = to_toml(resolved)
    assert "descriptors 3 from systemd (LISTEN_FDS); host, port and backlog are not used" in printed
    assert "(NOTIFY_SOCKET)" in printed


def test_the_variables_are_unset_once_read() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "NOTIFY_SOCKET": "@n"}
    environ["PATH"] = "/bin"
    forget_systemd(environ)
    assert environ == {"PATH": "/bin"}


# Checking the descriptors


def _sockets_that_are_not_listening_tcp() -> Iterator[tuple[socket.socket, str]]:
    yield socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "not a TCP socket (AF_INET, SOCK_DGRAM)"
    yield socket.socket(socket.AF_UNIX), "not a TCP socket (AF_UNIX, SOCK_STREAM)"
    yield socket.socket(), "a TCP socket that is not listening"


def test_a_descriptor_that_is_no_listening_tcp_socket_is_refused_and_left_open() -> None:
    for sock, reason in _sockets_that_are_not_listening_tcp():
        with sock:
            config = ServerConfig(listen_fds=(sock.fileno(),))
            with pytest.raises(InheritedSocketError) as caught:
                net.listening_sockets(config)
            assert caught.value.reason == reason
            assert caught.value.exit_code == 2
            os.fstat(sock.fileno())  # still open: it was never the server's to close
    reader, writer = os.pipe()
    try:
        with pytest.raises(InheritedSocketError, match="not a socket"):
            net.listening_sockets(ServerConfig(listen_fds=(reader,)))
        os.fstat(reader)
    finally:
        os.close(reader)
        os.close(writer)


def test_a_bad_descriptor_after_a_good_one_closes_the_good_one_as_a_stop_would() -> None:
    with socket.create_server(("127.0.0.1", 0)) as good, socket.socket() as bad:
        copy = os.dup(good.fileno())  # the server's to close; closed by the failure
        with pytest.raises(InheritedSocketError):
            net.listening_sockets(ServerConfig(listen_fds=(copy, bad.fileno())))
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(copy)


# Notification


def _notify_socket(tmp_path: Path, kind: str) -> tuple[socket.socket, str]:
    """A bound unix datagram socket, and the NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        path = str(tmp_path / "notify")
        sock.bind(path)
        address = path
    else:
        name = f"tcpecho-test-{secrets.token_hex(6)}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(PROMPT)
    return sock, address


def test_a_notification_nobody_hears_is_dropped_after_one_debug_line(tmp_path: Path) -> None:
    logger = logging.getLogger("tcpecho.server")
    handler, level = CapturedRecords(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        Notifier(str(tmp_path / "nobody")).ready([("127.0.0.1", 1)])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    [record] = handler.records
    assert record.levelno == logging.DEBUG
    assert "cannot notify systemd" in record.getMessage()


def test_no_notify_socket_sends_nothing_and_stopping_is_sent_once(tmp_path: Path) -> None:
    Notifier("").ready([("127.0.0.1", 1)])  # nothing to send to, nothing raised
    sock, address = _notify_socket(tmp_path, "abstract")
    with sock:
        notifier = Notifier(address)
        notifier.stopping()
        notifier.stopping()
        notifier.ready([("127.0.0.1", 1)])  # too late: a stopping server is not ready
        assert sock.recv(4096).startswith(b"STOPPING=1\n")
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)


@pytest.mark.parametrize(
    ("variant", "workers", "kind"),
    [("threads", 1, "path"), ("asyncio", 1, "abstract"), ("asyncio", 2, "path")],
)
def test_ready_once_listening_and_stopping_on_sigterm(
    tmp_path: Path, variant: str, workers: int, kind: str
) -> None:
    """READY=1 comes after the banner, when a connect succeeds and is echoed at once;
    STOPPING=1 comes when SIGTERM begins the stop, and the server then exits 0."""
    sock, address = _notify_socket(tmp_path, kind)
    args = ["--host", "127.0.0.1", "--port", "0", "--workers", str(workers), "-q"]
    with (
        sock,
        ServerProcess(*args, *engine_arguments(variant), env={"NOTIFY_SOCKET": address}) as server,
    ):
        ready = sock.recv(4096).decode()
        port = server.wait_listening()  # printed before READY=1 was sent
        assert ready == f"READY=1\nSTATUS=Listening on 127.0.0.1:{port}" + (
            f" with {workers} workers" if workers > 1 else ""
        )
        with connect(("127.0.0.1", port)) as client:
            client.sendall(b"ping\n")
            assert recv_exactly(client, 5) == b"ping\n"
        server.proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).startswith(b"STOPPING=1\n")
        assert server.proc.wait(PROMPT) == 0


# Socket activation, for real


def _activated(
    namespace: Namespace, *args: str, listen: str = f"127.0.0.1:{ACTIVATED_PORT}"
) -> ServerProcess:
    """tcp_server.py under systemd-socket-activate, in ``namespace``: it listens on ``listen``
    and execs the server (same process) when the first connection arrives."""
    activate = require_peer("systemd-socket-activate")
    return ServerProcess(*args, launcher=[*namespace.exec_in(), activate, "-l", listen])


def _wait_activator_listening(server: ServerProcess) -> None:
    """systemd-socket-activate says on stderr when it listens, before it waits for a client."""
    assert server.proc.stderr is not None
    line = server.proc.stderr.readline()
    assert line.startswith("Listening on "), line


@pytest.mark.parametrize(("variant", "workers"), [("threads", 1), ("asyncio", 1), ("asyncio", 2)])
def test_socket_activation_serves_on_the_socket_systemd_passes(variant: str, workers: int) -> None:
    """The first client connects before the server even runs (the socket is systemd's) and is
    echoed once it does; the banner names the inherited address; others are served too; SIGTERM
    stops it cleanly."""
    with loopback_namespace() as namespace:
        address = ("127.0.0.1", ACTIVATED_PORT)
        with _activated(
            namespace, "--workers", str(workers), "-q", *engine_arguments(variant)
        ) as server:
            _wait_activator_listening(server)
            with namespace.connect(address, PROMPT) as first:
                first.sendall(b"first\n")  # queued in the socket: nobody has accepted yet
                banner = server.wait_for("[SERVER STARTING]")
                assert (
                    banner.strip() == f"[SERVER STARTING] Listening on 127.0.0.1:{ACTIVATED_PORT}"
                )
                assert "socket activation: serving on the sockets passed as descriptors 3" in (
                    server.readline()
                )
                assert recv_exactly(first, 6) == b"first\n"
                for n in range(3):
                    with namespace.connect(address, PROMPT) as other:
                        other.sendall(b"%d\n" % n)
                        assert recv_exactly(other, 2) == b"%d\n" % n
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(PROMPT) == 0, server.stderr()


def test_socket_activation_with_a_unix_socket_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """tcpecho serves TCP only: a unix stream socket passed is refused at start, in one line."""
    path = str(tmp_path / "echo.sock")
    activate = require_peer("systemd-socket-activate")
    with ServerProcess(launcher=[activate, "-l", path]) as server:
        _wait_activator_listening(server)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # what makes systemd-socket-activate start the server
            assert server.proc.wait(PROMPT) == 2
        assert server.proc.stdout is not None
        assert server.proc.stdout.read() == ""
        lines = server.stderr().splitlines()
        assert lines[-1] == (
            "Error: cannot serve on descriptor 3 (LISTEN_FDS): not a TCP socket (AF_UNIX, "
            "SOCK_STREAM). tcpecho serves TCP only: in the socket unit, use ListenStream= with "
            "an IP address and port."
        )
        assert not any(line.startswith("Traceback") for line in lines)


def test_a_tcp_socket_not_listening_is_one_line_and_exit_2() -> None:
    """What sd_listen_fds(3) passes must be checked: a bound TCP socket that does not listen
    (passed as descriptor 3 with LISTEN_PID set to the server's pid, as systemd does)."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        # A launcher that does what systemd does between fork and exec: the socket as
        # descriptor 3, and its own pid (the server's, once it execs) in LISTEN_PID.
        launch = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); "
            "env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
            "os.execve(sys.executable, [sys.executable, *sys.argv[2:]], env)"
        )
        result = subprocess.run(
            [sys.executable, "-c", launch, str(bound.fileno()), str(ROOT / "tcp_server.py")],
            pass_fds=(bound.fileno(),),
            capture_output=True,
            text=True,
            timeout=PROMPT,
            check=False,
        )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(
        "Error: cannot serve on descriptor 3 (LISTEN_FDS): a TCP socket that is not listening."
    )
    assert len(result.stderr.splitlines()) == 1
