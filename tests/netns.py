"""Private networks for tests: network namespaces as hosts, joined by veth pairs.

`veth_link` is a bad network: two namespaces joined by one veth pair.

The server's namespace holds 198.18.0.1/30 and the client's 198.18.0.2/30, from the range set
aside for benchmarking (RFC 2544, 198.18.0.0/15), so that neither can be mistaken for a real
network. Each test makes its own pair under names no other run uses, makes its faults on it
(random loss with nftables, a rate limit with tc's tbf, the link going down) and deletes it
afterwards, with every process still inside.

`new_namespaces`, `add_veth` and `connect_in` are its parts, for tests that build other
networks (tests/test_haproxy.py: a client, a balancer and two servers).

Making namespaces needs root and iproute2, loss needs nftables, the rate limit tc; where one is
missing, the test is skipped (failed in CI, by ``helpers.unavailable``).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from tests.helpers import require_peer, require_root, unavailable

SERVER_ADDRESS = "198.18.0.1"
CLIENT_ADDRESS = "198.18.0.2"
PREFIX_LENGTH = 30

# setns(2)'s flag for a network namespace: Python has os.setns only from 3.12.
CLONE_NEWNET = 0x40000000

# Every ip, nft and tc command is quick; one that hangs is a bug, not a slow machine.
COMMAND_TIMEOUT = 10.0

# The nftables table that makes random loss, one in each namespace.
LOSS_TABLE = "tcpecho_loss"


def _run(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def _must(*args: str) -> str:
    """Run a command that cannot fail once namespaces can be made; its stdout."""
    result = _run(args)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


@dataclass(frozen=True)
class LossCount:
    """What one namespace's loss rule saw: packets that arrived on the link, and those dropped."""

    namespace: str
    arrived: int
    dropped: int


@dataclass(frozen=True)
class Link:
    """The two ends of the veth pair: the server's namespace and device, and the client's."""

    ip: str
    server_namespace: str
    client_namespace: str
    server_device: str
    client_device: str

    def ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(namespace, device) of the server's end, then of the client's."""
        return (
            (self.server_namespace, self.server_device),
            (self.client_namespace, self.client_device),
        )

    def exec_in(self, namespace: str) -> list[str]:
        """The command prefix that runs a program in ``namespace`` (``ip netns exec`` execs
        it, so the process started is the program itself)."""
        return [self.ip, "netns", "exec", namespace]

    def in_server(self) -> list[str]:
        """The command prefix that runs a program in the server's namespace."""
        return self.exec_in(self.server_namespace)

    def in_client(self) -> list[str]:
        """The command prefix that runs a program in the client's namespace."""
        return self.exec_in(self.client_namespace)

    def down(self) -> None:
        """Take the server's end down; the client's end loses its carrier with it."""
        _must(self.ip, "-n", self.server_namespace, "link", "set", self.server_device, "down")

    def up(self) -> None:
        """Bring the server's end back; the kernel restores its address's route at once."""
        _must(self.ip, "-n", self.server_namespace, "link", "set", self.server_device, "up")

    def drop_randomly(self, percent: int) -> None:
        """Drop ``percent`` % of the packets arriving on each end, each packet by its own draw.

        The rule is on the input hook, so that a packet is lost after it crossed the link, as
        on a wire: a drop on the output hook is reported to the sending TCP as a local error,
        and TCP handles that differently from a loss it has to discover. Counters record what
        each end saw, so that a test can show the loss was there (``loss_counts``).
        """
        nft = require_peer("nft")
        for namespace, device in self.ends():
            arriving = f'iifname "{device}"'
            rules = "\n".join(
                [
                    f"table inet {LOSS_TABLE} {{",
                    "  counter arrived { }",
                    "  counter dropped { }",
                    "  chain input {",
                    "    type filter hook input priority filter; policy accept;",
                    f'    {arriving} counter name "arrived"',
                    f'    {arriving} numgen random mod 100 < {percent} counter name "dropped" drop',
                    "  }",
                    "}",
                ]
            )
            result = _run([*self.exec_in(namespace), nft, "-f", "-"], stdin=rules)
            if result.returncode != 0:
                unavailable(f"nftables cannot filter in a namespace here: {result.stderr.strip()}")

    def loss_counts(self) -> list[LossCount]:
        """The counters of ``drop_randomly``: the server's end first, then the client's."""
        nft = require_peer("nft")
        counts = []
        for namespace, _ in self.ends():
            listing = _must(*self.exec_in(namespace), nft, "-j", "list", "counters")
            counters = {
                item["counter"]["name"]: item["counter"]["packets"]
                for item in json.loads(listing)["nftables"]
                if "counter" in item and item["counter"]["table"] == LOSS_TABLE
            }
            counts.append(LossCount(namespace, counters["arrived"], counters["dropped"]))
        return counts

    def throttle(self, rate: str, burst: str, latency: str) -> None:
        """Limit each end's sending to ``rate`` with a token bucket (tc's tbf qdisc)."""
        tc = require_peer("tc")
        for namespace, device in self.ends():
            command = [tc, "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf"]
            result = _run([*command, "rate", rate, "burst", burst, "latency", latency])
            if result.returncode != 0:
                unavailable(f"tc cannot add a tbf qdisc here: {result.stderr.strip()}")

    def connect_from_client(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection to ``address`` made from the client's namespace, in this process."""
        return connect_in(self.client_namespace, address, timeout)


def connect_in(namespace: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to ``address`` made from ``namespace``, in this process; the caller
    closes it.

    A socket belongs to the namespace of the thread that made it, for good; so a thread joins
    the namespace (setns affects only the calling thread), connects and ends, and the socket
    serves any thread after. Raises what the connect raised (OSError, TimeoutError).
    """
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def connect() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{namespace}", "rb") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns: {os.strerror(error)}")
            made.append(socket.create_connection(address, timeout=timeout))
        except BaseException as error:  # re-raised in the caller's thread
            failed.append(error)

    thread = threading.Thread(target=connect, name=f"setns-{namespace}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def _end_processes_in(ip: str, namespace: str) -> None:
    """SIGKILL every process left in ``namespace`` (the test started each), and wait for them.

    A namespace lives until its last process leaves, and its veth end with it.
    """
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while pids := _run([ip, "netns", "pids", namespace]).stdout.split():
        for pid in pids:
            with suppress(ProcessLookupError):  # it died meanwhile
                os.kill(int(pid), signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {pids} in {namespace} did not die")
        time.sleep(0.05)


@contextmanager
def new_namespaces(*names: str) -> Iterator[str]:
    """Make the network namespaces ``names``; on the way out, end every process left in them
    and delete them, with their veth ends. Yields the path of ``ip``.

    Skipped (failed in CI) without root, iproute2, or the right to make a namespace.
    """
    require_root("making network namespaces")
    ip = require_peer("ip")
    made: list[str] = []
    try:
        for namespace in names:
            result = _run([ip, "netns", "add", namespace])
            if result.returncode != 0:
                unavailable(f"cannot make a network namespace: {result.stderr.strip()}")
            made.append(namespace)
        yield ip
    finally:
        for namespace in made:
            _end_processes_in(ip, namespace)
            _run([ip, "netns", "delete", namespace])


def add_veth(ip: str, *ends: tuple[str, str, str]) -> None:
    """A veth pair between two namespaces, each end (namespace, device, address/prefix)
    addressed and up. Deleting either namespace deletes the pair."""
    (first, first_device, _), (second, second_device, _) = ends
    _must(
        ip, "link", "add", first_device, "netns", first,
        "type", "veth", "peer", "name", second_device, "netns", second,
    )  # fmt: skip
    for namespace, device, prefix in ends:
        _must(ip, "-n", namespace, "address", "add", prefix, "dev", device)
        _must(ip, "-n", namespace, "link", "set", device, "up")


@dataclass(frozen=True)
class Namespace:
    """A network namespace with only its loopback, up: a private 127.0.0.1 whose ports no other
    test or program uses, so that a test may listen on a fixed port."""

    ip: str
    name: str

    def exec_in(self) -> list[str]:
        """The command prefix that runs a program in the namespace (``ip netns exec`` execs
        it, so the process started is the program itself)."""
        return [self.ip, "netns", "exec", self.name]

    def connect(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection to ``address`` made from inside the namespace, in this process."""
        return connect_in(self.name, address, timeout)


@contextmanager
def loopback_namespace() -> Iterator[Namespace]:
    """A new namespace with its loopback up; deleted on the way out, with every process in it
    killed."""
    name = f"tcpecho-{secrets.token_hex(4)}-lo"
    with new_namespaces(name) as ip:
        _must(ip, "-n", name, "link", "set", "lo", "up")
        yield Namespace(ip, name)


@contextmanager
def veth_link() -> Iterator[Link]:
    """Two new namespaces joined by a veth pair, addressed and up; deleted on the way out."""
    # Names unique to this test, so that parallel or repeated runs never meet; a device name
    # is at most 15 bytes.
    token = secrets.token_hex(4)
    server_namespace = f"tcpecho-{token}-server"
    client_namespace = f"tcpecho-{token}-client"
    with new_namespaces(server_namespace, client_namespace) as ip:
        link = Link(
            ip=ip,
            server_namespace=server_namespace,
            client_namespace=client_namespace,
            server_device=f"te{token}s",
            client_device=f"te{token}c",
        )
        add_veth(
            ip,
            (server_namespace, link.server_device, f"{SERVER_ADDRESS}/{PREFIX_LENGTH}"),
            (client_namespace, link.client_device, f"{CLIENT_ADDRESS}/{PREFIX_LENGTH}"),
        )
        yield link
