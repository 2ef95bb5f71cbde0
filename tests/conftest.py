"""Shared fixtures: real servers on ports the OS picks, and real peer programs.

The plain helpers the tests import (sockets, server processes, engine variants) are in
tests/helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tcpecho.config import ServerConfig, forget_systemd
from tcpecho.testing import RunningServer, running_server
from tests.helpers import ENGINE_VARIANTS, ServerFactory, engine_options, require_variant

# Property tests run beside servers under load: a slow example is not a failure.
settings.register_profile("tcpecho", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tcpecho")


def pytest_configure(config: pytest.Config) -> None:
    """The servers under test, in this process and in the ones it starts, see no TCPECHO_*
    variable from the shell that runs the tests (they would change every default), and none of
    systemd's (a test run started by a service manager would have them report to it)."""
    for name in [name for name in os.environ if name.startswith("TCPECHO_")]:
        del os.environ[name]
    forget_systemd(os.environ)


@pytest.fixture(params=list(ENGINE_VARIANTS))
def engine(request: pytest.FixtureRequest) -> str:
    """Each engine variant in turn: a test that takes it runs once per engine and loop.

    A variant that cannot run here (uvloop not installed) is skipped, or failed in CI.
    """
    name: str = request.param
    require_variant(name)
    return name


@pytest.fixture
def serve(engine: str) -> Iterator[ServerFactory]:
    """Start a server on 127.0.0.1, port 0, with the ``engine`` and any ServerConfig options."""
    with ExitStack() as stack:

        def start(**options: Any) -> RunningServer:
            options.setdefault("host", ("127.0.0.1",))
            options.setdefault("port", 0)
            options.setdefault("drain_timeout", 2.0)
            options = {**engine_options(engine), **options}
            config = ServerConfig(**options)
            return stack.enter_context(running_server(config))

        yield start


@pytest.fixture
def server(serve: ServerFactory) -> RunningServer:
    """A default server (raw framing, exact echo) of each engine."""
    return serve()
