"""The fault suite's fixture: a server of each engine variant, started with the case's flags."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.faults.harness import FaultServer, StartServer

# The servers a test started, for its report if it fails.
SERVERS = pytest.StashKey[list[FaultServer]]()
# How many of each server's lines a failed test's report shows, at most (the last ones).
REPORT_LINES = 30


def _routine(line: str) -> bool:
    return line.startswith("[NEW CONNECTION]") or (
        line.startswith("[DISCONNECTED]") and "closed by client (" in line
    )


@pytest.fixture
def fault_server(engine: str, request: pytest.FixtureRequest) -> Iterator[StartServer]:
    """Start ``tcp_server.py`` of each engine variant with the case's flags, for example
    ``fault_server("-q", "--framing=line", nofile=64)`` (options: `FaultServer`'s). The
    servers started are killed at the end of the test.

    What a case records goes to the test's user properties (``pytest --junitxml`` writes
    them), not through the record_property fixture, which warns under the xunit2 format.
    """
    servers: list[FaultServer] = []
    request.node.stash[SERVERS] = servers

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))

    def start(*flags: str, **options: Any) -> FaultServer:
        server = FaultServer(engine, flags, record=record, **options)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report ends with what each of its servers logged, but for the routine
    lines (connected, closed by the client), and what it wrote to stderr: what the server saw
    is often what explains the failure."""
    report = yield
    if report.failed and report.when == "call":
        for server in item.stash.get(SERVERS, []):
            lines = [line.text for line in server.lines if not _routine(line.text)]
            text = "\n".join([*lines[-REPORT_LINES:], "--- stderr:", server.stderr()])
            report.sections.append((f"server {server.pid} ({' '.join(server.flags)})", text))
    return report
