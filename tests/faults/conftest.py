"""The fault suite's fixture: a server of each engine variant, started with the case's flags."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults.harness import FaultServer, StartServer


@pytest.fixture
def fault_server(engine: str, request: pytest.FixtureRequest) -> Iterator[StartServer]:
    """Start ``tcp_server.py`` of each engine variant with the case's flags, for example
    ``fault_server("-q", "--framing=line", nofile=64)`` (options: `FaultServer`'s). The
    servers started are killed at the end of the test.

    What a case records goes to the test's user properties (``pytest --junitxml`` writes
    them), not through the record_property fixture, which warns under the xunit2 format.
    """
    servers: list[FaultServer] = []

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
