"""EchoClient, a small blocking client library, and the seed's interactive client."""

from __future__ import annotations

import contextlib
import socket
import sys
from typing import BinaryIO, TextIO

from tcpecho.errors import ConnectFailed, ConnectionRefused, HostNotFound
from tcpecho.net import format_address

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 65432
# How long the client waits to connect, and for each reply.
DEFAULT_TIMEOUT = 5.0
_RECV_SIZE = 64 * 1024


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
    """

    def __init__(
        self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
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
            self._sock = socket.create_connection((self.host, self.port), self.timeout)
        except socket.gaierror as exc:
            raise HostNotFound(self.host, exc.strerror or str(exc)) from exc
        except ConnectionRefusedError as exc:
            raise ConnectionRefused(self.address, exc.strerror or "Connection refused") from exc
        except OSError as exc:
            raise ConnectFailed(self.address, exc.strerror or str(exc)) from exc

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

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
    print(f"Connected to {client.host}:{client.port}", file=stdout)
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
        print(f"An error occurred: {exc.strerror or exc}", file=stdout)
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
                print(f"Error: {exc.strerror or exc}", file=sys.stderr)
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


def _show(reply: bytes) -> str:
    return reply.rstrip(b"\r\n").decode("utf-8", "backslashreplace")
