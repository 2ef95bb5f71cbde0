"""The log cannot be flooded: what one connection costs it is bounded, whatever it sends."""

from __future__ import annotations

import threading

from tcpecho.engines.base import MAX_LOGGED_MESSAGES
from tests.helpers import ServerProcess, connect, engine_arguments, recv_exactly

# MAX_LOGGED_MESSAGES lines of at most ~850 bytes, the opened, held and closed lines.
LOG_BYTES_PER_CONNECTION = 90 * 1024


def test_a_million_one_byte_lines_cost_the_log_a_bounded_number_of_bytes(engine: str) -> None:
    flood = b"x\n" * 1_000_000
    args = ["--host", "127.0.0.1", "--port", "0", "--framing", "line"]
    with ServerProcess(*args, *engine_arguments(engine)) as server:
        port = server.wait_listening()
        with connect(("127.0.0.1", port), timeout=30) as sock:
            sender = threading.Thread(target=sock.sendall, args=(flood,))
            sender.start()
            assert recv_exactly(sock, len(flood)) == flood  # every line echoed all the same
            sender.join()
            host, local_port = sock.getsockname()[:2]
            peer = f"{host}:{local_port}"
        closed = server.wait_for("[DISCONNECTED]")
        lines = [line for line in server.lines if peer in line]
    assert f"({len(flood)} bytes received, {len(flood)} sent" in closed
    messages = [line for line in lines if line.startswith(f"[{peer}] x\\n")]
    assert len(messages) == MAX_LOGGED_MESSAGES
    assert sum(f"[{peer}] {MAX_LOGGED_MESSAGES} messages logged" in line for line in lines) == 1
    assert sum(len(line.encode()) for line in lines) <= LOG_BYTES_PER_CONNECTION
