"""Shutdown under load: SIGTERM while 100 clients stream loses nothing the server received.

"Received" means acknowledged by the server's kernel: each client takes, just before the
signal, what it sent minus what its kernel still holds unacknowledged (SIOCOUTQ). Every such
byte must come back to a client that reads; the server stops accepting at once and exits 0
within the drain timeout (plus a second), also with clients that are idle or never read.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass, field

from tcpecho.net import unsent_bytes
from tests.helpers import ServerProcess, engine_arguments

DRAIN_TIMEOUT = 3.0
CHUNK = 4096
STREAM_CAP = 64 * 1024 * 1024  # far more than a run sends: streaming clients never stop


@dataclass
class Client:
    sock: socket.socket
    # "stream"; "slow": reads 64 KiB every 10 ms, slower than it sends, yet fast enough to take
    # its whole backlog within the drain timeout (a reader too slow for that loses by design);
    # "idle"; "deaf": never reads.
    kind: str
    pattern: bytes
    peer: str
    sent: int = 0
    echoed: bytearray = field(default_factory=bytearray)
    acked_at_signal: int = 0
    ended: bool = False
    next_read: float = 0.0


def make_clients(port: int) -> list[Client]:
    kinds = ["stream"] * 70 + ["slow"] * 10 + ["idle"] * 10 + ["deaf"] * 10
    clients = []
    for number, kind in enumerate(kinds):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setblocking(False)
        pattern = bytes((number + i) % 251 for i in range(CHUNK))
        clients.append(Client(sock, kind, pattern, peer="{}:{}".format(*sock.getsockname()[:2])))
    return clients


def step(client: Client, now: float) -> None:
    """Send what the client may, read what it should; note the end of stream. A failed send
    (the server has closed) only stops the sending: the client still reads to the end."""
    if client.ended:
        return
    if client.kind in ("stream", "slow", "deaf") and client.sent < STREAM_CAP:
        try:
            client.sent += client.sock.send(client.pattern)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            client.sent = STREAM_CAP  # nothing more will be sent
    if client.kind == "stream" or (client.kind == "slow" and now >= client.next_read):
        client.next_read = now + 0.01
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        client.echoed += data
        client.ended = not data


def pump(clients: list[Client], until: float) -> None:
    while time.monotonic() < until:
        now = time.monotonic()
        for client in clients:
            step(client, now)


def run_to_the_end(clients: list[Client], until: float) -> None:
    """After the signal: clients go on as before (streaming ones still send) until the server
    ends every reading client's stream."""
    while time.monotonic() < until:
        now = time.monotonic()
        for client in clients:
            step(client, now)
        if all(c.ended for c in clients if c.kind in ("stream", "slow")):
            return
        time.sleep(0.001)


def expected(client: Client, length: int) -> bytes:
    whole, rest = divmod(length, CHUNK)
    return client.pattern * whole + client.pattern[:rest]


def test_sigterm_under_load_echoes_every_byte_received_and_exits_in_time(engine: str) -> None:
    args = ["--host", "127.0.0.1", "--port", "0", "-q", "--drain-timeout", str(DRAIN_TIMEOUT)]
    with ServerProcess(*args, *engine_arguments(engine)) as server:
        port = server.wait_listening()
        clients = make_clients(port)
        try:
            pump(clients, time.monotonic() + 0.3)
            # A server briefly behind: what clients send now waits in its kernel, unread.
            server.proc.send_signal(signal.SIGSTOP)
            pump(clients, time.monotonic() + 0.2)
            for client in clients:
                client.acked_at_signal = client.sent - unsent_bytes(client.sock.fileno())
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            server.proc.send_signal(signal.SIGCONT)
            refused_after = wait_refused(port, signalled + 2.0) - signalled
            run_to_the_end(clients, signalled + DRAIN_TIMEOUT + 5)
            code = server.proc.wait(timeout=DRAIN_TIMEOUT + 5)
            exited_after = time.monotonic() - signalled
            log = server.lines + server.proc.stdout.readlines() if server.proc.stdout else []
        finally:
            for client in clients:
                client.sock.close()
    assert code == 0
    assert refused_after < 1.0
    assert exited_after < DRAIN_TIMEOUT + 1.0
    for number, client in enumerate(clients):
        if client.kind not in ("stream", "slow"):
            continue
        assert bytes(client.echoed) == expected(client, len(client.echoed)), number
        lost = client.acked_at_signal - len(client.echoed)
        assert lost <= 0, (
            f"client {number} ({client.kind}): {lost} bytes received, not echoed; "
            f"server: {[line for line in log if 'STOPP' in line or client.peer in line]}"
        )


def wait_refused(port: int, deadline: float) -> float:
    """When a new connect to ``port`` is first refused."""
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return time.monotonic()
        time.sleep(0.005)
    raise AssertionError("new connections were still accepted 2 s after SIGTERM")


def test_unsent_bytes_counts_what_the_peer_has_not_acknowledged() -> None:
    """The measure the test above relies on: 0 once the peer's kernel has acknowledged."""
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as left,
    ):
        right, _ = listener.accept()
        with right:
            left.sendall(b"x" * 1000)
            assert len(right.recv(2000)) > 0
            deadline = time.monotonic() + 5
            while unsent_bytes(left.fileno()) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert unsent_bytes(left.fileno()) == 0
