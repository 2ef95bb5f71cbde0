"""What happens in a server, as typed events: the one stream that the log, the summary and
(later) the metrics consume. Engines emit them through `EngineCore`; nothing here formats
text (log.py does) or touches a socket.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tcpecho.protocol import CloseReason


@dataclass(frozen=True, slots=True)
class Opened:
    peer: str  # the client: from the PROXY header when there is one
    active: int  # connections open, this one included
    via: str = ""  # the proxy's address, when a PROXY header named the client
    tls: str = ""  # TLS version and cipher, and the verified client certificate's subject


@dataclass(frozen=True, slots=True)
class Message:
    """A message received (one read in raw framing, one line in line framing)."""

    peer: str
    data: bytes


@dataclass(frozen=True, slots=True)
class MessagesHeld:
    """A connection logged its quota of messages; the rest are echoed but not logged."""

    peer: str
    logged: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """An unexpected exception while handling one connection (a bug): that one is aborted."""

    peer: str
    error: Exception


@dataclass(frozen=True, slots=True)
class Closed:
    peer: str
    reason: CloseReason
    detail: str  # the OS's words when an error ended it, else ""
    bytes_received: int
    bytes_sent: int
    bytes_discarded: int
    discard_reason: str
    bytes_unsent: int  # of bytes_sent, dropped by an abort
    duration: float


@dataclass(frozen=True, slots=True)
class Refused:
    peer: str
    reason: CloseReason
    via: str = ""  # the proxy's address, when a PROXY header named the client


@dataclass(frozen=True, slots=True)
class AcceptFailed:
    error: str
    retrying: bool  # out of descriptors or memory: accepting pauses, then retries


@dataclass(frozen=True, slots=True)
class Draining:
    connections: int  # how many the server waits for
    timeout: float


@dataclass(frozen=True, slots=True)
class DrainTimedOut:
    remaining: int
    timeout: float


@dataclass(frozen=True, slots=True)
class Stopped:
    summary: Summary


Event = (
    Opened
    | Message
    | MessagesHeld
    | InternalError
    | Closed
    | Refused
    | AcceptFailed
    | Draining
    | DrainTimedOut
    | Stopped
)
Consumer = Callable[[Event], None]


@dataclass
class Summary:
    """What a server did: the counts its last log line gives. Every field is an int, so the
    summaries of several workers add up field by field. ``bytes_sent``: the bytes of
    the connections' echoes, replies and error lines handed to the kernel (a refusal's reply is
    not counted: a refused client is no connection served; the busy line of an unserved one,
    admitted first, is)."""

    connections: int = 0
    refused: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    accept_errors: int = 0
    unserved: int = 0  # admitted, then told the server is busy: no thread could serve them


@dataclass
class Counters:
    """Every count about a server, kept from its events (thread-safe)."""

    opened: int = 0
    closed: Counter[CloseReason] = field(default_factory=Counter)
    refused: Counter[CloseReason] = field(default_factory=Counter)
    bytes_received: int = 0
    bytes_sent: int = 0
    bytes_discarded: int = 0
    accept_errors: int = 0
    internal_errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Message | MessagesHeld):
            return
        with self._lock:
            if isinstance(event, Opened):
                self.opened += 1
            elif isinstance(event, Closed):
                self.closed[event.reason] += 1
                self.bytes_received += event.bytes_received
                self.bytes_sent += event.bytes_sent - event.bytes_unsent
                self.bytes_discarded += event.bytes_discarded
            elif isinstance(event, Refused):
                self.refused[event.reason] += 1
            elif isinstance(event, AcceptFailed):
                self.accept_errors += 1
            elif isinstance(event, InternalError):
                self.internal_errors += 1

    def summary(self) -> Summary:
        with self._lock:
            unserved = self.closed[CloseReason.NO_THREAD]
            return Summary(
                connections=self.opened - unserved,
                refused=sum(self.refused.values()),
                bytes_received=self.bytes_received,
                bytes_sent=self.bytes_sent,
                accept_errors=self.accept_errors,
                unserved=unserved,
            )


class EventStream:
    """Hands every event to each consumer, in order."""

    def __init__(self, consumers: Iterable[Consumer]) -> None:
        self.consumers = tuple(consumers)

    def __call__(self, event: Event) -> None:
        for consume in self.consumers:
            consume(event)
