"""Listening sockets, and the one place where the OS's bind errors become ours."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import termios
from collections.abc import Sequence

from tcpecho.config import ServerConfig
from tcpecho.errors import (
    AddressInUse,
    AddressNotAvailable,
    BindError,
    BindPermissionDenied,
    HostNotFound,
    InheritedSocketError,
)

Address = tuple[str, int]

_BIND_ERRORS: dict[int, type[BindError]] = {
    errno.EADDRINUSE: AddressInUse,
    errno.EACCES: BindPermissionDenied,
    errno.EPERM: BindPermissionDenied,
    errno.EADDRNOTAVAIL: AddressNotAvailable,
}


def plain_address(address: tuple[object, ...]) -> Address:
    """``(host, port)`` of a peer; an IPv4 client of a dual-stack socket (``::ffff:192.0.2.1``)
    as plain IPv4."""
    host = str(address[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(str(address[1]))


def format_address(address: tuple[object, ...]) -> str:
    """``host:port``, with IPv6 hosts in brackets: ``[::1]:65432``."""
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def listening_sockets(config: ServerConfig) -> list[socket.socket]:
    """The sockets a server accepts on, listening and non-blocking: ``config.listen_fds``
    wrapped when given (they are listening already: systemd's, or the supervisor's), else
    bound to host and port.

    Raises `HostNotFound` or a `BindError` when binding fails, `InheritedSocketError` when a
    descriptor given is no listening TCP socket. The caller closes the sockets (closing a
    wrapped one closes that descriptor in this process only).
    """
    if not config.listen_fds:
        return open_listeners(config.host, config.port, config.backlog)
    listeners: list[socket.socket] = []
    try:
        for fd in config.listen_fds:
            listeners.append(_inherited(fd))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _inherited(fd: int) -> socket.socket:
    """``fd`` as a socket object, non-blocking, once it is known to be a listening TCP socket.
    On error ``fd`` is left open (it was never this function's to close)."""
    try:
        # Family and type are read from the descriptor.
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        what = "not a socket" if exc.errno == errno.ENOTSOCK else exc.strerror or str(exc)
        raise InheritedSocketError(fd, what) from None
    try:
        if sock.family not in _TCP_FAMILIES or sock.type != socket.SOCK_STREAM:
            family, kind = _name(sock.family, "AF_"), _name(sock.type, "SOCK_")
            raise InheritedSocketError(fd, f"not a TCP socket ({family}, {kind})")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise InheritedSocketError(fd, "a TCP socket that is not listening")
        # Shared with every process that holds the descriptor; accepting must not block
        # when another process took the connection first.
        sock.setblocking(False)
    except BaseException:
        sock.detach()
        raise
    return sock


def _name(value: int, prefix: str) -> str:
    """``socket.AF_UNIX`` as "AF_UNIX"; a number no constant names, as itself."""
    return getattr(value, "name", None) or f"{prefix}{int(value)}"


def open_listeners(hosts: Sequence[str], port: int, backlog: int) -> list[socket.socket]:
    """Bind and listen on every address each of ``hosts`` resolves to, non-blocking.

    With port 0 the OS picks a port, and every further address gets that same port. An IPv6
    wildcard (``::``) takes IPv4 clients too (dual stack), unless an IPv4 address is listened
    on as well. Raises `HostNotFound` or a `BindError`; on error no socket is left open. The
    caller closes the sockets.
    """
    infos = []
    for host in hosts:
        try:
            infos += socket.getaddrinfo(
                host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise HostNotFound(host, exc.strerror or str(exc)) from exc
    dual_stack = not any(info[0] == socket.AF_INET for info in infos)
    listeners: list[socket.socket] = []
    seen: set[tuple[object, ...]] = set()
    try:
        for family, kind, proto, _, resolved in infos:
            if resolved[:2] in seen:
                continue
            seen.add(resolved[:2])
            sockaddr = resolved
            if port == 0 and listeners:
                sockaddr = (resolved[0], listeners[0].getsockname()[1], *resolved[2:])
            listeners.append(_listen(family, kind, proto, sockaddr, backlog, dual_stack))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _listen(
    family: int,
    kind: int,
    proto: int,
    sockaddr: tuple[object, ...],
    backlog: int,
    dual_stack: bool,
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        # A server restarted right after a stop must bind again despite TIME_WAIT connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" takes IPv4 clients too when nothing else listens on IPv4; alongside an IPv4
            # listener it must not, or "0.0.0.0" and "::" could not be bound together.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        error = _BIND_ERRORS.get(exc.errno or 0, BindError)
        raise error(format_address(sockaddr), exc.errno, exc.strerror or str(exc)) from exc
    return sock


def describe_os_error(exc: OSError) -> str:
    """A short reason for a connection that failed or ended with ``exc``."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc)


def unread_bytes(fd: int) -> int:
    """Bytes in a connected socket's receive queue, not read yet (FIONREAD). Raises OSError."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


def unsent_bytes(fd: int) -> int:
    """Bytes sent on a connected TCP socket that the peer has not acknowledged yet (SIOCOUTQ,
    which Linux numbers as TIOCOUTQ). Raises OSError."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])


# struct tcp_info (linux/tcp.h): tcpi_last_data_recv, milliseconds since data last arrived, is
# the 12th 32-bit field after 8 bytes of 8-bit ones; tcpi_bytes_received (Linux 4.1), the bytes
# received in order (a FIN counts one), the fourth 64-bit field after 24 32-bit ones.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = 8 + 11 * 4
_BYTES_RECEIVED = 8 + 24 * 4 + 3 * 8
INPUT_AGE_KNOWN = _TCP_INFO is not None


def input_age(sock: socket.socket) -> float | None:
    """Seconds since data last arrived on a connected TCP socket, by the kernel's record
    (None where the OS keeps none, or the socket is gone). Counted in the kernel's ticks, and
    rounded down to one."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV + 4)
    except OSError:
        return None
    if len(info) < _LAST_DATA_RECV + 4:
        return None
    return int(struct.unpack_from("I", info, _LAST_DATA_RECV)[0]) / 1000


# linux/tcp.h: TCP_INQ, which makes each recvmsg report the bytes still queued (TCP_CM_INQ, the
# same number) counted as the kernel counts bytes received. Python does not name it.
_TCP_INQ = 36


def count_reads(sock: socket.socket) -> None:
    """Let `bytes_read` count on ``sock`` (or a duplicate: the option is the socket's). Only
    recvmsg reports more for it. Raises OSError where the OS has no such option."""
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_INQ, 1)


def bytes_read(sock: socket.socket) -> int:
    """Bytes the process has read from a connected TCP socket so far, by the kernel's count
    (`count_reads` first).

    ``tcpi_bytes_received`` less what is still queued, read until two readings agree (data
    that arrives in between changes them; nobody reads meanwhile, so this ends at the latest
    when the receive queue is full). Queued is TCP_INQ's count, not FIONREAD's: both of these
    count the client's FIN as a byte, read or not, where FIONREAD does not, and FIONREAD stops at
    an urgent mark. A reset not yet reported to the reader is reported here (and so no longer
    to it). Raises OSError, also where the OS keeps no such count.
    """
    if _TCP_INFO is None:
        raise OSError(errno.ENOPROTOOPT, "the OS does not count the bytes a socket received")
    while True:
        before = _received(sock)
        queued = _queued(sock)
        if _received(sock) == before:
            return before - queued


def _received(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO or 0, _BYTES_RECEIVED + 8)
    if len(info) < _BYTES_RECEIVED + 8:
        raise OSError(errno.ENOPROTOOPT, "the kernel does not count the bytes a socket received")
    return int(struct.unpack_from("Q", info, _BYTES_RECEIVED)[0])


def _queued(sock: socket.socket) -> int:
    """Bytes received but not read, and the FIN (read or not), by TCP_INQ."""
    try:
        ancillary = _peek(sock)
    except BlockingIOError:
        return 0  # nothing queued, and no FIN
    except OSError:  # a pending error (a reset) is reported once, before anything else
        try:
            ancillary = _peek(sock)
        except BlockingIOError:
            return 0
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_TCP and kind == _TCP_INQ:
            return int(struct.unpack("i", data[:4])[0])
    raise OSError(errno.ENOPROTOOPT, "recvmsg reported no TCP_INQ")


def _peek(sock: socket.socket) -> list[tuple[int, int, bytes]]:
    return sock.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_PEEK | socket.MSG_DONTWAIT)[1]
