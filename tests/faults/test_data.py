"""Faults in what clients send: a half-close, every byte value, and hostile text in the log."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata

import pytest

from tests.faults.harness import StartServer, peer_of, send_and_half_close
from tests.helpers import connect

MIB = 1024 * 1024
# Random payloads are seeded: a failure can be replayed byte for byte.
SEED = 862


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_half_close_after_a_mib_every_byte_is_echoed_then_the_end(
    fault_server: StartServer,
) -> None:
    server = fault_server("-q")
    payload = random.Random(SEED).randbytes(MIB)
    mark = server.mark()
    with connect(server.address) as sock:
        echoed = send_and_half_close(sock, payload)  # returns once the server closed

    def expected() -> None:
        assert len(echoed) == len(payload)
        assert sha256(echoed) == sha256(payload)
        closed = server.wait_for("[DISCONNECTED]", since=mark)[0].text
        assert f"closed by client ({MIB} bytes received, {MIB} sent" in closed

    server.check(expected)


@pytest.mark.parametrize("framing", ["raw", "line"])
def test_every_byte_value_and_a_mib_of_random_bytes_come_back_exactly(
    fault_server: StartServer, framing: str
) -> None:
    """In line framing the random MiB holds about 4,000 newlines (the longest line is a few
    KiB, far below the limit); what follows the last one is echoed at the end of input."""
    server = fault_server("-q", f"--framing={framing}")
    payloads = {
        "all 256 byte values": bytes(range(256)),
        "a MiB of random bytes": random.Random(SEED).randbytes(MIB),
    }
    echoes: dict[str, bytes] = {}
    for name, payload in payloads.items():
        with connect(server.address) as sock:
            echoes[name] = send_and_half_close(sock, payload)

    def expected() -> None:
        for name, payload in payloads.items():
            assert sha256(echoes[name]) == sha256(payload), name

    server.check(expected)


# Messages that would drive a terminal or forge a log line if printed raw, one per line.
HOSTILE_MESSAGES = [
    b"\x1b[31mred\x1b[0m",  # ANSI colour (CSI ... m)
    b"\x1b[2J\x1b[H",  # clear the screen, cursor home
    b"\x1b]0;owned\x07",  # OSC: set the window title, BEL-terminated
    b"\x1b]8;;http://example.invalid/\x1b\\link\x1b]8;;\x1b\\",  # OSC 8 hyperlink, ST-terminated
    "\u009b2J".encode(),  # the one-character CSI (a C1 control), as UTF-8
    b"\x9b2J",  # the same byte alone: invalid UTF-8
    b"nul\x00inside",
    b"\x00",
    b"a bare\rcarriage return",
    b"\r[DISCONNECTED] 127.0.0.1:1 closed by client (0 bytes received, 0 sent, 0.0s)",
    b"bell\x07 backspace\x08\x08 delete\x7f tab\t vertical tab\x0b form feed\x0c",
    b"invalid \xff\xfe utf-8 \xc3( \xed\xa0\x80 \xe2\x82",
    "line\u2028separator, paragraph\u2029separator, \u202eright-to-left".encode(),
    b"",  # an empty line is a message too
]
# And one that ends with CR LF rather than LF.
CRLF_MESSAGE = b"\x1b[1mbold, ended by CR LF\x1b[0m"


# Characters that reorder text on a terminal: bidi embeddings, overrides and isolates.
BIDI_REORDERING = {*range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def raw_controls(text: str) -> list[str]:
    """What is left raw in ``text`` that a terminal would act on: control characters (C0,
    DEL, C1), bytes that are not UTF-8, line and paragraph separators, bidi reordering."""
    return [
        char
        for char in text
        if unicodedata.category(char) in {"Cc", "Cs", "Zl", "Zp"} or ord(char) in BIDI_REORDERING
    ]


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_hostile_messages_are_one_clean_log_record_each(
    fault_server: StartServer, log_format: str
) -> None:
    server = fault_server("--framing=line", f"--log-format={log_format}")
    stream = b"".join(message + b"\n" for message in HOSTILE_MESSAGES) + CRLF_MESSAGE + b"\r\n"
    message_count = len(HOSTILE_MESSAGES) + 1
    mark = server.mark()
    with connect(server.address) as sock:
        peer = peer_of(sock)
        echoed = send_and_half_close(sock, stream)
    # Once its close is logged, every record of the connection is out.
    server.wait_for("DISCONNECTED", f"{peer} closed by client", since=mark)

    def expected() -> None:
        assert echoed == stream
        lines = [line.text for line in server.lines]
        assert all(not raw_controls(text) for text in lines), [
            text for text in lines if raw_controls(text)
        ]
        records = lines[mark:]
        if log_format == "json":
            parsed = [json.loads(text) for text in records]
            assert all(isinstance(record, dict) for record in parsed)
            messages = [
                record
                for record in parsed
                if record["event"] == "message" and record["peer"] == peer
            ]
            assert sum(record["bytes"] for record in messages) == len(stream)
            closed = [record for record in parsed if record["event"] == "closed"]
        else:
            assert all(re.match(r"\[[^\]]+\] ", text) for text in records), records
            messages = [text for text in records if text.startswith(f"[{peer}] ")]
            closed = [text for text in records if text.startswith("[DISCONNECTED] ")]
        assert len(messages) == message_count, records
        # The forged line stays inside its message record: one [DISCONNECTED] record, ours.
        assert len(closed) == 1, closed
        assert peer in str(closed[0])

    server.check(expected)
