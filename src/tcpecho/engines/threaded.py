"""The seed's model: one thread per connection, every thread named, tracked and joined."""

from __future__ import annotations

import contextlib
import mmap
import queue
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable
from time import monotonic

from tcpecho import net
from tcpecho.config import ServerConfig
from tcpecho.engines.base import (
    ACCEPT_BATCH,
    MAX_WAIT,
    RECV_SIZE,
    Driver,
    EngineCore,
    seconds_until,
    signals_wake,
)
from tcpecho.events import Consumer, Summary
from tcpecho.net import Address
from tcpecho.protocol import MAX_V2_LENGTH, CloseReason
from tcpecho.protocol.session import State


class ThreadedEngine:
    """Accepts in the calling thread; serves each connection in a thread of its own, started
    by the accept thread or, when connections come faster, by a starter thread (`_accept`).

    The accept loop waits in a selector on the listeners and a wake-up socket. `stop` only
    sets a flag and writes to that socket (no lock, so it is safe in a signal handler), which
    wakes the loop at once; so does each connection thread that ends while the server drains.
    Draining shuts the read side of every connection, which wakes each thread's blocking
    ``recv``; the thread answers what was already received and closes.
    """

    description = "threads"

    def __init__(self, config: ServerConfig, consumers: Iterable[Consumer] = ()) -> None:
        self.config = config
        self.core: EngineCore[ThreadConnection] = EngineCore(config, consumers, threaded=True)
        self._stop_requested = False
        self._forced = False
        self._listeners: list[socket.socket] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._threads: set[ThreadConnection] = set()  # each with its thread started or to start
        self._threads_lock = threading.Lock()
        # Accepted connections whose thread the starter thread is to start (None: end).
        self._to_start: queue.SimpleQueue[ThreadConnection | None] = queue.SimpleQueue()
        self._starter = threading.Thread(target=self._start_threads, name="starter")
        self._unserved: queue.SimpleQueue[ThreadConnection] = queue.SimpleQueue()

    def start(self) -> list[Address]:
        self._listeners = net.listening_sockets(self.config)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        return [sock.getsockname()[:2] for sock in self._listeners]

    def stop(self, *, force: bool = False) -> None:
        self._stop_requested = True
        self._forced = self._forced or force
        self.wake()

    def wake(self) -> None:
        # The wake-up socket may be full (already woken) or closed (serve() returned).
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def serve(self) -> Summary:
        if self._wake_r is None:
            raise RuntimeError("start() first")
        with selectors.DefaultSelector() as selector, signals_wake(self._wake_w):
            self._refused = Refused(selector)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                self._starter.start()
                self._accept_until_stopped(selector)
            finally:
                for sock in self._listeners:
                    selector.unregister(sock)
                    sock.close()
                try:
                    self._drain(selector)
                finally:
                    self._stop_starter()
        self._wake_r.close()
        if self._wake_w is not None:
            self._wake_w.close()
        return self.core.stopped()

    def _accept_until_stopped(self, selector: selectors.BaseSelector) -> None:
        for listener in self._listeners:
            selector.register(listener, selectors.EVENT_READ, data=listener)
        while not self._stop_requested:
            for key, _ in selector.select(self._refused.timeout()):
                if key.data is None:
                    self._clear_wake()
                    self._take_unserved(linger=True)
                elif isinstance(key.data, ThreadConnection):
                    self._refused.readable(key.data)
                elif not self._stop_requested:
                    self._accept(key.data)
            self._refused.expire()
        self._take_unserved(linger=True)
        self._refused.close_all()

    def _clear_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)

    def _accept(self, listener: socket.socket) -> None:
        """Accept the connections waiting (up to `ACCEPT_BATCH`), then start their threads.

        `Thread.start` waits until the new thread runs. Under load that wait is milliseconds
        (the new thread, then the starting one, must get the GIL from the others), and it held
        accepting below the pace of a burst: with 5,000 connects at once beside three busy
        processes, the listen queue overflowed about 3,000 times, the clients waited for SYN
        retries, and a client left too long in a full queue is reset. So when more than one
        connection was waiting, or threads are still to start, the starter thread starts them
        and this one goes on accepting. A lone connection's thread is started here: a second
        thread's wake-up cost a fifth more CPU per connection for one client reconnecting.
        """
        admitted: list[ThreadConnection] = []
        pause = 0.0
        try:
            for _ in range(ACCEPT_BATCH):
                accepted = self.core.accept(listener)
                if isinstance(accepted, tuple):
                    conn = self._admit(*accepted)
                    if conn is not None:
                        admitted.append(conn)
                elif accepted is None:  # none waiting
                    break
                elif accepted:  # out of descriptors or memory: pause accepting
                    pause = accepted
                    break
                # (0.0: a connection failed before it was accepted.) Another waiting? Asked
                # with a poll: an accept that finds none raises, which costs ten times more.
                if not select.select([listener], [], [], 0)[0]:
                    break
        finally:
            if len(admitted) == 1 and self._to_start.empty():
                self._start(admitted[0])
            else:
                for conn in admitted:
                    self._to_start.put(conn)
        if pause and self._wake_r is not None:
            # A pause that a stop still ends at once (the listener, still readable, is not
            # watched meanwhile).
            select.select([self._wake_r], [], [], pause)

    def _admit(self, sock: socket.socket, address: Address) -> ThreadConnection | None:
        """The connection to give a thread, or None when it was refused."""
        sock.setblocking(True)
        conn = ThreadConnection(self, sock, address)
        try:
            admitted = conn.admit()
        except OSError as exc:  # refused, and gone before the refusal could be sent
            sock.close()
            conn.lost(exc)
            return None
        if not admitted:
            self._refused.add(conn)
            return None
        conn.thread = threading.Thread(target=conn.run, name=f"conn-{conn.peer}")
        with self._threads_lock:
            self._threads.add(conn)
        return conn

    def _start_threads(self) -> None:
        """The starter thread: start the thread of each connection handed to it, in order,
        until None."""
        while (conn := self._to_start.get()) is not None:
            if conn.stopped_at_once:  # a forced stop or the drain timeout came first
                conn.end_unstarted()
                self.connection_ended(conn)
            else:
                self._start(conn)

    def _start(self, conn: ThreadConnection) -> None:
        try:
            conn.thread.start()
        except RuntimeError as exc:
            # "can't start new thread": a limit on tasks (systemd's TasksMax, a container's
            # pids limit, ulimit -u) or on memory. The client is told the server is busy; the
            # accept thread lingers with it, as with a refused client.
            self.connection_ended(conn)
            try:
                conn.cannot_serve(exc)
            except OSError as error:  # the client is gone (or a stop shut the socket)
                conn.sock.close()
                conn.lost(error)
                return
            self._unserved.put(conn)
            self.wake()

    def _take_unserved(self, *, linger: bool) -> None:
        """The connections no thread could be started for: linger with them among the refused
        ones, or (the server stopping) close them."""
        while not self._unserved.empty():
            conn = self._unserved.get()
            if linger:
                self._refused.add(conn)
            else:
                Refused.close(conn)

    def connection_ended(self, conn: ThreadConnection) -> None:
        with self._threads_lock:
            self._threads.discard(conn)
        if self.core.stopping:
            self.wake()

    def _drain(self, selector: selectors.BaseSelector) -> None:
        """Wake every connection to finish, wait for them up to the drain timeout (or a forced
        stop), then close the rest."""
        for conn in self.core.drain_started():
            conn.wake_to_stop()
        deadline = monotonic() + self.config.drain_timeout
        while self._threads and not self._forced:
            remaining = deadline - monotonic()
            if remaining <= 0:
                for conn in self.core.drain_timed_out():
                    conn.drain_expired()
                break
            if selector.select(min(remaining, MAX_WAIT)):  # a connection ended, or a second stop
                self._clear_wake()
        with self._threads_lock:
            left = list(self._threads)
        for conn in left:
            conn.stop_at_once()
        self._stop_starter()  # the threads it had still to start end at once: stopped
        for conn in left:
            if conn.thread.ident is not None:  # None: its start failed
                conn.thread.join()

    def _stop_starter(self) -> None:
        """Let the starter thread start what it has left, then end."""
        self._to_start.put(None)
        if self._starter.ident is not None:  # None: it could not be started
            self._starter.join()
        self._take_unserved(linger=False)


class Refused:
    """Refused connections, carried out by the accept thread with its selector rather than a
    thread each: the session's reply went with `Driver.admit`; here they linger (read and
    discard) until the client closes or the session's deadline, like any connection."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._lingering: set[ThreadConnection] = set()

    def add(self, conn: ThreadConnection) -> None:
        if not conn.reading:  # the session closed it at once (a denied client)
            self.close(conn)
            return
        conn.sock.setblocking(False)
        self._selector.register(conn.sock, selectors.EVENT_READ, data=conn)
        self._lingering.add(conn)

    def timeout(self) -> float | None:
        """How long the accept loop may wait before a refused connection's deadline."""
        deadlines = [conn.deadline for conn in self._lingering if conn.deadline is not None]
        return seconds_until(min(deadlines)) if deadlines else None

    def readable(self, conn: ThreadConnection) -> None:
        try:
            conn.data_received(conn.sock.recv(RECV_SIZE))
        except BlockingIOError:
            return
        except OSError:
            conn.reading = False
        self._end_if_done(conn)

    def expire(self) -> None:
        now = monotonic()
        for conn in list(self._lingering):
            if conn.deadline is not None and conn.deadline <= now:
                conn.timer_fired()
                self._end_if_done(conn)

    def close_all(self) -> None:
        for conn in list(self._lingering):
            conn.reading = False
            self._end_if_done(conn)

    def _end_if_done(self, conn: ThreadConnection) -> None:
        if not conn.reading:
            self._lingering.discard(conn)
            self._selector.unregister(conn.sock)
            self.close(conn)

    @staticmethod
    def close(conn: ThreadConnection) -> None:
        conn.sock.close()
        conn.lost(None)


class ThreadConnection(Driver):
    """One connection, served by the thread that calls `run` (blocking socket).

    The connection's one timer is the kernel's: ``SO_RCVTIMEO`` while it waits to read,
    ``SO_SNDTIMEO`` while a send is blocked. Both count from the start of each call, so an
    absolute deadline (the line timeout) is re-armed before every read in line framing.
    Every session call happens in this thread; other threads only shut the socket down (which
    wakes it) and set `_forced`.
    """

    def __init__(self, engine: ThreadedEngine, sock: socket.socket, address: Address) -> None:
        super().__init__(engine.core, address)
        self.engine = engine
        self.thread = _NO_THREAD  # until admitted: a refused client never gets one
        self.sock = sock
        self._send = sock.send  # bound once: the per-read path
        self.reading = True
        self.deadline: float | None = None
        self._timer_dirty = False
        self._rearm_every_read = self.session.settings.framing == "line"
        self._forced: CloseReason | None = None
        self._unsent = 0  # bytes of replies an abort dropped
        self._tls = False
        self._timed_out: tuple[type[Exception], ...] = _TIMED_OUT  # what the timer raises
        self._buffer: memoryview | None = None  # raw echo's, made at its first read

    def run(self) -> None:
        error: BaseException | None = None
        try:
            if self.session.state is not State.OPEN:
                self._before_open()
            self._read_until_done()
        except OSError as exc:
            error = exc
            if self._forced is not None:
                super().force(self._forced)
        except Exception as exc:
            self.failed(exc)
        finally:
            if self._tls and error is None and self._forced is None:
                _close_notify(self.sock)
            self.sock.close()
            self.lost(error, self._unsent)
            self.engine.connection_ended(self)

    def _before_open(self) -> None:
        """A PROXY header that TLS follows (peeked, so not a byte of TLS is read), then the
        TLS handshake. A PROXY header with no TLS is read as data, like any input."""
        context = self.core.tls_context
        if context is None:
            return
        while self.session.state is State.PROXY_HEADER and self.reading:
            self._arm(socket.SO_RCVTIMEO)
            try:
                peeked = self.sock.recv(MAX_V2_LENGTH, socket.MSG_PEEK)
            except BlockingIOError:
                self.timer_fired()
                continue
            if not peeked:
                self.input_ended()
                continue
            with self.contained():
                used = self.session.header_peeked(peeked, monotonic())
                if used:
                    self.sock.recv(used, socket.MSG_WAITALL)
                self.carry_out()
        if self.session.state is State.HANDSHAKE and self.reading:
            self._handshake(context)

    def _handshake(self, context: ssl.SSLContext) -> None:
        tls_sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock, self._send, self._tls = tls_sock, tls_sock.send, True
        self._timed_out = _TLS_TIMED_OUT
        deadline = self.session.handshake_deadline()
        while True:
            tls_sock.settimeout(seconds_until(deadline, at_least=0.001))
            try:
                tls_sock.do_handshake()
                break
            except OSError as exc:  # ssl.SSLError is one, and so is the timeout
                if isinstance(exc, TimeoutError) and monotonic() < deadline:
                    continue  # the wait was cut to MAX_WAIT: the deadline is further on
                self.handshake_failed(exc)
                self.reading = False
                return
        tls_sock.settimeout(None)  # blocking again: the kernel's timeouts are the timer
        self._timer_dirty = True
        self.handshake_done(tls_sock)

    def _read_until_done(self) -> None:
        recv = self.sock.recv  # after the handshake: the TLS socket's
        handle = self.data_received
        while self.reading:
            if self._timer_dirty or self._rearm_every_read:
                self._arm(socket.SO_RCVTIMEO)
            try:
                data = self._echo() if self.echo_fast and not self._tls else recv(RECV_SIZE)
            except self._timed_out:  # SO_RCVTIMEO (TLS: the socket's timeout): the timer fired
                self.timer_fired()
                continue
            if data:
                handle(data)
            elif data is not None:
                self._recv_ended()

    def _echo(self) -> bytes | None:
        """Raw echo (`echo_fast`), in one loop: each read is sent back from here. Returns the
        end of input (b""), or None after a send that blocked (the session has been told).

        Nothing in here changes the session's state or the timer: only another call into the
        session does, and `_send_blocked` is the only one. The timer (``SO_RCVTIMEO``) counts
        from the start of each read, which is what the idle timeout measures.
        """
        # Each read goes into the connection's own buffer and is sent from there: no bytes
        # object per read (recv allocates RECV_SIZE bytes, then shrinks them, which made
        # malloc the largest cost of a small read). The buffer is an anonymous mapping, so
        # the pages a connection never reads into cost no memory. A read the size of the one
        # before is sent through the same view, so a steady stream makes no object per read.
        if self._buffer is None:
            self._buffer = memoryview(mmap.mmap(-1, RECV_SIZE))
        sock, buffer, dontwait = self.sock, self._buffer, _DONTWAIT
        view, last, echoed = buffer, -1, 0  # the count is kept here until the loop ends
        try:
            while True:
                size = sock.recv_into(buffer)
                if not size:
                    return b""
                echoed += size
                if size != last:
                    view, last = buffer[:size], size
                try:
                    sent = sock.send(view, dontwait)
                except BlockingIOError:
                    sent = 0
                if sent < size:
                    self.session.echoed_by_engine += echoed
                    echoed = 0
                    self._send_blocked(view[sent:])
                    return None
        finally:
            self.session.echoed_by_engine += echoed

    def _recv_ended(self) -> None:
        """recv returned b"": the client's end, or the server shutting our read side."""
        if self._forced is not None:
            super().force(self._forced)
        elif self.core.stopping:
            pending = _read_pending(self.sock)
            if pending:
                self.data_received(pending)
            self.stop()
            self.input_ended()  # the read side is shut: nothing more will come
        else:
            self.input_ended()

    @property
    def stopped_at_once(self) -> bool:
        """A forced stop or the drain timeout has ended this connection (`force`)."""
        return self._forced is not None

    def end_unstarted(self) -> None:
        """From the starter: end a connection stopped at once before its thread started, as
        its thread would have."""
        assert self._forced is not None
        super().force(self._forced)
        self.sock.close()
        self.lost(None)

    def wake_to_stop(self) -> None:
        """From the accept thread: wake this connection's thread to drain."""
        _shutdown(self.sock, socket.SHUT_RD)
        if self.session.state is State.HANDSHAKE:
            _shutdown(self.sock, socket.SHUT_RDWR)  # the handshake may be waiting to send

    def force(self, reason: CloseReason) -> None:
        """From any thread: this connection's thread aborts at once (the shutdown wakes it,
        and it tells the session)."""
        if threading.current_thread() is self.thread:
            super().force(reason)
            return
        if self._forced is None:
            self._forced = reason
        _shutdown(self.sock, socket.SHUT_RDWR)

    # The mechanisms the session's commands use.

    def write(self, data: bytes) -> None:
        if self._tls:  # a TLS socket takes no flags: every send may block
            self._send_blocked(memoryview(data))
            return
        try:
            sent = self._send(data, _DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self._send_blocked(memoryview(data)[sent:])

    def _send_blocked(self, rest: memoryview) -> None:
        """The client is not taking replies: wait in a blocking send, timed by the session."""
        self.writing_blocked()
        while rest and self.reading:
            self._arm(socket.SO_SNDTIMEO)
            try:
                rest = rest[self.sock.send(rest) :]
            except self._timed_out:  # SO_SNDTIMEO (TLS: the socket's timeout): the timer fired
                self.timer_fired()
        if self.reading:
            self.writing_resumed()
        else:  # aborted: what was not sent is reported, not counted as echoed
            self._unsent += len(rest)

    def shut_write(self) -> None:
        if self._tls:
            # No half-close over TLS: after close_notify, clients treat more data from them as
            # an error. The close (and close_notify) follows the client's end or the linger.
            return
        if self.core.stopping:
            self._wait_acknowledged()
        self.sock.shutdown(socket.SHUT_WR)

    def _wait_acknowledged(self) -> None:
        """Wait (up to the session's linger timeout) until the client has acknowledged every
        reply.

        Draining shut this socket's read side to wake the thread. Once our end is sent too,
        Linux answers any more data from the client with a reset, and a reset drops the replies
        still in flight; so the end goes only after they have arrived. Meanwhile more data from
        the client is only queued. There is no event for "acknowledged", hence the short sleeps.
        """
        deadline = monotonic() + self.session.settings.linger_timeout
        fd = self.sock.fileno()
        with contextlib.suppress(OSError):
            while net.unsent_bytes(fd) and self._forced is None and monotonic() < deadline:
                time.sleep(ACK_POLL)

    def close(self) -> None:
        self.reading = False

    def abort(self) -> None:
        # SO_LINGER with a zero timeout: close() sends RST and drops what is queued.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.reading = False

    def local_address(self) -> str:
        return net.format_address(self.sock.getsockname())

    def input_age(self) -> float | None:
        return net.input_age(self.sock)

    def pause_reading(self) -> None:
        pass  # this thread is blocked in send: it reads again only when the send is done

    def resume_reading(self) -> None:
        pass

    def set_timer(self, deadline: float | None) -> None:
        self.deadline = deadline
        self._timer_dirty = True

    def _arm(self, option: int) -> None:
        self._timer_dirty = False
        seconds = 0.0 if self.deadline is None else seconds_until(self.deadline, at_least=0.001)
        if self._tls:
            # A blocking SSLSocket retries a read or write that SO_RCVTIMEO or SO_SNDTIMEO cut
            # short, so those never fire: its own timeout (a poll before each try) does.
            self.sock.settimeout(seconds or None)
            return
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, option, timeval)


# Draining: how often a connection looks whether the client has acknowledged its last replies
# before it sends its end (see _wait_acknowledged).
ACK_POLL = 0.005
_NO_THREAD = threading.Thread(name="none")  # never started
_DONTWAIT = socket.MSG_DONTWAIT  # a send that would block returns at once: see _send_blocked
# What a blocking call raises when SO_RCVTIMEO or SO_SNDTIMEO expires.
_TIMED_OUT: tuple[type[Exception], ...] = (BlockingIOError,)
# What a TLS socket's read or write raises when the timeout `_arm` gave it expires. Only
# here TimeoutError: on a TCP socket it is the kernel's ETIMEDOUT, a network error.
_TLS_TIMED_OUT: tuple[type[Exception], ...] = (
    TimeoutError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


def _close_notify(sock: socket.socket) -> None:
    """Send TLS's close_notify before the close, without waiting for the client's."""
    if isinstance(sock, ssl.SSLSocket):
        with contextlib.suppress(OSError, ValueError):
            sock.setblocking(False)
            sock.unwrap()


def _read_pending(sock: socket.socket) -> bytes:
    """What the client has sent that is queued in the kernel now, without waiting."""
    if isinstance(sock, ssl.SSLSocket):
        # It takes no flags (ValueError). Its read side ended at the shutdown: what was sent
        # before the stop has been read, and what comes after it is not answered.
        return b""
    chunks = []
    with contextlib.suppress(OSError):  # BlockingIOError: nothing more queued
        while chunk := sock.recv(RECV_SIZE, socket.MSG_DONTWAIT):
            chunks.append(chunk)
    return b"".join(chunks)


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):  # the peer may be gone already, or the socket closed
        # socket.socket's own: an SSLSocket's shutdown would also drop its TLS state, under
        # the feet of the thread that uses it.
        socket.socket.shutdown(sock, how)
