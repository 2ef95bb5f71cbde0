"""Log formatting: the seed's console tags, or one JSON object per line.

Library code only calls ``logging.getLogger("tcpecho...")``; `configure` is for the CLI.
Everything that came from the network passes through `escape` first, so a client can neither
forge a log line nor send escape sequences to the operator's terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from tcpecho.config import LogFormat, LogLevel

# Messages longer than this are cut in the log (the whole message is still echoed).
MAX_LOGGED_BYTES = 200

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
    """One JSON object a line: time, level, event, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "event": getattr(record, "tag", None) or record.levelname,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


def configure(level: LogLevel, fmt: LogFormat, stream: TextIO | None = None) -> None:
    """Send tcpecho's log to ``stream`` (stdout, like the seed's prints) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    logger = logging.getLogger("tcpecho")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
