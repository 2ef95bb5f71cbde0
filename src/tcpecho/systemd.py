"""sd_notify(3): telling systemd that the server is ready, and that it is stopping.

systemd gives a ``Type=notify`` service the address of a unix datagram socket in NOTIFY_SOCKET
(config.py reads it into ``ServerConfig.notify_socket``); the service sends it lines such as
``READY=1``. Only the standard library is used: no libsystemd, no python-systemd.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from tcpecho.net import Address, format_address

logger = logging.getLogger("tcpecho.server")


class Notifier:
    """Sends sd_notify messages to ``address``: a path, or ``@name`` for a socket in the
    abstract namespace; ``""`` sends nothing.

    Each message is one datagram from a socket opened for it and closed at once, sent without
    blocking, so that a message may be sent from a signal handler. A message that cannot be
    sent (nobody listens, the queue is full) is dropped after one debug line: the server serves
    the same whether or not anyone hears it.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._stopping = False

    def ready(self, addresses: Sequence[Address], workers: int = 1) -> None:
        """The server listens on ``addresses``: READY=1, with a STATUS line saying where."""
        if self._stopping:  # stopped while starting: too late to be ready
            return
        listening = ", ".join(format_address(address) for address in addresses)
        by = f" with {workers} workers" if workers > 1 else ""
        self.send(f"READY=1\nSTATUS=Listening on {listening}{by}")

    def stopping(self) -> None:
        """A stop has begun: STOPPING=1, the first time only (a second Ctrl-C is the same stop,
        made faster)."""
        if self._stopping:
            return
        self._stopping = True
        self.send("STOPPING=1\nSTATUS=Stopping: finishing the connections open")

    def send(self, message: str) -> None:
        """Send ``message`` (newline-separated assignments) as one datagram."""
        if not self.address:
            return
        # An abstract address is written with @ and sent with a NUL byte in its place.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), socket.MSG_DONTWAIT, target)
        except OSError as exc:
            logger.debug(
                "cannot notify systemd at %s: %s",
                self.address,
                exc.strerror or exc,
                extra={"tag": "SYSTEMD", "event": "notify_failed"},
            )
