"""Log formatting: escaping what came from the network, and the console and JSON formats."""

from __future__ import annotations

import json
import logging
import re
import sys
import unicodedata
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpecho.events import Closed, Draining, Refused, Stopped, Summary
from tcpecho.log import (
    MAX_LOGGED_BYTES,
    WARNING_INTERVAL,
    ConsoleFormatter,
    EventLog,
    JsonFormatter,
    RateLimited,
    escape,
)
from tcpecho.protocol import CloseReason
from tests.helpers import CapturedRecords, captured_server_log

# Characters that reorder text on a terminal: bidi embeddings, overrides and isolates.
BIDI_REORDERING = {*range(0x202A, 0x202F), *range(0x2066, 0x206A)}
# Characters a client could use to forge a log line or drive a terminal, to mix into text.
HOSTILE = [*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\\", "\u2028"]
HOSTILE += ["\u2029", *map(chr, sorted(BIDI_REORDERING))]
any_character = st.characters(exclude_categories=["Cs"])  # surrogates cannot be encoded
hostile_text = st.lists(st.sampled_from(HOSTILE) | any_character, max_size=100).map("".join)
# Any bytes, and valid UTF-8 rich in controls, separators and bidi characters.
network_bytes = st.binary(max_size=300) | hostile_text.map(str.encode)


def visible(text: str) -> bool:
    """No control character, line or paragraph separator, or bidi reordering character."""
    return not any(
        unicodedata.category(char) in {"Cc", "Zl", "Zp"} or ord(char) in BIDI_REORDERING
        for char in text
    )


def unescape(text: str) -> str:
    """The inverse of `escape` for valid UTF-8 under the limit (the test's own decoder)."""

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code in {"n", "r", "t", "\\"}:
            return {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[code]
        return chr(int(code[1:], 16))

    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[nrt\\])", one, text)


# escape


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"\x1b[31mred", "\\x1b[31mred"),
        (b"a\rb", "a\\rb"),
        (b"a\nb", "a\\nb"),
        (b"a\r\n", "a\\r\\n"),
        (b"a\tb", "a\\tb"),
        (b"\x00\x07\x08\x0b\x0c", "\\x00\\x07\\x08\\x0b\\x0c"),
        (b"\x7f", "\\x7f"),
        ("\u0085".encode(), "\\u0085"),  # NEL, a C1 control and a line break
        ("\u009b2J".encode(), "\\u009b2J"),  # CSI, the one-character escape sequence start
        ("\u2028".encode(), "\\u2028"),  # LINE SEPARATOR
        ("\u2029".encode(), "\\u2029"),  # PARAGRAPH SEPARATOR
        ("\u202e".encode(), "\\u202e"),  # RIGHT-TO-LEFT OVERRIDE
        ("\u2066".encode(), "\\u2066"),  # LEFT-TO-RIGHT ISOLATE
    ],
)
def test_control_and_reordering_characters_become_visible_escapes(data: bytes, shown: str) -> None:
    assert escape(data) == shown


@pytest.mark.parametrize("code", [*range(0x80, 0xA0)], ids=hex)
def test_every_c1_control_is_escaped_apart_from_an_invalid_byte(code: int) -> None:
    assert escape(chr(code).encode()) == f"\\u{code:04x}"
    assert escape(bytes([code])) == f"\\x{code:02x}"


def test_printable_text_is_shown_as_it_is() -> None:
    assert escape("hello, wörld! 日本 🙂".encode()) == "hello, wörld! 日本 🙂"


def test_a_typed_backslash_x_is_told_apart_from_a_real_esc() -> None:
    """The client typing the four characters \\x1b is logged differently from an ESC byte."""
    typed = escape(b"\\x1b[2J")
    real = escape(b"\x1b[2J")

    assert typed == "\\\\x1b[2J"
    assert real == "\\x1b[2J"
    assert typed != real


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"ok\xff", "ok\\xff"),
        (b"\xc3(", "\\xc3("),  # a lead byte without its continuation
        (b"\xe2\x82", "\\xe2\\x82"),  # a character cut short at the end
        (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),  # an encoded surrogate
        (b"\x80abc\xfe\xfe", "\\x80abc\\xfe\\xfe"),
    ],
)
def test_invalid_utf8_shows_as_hex_escapes(data: bytes, shown: str) -> None:
    assert escape(data) == shown


@given(network_bytes)
def test_the_output_never_holds_a_control_character_or_a_line_break(data: bytes) -> None:
    """Whatever a client sends, escape gives one visible line: it cannot forge a log line."""
    text = escape(data)

    assert visible(text)
    assert len(text.splitlines()) <= 1


@given(hostile_text.map(lambda text: text[: MAX_LOGGED_BYTES // 4]))
def test_valid_utf8_under_the_limit_loses_nothing(text: str) -> None:
    """Escapes are unambiguous: the logged text decodes back to exactly what was sent."""
    assert unescape(escape(text.encode())) == text


@pytest.mark.parametrize("code", [0x061C, 0x200E, 0x200F], ids=hex)
def test_every_bidi_control_character_is_escaped(code: int) -> None:
    assert escape(chr(code).encode()) == f"\\u{code:04x}"


def test_a_long_message_is_cut_at_max_logged_bytes_with_its_size() -> None:
    assert escape(b"a" * 500) == "a" * MAX_LOGGED_BYTES + "… (500 bytes)"


def test_a_message_of_exactly_max_logged_bytes_is_not_cut() -> None:
    assert escape(b"a" * MAX_LOGGED_BYTES) == "a" * MAX_LOGGED_BYTES


def test_the_limit_counts_bytes_received_not_characters_shown() -> None:
    assert escape(b"\x1b" * 300) == "\\x1b" * MAX_LOGGED_BYTES + "… (300 bytes)"
    assert escape(b"abcdef", limit=3) == "abc… (6 bytes)"


@settings(max_examples=200)
@given(st.binary(max_size=1000), st.integers(min_value=1, max_value=400))
def test_any_input_over_the_limit_shows_its_first_bytes_and_its_size(
    data: bytes, limit: int
) -> None:
    text = escape(data, limit=limit)
    if len(data) > limit:
        assert text == escape(data[:limit], limit=limit) + f"… ({len(data)} bytes)"
    else:
        assert "…" not in text


# Formatters


def make_record(
    msg: str,
    *args: object,
    level: int = logging.INFO,
    exc_info: Any = None,
    **extra: object,
) -> logging.LogRecord:
    """A record as ``logger.info(msg, *args, extra=extra)`` makes it."""
    record = logging.LogRecord("tcpecho.test", level, __file__, 1, msg, args or None, exc_info)
    record.__dict__.update(extra)
    return record


def record_with_exception() -> logging.LogRecord:
    try:
        raise ValueError("boom")
    except ValueError:
        return make_record("failed", level=logging.ERROR, exc_info=sys.exc_info(), tag="OOPS")


def test_console_format_is_the_tag_in_brackets_then_the_message() -> None:
    record = make_record("%s connected", "127.0.0.1:5000", tag="NEW CONNECTION")
    assert ConsoleFormatter().format(record) == "[NEW CONNECTION] 127.0.0.1:5000 connected"


def test_console_format_uses_the_level_when_there_is_no_tag() -> None:
    record = make_record("low on %s", "descriptors", level=logging.WARNING)
    assert ConsoleFormatter().format(record) == "[WARNING] low on descriptors"


def test_console_format_appends_the_traceback() -> None:
    lines = ConsoleFormatter().format(record_with_exception()).splitlines()
    assert lines[0] == "[OOPS] failed"
    assert lines[-1] == "ValueError: boom"


def test_json_format_is_one_object_with_event_level_message_and_fields() -> None:
    record = make_record(
        "%s connected",
        "127.0.0.1:5000",
        tag="NEW CONNECTION",
        fields={"peer": "127.0.0.1:5000", "active": 3},
    )
    line = JsonFormatter().format(record)

    assert "\n" not in line
    entry = json.loads(line)
    assert entry["event"] == "new_connection"  # no event name given: the tag's
    assert entry["tag"] == "NEW CONNECTION"
    assert entry["level"] == "info"
    assert entry["message"] == "127.0.0.1:5000 connected"
    assert entry["peer"] == "127.0.0.1:5000"
    assert entry["active"] == 3
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None


def test_json_format_uses_the_level_as_event_when_there_is_no_tag() -> None:
    entry = json.loads(JsonFormatter().format(make_record("x", level=logging.ERROR)))
    assert entry["event"] == "error"
    assert entry["level"] == "error"


def test_json_format_keeps_the_traceback_on_the_same_line() -> None:
    line = JsonFormatter().format(record_with_exception())

    assert "\n" not in line
    assert json.loads(line)["exception"].endswith("ValueError: boom")


@given(
    hostile_text,
    hostile_text.filter(bool),
    st.dictionaries(st.sampled_from(["peer", "bytes", "reason"]), hostile_text),
)
def test_json_format_is_one_ascii_line_that_parses_back_for_any_text(
    message: str, tag: str, fields: dict[str, str]
) -> None:
    line = JsonFormatter().format(make_record("%s", message, tag=tag, fields=fields))

    assert line.isascii()
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert entry["message"] == message


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_kind_of_warning_passes_once_a_second_with_the_count_it_held() -> None:
    clock = Clock()
    limit = RateLimited(clock)
    assert limit.allow("busy") == 0
    assert [limit.allow("busy") for _ in range(5)] == [None] * 5
    assert limit.allow("denied") == 0  # each kind on its own
    clock.now = WARNING_INTERVAL
    assert limit.allow("busy") == 5
    assert limit.allow("busy") is None


@pytest.fixture
def server_log() -> Iterator[CapturedRecords]:
    with captured_server_log() as log:
        yield log


def test_a_flood_of_refusals_is_one_line_per_reason_and_second(server_log: CapturedRecords) -> None:
    log = EventLog()
    for port in range(1000):
        log(Refused(f"127.0.0.1:{port}", CloseReason.REFUSED_BUSY))
        log(Refused(f"127.0.0.2:{port}", CloseReason.REFUSED_PER_ADDRESS))
    lines = [record.getMessage() for record in server_log.records]
    assert lines == [
        "127.0.0.1:0 refused: server busy (--max-connections)",
        "127.0.0.2:0 refused: too many connections from this address (--max-per-address)",
    ]


@pytest.mark.parametrize(
    ("summary", "line"),
    [
        (Summary(3, 0, 30, 30, 0), "3 connections served, 30 bytes received, 30 sent"),
        (Summary(3, 5, 30, 30, 0), "3 connections served, 30 bytes received, 30 sent, 5 refused"),
        (
            Summary(0, 2, 0, 0, 7),
            "0 connections served, 0 bytes received, 0 sent, 2 refused, 7 accept errors",
        ),
    ],
)
def test_the_stop_line_counts_refusals_the_folded_log_lines_may_not_have_told(
    server_log: CapturedRecords, summary: Summary, line: str
) -> None:
    EventLog()(Stopped(summary))
    [record] = server_log.records
    assert record.getMessage() == line
    assert record.__dict__["fields"]["refused"] == summary.refused


@pytest.mark.parametrize(
    ("timeout", "text", "field"),
    [
        (5.0, "waiting up to 5s for 2 connections", 5.0),
        (float("inf"), "waiting with no limit for 2 connections", None),
    ],
)
def test_a_drain_without_a_limit_says_so_and_stays_strict_json(
    server_log: CapturedRecords, timeout: float, text: str, field: float | None
) -> None:
    EventLog()(Draining(2, timeout))
    [record] = server_log.records
    assert text in record.getMessage()

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    entry = json.loads(JsonFormatter().format(record), parse_constant=refuse)
    assert entry["timeout"] == field


def test_a_closed_connection_is_one_line_with_its_reason_counts_and_discards(
    server_log: CapturedRecords,
) -> None:
    EventLog()(
        Closed(
            "127.0.0.1:5000",
            CloseReason.LINE_TOO_LONG,
            "",
            bytes_received=70000,
            bytes_sent=60,
            bytes_discarded=69990,
            discard_reason="line too long",
            bytes_unsent=0,
            duration=1.25,
        )
    )
    [record] = server_log.records
    assert record.getMessage() == (
        "127.0.0.1:5000 closed: line too long (--max-line-length) (70000 bytes received, 60 sent,"
        " 69990 discarded (line too long), 1.2s)"
    )
    assert record.__dict__["fields"]["reason"] == "line_too_long"
