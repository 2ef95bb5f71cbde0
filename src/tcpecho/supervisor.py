"""Runs a server in the foreground: banner, signals, worker processes, summary."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from tcpecho import net
from tcpecho.config import ServerConfig
from tcpecho.engines import Summary, create_engine
from tcpecho.errors import TcpEchoError, WorkersFailing
from tcpecho.net import Address, format_address

logger = logging.getLogger("tcpecho.server")

# A worker that dies is restarted after this pause, so a worker that cannot start at all does
# not make the supervisor spin.
WORKER_RESTART_DELAY = 0.5
# A worker that dies sooner than this after it started counts as failing at start; after this
# many such deaths in a row the supervisor gives up rather than restart it forever.
WORKER_MIN_LIFETIME = 1.0
MAX_QUICK_DEATHS = 5
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>


def serve(config: ServerConfig) -> Summary:
    """Listen, log the banner, serve until SIGINT or SIGTERM, log the summary.

    The first signal stops accepting and drains; a second one closes every connection at
    once. With ``config.workers`` > 1 this process supervises that many worker processes
    instead. Raises `HostNotFound` or a `BindError` when the server cannot listen.
    """
    if config.workers > 1:
        return _serve_workers(config)
    engine = create_engine(config)
    addresses = engine.start()
    _log_banner(addresses)
    logger.info(
        "engine %s, %s framing, %s replies, up to %d connections",
        engine.description,
        config.framing,
        config.reply,
        config.max_connections,
        extra={"tag": "ENGINE", "fields": {"engine": engine.description}},
    )
    with stop_on_signals(engine.stop):
        return engine.serve()  # it logs its own summary


def _log_banner(addresses: list[Address]) -> None:
    listening = ", ".join(format_address(address) for address in addresses)
    logger.info(
        "Listening on %s",
        listening,
        extra={"tag": "SERVER STARTING", "fields": {"addresses": [list(a) for a in addresses]}},
    )


def _log_summary(summary: Summary, worker: str = "") -> None:
    logger.info(
        "%s%d connections served, %d bytes echoed",
        worker,
        summary.connections,
        summary.bytes_echoed,
        extra={
            "tag": "SERVER STOPPED",
            "fields": {"connections": summary.connections, "bytes_echoed": summary.bytes_echoed},
        },
    )


@contextmanager
def stop_on_signals(stop: Callable[..., None]) -> Iterator[None]:
    """Call ``stop()`` on the first SIGINT/SIGTERM and ``stop(force=True)`` on the next.

    The handler only calls ``stop``, which sets an event. Outside the main thread, where
    Python cannot install handlers, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        stop(force=received > 1)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _serve_workers(config: ServerConfig) -> Summary:
    """Fork ``config.workers`` processes that listen on one port with SO_REUSEPORT.

    This process reserves the port (bound, not listening, so it takes no connections), prints
    the banner once, restarts a worker that dies, and forwards SIGINT/SIGTERM to the workers as
    SIGTERM: the first makes them drain, the second makes them stop at once. Raises
    `WorkersFailing` when workers keep dying as soon as they start.
    """
    reserved = net.open_listeners(config.host, config.port, None, reuse_port=True)
    addresses: list[Address] = [sock.getsockname()[:2] for sock in reserved]
    worker_config = dataclasses.replace(config, port=addresses[0][1], workers=1, reuse_port=True)
    create_engine(worker_config)  # a bad choice (say, --loop uvloop without uvloop) fails here
    workers: dict[int, tuple[int, float]] = {}  # pid → (worker number, when it started)
    stopping = False
    quick_deaths = 0

    def forward(force: bool = False) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    def spawn(number: int) -> None:
        # Signals wait until the new worker is in `workers`, so that forward() reaches it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if not stopping:
                config = dataclasses.replace(worker_config, worker=number)
                workers[_fork_worker(config, blocked)] = (number, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    _log_banner(addresses)
    try:
        with stop_on_signals(forward):
            for number in range(1, config.workers + 1):
                spawn(number)
            while workers:
                pid, status = os.wait()
                number, started = workers.pop(pid)
                if stopping:
                    continue
                lived = time.monotonic() - started
                quick_deaths = quick_deaths + 1 if lived < WORKER_MIN_LIFETIME else 0
                logger.warning(
                    "worker %d (pid %d) %s after %.1fs; restarting it",
                    number,
                    pid,
                    _describe_status(status),
                    lived,
                    extra={"tag": "WORKER", "fields": {"worker": number, "pid": pid}},
                )
                if quick_deaths >= MAX_QUICK_DEATHS:
                    forward()
                    for pid in list(workers):
                        os.waitpid(pid, 0)
                    raise WorkersFailing(quick_deaths, WORKER_MIN_LIFETIME)
                time.sleep(WORKER_RESTART_DELAY)
                spawn(number)
    finally:
        for sock in reserved:
            sock.close()
    logger.info("all %d workers stopped", config.workers, extra={"tag": "SERVER STOPPED"})
    return Summary()


def _fork_worker(config: ServerConfig, signal_mask: set[int | signal.Signals]) -> int:
    """Start one worker process; return its pid. The child never returns from here.

    Called with the stop signals blocked; the child restores ``signal_mask`` once its own
    handlers are in place.
    """
    supervisor = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # The supervisor's handlers came along with the fork. Until the engine's own are in
        # place a SIGTERM simply ends this worker. Ctrl-C reaches the whole process group, so
        # a worker ignores SIGINT and heeds only the SIGTERM the supervisor forwards.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        _die_with_parent(supervisor)
        engine = create_engine(config)
        engine.start()
        logger.info(
            "worker %d (pid %d) listening, %s",
            config.worker,
            os.getpid(),
            engine.description,
            extra={"tag": "WORKER", "fields": {"worker": config.worker, "pid": os.getpid()}},
        )
        with stop_on_signals(engine.stop):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            engine.serve()
        code = 0
    except TcpEchoError as exc:
        logger.error("worker %d: %s", config.worker, exc, extra={"tag": "WORKER"})
    except BaseException:
        logger.exception("worker %d failed", config.worker, extra={"tag": "WORKER"})
    finally:
        logging.shutdown()
        os._exit(code)


def _die_with_parent(supervisor: int) -> None:
    """Ask Linux to send this worker SIGTERM when the supervisor dies, even by SIGKILL, so no
    worker is left serving the port on its own. Elsewhere, or without libc, do nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"
