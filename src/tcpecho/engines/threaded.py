"""The seed's model: one thread per connection, every thread named, tracked and joined."""

from __future__ import annotations

import contextlib
import select
import selectors
import socket
import struct
import threading
import time

from tcpecho import net
from tcpecho.config import ServerConfig
from tcpecho.engines.base import (
    ACCEPT_RETRY_DELAY,
    ACCEPT_RETRY_ERRNOS,
    LINGER_TIMEOUT,
    RECV_SIZE,
    ConnectionLog,
    Summary,
    new_connection,
)
from tcpecho.net import Address, describe_os_error
from tcpecho.protocol import BUSY_REPLY, EchoConnection, State


class ThreadedEngine:
    """Accepts in the calling thread; serves each connection in a thread of its own.

    The accept loop waits in a selector on the listeners and a wake-up socket. `stop` only
    sets a flag and writes to that socket (no lock, so it is safe in a signal handler), which
    wakes the loop at once; so does each connection thread that ends while the server drains.
    Stopping shuts the read side of every connection, which wakes each thread's blocking
    ``recv``; the thread echoes what was already received and closes.
    """

    description = "threads"

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.log = ConnectionLog(config)
        self.summary = Summary()
        self.stopping = False  # set by stop(); read by every thread
        self._forced = False
        self._listeners: list[socket.socket] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}

    def start(self) -> list[Address]:
        self._listeners = net.listening_sockets(self.config)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        return [sock.getsockname()[:2] for sock in self._listeners]

    def stop(self, *, force: bool = False) -> None:
        self.stopping = True
        self._forced = self._forced or force
        self._wake()

    def _wake(self) -> None:
        # The wake-up socket may be full (already woken) or closed (serve() returned).
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def serve(self) -> Summary:
        if self._wake_r is None:
            raise RuntimeError("start() first")
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                self._accept_until_stopped(selector)
            finally:
                for sock in self._listeners:
                    selector.unregister(sock)
                    sock.close()
                self._drain(selector)
        self._wake_r.close()
        if self._wake_w is not None:
            self._wake_w.close()
        return self.summary

    def _accept_until_stopped(self, selector: selectors.BaseSelector) -> None:
        for listener in self._listeners:
            selector.register(listener, selectors.EVENT_READ, data=listener)
        while not self.stopping:
            for key, _ in selector.select():
                if key.data is None:
                    self._clear_wake()
                elif not self.stopping:
                    self._accept(key.data)

    def _clear_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(OSError):
            self._wake_r.recv(4096)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in ACCEPT_RETRY_ERRNOS:
                self.log.accept_failed(
                    "cannot accept a connection: %s; retrying", exc.strerror or str(exc)
                )
                # A pause that a stop still ends at once (the listener, still readable, is not
                # watched meanwhile).
                if self._wake_r is not None:
                    select.select([self._wake_r], [], [], ACCEPT_RETRY_DELAY)
            else:  # the connection failed before we took it (reset, aborted, unreachable)
                self.log.accept_failed("a connection failed before it was accepted: %s", exc)
            return
        sock.setblocking(True)
        peer = net.format_address(address)
        with self._lock:
            active = len(self._connections)
            if active < self.config.max_connections:
                thread = threading.Thread(
                    target=self._serve_connection, args=(sock, peer), name=f"conn-{peer}"
                )
                self._connections[sock] = thread
                self.summary.connections += 1
        if active >= self.config.max_connections:
            self._refuse(sock, peer)
            return
        self.log.opened(peer, active + 1)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of memory or a ulimit
            with self._lock:
                del self._connections[sock]
                self.summary.connections -= 1
                sock.close()
            self.log.accept_failed("closed %s: cannot start a thread for it (%s)", peer, exc)

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        self.log.busy(
            "refused %s: %d connections open (--max-connections)", peer, self.config.max_connections
        )
        try:
            sock.setblocking(False)
            sock.send(BUSY_REPLY)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        conn = new_connection(self.config)
        sent = 0
        reason = "closed by client"
        _set_send_timeout(sock, self.config.write_timeout)
        try:
            while conn.state is State.OPEN:
                data = sock.recv(RECV_SIZE)
                if not data and self.stopping:
                    reason = "closed: server stopping"
                    if pending := _read_pending(sock):
                        sent += self._reply(sock, conn, peer, pending)
                sent += self._reply(sock, conn, peer, data)
            if conn.state is State.REJECTED:
                reason = "closed: line too long"
                self.log.rejected(peer, conn)
            _linger(sock, conn)
        except BlockingIOError:
            reason = "closed: not reading (--write-timeout)"
        except OSError as exc:
            reason = describe_os_error(exc)
        finally:
            with self._lock:  # unregistered under the lock, so _drain never shuts a closed fd
                del self._connections[sock]
                sock.close()
                self.summary.bytes_received += conn.bytes_received
                self.summary.bytes_echoed += sent
                if self.stopping and not self._connections:
                    self._wake()
            self.log.closed(peer, conn, sent, reason)

    def _reply(self, sock: socket.socket, conn: EchoConnection, peer: str, data: bytes) -> int:
        out = conn.receive_data(data)
        self.log.messages(peer, conn)
        if out:
            sock.sendall(out)
        return len(out)

    def _drain(self, selector: selectors.BaseSelector) -> None:
        """Wake every connection to finish, wait for them up to the drain timeout (or a forced
        stop), then close the rest."""
        with self._lock:
            for sock in self._connections:
                _shutdown(sock, socket.SHUT_RD)
        deadline = time.monotonic() + self.config.drain_timeout
        while self._connections and not self._forced:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.log.drain_timed_out(self.config.drain_timeout, len(self._connections))
                break
            if selector.select(remaining):  # a connection ended, or a second stop
                self._clear_wake()
        with self._lock:
            threads = list(self._connections.values())
            for sock in self._connections:
                _shutdown(sock, socket.SHUT_RDWR)
        for thread in threads:
            thread.join()


def _read_pending(sock: socket.socket) -> bytes:
    """What the client had sent before the server stopped reading: the receive queue now."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _linger(sock: socket.socket, conn: EchoConnection) -> None:
    """Close our side, then read and discard until the client closes or `LINGER_TIMEOUT`.

    Closing a socket with unread input makes the kernel send RST, which can destroy replies the
    client has not read yet; reading first lets them arrive.
    """
    sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + LINGER_TIMEOUT
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            data = sock.recv(RECV_SIZE)
            if not data:
                break
            conn.receive_data(data)
    except OSError:  # timed out, or reset: either way the client had its chance
        pass


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    # SO_SNDTIMEO bounds only sends; a blocked send then fails with EAGAIN (BlockingIOError).
    # Python's own timeout would also end idle reads, which must wait for as long as it takes.
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):  # the peer may be gone already
        sock.shutdown(how)
