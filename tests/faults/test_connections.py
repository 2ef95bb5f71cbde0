"""Faults in how clients connect: thousands at once, scanners, resets, limits, access lists,
running out of descriptors, and a restart on the same port."""

from __future__ import annotations

import itertools
import selectors
import socket
import struct
import time

import pytest

from tcpecho.protocol import BUSY_REPLY
from tcpecho.protocol.session import TOO_MANY_FROM_ADDRESS_REPLY
from tests.faults.harness import (
    FD_TOLERANCE,
    SETTLE_TIMEOUT,
    FaultServer,
    StartServer,
    connect_and_close_at_once,
    open_and_echo,
    peer_of,
    raise_nofile,
    small_buffer_socket,
    start_connects,
    task_limit,
    thread_count,
)
from tests.helpers import FULL_COUNTS, connect, recv_exactly, recv_until_closed, require_root

# Descriptors a process needs besides one per connection: std streams, pipes, the listener,
# the selector, the wake-up sockets, pytest's own files.
FD_MARGIN = 256


def echo_once(sock: socket.socket, payload: bytes = b"still served\n") -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def close_reasons(lines: list[str], peers: set[str] | None = None) -> dict[str, int]:
    """How many [DISCONNECTED] lines give each reason (the text after the peer, up to its
    figures in parentheses)."""
    counts: dict[str, int] = {}
    for line in lines:
        _, peer, rest = line.split(" ", 2)
        if peers is None or peer in peers:
            reason = rest.split(" (", 1)[0].split(": ", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
    return counts


CLIENTS_AT_ONCE = 5000
# Beyond --max-connections: each must be refused with the busy line.
OVER_THE_LIMIT = 3
# The clients leave this many at a time, each batch once the server has released the one
# before. Closed all at once, the 5,000 took the threads engine 12-27 s to release on the
# 2-core VM (2,000: 5 s; 1,000: 1 s), against 1.3 s in batches of 250 and under 1 s for the
# asyncio engine either way: past the suite's time budget, and this case is about connecting.
CLOSE_BATCH = 250


def close_gradually(server: FaultServer, socks: list[socket.socket]) -> None:
    """Close ``socks`` CLOSE_BATCH at a time, each batch once the server holds no more
    descriptors than the connections still open need."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    for start in range(0, len(socks), CLOSE_BATCH):
        for sock in socks[start : start + CLOSE_BATCH]:
            sock.close()
        still_open = max(len(socks) - start - CLOSE_BATCH, 0)
        while server.fd_count() > server.baseline_fds + still_open + FD_TOLERANCE:
            assert time.monotonic() < deadline, f"{server.fd_count()} descriptors still held"
            time.sleep(0.005)  # polling /proc with a deadline: closes are asynchronous


def test_5000_clients_at_once_are_all_served_then_more_are_refused(
    fault_server: StartServer,
) -> None:
    raise_nofile(CLIENTS_AT_ONCE + FD_MARGIN)
    server = fault_server(
        "-q",
        f"--max-connections={CLIENTS_AT_ONCE}",
        f"--max-per-address={CLIENTS_AT_ONCE}",
        "--backlog=4096",  # the kernel's somaxconn caps it; the rest wait for a SYN retry
        nofile=CLIENTS_AT_ONCE + FD_MARGIN,
    )
    mark = server.mark()
    started = time.monotonic()
    clients = open_and_echo(server.address, CLIENTS_AT_ONCE, timeout=30.0)
    server.record("all_echoed_after_s", round(time.monotonic() - started, 2))
    try:
        server.record("rss_with_all_connected", server.rss())
        server.record("fds_with_all_connected", server.fd_count())
        refusals = []
        for _ in range(OVER_THE_LIMIT):
            with connect(server.address) as extra:
                refusals.append(recv_until_closed(extra))
        assert echo_once(clients[0]) == b"still served\n"
    finally:
        close_gradually(server, clients)

    def expected() -> None:
        assert refusals == [BUSY_REPLY] * OVER_THE_LIMIT
        server.wait_for("[REFUSED]", "refused: server busy (--max-connections)", since=mark)
        closed = server.wait_for("[DISCONNECTED]", count=CLIENTS_AT_ONCE, since=mark)
        assert close_reasons([line.text for line in closed]) == {
            "closed by client": CLIENTS_AT_ONCE
        }

    server.check(expected)


# Connects that close at once, one after another, as port scanners and `nc -z` do. A server
# that falls behind holds connections whose client has gone until it reads their end, and
# counts them: the stdlib loop falls more than 256 behind (the default --max-per-address), the
# threads engine, whose threads start one after another, more than 1,024 (the default
# --max-connections). Both limits are lifted here, so that every connect is admitted and
# accounted for; the refusal of clients already gone is a case of its own below. A listen
# queue as long as the kernel allows keeps connects from waiting for a SYN retry (1 s).
# The threads engine is scaled down to 3,000 for the suite's time budget: on the 2-core VM
# 10,000 took it 4-7 s, 12 s beside three busy processes (the asyncio engine: 2-3 s, 4-5 s).
# FULL_COUNTS=1 runs the full counts (10,000 on every engine, 100 restarts).
SCANS = {"threads": 10_000 if FULL_COUNTS else 3_000, "asyncio": 10_000, "uvloop": 10_000}


def test_connect_and_close_thousands_of_times(fault_server: StartServer, engine: str) -> None:
    scans = SCANS[engine]
    server = fault_server(
        "-q", "--max-per-address=0", f"--max-connections={scans}", "--backlog=4096"
    )
    mark = server.mark()
    started = time.monotonic()
    for _ in range(scans):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        sock.connect(server.address)
        sock.close()
    server.record("scans", scans)
    server.record("connects_took_s", round(time.monotonic() - started, 2))

    def expected() -> None:
        closed = server.wait_for("[DISCONNECTED]", count=scans, since=mark, timeout=30.0)
        server.record("all_closed_after_s", round(time.monotonic() - started, 2))
        assert close_reasons([line.text for line in closed]) == {"closed by client": scans}
        assert not server.found("[ERROR]", since=mark)

    server.check(expected)


RESETS = 1000
# Sent before the reset: twice the client's receive buffer (64 KiB, doubled by the kernel),
# so that much of the echo is still queued at the server when the reset arrives.
RESET_PAYLOAD = b"r" * (256 * 1024)


def test_resets_in_the_middle_of_a_reply_1000_times(fault_server: StartServer) -> None:
    """Connect, send, read the start of the echo, then close with SO_LINGER 0 (a reset)."""
    server = fault_server("-q")
    mark = server.mark()
    peers: set[str] = set()
    for _ in range(RESETS):
        sock = small_buffer_socket()
        sock.settimeout(10.0)
        sock.connect(server.address)
        peers.add(peer_of(sock))
        sock.sendall(RESET_PAYLOAD)
        assert sock.recv(65536)  # the echo has begun
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def expected() -> None:
        closed = server.wait_for("[DISCONNECTED]", count=RESETS, since=mark)
        reasons = close_reasons([line.text for line in closed], peers)
        server.record("reasons", reasons)
        assert sum(reasons.values()) == RESETS
        assert set(reasons) <= {"reset by client", "client gone (broken pipe)"}, reasons

    server.check(expected)


# A limit low enough to reach with a few held clients.
LOW_LIMIT = 3


def test_over_max_per_address_gets_its_reason_and_the_others_are_untouched(
    fault_server: StartServer,
) -> None:
    server = fault_server("-q", f"--max-per-address={LOW_LIMIT}")
    mark = server.mark()
    held = [connect(server.address) for _ in range(LOW_LIMIT)]
    try:
        for sock in held:  # an echo: admitted, before the next one connects
            assert echo_once(sock) == b"still served\n"
        with connect(server.address) as extra:
            refused = recv_until_closed(extra)
        echoes = [echo_once(sock) for sock in held]
    finally:
        for sock in held:
            sock.close()

    def expected() -> None:
        assert refused == TOO_MANY_FROM_ADDRESS_REPLY
        assert echoes == [b"still served\n"] * LOW_LIMIT
        server.wait_for("[REFUSED]", "too many connections from this address", since=mark)

    server.check(expected)


# A burst of clients over a limit that connect and close at once, as a scanner does: the
# server answers each refusal to a client already gone.
SCANNER_BURST = 200
# What each engine does with them, seen on the 2-core test VM (every run alike, over either
# limit: the refusals share one path).
# Each limit, and what its [REFUSED] line says.
LIMITS = {
    "--max-per-address": "refused: too many connections from this address (--max-per-address)",
    "--max-connections": "refused: server busy (--max-connections)",
}


@pytest.mark.parametrize("limit", list(LIMITS), ids=lambda flag: flag.lstrip("-"))
def test_clients_over_a_limit_already_gone_are_refused_quietly(
    fault_server: StartServer, engine: str, limit: str, request: pytest.FixtureRequest
) -> None:
    server = fault_server("-q", f"{limit}={LOW_LIMIT}")
    mark = server.mark()
    held = [connect(server.address) for _ in range(LOW_LIMIT)]
    try:
        for sock in held:
            assert echo_once(sock) == b"still served\n"
        connect_and_close_at_once(server.address, SCANNER_BURST)
        # Every refused client has left the server once its descriptors are back to the
        # baseline plus the held clients.
        deadline = time.monotonic() + 10.0
        while server.fd_count() > server.baseline_fds + LOW_LIMIT + FD_TOLERANCE:
            assert time.monotonic() < deadline, "the refused clients are still open"
            time.sleep(0.02)  # polling /proc with a deadline: closes are asynchronous
        echoes = [echo_once(sock) for sock in held]
    finally:
        for sock in held:
            sock.close()

    def expected() -> None:
        stopping = server.found("[SERVER STOPPING]", since=mark)
        assert not stopping, f"the server stopped by itself: {server.stderr()[-300:]!r}"
        assert echoes == [b"still served\n"] * LOW_LIMIT
        server.wait_for("[REFUSED]", LIMITS[limit], since=mark)
        errors = server.found("[ERROR]", since=mark)
        assert not errors, f"{len(errors)} [ERROR] records, the first: {errors[0].text}"

    server.check(expected)


def test_a_denied_address_is_closed_with_no_reply(fault_server: StartServer) -> None:
    """A denied client learns nothing: no bytes, whether it waits or sends first (then the
    server's close, with its bytes unread, may be a reset rather than an end of stream)."""
    # The canary connects from another loopback address, which is not denied.
    server = fault_server("-q", "--deny=127.0.0.1", canary_source="127.0.0.2")
    mark = server.mark()
    with connect(server.address) as waiting:
        waited = recv_until_closed(waiting)
    with connect(server.address) as talking:
        talking.sendall(b"hello\n")
        try:
            answered = recv_until_closed(talking)
        except ConnectionResetError:
            answered = b""

    def expected() -> None:
        assert waited == b""
        assert answered == b""
        server.wait_for("[REFUSED]", "refused: address denied (--allow/--deny)", since=mark)

    server.check(expected)


# The server's descriptor limit, and clients enough to pass it (the others wait in the
# listen queue, connected as far as they know).
LOW_NOFILE = 64
STARVING_CLIENTS = 100
# How long the starved server's CPU use is measured.
STARVED_WINDOW = 2.0
# Two lines read from the server's pipe may be this much closer than they were written.
LINE_JITTER = 0.05


# Clients the threads engine serves under the task limit before one gets no thread.
SERVED_UNDER_LIMIT = 3
# Unserved clients: some one at a time (the accept thread starts a lone connection's thread
# itself), then a burst of connects at once (handed to the starter thread).
UNSERVED_ONE_BY_ONE = 2
UNSERVED_AT_ONCE = 20
UNSERVED = UNSERVED_ONE_BY_ONE + UNSERVED_AT_ONCE


@pytest.mark.parametrize("engine", ["threads"])
def test_out_of_threads_a_client_is_told_busy_and_the_others_go_on(
    fault_server: StartServer, engine: str
) -> None:
    """The threads engine under a cap on its tasks (systemd's TasksMax, a container's pids
    limit): a client it can start no thread for gets the busy line and the end, with a log
    line that says why and what it sent; the clients already served go on, and once threads
    are free again a new client is served."""
    require_root("a cgroup that caps the server's threads")
    server = fault_server()
    with task_limit(server.pid) as limit_tasks:
        limit_tasks(str(thread_count(server.pid) + SERVED_UNDER_LIMIT))
        served = [connect(server.address) for _ in range(SERVED_UNDER_LIMIT)]
        for sock in served:
            assert echo_once(sock) == b"still served\n"
        mark = server.mark()
        for _ in range(UNSERVED_ONE_BY_ONE):
            with connect(server.address) as unserved:
                unserved.sendall(b"no thread for me\n")
                assert recv_exactly(unserved, len(BUSY_REPLY)) == BUSY_REPLY
        burst: list[socket.socket] = []
        with selectors.DefaultSelector() as selector:
            start_connects(server.address, UNSERVED_AT_ONCE, selector, burst)
        try:
            for sock in burst:
                sock.settimeout(10.0)  # a send waits for the connect to complete
                sock.sendall(b"no thread for me\n")
            for sock in burst:
                assert recv_exactly(sock, len(BUSY_REPLY)) == BUSY_REPLY
        finally:
            for sock in burst:
                sock.close()
        for sock in served:
            assert echo_once(sock) == b"still served\n"
        limit_tasks("max")
        with connect(server.address) as late:
            assert echo_once(late) == b"still served\n"
        for sock in served:
            sock.close()

    def expected() -> None:
        lines = server.wait_for(
            "[DISCONNECTED]", "no thread could be started", count=UNSERVED, since=mark
        )
        assert len(lines) == UNSERVED
        for line in lines:
            assert "can't start new thread (17 bytes received" in line.text, line.text
            assert "17 discarded" in line.text, line.text

    server.check(expected)
    server.terminate()
    stopped = server.wait_for("[SERVER STOPPED]")[0].text
    assert stopped.endswith(f" sent, {UNSERVED} not served (no thread)"), stopped


def test_out_of_descriptors_the_server_waits_quietly_then_serves_again(
    fault_server: StartServer,
) -> None:
    server = fault_server("-q", nofile=LOW_NOFILE)
    mark = server.mark()
    held = [connect(server.address) for _ in range(STARVING_CLIENTS)]
    try:
        server.wait_for("[ACCEPT ERROR]", since=mark)
        cpu_before, started = server.cpu_seconds(), time.monotonic()
        time.sleep(STARVED_WINDOW)  # a window to measure CPU use over, not a wait for a state
        elapsed = time.monotonic() - started
        cpu_share = (server.cpu_seconds() - cpu_before) / elapsed
        served_while_starved = echo_once(held[0])  # the first was accepted before the limit
        errors = server.found("[ACCEPT ERROR]", since=mark)
    finally:
        for sock in held:
            sock.close()
    closed_at = time.monotonic()
    with connect(server.address) as fresh:
        back = echo_once(fresh, b"back\n")
    back_after = time.monotonic() - closed_at
    server.record("cpu_share_starved", round(cpu_share, 4))
    server.record("accept_error_lines", len(errors))
    server.record("served_again_after_s", round(back_after, 3))

    def expected() -> None:
        assert "Too many open files" in errors[0].text
        gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(errors)]
        assert all(gap >= 1.0 - LINE_JITTER for gap in gaps), gaps
        assert len(errors) <= elapsed + 2  # the first line came before the window
        assert cpu_share < 0.05, f"{cpu_share:.1%} of a core while starved"
        assert served_while_starved == b"still served\n"
        assert back == b"back\n"
        assert back_after < 1.0

    server.check(expected)


# Each try: a server with a client connected gets SIGTERM, and a new one starts on its port
# as soon as the old one has closed its listening socket (its [SERVER STOPPING] line), while
# the old one still drains that client. A try takes 0.2-0.4 s on the 2-core VM (a server's
# start-up is ~0.3 s of interpreter and imports): 100 tries on each of the three engine
# variants would take ~90 s, the whole suite's time budget, so the count is scaled down to 10.
RESTARTS = 100 if FULL_COUNTS else 10
# A stopping server logs [SERVER STOPPING] at once; this is ample.
STOP_TIMEOUT = 2.0


class StopNotActedOn(AssertionError):
    """A running server logged nothing of a stop STOP_TIMEOUT after its SIGTERM."""


def test_a_restart_right_after_a_stop_binds_every_time(
    fault_server: StartServer, engine: str, request: pytest.FixtureRequest
) -> None:
    server = fault_server("-q")
    port = server.port
    started = time.monotonic()
    bound = 0
    stops: list[tuple[int, bytes]] = []  # each old server's exit status, what its client got
    for attempt in range(1, RESTARTS + 1):
        with connect(server.address) as client:
            # Echoed inside the engine's serve(): the stop signals are handled by then.
            assert echo_once(client) == b"still served\n"
            mark = server.mark()
            server.terminate()
            try:
                server.wait_for("[SERVER STOPPING]", since=mark, timeout=STOP_TIMEOUT)
            except AssertionError as exc:
                if server.proc.poll() is not None:
                    raise
                raise StopNotActedOn(f"try {attempt} of {RESTARTS}: still running") from exc
            try:  # its listener is closed: the new server must bind at once
                successor = fault_server("-q", port=port)  # listening, and served a canary
            except AssertionError as exc:
                raise AssertionError(f"try {attempt} of {RESTARTS}: no new server") from exc
            bound += 1
            drained = recv_until_closed(client)  # the old server ends the connection
        stops.append((server.proc.wait(timeout=10), drained))
        server.close()
        server = successor
    server.record("restarts", RESTARTS)
    server.record("seconds_per_restart", round((time.monotonic() - started) / RESTARTS, 3))

    def expected() -> None:
        assert bound == RESTARTS
        assert server.port == port
        assert stops == [(0, b"")] * RESTARTS

    server.check(expected)
