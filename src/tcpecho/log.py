"""Log formatting: the seed's console tags, or one JSON object per line.

Library code only calls ``logging.getLogger("tcpecho...")``; `configure` is for the CLI.
Everything that came from the network passes through `escape` first, so a client can neither
forge a log line nor send escape sequences to the operator's terminal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from tcpecho.config import LogFormat, LogLevel
from tcpecho.events import (
    AcceptFailed,
    Closed,
    Draining,
    DrainTimedOut,
    Event,
    InternalError,
    Message,
    MessagesHeld,
    Opened,
    Refused,
    Stopped,
)

# Messages longer than this are cut in the log (the whole message is still echoed).
MAX_LOGGED_BYTES = 200
# Warnings that a flood could repeat (refusals, accept errors) are logged at most once per this
# many seconds per kind, with the count of those folded into the next line.
WARNING_INTERVAL = 1.0

# Control characters (C0, DEL, C1), and Unicode characters that move or reorder text on a
# terminal (line/paragraph separators, bidi controls), shown as escapes. Backslash is doubled
# so that a client typing "\x1b" is told apart from a real ESC.
# C1 controls show as \u0085 and the like, so that they differ from an invalid byte \x85.
_ESCAPES: dict[int, str] = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F]}
_ESCAPES.update({code: f"\\u{code:04x}" for code in range(0x80, 0xA0)})
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord("\\"): "\\\\"})
_MOVERS = [0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F)]
_MOVERS += range(0x2066, 0x206A)
_ESCAPES.update({code: f"\\u{code:04x}" for code in _MOVERS})


def escape(data: bytes, limit: int = MAX_LOGGED_BYTES) -> str:
    """Printable, single-line text for bytes from the network.

    Invalid UTF-8 shows as ``\\xNN``. Past ``limit`` bytes the text is cut and ends with
    ``… (N bytes)``.
    """
    parts: list[str] = []
    view = data[:limit]
    while view:
        try:
            parts.append(view.decode("utf-8").translate(_ESCAPES))
            break
        except UnicodeDecodeError as exc:
            parts.append(view[: exc.start].decode("utf-8").translate(_ESCAPES))
            parts.extend(f"\\x{byte:02x}" for byte in view[exc.start : exc.end])
            view = view[exc.end :]
    if len(data) > limit:
        parts.append(f"… ({len(data)} bytes)")
    return "".join(parts)


class ConsoleFormatter(logging.Formatter):
    """``[TAG] message``, the seed's style. Records without a tag get their level as the tag."""

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "tag", None) or record.levelname
        text = f"[{tag}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, event, tag, message, and the record's fields.

    ``event`` is a stable name for machines (``opened``, ``closed``, ``refused``, …: the
    list is in docs/metrics.md), from the record's ``event``; a record without one gets its
    tag in lower case with ``_`` for spaces, or its level. ``tag`` is the console's tag.
    """

    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "tag", None) or record.levelname
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or _event_name(tag),
            "tag": tag,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            return _STRICT_JSON.encode(entry)
        except ValueError:  # a float JSON has no name for: a timeout of inf is no limit, null
            finite = {
                key: None if isinstance(value, float) and not math.isfinite(value) else value
                for key, value in entry.items()
            }
            return _STRICT_JSON.encode(finite)


# JSON has no infinity: json.dumps would write `Infinity`, which strict parsers refuse.
_STRICT_JSON = json.JSONEncoder(ensure_ascii=True, allow_nan=False)


def _event_name(tag: str) -> str:
    """``SERVER STARTING`` → ``server_starting``."""
    return "_".join(tag.lower().split())


def configure(level: LogLevel, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """Send tcpecho's log to ``stream`` (stdout, like the seed's prints) in the chosen format."""
    # Our formatters use none of the caller's file and line, thread or process: skip finding
    # them for every record (the logging HOWTO's "Optimization"), a quarter of a line's cost.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    logger = logging.getLogger("tcpecho")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


class RateLimited:
    """Lets a kind of line through at most once per `WARNING_INTERVAL`, counting the rest."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next: dict[object, float] = {}
        self._held: dict[object, int] = {}

    def allow(self, kind: object) -> int | None:
        """None: hold this one back. Else how many of ``kind`` were held since the last."""
        now = self._clock()
        if now < self._next.get(kind, 0.0):
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._next[kind] = now + WARNING_INTERVAL
        return self._held.pop(kind, 0)


class EventLog:
    """Turns server events into log records: the seed's console lines, or JSON objects.

    ``worker``: the worker's number (0: no workers), shown on the lines it opens.
    """

    def __init__(self, *, log_messages: bool = True, worker: int = 0) -> None:
        self.logger = logging.getLogger("tcpecho.server")
        self.log_messages = log_messages
        self._number = worker
        self._worker = f" (worker {worker})" if worker else ""
        self._limit = RateLimited()

    @property
    def wants_messages(self) -> bool:
        """Whether `Message` events are worth making (false with -q or above info)."""
        return self.log_messages and self.logger.isEnabledFor(logging.INFO)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Message):
            self._message(event)
        elif isinstance(event, Opened):
            self._opened(event)
        elif isinstance(event, Closed):
            self._closed(event)
        elif isinstance(event, MessagesHeld):
            self._info(
                event.peer,
                "messages_held",
                "%d messages logged; the rest are echoed but not logged",
                event.logged,
                peer=event.peer,
            )
        elif isinstance(event, InternalError):
            self._internal_error(event)
        elif isinstance(event, Refused):
            self._refused(event)
        elif isinstance(event, AcceptFailed):
            self._accept_failed(event)
        elif isinstance(event, Draining):
            self._info(
                "SERVER STOPPING",
                "draining",
                "draining: waiting %s for %d connections to finish",
                f"up to {event.timeout:g}s" if math.isfinite(event.timeout) else "with no limit",
                event.connections,
                connections=event.connections,
                timeout=event.timeout,
            )
        elif isinstance(event, DrainTimedOut):
            self._warning(
                "SERVER STOPPING",
                "drain_timed_out",
                "drain timeout (%gs) reached: closing %d connections",
                event.timeout,
                event.remaining,
                remaining=event.remaining,
                timeout=event.timeout,
            )
        elif isinstance(event, Stopped):
            self._stopped(event)

    def _stopped(self, event: Stopped) -> None:
        # A worker's own line has a tag of its own, so that [SERVER STOPPED] is only ever the
        # server's total (the supervisor's, with workers).
        summary = event.summary
        worker = f"worker {self._number} (pid {os.getpid()}): " if self._number else ""
        # Refusals are folded in the log (one line a second per reason): the total is here, so
        # a refusal that no later line counted is still told.
        more = "".join(
            f", {count} {what}"
            for count, what in (
                (summary.refused, "refused"),
                (summary.unserved, "not served (no thread)"),
                (summary.accept_errors, "accept errors"),
            )
            if count
        )
        self._info(
            "WORKER STOPPED" if self._number else "SERVER STOPPED",
            "worker_stopped" if self._number else "stopped",
            "%s%d connections served, %d bytes received, %d sent%s",
            worker,
            summary.connections,
            summary.bytes_received,
            summary.bytes_sent,
            more,
            **({"worker": self._number} if self._number else {}),
            connections=summary.connections,
            bytes_sent=summary.bytes_sent,
            refused=summary.refused,
            bytes_received=summary.bytes_received,
            accept_errors=summary.accept_errors,
            unserved=summary.unserved,
        )

    def _message(self, event: Message) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(
                "%s",
                escape(event.data),
                extra={
                    "tag": event.peer,
                    "event": "message",
                    "fields": {"peer": event.peer, "bytes": len(event.data)},
                },
            )

    def _closed(self, event: Closed) -> None:
        extras = ""
        if event.detail:
            extras += f": {event.detail}"
        extras += f" ({event.bytes_received} bytes received, {event.bytes_sent} sent"
        if event.bytes_unsent:
            extras += f", {event.bytes_unsent} of them never delivered"
        if event.bytes_discarded:
            extras += f", {event.bytes_discarded} discarded ({event.discard_reason})"
        self._info(
            "DISCONNECTED",
            "closed",
            "%s %s%s, %.1fs)",
            event.peer,
            event.reason.value,
            extras,
            event.duration,
            peer=event.peer,
            reason=event.reason.label,
            detail=event.detail,
            bytes_received=event.bytes_received,
            bytes_sent=event.bytes_sent,
            bytes_unsent=event.bytes_unsent,
            bytes_discarded=event.bytes_discarded,
            duration=round(event.duration, 3),
        )

    def _internal_error(self, event: InternalError) -> None:
        error = event.error
        held = self._limit.allow((InternalError, type(error)))
        if held is None:
            return
        more = f" ({held} more since the last such line)" if held else ""
        self.logger.error(
            "%s: closed after an unexpected %s: %s%s",
            event.peer,
            type(error).__name__,
            escape(str(error).encode()),
            more,
            extra={
                "tag": "INTERNAL ERROR",
                "event": "internal_error",
                "fields": {"peer": event.peer, "error": type(error).__name__, "folded": held},
            },
        )
        self.logger.debug(
            "the traceback",
            exc_info=error,
            extra={"tag": "INTERNAL ERROR", "event": "internal_error_traceback", "fields": {}},
        )

    def _opened(self, event: Opened) -> None:
        about = ", ".join(
            part for part in (f"via {event.via}" if event.via else "", event.tls) if part
        )
        self._info(
            "NEW CONNECTION",
            "opened",
            "%s connected%s. Active connections: %d%s",
            event.peer,
            f" ({escape(about.encode())})" if about else "",
            event.active,
            self._worker,
            peer=event.peer,
            active=event.active,
            **({"via": event.via} if event.via else {}),
            **({"tls": event.tls} if event.tls else {}),
        )

    def _refused(self, event: Refused) -> None:
        held = self._limit.allow(event.reason)
        if held is None:
            return
        more = f" ({held} more since the last such line)" if held else ""
        via = f" (via {event.via})" if event.via else ""
        self._warning(
            "REFUSED",
            "refused",
            "%s%s %s%s",
            event.peer,
            via,
            event.reason.value,
            more,
            peer=event.peer,
            reason=event.reason.label,
            folded=held,
            **({"via": event.via} if event.via else {}),
        )

    def _accept_failed(self, event: AcceptFailed) -> None:
        held = self._limit.allow(AcceptFailed)
        if held is None:
            return
        more = f" ({held} more since the last such line)" if held else ""
        if event.retrying:
            text = "cannot accept a connection: %s; retrying%s"
        else:
            text = "a connection failed before it was accepted: %s%s"
        self._warning(
            "ACCEPT ERROR",
            "accept_failed",
            text,
            event.error,
            more,
            error=event.error,
            retrying=event.retrying,
            folded=held,
        )

    def _info(self, tag: str, event: str, message: str, *args: object, **fields: object) -> None:
        self.logger.info(message, *args, extra={"tag": tag, "event": event, "fields": fields})

    def _warning(self, tag: str, event: str, message: str, *args: object, **fields: object) -> None:
        self.logger.warning(message, *args, extra={"tag": tag, "event": event, "fields": fields})
