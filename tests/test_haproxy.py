"""tcpecho behind a real HAProxy, across hosts: the PROXY protocol v2 and health checks.

Four network namespaces are the hosts, each on a point-to-point veth link to the balancer,
with addresses from the benchmarking range (198.18.0.0/15):

    client 198.18.1.2 ── 198.18.1.1 balancer 198.18.2.1 ── 198.18.2.2 server 1
                                             198.18.3.1 ── 198.18.3.2 server 2

HAProxy on the balancer is a full proxy: it accepts the client's connection and makes its own
to a server, so no host routes or forwards anything, and a server sees only the balancer's
address, except in the PROXY v2 header that HAProxy sends first (``send-proxy-v2``). Each
server trusts exactly its link's balancer address (``--proxy-trusted``), and its log must show
the client host's address, "via" the balancer's.

Root, iproute2 and haproxy are needed; without them the tests are skipped (failed in CI).
deploy/haproxy.cfg is the example for users; its check is here too.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.helpers import ROOT, ServerProcess, engine_arguments, recv_exactly, require_peer
from tests.netns import add_veth, connect_in, new_namespaces

CLIENT_ADDRESS = "198.18.1.2"
FRONTEND_ADDRESS = "198.18.1.1"  # the balancer, on the client's link
# Each server's link: the balancer's end (the address the server sees), the server's end.
SERVER_LINKS = (("198.18.2.1", "198.18.2.2"), ("198.18.3.1", "198.18.3.2"))
PREFIX_LENGTH = 30
# The balancer's namespace is this test's own, so a fixed port cannot meet anything else.
FRONTEND_PORT = 7000
BACKEND = "echo"

# HAProxy checks each server every 200 ms and takes it out after 2 failed checks: a stopped
# server is out 0.2-0.4 s after it stops listening. HAProxy's default is 2 s and 3 checks.
CHECK_INTERVAL_MS = 200
# HAProxy starts, and reports both servers' first checks passed, well within this.
READY_DEADLINE = 5.0
# A stopped server is reported DOWN within 2 check intervals; this is for a loaded machine.
DOWN_DEADLINE = 5.0
# Every connect, send and read of a client; an echo on these links takes about a millisecond.
ECHO_TIMEOUT = 5.0
# Connections through HAProxy before and after a server is stopped.
ECHOES = 8
# Bytes each echo sends: several TCP segments, read back 10 bytes at a time.
ECHO_SIZE = 3000

HAPROXY_CONFIG = """\
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 500ms
    timeout client 10s
    timeout server 10s
    # A connection refused by the stopped server is retried at once on the other, when it
    # is not yet marked down: this only makes failures during that window rarer.
    retries 2
    option redispatch 1

frontend clients
    bind {frontend}:{port}
    default_backend {backend}

backend {backend}
    balance roundrobin
    default-server send-proxy-v2 check inter {inter}ms fall 2 rise 1
    server s1 {s1}
    server s2 {s2}
"""

# "[NEW CONNECTION] 198.18.1.2:50874 connected (via 198.18.2.1:39126). Active connections: 1"
NEW_CONNECTION = re.compile(r"^\[NEW CONNECTION\] (\S+):(\d+) connected(?: \(via (\S+):\d+\))?\.")
# "[DISCONNECTED] 198.18.2.1:39044 reset by client: Connection reset by peer (0 bytes
# received, 0 sent, 0.0s)"
DISCONNECTED = re.compile(r"^\[DISCONNECTED\] (\S+):(\d+) (.+) \((\d+) bytes received, (\d+) sent,")
# How the balancer's own connections (its health checks, which send a LOCAL header) may end:
# HAProxy closes a check with a reset, and one open when a server stops is closed by it.
CHECK_ENDINGS = {"reset by client", "closed by client", "closed: server stopping"}
# How a client's connection may end: HAProxy passes on the client's close; or, when the client
# has closed but HAProxy's close has not reached the server when it is stopped, the server
# closes it, every byte echoed.
CLIENT_ENDINGS = {"closed by client", "closed: server stopping"}
REASONS = CHECK_ENDINGS | CLIENT_ENDINGS
# The log's tags on a clean run; anything else (REFUSED, INTERNAL ERROR, ACCEPT ERROR, a
# warning) is a failure.
CLEAN_TAGS = {
    "SERVER STARTING",
    "ENGINE",
    "NEW CONNECTION",
    "DISCONNECTED",
    "SERVER STOPPING",
    "SERVER STOPPED",
}


@dataclass(frozen=True)
class Hosts:
    """The namespaces: the client, the balancer and the two servers, and ``ip``'s path."""

    ip: str
    client: str
    balancer: str
    servers: tuple[str, str]

    def exec_in(self, namespace: str) -> list[str]:
        """The command prefix that runs a program in ``namespace`` (``ip netns exec`` execs
        it, so the process started is the program itself)."""
        return [self.ip, "netns", "exec", namespace]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Four new namespaces on three veth links, addressed and up; deleted afterwards with
    every process in them, however the test ends."""
    # Names unique to this run, so that parallel or aborted runs never meet; a device name is
    # at most 15 bytes ("th" + 8 + 2).
    token = os.urandom(4).hex()
    client, balancer = f"tcpecho-{token}-client", f"tcpecho-{token}-balancer"
    servers = (f"tcpecho-{token}-server1", f"tcpecho-{token}-server2")
    with new_namespaces(client, balancer, *servers) as ip:
        add_veth(
            ip,
            (client, f"th{token}c0", f"{CLIENT_ADDRESS}/{PREFIX_LENGTH}"),
            (balancer, f"th{token}b0", f"{FRONTEND_ADDRESS}/{PREFIX_LENGTH}"),
        )
        for number, (server, (balancer_end, server_end)) in enumerate(
            zip(servers, SERVER_LINKS, strict=True), start=1
        ):
            add_veth(
                ip,
                (balancer, f"th{token}b{number}", f"{balancer_end}/{PREFIX_LENGTH}"),
                (server, f"th{token}s{number}", f"{server_end}/{PREFIX_LENGTH}"),
            )
        yield Hosts(ip, client, balancer, servers)


@contextmanager
def echo_server(hosts: Hosts, number: int, engine: str) -> Iterator[tuple[ServerProcess, int]]:
    """tcpecho in server ``number``'s namespace, on every address, taking a PROXY header from
    the balancer only; and the port its banner names."""
    namespace, (balancer_end, _) = hosts.servers[number - 1], SERVER_LINKS[number - 1]
    with ServerProcess(
        "--host", "0.0.0.0", "--port", "0", *engine_arguments(engine), "-q",
        "--proxy-protocol", "on", "--proxy-trusted", f"{balancer_end}/32",
        launcher=hosts.exec_in(namespace),
    ) as server:  # fmt: skip
        yield server, server.wait_listening()


@contextmanager
def haproxy(hosts: Hosts, ports: tuple[int, int], tmp_path: Path) -> Iterator[Path]:
    """HAProxy in the balancer's namespace in front of the two servers; yields its stats
    socket once both servers' first health checks passed. Stopped on the way out."""
    binary = require_peer("haproxy")
    with ExitStack() as stack:
        # A Unix socket's path has at most 107 bytes; pytest's tmp_path can be longer.
        stats = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tcpecho-"))) / "s"
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(
                stats=stats,
                frontend=FRONTEND_ADDRESS,
                port=FRONTEND_PORT,
                backend=BACKEND,
                inter=CHECK_INTERVAL_MS,
                s1=f"{SERVER_LINKS[0][1]}:{ports[0]}",
                s2=f"{SERVER_LINKS[1][1]}:{ports[1]}",
            )
        )
        output = stack.enter_context((tmp_path / "haproxy.log").open("w+"))
        # -db: stay in the foreground, so that the process is HAProxy itself.
        proc = subprocess.Popen(
            [*hosts.exec_in(hosts.balancer), binary, "-db", "-f", str(config)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + READY_DEADLINE
            while True:
                assert proc.poll() is None, f"haproxy exited: {config.read_text()}{_read(output)}"
                try:
                    state = server_states(stats)
                except OSError:  # not listening on its stats socket yet
                    state = {}
                if [state.get(name, ("", ""))[1] for name in ("s1", "s2")] == ["L4OK"] * 2:
                    break
                assert time.monotonic() < deadline, (state, _read(output))
                time.sleep(0.02)
            yield stats
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _read(output: IO[str]) -> str:
    output.seek(0)
    return output.read()


def server_states(stats: Path) -> dict[str, tuple[str, str]]:
    """Each server of the backend: its status ("UP", "UP 1/2", "DOWN") and its last check's
    result ("L4OK", "L4CON": refused), from HAProxy's ``show stat``. Raises OSError while
    HAProxy is not listening on ``stats`` yet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ECHO_TIMEOUT)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    rows = csv.DictReader(answer.removeprefix("# ").splitlines())
    return {
        row["svname"]: (row["status"], row["check_status"])
        for row in rows
        if row["pxname"] == BACKEND and row["svname"] not in {"FRONTEND", "BACKEND"}
    }


@dataclass(frozen=True)
class Echo:
    """One connection from the client host through HAProxy: its port on the client host, and
    whether every byte sent came back (False: HAProxy closed or reset it first)."""

    port: int
    exact: bool
    error: str = ""


def echo_through(hosts: Hosts, number: int) -> Echo:
    """Connect from the client host to HAProxy, send ``ECHO_SIZE`` bytes, read them back.

    A reply that comes back different fails the test at once: only a connection that HAProxy
    ends before the reply is a failed echo (`Echo.exact` False).
    """
    payload = f"echo {number}:".encode() + os.urandom(ECHO_SIZE)
    with connect_in(hosts.client, (FRONTEND_ADDRESS, FRONTEND_PORT), ECHO_TIMEOUT) as sock:
        port = sock.getsockname()[1]
        try:
            sock.sendall(payload)
            got = recv_exactly(sock, len(payload), chunk=10)
        except ConnectionError as error:
            return Echo(port, exact=False, error=repr(error))
    assert payload.startswith(got), f"echo {number}: wrong bytes came back"
    return Echo(port, exact=got == payload, error="" if got == payload else f"{len(got)} bytes")


def stopped_log(server: ServerProcess) -> list[str]:
    """Every line the server logged, once it has exited (with 0, and nothing on stderr)."""
    assert server.proc.wait(timeout=10) == 0, server.stderr()
    assert server.stderr() == ""
    assert server.proc.stdout is not None
    return "".join([*server.lines, server.proc.stdout.read()]).splitlines()


def clients_in(log: list[str], balancer_end: str) -> set[int]:
    """The client host's ports that ``log`` shows connected via the balancer; and checks
    that everything else in the log is the balancer's health checks, ended cleanly."""
    clients: set[int] = set()
    checks: dict[str, str] = {}  # the balancer's own connections: port → how it ended
    for line in log:
        tag = line[1 : line.index("]")] if line.startswith("[") else ""
        assert tag in CLEAN_TAGS, line
        if opened := NEW_CONNECTION.match(line):
            host, port, via = opened.groups()
            if via is None:  # a health check: LOCAL header, the proxy's own connection
                assert host == balancer_end, line
                checks[port] = ""
            else:
                assert (host, via) == (CLIENT_ADDRESS, balancer_end), line
                clients.add(int(port))
        elif closed := DISCONNECTED.match(line):
            host, port, ending, received, sent = closed.groups()
            # The reason, then the error's text for some ("reset by client: Connection reset
            # by peer"); a reason may have a colon of its own ("closed: server stopping").
            reason = next((each for each in REASONS if f"{ending}: ".startswith(f"{each}: ")), "")
            if host == balancer_end:
                assert reason in CHECK_ENDINGS, line
                checks[port] = reason
            else:
                assert host == CLIENT_ADDRESS, line
                assert reason in CLIENT_ENDINGS, line
                assert int(received) == int(sent) > ECHO_SIZE, line
    assert checks, f"no health check reached the server: {log}"
    assert all(checks.values()), f"a health check never ended: {log}"
    return clients


@pytest.mark.timeout(45)
def test_round_robin_real_client_address_and_failover(
    hosts: Hosts, engine: str, tmp_path: Path
) -> None:
    """Through HAProxy with send-proxy-v2, round robin: every echo is exact, each server logs
    the client host's address via the balancer's, and the health checks (a LOCAL header each)
    log no error. Server 1 is stopped: once HAProxy's checks mark it DOWN, every echo goes
    through server 2, exact, and none fails.

    Between the stop and HAProxy's DOWN (at most 2 check intervals), a connection HAProxy sends
    to server 1 is refused; HAProxy redispatches it to server 2 (``option redispatch``), but
    a failure there is allowed, as HAProxy cannot know sooner: only then.
    """
    with ExitStack() as stack:
        (s1, port1), (s2, port2) = (
            stack.enter_context(echo_server(hosts, number, engine)) for number in (1, 2)
        )
        stats = stack.enter_context(haproxy(hosts, (port1, port2), tmp_path))

        before = [echo_through(hosts, number) for number in range(ECHOES)]
        assert all(each.exact for each in before), before

        s1.proc.send_signal(signal.SIGTERM)
        log1 = stopped_log(s1)
        deadline = time.monotonic() + DOWN_DEADLINE
        window: list[Echo] = []
        while not (state := server_states(stats))["s1"][0].startswith("DOWN"):
            assert time.monotonic() < deadline, state
            window.append(echo_through(hosts, ECHOES + len(window)))
        assert state["s2"] == ("UP", "L4OK"), state

        after = [echo_through(hosts, 2 * ECHOES + number) for number in range(ECHOES)]
        assert all(each.exact for each in after), after

        s2.proc.send_signal(signal.SIGTERM)
        log2 = stopped_log(s2)

    served1 = clients_in(log1, SERVER_LINKS[0][0])
    served2 = clients_in(log2, SERVER_LINKS[1][0])
    # Round robin, before the stop: each server had half, and each connection is in one log.
    ports_before = {each.port for each in before}
    assert served1 <= ports_before, (served1, before)  # it had stopped before the window
    assert len(served1) == len(served2 & ports_before) == ECHOES // 2, (served1, served2)
    assert served1 | served2 >= ports_before, (served1, served2, before)
    # After: server 2 alone, for each of them.
    assert {each.port for each in after} <= served2, (served2, after)
    # In the window, what came back was from server 2 (server 1 had stopped listening).
    assert {each.port for each in window if each.exact} <= served2, (served2, window)


def test_deploy_example_parses() -> None:
    """deploy/haproxy.cfg is a configuration HAProxy accepts (``haproxy -c``)."""
    binary = require_peer("haproxy")
    result = subprocess.run(
        [binary, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
