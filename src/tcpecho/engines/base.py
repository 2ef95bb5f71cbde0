"""What every engine offers, and what they share: constants, the connection log, a summary."""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from tcpecho.config import ServerConfig
from tcpecho.log import escape
from tcpecho.net import Address
from tcpecho.protocol import EchoConnection, State

# Past this many reply bytes queued for a client that does not read, the asyncio engine stops
# reading from it until it reads again (the threads engine blocks in send, with the same effect),
# so a client that sends and never reads cannot grow the server's memory.
WRITE_BUFFER_HIGH_WATER = 256 * 1024
# Bytes asked of the OS per read: large enough that a 64 KiB message is one read.
RECV_SIZE = 64 * 1024
# After the server finished sending (error reply, end of echo, stop), how long it keeps reading
# and discarding what the client still sends, so that closing does not reset the connection
# and destroy a reply the client has not read yet.
LINGER_TIMEOUT = 2.0
# Repeated warnings (server busy, out of descriptors) are logged at most once per this many
# seconds, so a flood cannot flood the log.
WARNING_INTERVAL = 1.0
# Accept errors that mean "out of resources for now": pause, retry, never stop serving.
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How long the accept loop pauses after one of those before it tries again.
ACCEPT_RETRY_DELAY = 0.1
# Connections the asyncio engine accepts per readiness event, so a burst cannot starve the
# connections already open.
ACCEPT_BATCH = 128


@dataclass
class Summary:
    """What a server did, for the line it prints when it stops."""

    connections: int = 0
    bytes_received: int = 0
    bytes_echoed: int = 0


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


def new_connection(config: ServerConfig) -> EchoConnection:
    return EchoConnection(
        config.framing,
        config.reply,
        max_line_length=config.max_line_length,
        confirm_prefix=config.confirm_prefix.encode(),
    )


class RateLimitedWarning:
    """A warning logged at most once per `WARNING_INTERVAL`, with the count of those it held."""

    def __init__(self, logger: logging.Logger, tag: str) -> None:
        self._logger = logger
        self._tag = tag
        self._next = 0.0
        self._held = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += f" ({self._held} more since the last such line)"
            self._held = 0
        self._next = now + WARNING_INTERVAL
        self._logger.warning(message, *args, extra={"tag": self._tag})


class ConnectionLog:
    """The console lines about connections, the same for every engine."""

    def __init__(self, config: ServerConfig) -> None:
        self.logger = logging.getLogger("tcpecho.server")
        self.log_messages = config.log_messages
        self.worker = f" (worker {config.worker})" if config.worker else ""
        self.busy = RateLimitedWarning(self.logger, "BUSY")
        self.accept_failed = RateLimitedWarning(self.logger, "ACCEPT ERROR")

    def drain_timed_out(self, timeout: float, remaining: int) -> None:
        self.logger.warning(
            "drain timeout (%gs) reached: closing %d connections",
            timeout,
            remaining,
            extra={"tag": "SERVER STOPPING"},
        )

    def opened(self, peer: str, active: int) -> None:
        self.logger.info(
            "%s connected. Active connections: %d%s",
            peer,
            active,
            self.worker,
            extra={"tag": "NEW CONNECTION", "fields": {"peer": peer, "active": active}},
        )

    def messages(self, peer: str, conn: EchoConnection) -> None:
        """A line per message the last read completed. ``conn.frames`` is only built here, when
        such lines are wanted (with ``-q`` the per-read path builds nothing)."""
        if self.log_messages and self.logger.isEnabledFor(logging.INFO):
            for frame in conn.frames:
                text = escape(frame)
                self.logger.info(
                    "%s", text, extra={"tag": peer, "fields": {"peer": peer, "bytes": len(frame)}}
                )

    def rejected(self, peer: str, conn: EchoConnection) -> None:
        if conn.error is not None:
            self.logger.warning(
                "%s sent a line longer than %d bytes; replied with an error, closing",
                peer,
                conn.error.max_length,
                extra={"tag": "LINE TOO LONG", "fields": {"peer": peer}},
            )

    def closed(self, peer: str, conn: EchoConnection, sent: int, reason: str) -> None:
        discarded = ""
        if conn.bytes_discarded:
            why = "line too long" if conn.state is State.REJECTED else "sent after the end"
            discarded = f", {conn.bytes_discarded} discarded ({why})"
        self.logger.info(
            "%s %s (%d bytes received, %d sent%s)",
            peer,
            reason,
            conn.bytes_received,
            sent,
            discarded,
            extra={
                "tag": "DISCONNECTED",
                "fields": {
                    "peer": peer,
                    "reason": reason,
                    "bytes_received": conn.bytes_received,
                    "bytes_sent": sent,
                    "bytes_discarded": conn.bytes_discarded,
                },
            },
        )
