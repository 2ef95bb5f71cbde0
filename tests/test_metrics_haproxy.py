"""HAProxy's ``option httpchk GET /readyz`` on the metrics port, as deploy/haproxy.cfg shows
it: the server is UP while it serves, and DOWN as soon as its drain starts, while it still
runs (and still echoes to the client it drains), not only once its port closes.

HAProxy runs on the loopback with a backend and no frontend (the checks are all this test
needs from it), and its stats socket in a temporary directory: no port is chosen here.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, recv_until_closed, require_peer
from tests.test_haproxy import BACKEND, server_states
from tests.test_metrics import PROMPTLY, metrics_address, stuck_client

# Checks every 100 ms; one failure takes the server out, one success puts it back.
CHECK_INTERVAL_MS = 100

HAPROXY_CONFIG = """\
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 500ms
    timeout client 10s
    timeout server 10s
    timeout check 1s

backend {backend}
    option httpchk GET /readyz
    http-check expect status 200
    default-server send-proxy-v2 check port {metrics_port} inter {inter}ms fall 1 rise 1
    server s1 127.0.0.1:{echo_port}
"""


def wait_for_state(stats: Path, status: str, check: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + PROMPTLY
    state: tuple[str, str] | None = None
    while True:
        assert proc.poll() is None, "haproxy exited"
        try:
            state = server_states(stats)["s1"]
        except (OSError, KeyError):  # not listening on its stats socket yet
            state = None
        if state is not None and state[0] == status and state[1] == check:
            return
        assert time.monotonic() < deadline, f"s1 never {status} with {check}: {state}"
        time.sleep(0.02)


@pytest.mark.peer("haproxy")
def test_haproxy_httpchk_takes_a_draining_server_out(tmp_path: Path) -> None:
    """UP with L7OK (HTTP 200, and no PROXY header sent to the metrics port, which would be a
    400); after SIGTERM, DOWN with L7STS (the 503) while the server still drains."""
    binary = require_peer("haproxy")
    with (
        ServerProcess(
            *("--host", "127.0.0.1", "--port", "0", "-q"),
            *("--metrics", "127.0.0.1:0", "--drain-timeout", "20"),
        ) as server,
        tempfile.TemporaryDirectory(prefix="tcpecho-") as short,  # a socket path ≤ 107 bytes
    ):
        port = server.wait_listening()
        metrics = metrics_address(server)
        stats = Path(short) / "s"
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(
                stats=stats,
                backend=BACKEND,
                metrics_port=metrics[1],
                inter=CHECK_INTERVAL_MS,
                echo_port=port,
            )
        )
        with (tmp_path / "haproxy.log").open("w+") as output:
            haproxy = subprocess.Popen(
                [binary, "-db", "-f", str(config)],
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                wait_for_state(stats, "UP", "L7OK", haproxy)
                with stuck_client(port) as (held, sent):
                    server.proc.send_signal(signal.SIGTERM)
                    wait_for_state(stats, "DOWN", "L7STS", haproxy)
                    assert server.proc.poll() is None, "the server stopped before HAProxy saw"
                    held.settimeout(PROMPTLY)
                    assert 0 < len(recv_until_closed(held)) <= sent
            finally:
                haproxy.terminate()
                haproxy.wait(timeout=PROMPTLY)
        assert server.proc.wait(timeout=PROMPTLY) == 0, server.stderr()
