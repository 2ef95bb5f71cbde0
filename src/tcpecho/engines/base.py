"""What both engines share: the Engine protocol, the per-connection driver, and `EngineCore`.

An engine only moves bytes. `Driver` is one connection as every engine drives it: it feeds the
`Session` what the engine read and when its timer fired, and carries out the session's
commands through the few mechanisms a subclass supplies (write, half-close, close, abort, pause
and resume reading, arm the one timer). `EngineCore` is what a server knows of all its
connections: admission, the event stream, the accept-error policy and the drain.
"""

from __future__ import annotations

import errno
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from time import monotonic
from typing import Any, Generic, Protocol, TypeVar

from tcpecho import net, tls
from tcpecho.config import ServerConfig
from tcpecho.events import (
    AcceptFailed,
    Closed,
    Consumer,
    Counters,
    Draining,
    DrainTimedOut,
    EventStream,
    InternalError,
    Message,
    MessagesHeld,
    Opened,
    Refused,
    Stopped,
    Summary,
)
from tcpecho.log import EventLog
from tcpecho.net import Address, format_address
from tcpecho.protocol import Admission, CloseReason, Command, Session
from tcpecho.protocol.session import State

# Past this many reply bytes queued for a client that does not read, the asyncio engine tells
# the session that writing is blocked (the threads engine: a send that cannot finish at once),
# so a client that sends and never reads cannot grow the server's memory.
WRITE_BUFFER_HIGH_WATER = 256 * 1024
# Bytes asked of the OS per read: large enough that a 64 KiB message is one read.
RECV_SIZE = 64 * 1024
# At the default level each message received is a log line; a connection logs at most this many
# (then one line saying the rest are not logged), so one client cannot flood the log: with the
# escaping, a line is at most about 850 bytes, so a connection costs the log at most ~90 KB.
MAX_LOGGED_MESSAGES = 100
# The longest one wait for a deadline may be: the OS's waits refuse infinity and far-off times,
# which the timeouts accept (--idle-timeout inf). A timer that wakes before its deadline finds
# nothing due and is armed again, so a day costs one look a day.
MAX_WAIT = 86400.0
# Accept errors that mean "out of resources for now": pause, retry, never stop serving.
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How long the accept loop pauses after one of those before it tries again.
ACCEPT_RETRY_DELAY = 0.1
# Raw echo skips the session per read (`Driver.echo_fast`) only where the kernel can say when
# a client last sent (Linux's TCP_INFO), which the idle timeout needs.
FAST_ECHO = net.INPUT_AGE_KNOWN
# See `Driver.timer_fired`: one kernel tick at the slowest tick rate Linux has (100 Hz).
INPUT_AGE_SLACK = 0.01
# Connections an engine accepts per readiness event, so a burst cannot starve the
# connections already open (the threads engine's accept thread: its refused clients).
ACCEPT_BATCH = 128


def seconds_until(deadline: float, at_least: float = 0.0) -> float:
    """How long to wait for ``deadline`` (monotonic): at least ``at_least``, at most
    `MAX_WAIT`."""
    return min(max(deadline - monotonic(), at_least), MAX_WAIT)


@contextmanager
def signals_wake(wake: socket.socket | None) -> Iterator[None]:
    """While serving in the main thread, a signal writes to ``wake``, which the engine's loop
    watches.

    Python runs a signal's handler in the main thread, when that thread next runs bytecode. A
    signal that lands while the loop is about to wait (or, with threads, in another thread,
    whose call CPython simply retries) would otherwise be acted on only at the next I/O event:
    a stop could wait for the next client. The write wakes the loop, so the handler runs at once.
    """
    if wake is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)


class Engine(Protocol):
    """A server engine. One instance serves once.

    - `start` binds and listens, and returns the bound addresses: ready means listening.
    - `serve` runs until `stop` is called, then stops accepting, lets connections finish for
      up to the drain timeout, closes the rest and returns a `Summary`. It closes every socket
      it opened.
    - `stop` may be called from a signal handler or another thread; ``force`` closes every
      connection at once.
    """

    @property
    def description(self) -> str: ...

    def start(self) -> list[Address]: ...

    def serve(self) -> Summary: ...

    def stop(self, *, force: bool = False) -> None: ...


DriverT = TypeVar("DriverT", bound="Driver")


class EngineCore(Generic[DriverT]):
    """What a server knows of all its connections, the same for every engine.

    ``threaded``: connections open and close from several threads, so admission is locked.
    """

    def __init__(
        self, config: ServerConfig, consumers: Iterable[Consumer] = (), *, threaded: bool
    ) -> None:
        self.config = config
        self.settings = config.session_settings()
        self.admission = Admission(
            config.max_connections,
            config.max_per_address,
            config.access_list(),
            config.trusted_proxies(),
            config.ipv6_prefix,
        )
        self.proxy_mode = config.proxy_protocol
        self.server_id = socket.gethostname()  # for --greeting info
        # Built once, here, so that a certificate that cannot be used stops the start-up.
        self.tls_context: ssl.SSLContext | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls_context = tls.server_context(
                config.tls_cert, config.tls_key, config.tls_client_ca
            )
            self.tls_context.sni_callback = self._sni_received
        self.server_names: dict[int, str] = {}  # id of a connection's SSL object → its SNI

        self.log = EventLog(log_messages=not config.quiet, worker=config.worker)
        self.counters = Counters()
        self.emit = EventStream([self.log, self.counters, *consumers])
        self.log_messages = self.log.wants_messages
        self.drivers: set[DriverT] = set()
        self.stopping = False
        self._lock: AbstractContextManager[object] = threading.Lock() if threaded else nullcontext()

    def _sni_received(
        self, connection: ssl.SSLSocket | ssl.SSLObject, name: str | None, _: ssl.SSLContext
    ) -> None:
        if name:
            self.server_names[id(connection)] = name

    def proxied(self, host: str) -> bool:
        """Does a connection from ``host`` begin with a PROXY header (or may it)?"""
        return self.proxy_mode != "off" and self.admission.is_trusted_proxy(host)

    def admit(self, driver: DriverT) -> CloseReason | None:
        """Admit a new connection (None) or say why it is refused; emits Refused, or Opened
        when the connection is open at once (no PROXY header or TLS handshake first)."""
        proxied = driver.session.state is State.PROXY_HEADER
        with self._lock:
            if self.proxy_mode == "on" and not proxied:
                refusal: CloseReason | None = CloseReason.REFUSED_UNTRUSTED_PROXY
            else:
                refusal = self.admission.admit(driver.host, stopping=self.stopping, proxy=proxied)
            if refusal is None:
                driver.counted_as = None if proxied else driver.host
                self.drivers.add(driver)
                active = len(self.drivers)
        if refusal is not None:
            self.emit(Refused(driver.peer, refusal))
        elif driver.session.state is State.OPEN:
            self.emit(Opened(driver.peer, active))
        return refusal

    def open(self, driver: DriverT) -> CloseReason | None:
        """A connection admitted before its PROXY header or TLS handshake is now open: admit
        its real client (from the header), or say why it is refused; emits Opened or Refused."""
        client = driver.session.client
        refusal = None
        with self._lock:
            if client is not None and driver.counted_as is None:
                refusal = self.admission.admit_client(client[0])
                if refusal is None:
                    driver.counted_as = client[0]
            active = len(self.drivers)
        if refusal is not None:
            self.emit(Refused(driver.peer, refusal, via=driver.via))
        else:
            self.emit(Opened(driver.peer, active, via=driver.via, tls=driver.tls_summary))
        return refusal

    def closed(self, driver: DriverT) -> None:
        """An admitted connection is gone: emit Closed, free its place."""
        session = driver.session
        with self._lock:
            self.drivers.discard(driver)
            self.admission.release(driver.counted_as)
        assert session.reason is not None
        if session.reason.refused:
            return  # its Refused event said it all
        self.emit(
            Closed(
                driver.peer,
                session.reason,
                session.detail,
                session.bytes_received,
                session.bytes_sent,
                session.bytes_discarded,
                session.discard_reason,
                session.bytes_unsent,
                monotonic() - session.opened_at,
            )
        )

    def messages(self, driver: Driver) -> None:
        """A Message event per frame the last read completed, up to the connection's budget
        (`MAX_LOGGED_MESSAGES`); then one MessagesHeld, and no more."""
        for frame in driver.session.frames:
            if driver.messages_left <= 0:
                driver.log_messages = False
                self.emit(MessagesHeld(driver.peer, MAX_LOGGED_MESSAGES))
                return
            driver.messages_left -= 1
            self.emit(Message(driver.peer, frame))

    def failed(self, driver: Driver, exc: Exception) -> None:
        self.emit(InternalError(driver.peer, exc))

    def accept(self, listener: socket.socket) -> tuple[socket.socket, Address] | float | None:
        """Accept one connection, under the one accept policy of every engine.

        Returns the new socket and the peer's address; None when no connection is waiting;
        a float after an error (logged, at most once a second): 0.0 when a connection failed
        before it was accepted (go on), else how long to pause accepting, because the process
        is out of descriptors or memory. An accept error never ends the accept loop.
        """
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            retrying = exc.errno in ACCEPT_RETRY_ERRNOS
            self.emit(AcceptFailed(exc.strerror or str(exc), retrying))
            return ACCEPT_RETRY_DELAY if retrying else 0.0
        # Urgent data (MSG_OOB) in line, like any byte: echoed, and counted where the kernel
        # counts (direct echo), instead of left unread.
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        return sock, net.plain_address(address)

    def drain_started(self) -> list[DriverT]:
        """Stop admitting; return the connections to drain (emits Draining)."""
        with self._lock:
            self.stopping = True
            drivers = list(self.drivers)
        self.emit(Draining(len(drivers), self.config.drain_timeout))
        return drivers

    def drain_timed_out(self) -> list[DriverT]:
        """The drain timeout passed: return the connections left (emits DrainTimedOut)."""
        with self._lock:
            drivers = list(self.drivers)
        if drivers:
            self.emit(DrainTimedOut(len(drivers), self.config.drain_timeout))
        return drivers

    def stopped(self) -> Summary:
        summary = self.counters.summary()
        self.emit(Stopped(summary))
        return summary


class Driver:
    """One connection, driven the same way by every engine.

    A subclass supplies the mechanisms: ``write`` (an attribute or method), `shut_write`,
    `close`, `abort`, `pause_reading`, `resume_reading` and `set_timer`. It calls
    `data_received` for every read (``b""``: the client finished sending), `timer_fired`,
    `writing_blocked`/`writing_resumed` for backpressure and `lost` exactly once at the end.
    """

    write: Callable[[bytes], object]

    def __init__(self, core: EngineCore[Any], address: tuple[object, ...]) -> None:
        self.core = core
        self.host = str(address[0])
        self.peer = format_address(address)
        self.via = ""  # the proxy's address, when a PROXY header named the client
        self.counted_as: str | None = None  # the address admission counts this connection for
        self.tls_info: dict[str, str] = {}  # set by the engine after a TLS handshake
        self.session = Session(core.settings, monotonic(), proxied=core.proxied(self.host))
        self.receive = self.session.receive_data  # bound once: the per-read path
        self.commands = self.session.commands  # the same list, read on every call
        self.log_messages = core.log_messages
        self.messages_left = MAX_LOGGED_MESSAGES
        self.admitted = False
        # True while a read needs nothing of the session but its count (`Session.echoes_raw`)
        # and nothing is logged: `data_received` then sends it back at once. Set again after
        # every other call into the session (`_follow_session`).
        self.echo_fast = False

    def admit(self) -> bool:
        """Ask admission; when refused, carry out the refusal and return False."""
        refusal = self.core.admit(self)
        if refusal is None:
            self.admitted = True
            if self.session.state is State.OPEN and self.core.config.greeting == "info":
                # Open at once (no PROXY header, no handshake): no Command.OPEN will come.
                self.send(self.session.opened(monotonic(), self.connection_info()))
            self.set_timer(self.session.next_deadline())
            self._follow_session()
            return True
        self.send(self.session.refuse(refusal, monotonic()))
        return False

    def data_received(self, data: bytes) -> None:
        """Bytes read (never empty: the end of input is `input_ended`)."""
        if self.echo_fast:
            # Raw echo: the read is the reply. No clock is read here; a timer that fires asks
            # the kernel when the client last sent (`input_age`). (On uvloop, direct echo skips
            # even this call: see aio.LoopConnection.)
            self.session.echoed_by_engine += len(data)
            self.write(data)
            return
        self.feed(data)

    def input_ended(self) -> None:
        """The client finished sending."""
        self.count_echoed()
        self.feed(b"")

    def feed(self, data: bytes) -> None:
        """A read (or the end of input: b""), through the session."""
        try:
            out = self.receive(data, monotonic())
            # Before the commands: an OPEN among them logs the messages held until then, which
            # are this read's frames too; logging after it would log them twice.
            if self.log_messages:
                self.core.messages(self)
            if self.commands:
                self.send(out)
            elif out:
                self.write(out)
            self._follow_session()
        except OSError:
            raise  # the connection's own end: the engine reports it through `lost`
        except Exception as exc:
            self.failed(exc)

    def _follow_session(self) -> None:
        self.echo_fast = FAST_ECHO and self.session.echoes_raw and not self.log_messages

    def failed(self, exc: Exception) -> None:
        """A bug in handling this connection: log it, abort this one, serve the others."""
        self.core.failed(self, exc)
        self.echo_fast = False
        self.session.reason = CloseReason.INTERNAL_ERROR
        self.session.commands.clear()
        self.abort()

    def cannot_serve(self, exc: Exception) -> None:
        """The engine cannot serve this admitted connection (no thread could be started for
        it): the client is told the server is busy, and it ends like a refused one."""
        self.session.detail = str(exc)
        self.send(self.session.refuse(CloseReason.NO_THREAD, monotonic()))

    def timer_fired(self) -> None:
        with self.contained():
            self.count_echoed()
            now = monotonic()
            age = self.input_age() if self.session.echoed_by_engine else None
            # The kernel counts in its ticks (at least 100 a second) and rounds down: its age
            # is up to one tick long, so the input is taken as one tick later (never early).
            input_at = None if age is None else now - age + INPUT_AGE_SLACK
            self.send(self.session.handle_timeout(now, input_at))
            self.set_timer(self.session.next_deadline())

    def writing_blocked(self) -> None:
        with self.contained():
            self.count_echoed()
            self.session.writing_blocked(monotonic())
            self.carry_out()

    def writing_resumed(self) -> None:
        with self.contained():
            self.count_echoed()
            self.session.writing_resumed(monotonic())
            self.carry_out()

    def stop(self) -> None:
        """The server is stopping: answer what was received (what the kernel holds too),
        then half-close and linger."""
        with self.contained():
            self.count_echoed()
            self.send(self.session.stop(monotonic(), self.unread()))

    @contextmanager
    def contained(self) -> Iterator[None]:
        """An unexpected exception inside is this connection's alone: see `failed`."""
        try:
            yield
        except OSError:
            raise
        except Exception as exc:
            self.failed(exc)

    def unread(self) -> int:
        """Bytes the kernel has received on this connection that were not read yet."""
        return 0

    def input_age(self) -> float | None:
        """Seconds since the client last sent, by the kernel's record (None: unknown)."""
        return None

    def count_echoed(self) -> None:
        """An engine whose reads can bypass the driver altogether (the asyncio engine's direct
        echo) adds what they echoed to ``session.echoed_by_engine`` here: the driver calls it
        before every call into the session but a read."""

    def force(self, reason: CloseReason) -> None:
        """Close at once, for ``reason``."""
        self.count_echoed()
        self.session.abort(reason)
        self.carry_out()

    def drain_expired(self) -> None:
        """The drain timeout passed with this connection still open."""
        self.force(CloseReason.DRAIN_TIMEOUT)

    def stop_at_once(self) -> None:
        """A second stop signal: no more waiting."""
        self.force(CloseReason.FORCED_STOP)

    def lost(self, exc: BaseException | None, unsent: int = 0) -> None:
        """The connection is gone (``exc``: the error that ended it)."""
        self.count_echoed()
        self.echo_fast = False
        self.session.connection_lost(exc, unsent)
        self.set_timer(None)
        if self.admitted:
            self.admitted = False
            self.core.closed(self)

    def send(self, out: bytes) -> None:
        """Send what a session call returned, then carry out its commands.

        The commands are taken first: a write that blocks tells the session, whose commands
        for that are carried out at once, while these (a half-close, say) must follow the
        bytes they come after.
        """
        commands = self.session.take_commands()
        if out:
            self.write(out)
        self._carry_out(commands)
        if self.commands:
            self.carry_out()

    def carry_out(self) -> None:
        self._carry_out(self.session.take_commands())

    def _carry_out(self, commands: list[Command]) -> None:
        for command in commands:
            if command is Command.RESCHEDULE:
                self.set_timer(self.session.next_deadline())
            elif command is Command.OPEN:
                self.open()
            else:
                getattr(self, _ACTIONS[command])()
        self._follow_session()

    def open(self) -> None:
        """The PROXY header, the TLS handshake are done: admit the real client, greet it,
        answer what it sent meanwhile."""
        client = self.session.client
        if client is not None:
            self.via, self.peer = self.peer, format_address(client)
        now = monotonic()
        refusal = self.core.open(self)
        if refusal is not None:
            self.send(self.session.refuse(refusal, now))
            return
        info = self.connection_info() if self.core.config.greeting == "info" else None
        self.send(self.session.opened(now, info))
        if self.log_messages:
            self.core.messages(self)  # what arrived before the connection was open
        self.set_timer(self.session.next_deadline())

    @property
    def tls_summary(self) -> str:
        """The TLS version and cipher, and the client certificate's subject, for the log."""
        info = self.tls_info
        if not info:
            return ""
        subject = info.get("peer_subject")
        return f"{info['version']} {info['cipher']}" + (f", client {subject}" if subject else "")

    def connection_info(self) -> dict[str, object]:
        """What ``--greeting info`` tells the client about its connection."""
        header = self.session.proxy_header
        return {
            "client": self.peer,
            "server": self.local_address(),
            "proxy": self.via or None,
            "proxy_destination": format_address(header.destination)
            if header is not None and header.destination is not None
            else None,
            "tls": dict(self.tls_info) or None,
            "server_id": self.core.server_id,
            "worker": self.core.config.worker or None,
        }

    def local_address(self) -> str:
        """The server's address of this connection (for the greeting)."""
        return ""

    def handshake_done(self, connection: ssl.SSLSocket | ssl.SSLObject) -> None:
        """The engine's TLS handshake succeeded: the connection opens."""
        with self.contained():
            self.tls_info = tls.describe_tls(connection)
            self.tls_info["sni"] = self.core.server_names.pop(id(connection), "")
            self.session.handshake_done(monotonic())
            self.carry_out()

    def handshake_failed(self, exc: BaseException) -> None:
        """The engine's TLS handshake failed; the engine then closes and calls `lost`."""
        if self.core.stopping:
            self.session.stop(monotonic())
        elif isinstance(exc, OSError):
            self.session.handshake_failed(
                tls.describe_ssl_error(exc), timed_out=isinstance(exc, TimeoutError)
            )
        else:
            self.session.handshake_failed(str(exc) or type(exc).__name__)
        self.session.commands.clear()  # the engine closes the socket itself

    # The mechanisms, supplied by each engine.

    def shut_write(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def set_timer(self, deadline: float | None) -> None:
        """Arm the connection's one timer for ``deadline`` (monotonic), or cancel it (None).
        Firing early is harmless (the session keeps deadlines not yet due); late is not."""
        raise NotImplementedError


# Each command, and the Driver method that carries it out.
_ACTIONS: dict[Command, str] = {
    Command.PAUSE_READING: "pause_reading",
    Command.RESUME_READING: "resume_reading",
    Command.SHUT_WRITE: "shut_write",
    Command.CLOSE: "close",
    Command.ABORT: "abort",
}
