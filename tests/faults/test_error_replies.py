"""Error, then close, readably: wherever the server answers with an error and closes (line too
long, line timeout, busy), 100 clients out of 100 read the whole error line and then the end
of the stream, although each keeps sending until the error arrives. A reset in place of the
server's end would destroy the error before the client read it."""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass

from tests.faults.harness import StartServer, peer_of
from tests.helpers import connect, recv_exactly

CLIENTS = 100
# Every client gives up after this long: far above the timeouts the cases set.
DEADLINE = 20.0
MAX_LINE = 64
LINE_TIMEOUT = 0.5


@dataclass(slots=True)
class Outcome:
    received: bytes = b""
    closed: bool = False  # the server's end (b"") came after what was received
    reset: bool = False


def keep_sending_until_closed(
    address: tuple[str, int], clients: int, chunk: bytes, interval: float
) -> list[Outcome]:
    """``clients`` connections, all at once, each sending ``chunk`` every ``interval`` seconds
    (0: as fast as the server takes it) until it has received a line, then reading until the
    server's end or a reset."""
    outcomes: list[Outcome] = []
    with selectors.DefaultSelector() as selector:
        for _ in range(clients):
            sock = socket.create_connection(address, timeout=5)
            sock.setblocking(False)
            outcome = Outcome()
            outcomes.append(outcome)
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, outcome)
        deadline = time.monotonic() + DEADLINE
        next_send = 0.0
        try:
            while selector.get_map() and time.monotonic() < deadline:
                sending = time.monotonic() >= next_send
                if sending and interval:
                    next_send = time.monotonic() + interval
                for key, events in selector.select(interval or 0.05):
                    _step(selector, key, events, chunk, sending)
        finally:
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    return outcomes


def _step(
    selector: selectors.BaseSelector,
    key: selectors.SelectorKey,
    events: int,
    chunk: bytes,
    sending: bool,
) -> None:
    sock: socket.socket = key.fileobj  # type: ignore[assignment]
    outcome: Outcome = key.data
    try:
        if events & selectors.EVENT_READ:
            data = sock.recv(65536)
            if not data:
                outcome.closed = True
                selector.unregister(sock)
                sock.close()
                return
            outcome.received += data
            if b"\n" in outcome.received:
                selector.modify(sock, selectors.EVENT_READ, outcome)  # the error: stop sending
        if events & selectors.EVENT_WRITE and sending:
            sock.send(chunk)
    except BlockingIOError:
        pass
    except (ConnectionResetError, BrokenPipeError):
        outcome.reset = True
        selector.unregister(sock)
        sock.close()


def assert_all_read_the_error(outcomes: list[Outcome], error: bytes) -> None:
    whole = [o for o in outcomes if o.received == error and o.closed and not o.reset]
    assert len(whole) == len(outcomes), [o for o in outcomes if o not in whole][:3]


def test_line_too_long_is_read_whole_by_every_client(fault_server: StartServer) -> None:
    server = fault_server("-q", "--framing=line", f"--max-line-length={MAX_LINE}")
    outcomes = keep_sending_until_closed(server.address, CLIENTS, b"x" * 4096, 0)
    error = b"ERROR line too long: more than %d bytes without a newline\n" % MAX_LINE
    server.check(lambda: assert_all_read_the_error(outcomes, error))


def test_line_timeout_is_read_whole_by_every_client(fault_server: StartServer) -> None:
    """Slowloris clients: a byte every 0.1 s, never a newline."""
    server = fault_server("-q", "--framing=line", f"--line-timeout={LINE_TIMEOUT:g}")
    outcomes = keep_sending_until_closed(server.address, CLIENTS, b"s", 0.1)
    error = b"ERROR line timeout: no newline within %gs\n" % LINE_TIMEOUT
    server.check(lambda: assert_all_read_the_error(outcomes, error))


def test_busy_is_read_whole_by_every_client(fault_server: StartServer) -> None:
    server = fault_server("-q", "--max-connections=1")
    mark = server.mark()
    with connect(server.address) as holder:
        holder.sendall(b"h")
        assert recv_exactly(holder, 1) == b"h"
        peer = peer_of(holder)
        outcomes = keep_sending_until_closed(server.address, CLIENTS, b"y" * 4096, 0)
    # The one place is free once the server has logged the holder gone (its descriptor may
    # close a moment before): only then may the canary come.
    server.wait_for("[DISCONNECTED]", f"{peer} closed by client", since=mark)
    server.check(lambda: assert_all_read_the_error(outcomes, b"ERROR server busy\n"))
