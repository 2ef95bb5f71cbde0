"""EchoClient, a small blocking client library, and the seed's interactive client."""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, TextIO, get_args

from tcpecho import tls
from tcpecho.errors import ConnectFailed, ConnectionRefused, HostNotFound
from tcpecho.net import format_address
from tcpecho.protocol.proxy import encode_v1, encode_v2

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 65432
# How long the client waits to connect, and for each reply.
DEFAULT_TIMEOUT = 5.0
_RECV_SIZE = 64 * 1024

# The PROXY protocol header the client can send first, as curl's --haproxy-protocol does.
ProxyVersion = Literal["v1", "v2"]
PROXY_VERSIONS: tuple[ProxyVersion, ...] = get_args(ProxyVersion)


def proxy_header(version: ProxyVersion, local: tuple[Any, ...], remote: tuple[Any, ...]) -> bytes:
    """The PROXY header for a connection from ``local`` to ``remote`` (socket addresses, as
    ``getsockname()`` and ``getpeername()`` give them): what a proxy would send for it.

    Raises ValueError for an address the header cannot carry (an IPv6 scope id).
    """
    source, destination = (local[0], local[1]), (remote[0], remote[1])
    return encode_v1(source, destination) if version == "v1" else encode_v2(source, destination)


@dataclass(frozen=True)
class ClientTLS:
    """How a client speaks TLS: the options ``--ca``, ``--cert``, ``--key``, ``--server-name``
    and ``--insecure``, for `context` to build the `ssl.SSLContext` from."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # the name sent (SNI) and checked; None: the host
    insecure: bool = False

    def context(self) -> ssl.SSLContext:
        """Raises `TLSConfigError` for a file that cannot be used."""
        return tls.client_context(self.ca, self.cert, self.key, self.insecure)


class ReplyIncomplete(Exception):
    """The reply did not end: the server closed (``closed``) or was silent too long.

    ``partial`` holds what did arrive.
    """

    def __init__(self, partial: bytes, closed: bool) -> None:
        super().__init__(partial, closed)
        self.partial = partial
        self.closed = closed


class EchoClient:
    """One connection to an echo server. A reply is one line: it ends with ``\\n``.

    Use it as a context manager: it connects on entry and closes the socket on exit.
    ``connect`` raises `ConnectionRefused`, `ConnectFailed` or `HostNotFound`.

    ``send_proxy``: first send a PROXY protocol header (``"v1"`` or ``"v2"``) naming this
    connection's own addresses, as a proxy in front of the server would. ``ssl_context``: then
    speak TLS (build one with `tcpecho.tls.client_context`), sending and checking
    ``server_hostname`` (default: ``host``). A handshake that fails is `ConnectFailed` with
    the reason (``certificate verify failed: self-signed certificate``).
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        send_proxy: ProxyVersion | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.send_proxy = send_proxy
        self.address = format_address((host, port))
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> EchoClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), self.timeout)
        except socket.gaierror as exc:
            raise HostNotFound(self.host, exc.strerror or str(exc)) from exc
        except ConnectionRefusedError as exc:
            raise ConnectionRefused(self.address, exc.strerror or "Connection refused") from exc
        except OSError as exc:
            raise ConnectFailed(self.address, exc.strerror or str(exc)) from exc
        with contextlib.ExitStack() as on_failure:
            on_failure.callback(sock.close)
            self._sock = self._start(sock)
            on_failure.pop_all()

    def _start(self, sock: socket.socket) -> socket.socket:
        """Send the PROXY header and do the TLS handshake, as asked; return the socket to use.
        The handshake is bounded by the socket's timeout."""
        if self.send_proxy is not None:
            # Or the TLS ClientHello (or first line) after the header waits for the header's
            # ACK (Nagle), which the server's delayed ACK can hold back for 40 ms.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                header = proxy_header(self.send_proxy, sock.getsockname(), sock.getpeername())
                sock.sendall(header)
            except ValueError as exc:
                raise ConnectFailed(self.address, f"cannot send a PROXY header: {exc}") from exc
            except OSError as exc:
                raise ConnectFailed(self.address, exc.strerror or str(exc)) from exc
        if self.ssl_context is None:
            return sock
        try:
            return self.ssl_context.wrap_socket(
                sock, server_hostname=self.server_hostname or self.host
            )
        except OSError as exc:
            reason = tls.describe_ssl_error(exc)
            raise ConnectFailed(self.address, f"TLS handshake failed: {reason}") from exc

    def tls_info(self) -> dict[str, str] | None:
        """`tcpecho.tls.describe_tls` of the connection: version, cipher, ALPN and the
        server certificate's subject; None when not connected over TLS."""
        if isinstance(self._sock, ssl.SSLSocket):
            return tls.describe_tls(self._sock)
        return None

    def close(self) -> None:
        """Close the connection; over TLS, send close_notify first (without waiting for the
        server's), so that the server sees a clean end and not a truncation."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if isinstance(sock, ssl.SSLSocket):
            # Non-blocking: unwrap sends close_notify, then would wait for the server's; it
            # raises SSLWantReadError instead, which is all we need.
            with contextlib.suppress(OSError, ValueError):
                sock.setblocking(False)
                sock.unwrap()
        sock.close()

    def request(self, message: bytes) -> bytes:
        """Send ``message`` as one line and return the whole reply line, however long.

        Raises `ReplyIncomplete`, or `OSError` when the connection breaks.
        """
        sock = self._connected()
        sock.sendall(message + b"\n")
        return self.read_reply()

    def read_reply(self) -> bytes:
        """The next line from the server, with its ``\\n``. Raises `ReplyIncomplete`."""
        sock = self._connected()
        while (end := self._buffer.find(b"\n")) < 0:
            try:
                chunk = sock.recv(_RECV_SIZE)
            except TimeoutError:
                raise ReplyIncomplete(self._take(len(self._buffer)), closed=False) from None
            if not chunk:
                raise ReplyIncomplete(self._take(len(self._buffer)), closed=True)
            self._buffer += chunk
        return self._take(end + 1)

    def _take(self, size: int) -> bytes:
        taken, self._buffer = self._buffer[:size], self._buffer[size:]
        return taken

    def _connected(self) -> socket.socket:
        if self._sock is None:
            raise ConnectFailed(self.address, "not connected")
        return self._sock


def run_interactive(client: EchoClient, stdin: TextIO, stdout: TextIO) -> int:
    """The seed's session: prompt, send, print the reply; ``exit`` (or end of input) quits."""
    info = client.tls_info()
    over = f" over {info['version']} ({info['cipher']})" if info else ""
    print(f"Connected to {client.address}{over}", file=stdout)
    try:
        while True:
            try:
                stdout.write("Enter message (or 'exit' to quit): ")
                stdout.flush()
                line = stdin.readline()
            except KeyboardInterrupt:
                print(file=stdout)
                break
            if not line or line.rstrip("\r\n").lower() == "exit":
                break
            try:
                reply = client.request(line.rstrip("\r\n").encode("utf-8", "surrogateescape"))
            except ReplyIncomplete as exc:
                if exc.partial:
                    print(f"Received from server: {_show(exc.partial)}", file=stdout)
                if exc.closed:
                    print("The server closed the connection.", file=stdout)
                else:  # a late reply would be taken for the next one's: stop here
                    print(f"Error: no complete reply within {client.timeout:g}s", file=stdout)
                return 1
            print(f"Received from server: {_show(reply)}", file=stdout)
    except OSError as exc:
        print(f"An error occurred: {_reason(exc)}", file=stdout)
        return 1
    finally:
        client.close()
        print("Client disconnected.", file=stdout)
    return 0


def run_script(client: EchoClient, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """For a pipe: send each line of ``stdin``, write each reply to ``stdout`` as it came.

    ``client`` must be connected; this closes it.
    """
    with contextlib.closing(client):
        for line in stdin:
            try:
                reply = client.request(line.rstrip(b"\r\n"))
            except OSError as exc:
                print(f"Error: {_reason(exc)}", file=sys.stderr)
                return 1
            except ReplyIncomplete as exc:
                stdout.write(exc.partial)
                stdout.flush()
                why = "the server closed the connection" if exc.closed else "timed out"
                print(f"Error: reply incomplete: {why}", file=sys.stderr)
                return 1
            stdout.write(reply)
            stdout.flush()
    return 0


def _reason(exc: OSError) -> str:
    """Why the connection broke; over TLS, OpenSSL's reason without its codes (the server's
    alert, such as ``tlsv13 alert certificate required``)."""
    return (
        tls.describe_ssl_error(exc) if isinstance(exc, ssl.SSLError) else exc.strerror or str(exc)
    )


def _show(reply: bytes) -> str:
    return reply.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
