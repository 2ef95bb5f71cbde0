"""A real Prometheus scrapes tcpecho's --metrics port; its own HTTP API must show the traffic
sent. And deploy/prometheus.yml and deploy/alerts.yml pass promtool.

Prometheus is started with ``--web.listen-address=127.0.0.1:0``: the OS picks its port, and
Prometheus logs the address it is bound to (``msg="Listening on" address=127.0.0.1:PORT``),
which the test reads, as it reads tcpecho's banner. No port is picked before it is bound.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import ROOT, ServerProcess, connect, recv_until_closed, require_peer
from tests.test_metrics import denied_once, metrics_address

DEPLOY = ROOT / "deploy"
# Prometheus starts in about a second; the first scrape comes within one scrape interval.
PROMETHEUS_START = 30.0
SCRAPE_INTERVAL = "1s"
# How long the series may take to show the traffic: a few scrape intervals.
SERIES_WAIT = 20.0
LISTENING = re.compile(r'msg="Listening on" address=(\S+)')
CONNECTIONS = 12
BYTES_EACH = 3000


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_peer("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=DEPLOY,
    )


@pytest.mark.peer("promtool")
def test_the_example_prometheus_config_and_its_rules_pass_promtool() -> None:
    """promtool check config (which loads alerts.yml too), check rules, and the alerts' own
    unit tests (deploy/alerts.test.yml: down, refusals rising, accept errors)."""
    for args in (
        ("check", "config", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts.test.yml"),
    ):
        result = promtool(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "SUCCESS" in result.stdout + result.stderr


@contextmanager
def prometheus(target: tuple[str, int], workdir: Path) -> Iterator[str]:
    """A Prometheus scraping ``target`` every second; yields its base URL."""
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": SCRAPE_INTERVAL},
                "scrape_configs": [
                    {
                        "job_name": "tcpecho",
                        "static_configs": [{"targets": [f"{target[0]}:{target[1]}"]}],
                    }
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            require_peer("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            "--web.listen-address=127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        lines = []
        deadline = time.monotonic() + PROMETHEUS_START
        while time.monotonic() < deadline and (line := proc.stderr.readline()):
            lines.append(line)
            if match := LISTENING.search(line):
                break
        else:
            raise AssertionError(f"Prometheus did not say where it listens: {lines}")
        base = f"http://{match.group(1)}"
        wait_ready(base, deadline)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=PROMETHEUS_START)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def wait_ready(base: str, deadline: float) -> None:
    """Until Prometheus says it is ready: it listens before its storage is open, and answers
    503 meanwhile."""
    while True:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=10) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            if error.code != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def query(base: str, expression: str) -> float | None:
    """The value of an instant query with one series as its result; None when it has none."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


@pytest.mark.peer("prometheus")
def test_a_real_prometheus_scrapes_the_traffic_sent(tmp_path: Path) -> None:
    """12 connections of 3000 bytes each, one denied: Prometheus's API shows 12 opened, 12
    closed by the client, 36000 bytes each way, one refused (denied), 12 durations, none
    active, the build info, and the target up."""
    require_peer("prometheus")
    with ServerProcess(
        *("--host", "127.0.0.1", "--port", "0", "-q", "--deny", "127.0.0.2"),
        *("--metrics", "127.0.0.1:0"),
    ) as server:
        port = server.wait_listening()
        target = metrics_address(server)
        with prometheus(target, tmp_path) as base:
            for _ in range(CONNECTIONS):
                with connect(("127.0.0.1", port)) as sock:
                    sock.sendall(b"p" * BYTES_EACH)
                    sock.shutdown(1)
                    assert recv_until_closed(sock) == b"p" * BYTES_EACH
            denied_once(("127.0.0.1", port))
            expected = {
                "up": 1,
                "tcpecho_connections_opened_total": CONNECTIONS,
                "tcpecho_connections_active": 0,
                'tcpecho_connections_closed_total{reason="client_closed"}': CONNECTIONS,
                'tcpecho_connections_refused_total{reason="refused_denied"}': 1,
                "tcpecho_received_bytes_total": CONNECTIONS * BYTES_EACH,
                "tcpecho_sent_bytes_total": CONNECTIONS * BYTES_EACH,
                "tcpecho_connection_duration_seconds_count": CONNECTIONS,
                'tcpecho_build_info{engine="threads",loop="none"}': 1,
            }
            deadline = time.monotonic() + SERIES_WAIT
            while True:
                seen = {expression: query(base, expression) for expression in expected}
                if seen == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            for expression, value in seen.items():
                print(f"prometheus: {expression} = {value} (traffic: {expected[expression]})")
            assert seen == expected
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0
