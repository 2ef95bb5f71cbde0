"""Runs a server in the foreground: banner, signals, worker processes, summary."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from tcpecho import net
from tcpecho.config import ServerConfig
from tcpecho.engines import Summary, create_engine
from tcpecho.errors import TcpEchoError, WorkersFailing
from tcpecho.events import Stopped
from tcpecho.log import EventLog
from tcpecho.net import Address, format_address
from tcpecho.systemd import Notifier

if TYPE_CHECKING:
    from tcpecho.metrics import Exporter

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
    instead. With ``config.notify_socket`` it tells systemd READY=1 once listening (after the
    banner) and STOPPING=1 when a stop begins. With ``config.metrics``, /metrics, /healthz and
    /readyz are served on that address, in threads of this process, from before the server
    listens until it has stopped. Raises `HostNotFound` or a `BindError` when the server
    cannot listen, `InheritedSocketError` when a socket systemd passed is unusable,
    `MissingExtra` when --metrics is given without prometheus_client.
    """
    notifier = Notifier(config.notify_socket)
    with _metrics(config, config.workers) as exporter:
        if config.workers > 1:
            return _serve_workers(config, notifier, exporter)
        return _serve_one(config, notifier, exporter)


@contextmanager
def _metrics(config: ServerConfig, slots: int) -> Iterator[Exporter | None]:
    """The metrics exporter when ``config.metrics`` asks for one, closed on exit."""
    if config.metrics is None:
        yield None
        return
    from tcpecho.metrics import open_exporter

    exporter = open_exporter(config, slots)
    try:
        yield exporter
    finally:
        exporter.health.stopping()
        exporter.close()


def _serve_one(config: ServerConfig, notifier: Notifier, exporter: Exporter | None) -> Summary:
    engine = create_engine(config, [] if exporter is None else [exporter.recorder()])
    addresses = engine.start()
    if exporter is not None:
        exporter.health.listening()
    # The handlers go in before the banner: a stop that comes as soon as the banner is out
    # (a script, a supervisor) must drain, not kill. The engine keeps a stop made before serve.
    with stop_on_signals(_announced(engine.stop, notifier)):
        _log_banner(addresses, config)
        if exporter is not None:
            exporter.log_listening()
        logger.info(
            "engine %s, %s framing, %s replies, up to %d connections",
            engine.description,
            config.framing,
            config.reply,
            config.max_connections,
            extra={
                "tag": "ENGINE",
                "event": "engine",
                "fields": {"engine": engine.description},
            },
        )
        notifier.ready(addresses)
        return engine.serve()  # it logs its own summary


def _log_banner(addresses: list[Address], config: ServerConfig) -> None:
    listening = ", ".join(format_address(address) for address in addresses)
    logger.info(
        "Listening on %s",
        listening,
        extra={
            "tag": "SERVER STARTING",
            "event": "listening",
            "fields": {"addresses": [list(a) for a in addresses]},
        },
    )
    if config.listen_fds:
        fds = ", ".join(str(fd) for fd in config.listen_fds)
        logger.info(
            "socket activation: serving on the sockets passed as descriptors %s; --host, "
            "--port and --backlog are not used",
            fds,
            extra={
                "tag": "SYSTEMD",
                "event": "socket_activation",
                "fields": {"fds": list(config.listen_fds)},
            },
        )


def _announced(stop: Callable[..., None], notifier: Notifier) -> Callable[..., None]:
    """``stop``, which then tells systemd STOPPING=1 (the first time)."""

    def stop_and_announce(force: bool = False) -> None:
        stop(force=force)
        notifier.stopping()

    return stop_and_announce


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


def _serve_workers(config: ServerConfig, notifier: Notifier, exporter: Exporter | None) -> Summary:
    """Listen here (or take systemd's sockets), then fork ``config.workers`` processes that
    accept on these sockets.

    The workers inherit the listening sockets, so the accept queue belongs to this process and
    outlives any worker: connections waiting in it when a worker dies are accepted by another.
    This process prints the banner once, restarts a worker that dies, forwards SIGINT/SIGTERM
    to the workers as SIGTERM (the first makes them drain, the second stop at once), and logs
    the sum of the summaries they report. It alone talks to systemd: READY=1 once every worker
    is started (each accepts as soon as it is up, and a connection made before then waits in
    this process's accept queue, not refused), STOPPING=1 when a stop begins.
    Raises `HostNotFound` or a `BindError` when it cannot listen, `InheritedSocketError`
    when a socket systemd passed is unusable, `WorkersFailing` when workers keep dying as soon
    as they start.

    ``exporter``: the metrics, served here; worker N counts into its slot N - 1, and /readyz
    turns 503 as this process forwards the stop.
    """
    listeners = net.listening_sockets(config)
    try:
        fds = tuple(sock.fileno() for sock in listeners)
        worker_config = dataclasses.replace(config, workers=1, listen_fds=fds, notify_socket="")
        create_engine(worker_config)  # a bad choice (say, --loop uvloop without uvloop) fails here
        workers = _Workers(worker_config, listeners, exporter)
        addresses = [sock.getsockname()[:2] for sock in listeners]
        if exporter is not None:
            exporter.health.listening()  # connections queue on these until a worker accepts
        # The handlers go in before the banner, as in serve().
        with stop_on_signals(_announced(workers.stop, notifier)):
            _log_banner(addresses, config)
            if exporter is not None:
                exporter.log_listening()
            total = workers.run(
                config.workers, started=lambda: notifier.ready(addresses, config.workers)
            )
    finally:
        for sock in listeners:
            sock.close()
    EventLog()(Stopped(total))
    return total


@dataclasses.dataclass
class _Worker:
    number: int
    pid: int
    started: float  # time.monotonic()
    report: int  # the read end of the pipe the worker writes its summary to as it exits


class _Workers:
    """The supervisor's worker processes: starts them, restarts one that dies, stops them all,
    and adds up the summaries they report."""

    def __init__(
        self, config: ServerConfig, listeners: list[socket.socket], exporter: Exporter | None
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.exporter = exporter
        self.running: dict[int, _Worker] = {}  # by pid
        self.stopping = False
        self.quick_deaths = 0
        self.total = Summary()

    def run(self, count: int, started: Callable[[], None] = lambda: None) -> Summary:
        """Serve with ``count`` workers until they have all stopped; return their total.
        ``started`` is called once all are started."""
        for number in range(1, count + 1):
            self.spawn(number)
        started()
        while self.running:
            pid, status = os.wait()
            self.reap(self.running.pop(pid), status)
        return self.total

    def stop(self, force: bool = False) -> None:
        """Called from the signal handler: forward the stop to every worker."""
        self.stopping = True
        if self.exporter is not None:
            self.exporter.health.stopping()
        # The listening sockets close once the workers have closed theirs too: from then on a
        # connect is refused, as with a single server, instead of queueing where nobody accepts.
        for sock in self.listeners:
            sock.close()
        for pid in self.running:
            # A worker that os.wait() has just reaped is still in `running` when the signal
            # interrupts run() before its pop; and one may already have ended on a SIGTERM of
            # its own (systemd's default KillMode signals every process of the unit).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def spawn(self, number: int) -> None:
        # Signals wait until the new worker is in `running`, so that stop() reaches it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if self.stopping:
                return
            report, writer = os.pipe()
            try:
                config = dataclasses.replace(self.config, worker=number)
                pid = _fork_worker(config, blocked, writer, self.exporter)
            except BaseException:
                os.close(report)
                raise
            finally:
                # Only the worker may hold the write end: its exit is then the pipe's end.
                os.close(writer)
            os.set_blocking(report, False)
            self.running[pid] = _Worker(number, pid, time.monotonic(), report)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def reap(self, worker: _Worker, status: int) -> None:
        """Count what an exited worker reported; restart it unless the server is stopping."""
        if self.exporter is not None:
            self.exporter.retire(worker.number - 1)  # before a new worker writes that slot
        summary = _read_report(worker.report)
        if summary is not None:
            self.total = _add(self.total, summary)
        uncounted = "; what it served is not counted in the summary" if summary is None else ""
        if self.stopping:
            if summary is None:
                _warn(worker, f"{_describe_status(status)}{uncounted}")
            return
        lived = time.monotonic() - worker.started
        self.quick_deaths = self.quick_deaths + 1 if lived < WORKER_MIN_LIFETIME else 0
        _warn(worker, f"{_describe_status(status)} after {lived:.1f}s{uncounted}; restarting it")
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            self.stop()
            for pid in list(self.running):
                _, status = os.waitpid(pid, 0)
                self.reap(self.running.pop(pid), status)
            raise WorkersFailing(self.quick_deaths, WORKER_MIN_LIFETIME)
        time.sleep(WORKER_RESTART_DELAY)
        self.spawn(worker.number)


def _warn(worker: _Worker, what: str) -> None:
    logger.warning(
        "worker %d (pid %d) %s",
        worker.number,
        worker.pid,
        what,
        extra={
            "tag": "WORKER",
            "event": "worker_exited",
            "fields": {"worker": worker.number, "pid": worker.pid},
        },
    )


def _read_report(fd: int) -> Summary | None:
    """The summary a worker wrote to its pipe as it exited; None if it wrote none (killed, or
    failed). Closes ``fd``."""
    try:
        # The worker has exited, and its one small write was atomic: all of it is here.
        data = os.read(fd, 65536)
    except BlockingIOError:
        data = b""
    finally:
        os.close(fd)
    try:
        reported = json.loads(data)
        return Summary(**{f.name: int(reported[f.name]) for f in dataclasses.fields(Summary)})
    except (ValueError, KeyError, TypeError):
        return None


def _add(total: Summary, more: Summary) -> Summary:
    """Field by field, so that a field added to Summary is summed too."""
    return Summary(
        **{
            f.name: getattr(total, f.name) + getattr(more, f.name)
            for f in dataclasses.fields(Summary)
        }
    )


def _fork_worker(
    config: ServerConfig,
    signal_mask: set[int | signal.Signals],
    report: int,
    exporter: Exporter | None,
) -> int:
    """Start one worker process; return its pid. The child never returns from here.

    Called with the stop signals blocked; the child restores ``signal_mask`` once its own
    handlers are in place. The child writes its summary to the descriptor ``report`` as one
    JSON line when it has stopped, and its counts to its slot of ``exporter``'s table.
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
        consumers = []
        if exporter is not None:
            exporter.forked()  # the metrics port is served by the supervisor alone
            consumers.append(exporter.recorder(config.worker - 1))
        engine = create_engine(config, consumers)
        engine.start()
        logger.info(
            "worker %d (pid %d) listening, %s",
            config.worker,
            os.getpid(),
            engine.description,
            extra={
                "tag": "WORKER",
                "event": "worker_listening",
                "fields": {"worker": config.worker, "pid": os.getpid()},
            },
        )
        with stop_on_signals(engine.stop):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            summary = engine.serve()  # it logs its own line, [WORKER STOPPED]
            # Still under the engine's handlers, so that a second stop arriving now cannot end
            # this worker before it has reported.
            line = json.dumps(dataclasses.asdict(summary)) + "\n"
            with contextlib.suppress(OSError):  # the supervisor is gone (killed): nobody asks
                os.write(report, line.encode())
        code = 0
    except TcpEchoError as exc:
        logger.error(
            "worker %d: %s",
            config.worker,
            exc,
            extra={"tag": "WORKER", "event": "worker_failed", "fields": {"worker": config.worker}},
        )
    except BaseException:
        logger.exception(
            "worker %d failed",
            config.worker,
            extra={"tag": "WORKER", "event": "worker_failed", "fields": {"worker": config.worker}},
        )
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
