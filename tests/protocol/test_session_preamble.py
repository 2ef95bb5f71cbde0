"""The states before OPEN (a PROXY header, a TLS handshake), and admission of a proxy's clients:
driven with bytes and times alone, no socket, no clock."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import accumulate
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpecho.protocol import (
    BUSY_REPLY,
    PROXY_HEADER_TIMEOUT,
    AccessList,
    Admission,
    CloseReason,
    Command,
    Network,
    Session,
    SessionSettings,
    encode_proxy_v1,
    encode_proxy_v2,
    parse_network,
    proxy,
)
from tcpecho.protocol.session import State

SOURCE = ("203.0.113.5", 4000)
DESTINATION = ("198.51.100.1", 80)
HEADERS = {
    "v1": encode_proxy_v1(SOURCE, DESTINATION),
    "v1-tcp6": encode_proxy_v1(("2001:db8::5", 4000), ("2001:db8::1", 80)),
    "v2": encode_proxy_v2(SOURCE, DESTINATION),
    "v2-tlvs": encode_proxy_v2(SOURCE, DESTINATION, [(0x04, b"x" * 40), (0xE0, b"")]),
    "v2-inet6": encode_proxy_v2(("2001:db8::5", 4000), ("2001:db8::1", 80)),
}
SOURCES = {
    "v1": SOURCE,
    "v1-tcp6": ("2001:db8::5", 4000),
    "v2": SOURCE,
    "v2-tlvs": SOURCE,
    "v2-inet6": ("2001:db8::5", 4000),
}
HANDSHAKE_TIMEOUT = 10.0


BASE = SessionSettings(idle_timeout=300.0, line_timeout=30.0, proxy="on")


def settings(**options: Any) -> SessionSettings:
    """`BASE` (``--proxy-protocol on``) with ``options``: long idle and line timeouts, so that
    only the deadline under test fires."""
    return replace(BASE, **options)


@st.composite
def chunked(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    """``stream`` cut into non-empty reads, anywhere."""
    if len(stream) < 2:
        return [stream] if stream else []
    cuts = sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=12)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


class Driven:
    """A session driven as `Driver` drives it: each read in turn, `opened` on Command.OPEN.
    Records the replies of each read and the commands, in order."""

    def __init__(
        self, session_settings: SessionSettings, *, proxied: bool = True, now: float = 0.0
    ) -> None:
        self.session = Session(session_settings, now, proxied=proxied)
        self.replies: list[bytes] = []
        self.commands: list[Command] = []
        self.opened_at_read: int | None = None

    def read(self, data: bytes, now: float = 1.0, info: dict[str, object] | None = None) -> bytes:
        out = self.session.receive_data(data, now)
        out += self.carry_out(now, info)
        self.replies.append(out)
        return out

    def carry_out(self, now: float, info: dict[str, object] | None = None) -> bytes:
        out = b""
        for command in self.session.take_commands():
            self.commands.append(command)
            if command is Command.OPEN:
                assert self.opened_at_read is None, "Command.OPEN twice"
                self.opened_at_read = len(self.replies)
                out += self.session.opened(now, info)
        return out

    @property
    def sent(self) -> bytes:
        return b"".join(self.replies)


# A header in any chunking, then data


@given(
    st.data(),
    st.sampled_from(sorted(HEADERS)),
    st.binary(max_size=60),
    st.sampled_from(["raw", "line"]),
)
def test_a_header_in_any_chunking_opens_once_with_its_client_then_echoes_what_follows(
    data: st.DataObject, kind: str, payload: bytes, framing: str
) -> None:
    """Command.OPEN comes once, on the read that completes the header; nothing is sent
    before it; `client` is the header's source; what followed the header (in the same read
    or later) is answered as on any connection."""
    header = HEADERS[kind]
    if framing == "line":
        payload = payload.replace(b"\r", b"") + b"\n"
    driven = Driven(settings(framing=framing, max_line_length=1000))
    chunks = data.draw(chunked(header + payload))
    for chunk in chunks:
        driven.read(chunk)
    completing = next(i for i, end in enumerate(accumulate(map(len, chunks))) if end >= len(header))
    assert driven.commands.count(Command.OPEN) == 1
    assert driven.opened_at_read == completing
    assert all(reply == b"" for reply in driven.replies[:completing])
    assert driven.sent == payload
    assert driven.session.state is State.OPEN
    assert driven.session.client == SOURCES[kind]
    assert driven.session.proxy_header is not None
    assert driven.session.proxy_header.length == len(header)
    assert driven.session.bytes_received == driven.session.bytes_sent == len(payload)


def test_after_the_header_raw_echo_is_the_fast_path_again() -> None:
    driven = Driven(settings())
    assert driven.read(HEADERS["v2"] + b"first") == b"first"
    chunk = b"then more"
    assert driven.session.receive_data(chunk, 2.0) is chunk
    assert driven.session.commands == []


def test_line_framing_answers_held_lines_and_keeps_the_unfinished_one() -> None:
    driven = Driven(settings(framing="line"))
    assert driven.read(HEADERS["v1"] + b"ab\ncd") == b"ab\n"
    assert driven.read(b"ef\n", 2.0) == b"cdef\n"


def test_nothing_is_answered_until_opened_is_called() -> None:
    """The held bytes are answered by `opened`, not by the read that completed the header."""
    session = Session(settings(), 0.0, proxied=True)
    assert session.receive_data(HEADERS["v1"] + b"held", 1.0) == b""
    assert Command.OPEN in session.take_commands()
    assert session.bytes_sent == 0
    assert session.opened(1.0) == b"held"
    assert session.opened(1.0) == b""  # answered once


@pytest.mark.parametrize(
    "header",
    [
        encode_proxy_v2(None, None),
        encode_proxy_v2(None, None, [(0x01, b"h2")]),
        b"PROXY UNKNOWN\r\n",
    ],
    ids=["v2-local", "v2-local-tlvs", "v1-unknown"],
)
def test_the_local_command_opens_with_no_client(header: bytes) -> None:
    """A health check's header: the connection is the proxy's own (client None)."""
    driven = Driven(settings())
    assert driven.read(header + b"ping") == b"ping"
    assert driven.commands.count(Command.OPEN) == 1
    assert driven.session.client is None
    assert driven.session.proxy_header is not None
    assert driven.session.proxy_header.local


# --proxy-protocol optional


@given(st.data(), st.sampled_from([b"GET / HTTP/1.0\r\n\r\n", b"PROBLEM\n", b"\r\nhi", b"P"]))
def test_optional_without_a_header_opens_and_answers_every_byte(
    data: st.DataObject, stream: bytes
) -> None:
    driven = Driven(settings(proxy="optional"))
    for chunk in data.draw(chunked(stream)):
        driven.read(chunk)
    if stream == b"P":  # a signature's first byte: not known yet, nothing answered
        assert driven.session.state is State.PROXY_HEADER
        assert driven.sent == b""
        return
    assert driven.commands.count(Command.OPEN) == 1
    assert driven.sent == stream
    assert driven.session.client is None
    assert driven.session.proxy_header is None


def test_optional_pro_then_blem_is_held_then_answered_whole() -> None:
    driven = Driven(settings(proxy="optional"))
    assert driven.read(b"PRO") == b""
    assert driven.session.state is State.PROXY_HEADER
    assert driven.read(b"BLEM\n") == b"PROBLEM\n"
    assert driven.opened_at_read == 1


@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_optional_with_a_header_is_the_same_as_on(kind: str) -> None:
    driven = Driven(settings(proxy="optional"))
    assert driven.read(HEADERS[kind] + b"x") == b"x"
    assert driven.session.client == SOURCES[kind]


# Bad headers, no header in time


V1 = HEADERS["v1"]
V2 = HEADERS["v2"]
BAD_HEADERS = {
    "no signature": b"GET / HTTP/1.0\r\n\r\n",
    "v1 bad address": b"PROXY TCP4 999.0.0.1 198.51.100.1 4000 80\r\n",
    "v1 bad port": b"PROXY TCP4 203.0.113.5 198.51.100.1 99999 80\r\n",
    "v1 lone LF": b"PROXY TCP4 203.0.113.5 198.51.100.1 4000 80\n",
    "v1 no CRLF": b"PROXY TCP4 " + b"1" * 120,
    "v1 unknown protocol": b"PROXY UDP4 203.0.113.5 198.51.100.1 4000 80\r\n",
    "v2 bad version": V2[:12] + b"\x31" + V2[13:],
    "v2 unknown command": V2[:12] + b"\x2f" + V2[13:],
    "v2 over the cap": V2[:14] + b"\xff\xff",
    "v2 datagram": V2[:13] + b"\x12" + V2[14:],
    "v2 unknown family": V2[:13] + b"\x51" + V2[14:],
    "v2 block too short": V2[:14] + b"\x00\x04" + V2[16:20],
    # An AF_INET block of 15 bytes: the addresses, then a TLV header claiming 9 bytes.
    "v2 TLV past the block": V2[:14] + b"\x00\x0f" + V2[16:28] + b"\x04\x00\x09",
}


def parser_message(data: bytes) -> str:
    with pytest.raises(proxy.ProxyHeaderError) as raised:
        proxy.parse(data)
    return str(raised.value)


# Under "optional", bytes that cannot start a header are the client's data, not a bad header.
BAD_HEADER_CASES = [
    (name, mode)
    for name in sorted(BAD_HEADERS)
    for mode in ("on", "optional")
    if mode == "on" or proxy.starts_like_header(BAD_HEADERS[name]) is not False
]


@pytest.mark.parametrize(("name", "mode"), BAD_HEADER_CASES)
def test_a_bad_header_closes_with_the_parsers_words_and_answers_nothing(
    name: str, mode: str
) -> None:
    bad = BAD_HEADERS[name]
    driven = Driven(settings(proxy=mode))
    driven.read(bad + b"after")
    driven.read(b"and more", 2.0)
    session = driven.session
    assert session.reason is CloseReason.PROXY_HEADER_INVALID
    assert session.detail == parser_message(bad)
    assert Command.CLOSE in driven.commands
    assert Command.OPEN not in driven.commands
    assert session.state is State.CLOSING
    assert driven.sent == b""
    assert session.bytes_sent == 0  # what came after is discarded, not counted as sent
    assert session.bytes_discarded == session.bytes_received
    assert session.client is None


@given(st.data(), st.sampled_from(sorted(BAD_HEADERS)))
def test_a_bad_header_in_any_chunking_gives_the_same_close(data: st.DataObject, name: str) -> None:
    bad = BAD_HEADERS[name]
    driven = Driven(settings())
    for chunk in data.draw(chunked(bad + b"tail")):
        driven.read(chunk)
    assert driven.session.reason is CloseReason.PROXY_HEADER_INVALID
    assert driven.session.detail == parser_message(bad)
    assert driven.commands.count(Command.CLOSE) == 1
    assert driven.sent == b""


def test_no_header_by_the_deadline_closes_and_not_a_moment_before() -> None:
    session = Session(settings(), 10.0, proxied=True)
    assert session.state is State.PROXY_HEADER
    deadline = 10.0 + PROXY_HEADER_TIMEOUT
    assert session.next_deadline() == deadline
    session.receive_data(V1[:9], 12.0)  # a header's first bytes do not move the deadline
    assert session.take_commands() == []
    assert session.next_deadline() == deadline
    assert session.handle_timeout(deadline - 1e-6) == b""
    assert session.take_commands() == []
    assert session.state is State.PROXY_HEADER
    assert session.handle_timeout(deadline) == b""
    assert session.take_commands()[-1] is Command.CLOSE
    assert (session.state, session.reason) == (State.CLOSING, CloseReason.PROXY_HEADER_TIMEOUT)
    assert session.bytes_sent == 0


@pytest.mark.parametrize("mode", ["on", "optional"])
def test_the_peers_end_before_any_header_closes_at_once_as_closed_by_client(mode: str) -> None:
    """A check that connects and closes: closed now, not at the header's deadline."""
    session = Session(settings(proxy=mode), 0.0, proxied=True)
    assert session.receive_data(b"", 0.5) == b""
    assert session.take_commands()[-1] is Command.CLOSE
    assert (session.state, session.reason) == (State.CLOSING, CloseReason.CLIENT_CLOSED)


@pytest.mark.parametrize("mode", ["on", "optional"])
@pytest.mark.parametrize(
    "cut_header",
    [V1[:1], V1[:6], V1[:9], V1[:-1], V2[:1], V2[:13], V2[:16], V2[:-1]],
    ids=["v1-1", "v1-signature", "v1-9", "v1-all-but-LF", "v2-1", "v2-13", "v2-16", "v2-1-short"],
)
def test_the_peers_end_inside_a_header_closes_at_once_as_a_bad_header(
    mode: str, cut_header: bytes
) -> None:
    session = Session(settings(proxy=mode), 0.0, proxied=True)
    assert session.receive_data(cut_header, 0.2) == b""
    assert session.receive_data(b"", 0.5) == b""
    assert session.take_commands()[-1] is Command.CLOSE
    assert session.reason is CloseReason.PROXY_HEADER_INVALID
    assert session.detail == "PROXY: the connection ended inside the header"
    assert session.bytes_sent == 0


def test_after_the_header_the_idle_deadline_replaces_the_header_deadline() -> None:
    session = Session(settings(idle_timeout=100.0), 0.0, proxied=True)
    session.next_deadline()
    session.receive_data(V2, 3.0)
    session.take_commands()
    session.opened(3.0)
    assert session.next_deadline() == 3.0 + 100.0
    session.handle_timeout(PROXY_HEADER_TIMEOUT)  # the old timer: too early for anything
    assert session.state is State.OPEN


def test_a_session_that_is_not_proxied_ignores_the_proxy_setting() -> None:
    """An untrusted peer's session (``proxied`` False) is open at once: header bytes are data
    (the engine refuses it under ``on``; under ``optional`` they are echoed)."""
    session = Session(settings(proxy="optional"), 0.0, proxied=False)
    assert session.state is State.OPEN
    assert session.receive_data(V1, 1.0) == V1


# header_peeked: an engine that must not read past the header


@given(st.data(), st.sampled_from(sorted(HEADERS)), st.binary(max_size=40))
def test_header_peeked_consumes_exactly_the_headers_bytes(
    data: st.DataObject, kind: str, tail: bytes
) -> None:
    """An engine peeks what the kernel holds and reads what `header_peeked` says: the bytes
    left in the kernel afterwards are the tail, whole, however the bytes arrived."""
    header = HEADERS[kind]
    session = Session(settings(tls=True), 0.0, proxied=True)
    kernel = b""
    for arrived in data.draw(chunked(header + tail)):
        kernel += arrived
        take = session.header_peeked(kernel, 1.0)
        assert 0 <= take <= len(kernel)
        kernel = kernel[take:]
    assert kernel == tail
    assert session.client == SOURCES[kind]
    assert session.state is State.HANDSHAKE
    assert session.take_commands().count(Command.OPEN) == 0  # not before the handshake
    assert session.header_peeked(b"more", 2.0) == 0  # done: never another byte


def test_header_peeked_with_a_whole_header_and_tail_in_one_peek() -> None:
    session = Session(settings(tls=True), 0.0, proxied=True)
    client_hello = b"\x16\x03\x01\x02\x00"
    assert session.header_peeked(V2 + client_hello, 1.0) == len(V2)
    assert session.header_peeked(client_hello, 1.0) == 0


def test_optional_header_peeked_sees_a_client_hello_and_takes_nothing() -> None:
    session = Session(settings(tls=True, proxy="optional"), 0.0, proxied=True)
    assert session.header_peeked(b"\x16\x03\x01\x02\x00\x01", 1.0) == 0
    assert session.state is State.HANDSHAKE
    assert session.client is None


def test_header_peeked_bad_header_closes() -> None:
    session = Session(settings(tls=True), 0.0, proxied=True)
    session.header_peeked(b"\x16\x03\x01\x02\x00\x01", 1.0)
    assert session.reason is CloseReason.PROXY_HEADER_INVALID
    assert session.take_commands()[-1] is Command.CLOSE


# TLS: the HANDSHAKE state


def tls_settings(**options: object) -> SessionSettings:
    return settings(tls=True, handshake_timeout=HANDSHAKE_TIMEOUT, proxy="off", **options)


def test_a_tls_session_starts_in_handshake_with_its_deadline() -> None:
    session = Session(tls_settings(), 5.0)
    assert session.state is State.HANDSHAKE
    assert session.handshake_deadline() == session.next_deadline() == 5.0 + HANDSHAKE_TIMEOUT


def test_handshake_done_opens_and_asks_for_open() -> None:
    driven = Driven(tls_settings(), proxied=False)
    driven.session.handshake_done(1.0)
    assert driven.session.state is State.OPEN
    assert driven.carry_out(1.0) == b""
    assert driven.commands.count(Command.OPEN) == 1
    assert driven.read(b"hi") == b"hi"
    driven.session.handshake_done(2.0)  # once only
    assert driven.session.take_commands() == []


def test_bytes_read_during_the_handshake_are_answered_when_open() -> None:
    driven = Driven(tls_settings(), proxied=False)
    assert driven.read(b"early") == b""
    driven.session.handshake_done(1.0)
    assert driven.carry_out(1.0) == b"early"


@pytest.mark.parametrize(
    ("timed_out", "reason"),
    [(False, CloseReason.TLS_HANDSHAKE_FAILED), (True, CloseReason.TLS_HANDSHAKE_TIMEOUT)],
)
def test_handshake_failed_closes_with_the_reason_and_the_libraries_words(
    timed_out: bool, reason: CloseReason
) -> None:
    session = Session(tls_settings(), 0.0)
    session.handshake_failed(
        "[SSL: WRONG_VERSION_NUMBER] wrong version number", timed_out=timed_out
    )
    assert session.state is State.CLOSED
    assert session.reason is reason
    assert session.detail == "[SSL: WRONG_VERSION_NUMBER] wrong version number"
    assert Command.OPEN not in session.take_commands()
    session.connection_lost(None)  # the engine reports it lost: the reason stays
    assert session.reason is reason


def test_the_handshake_deadline_aborts_and_not_a_moment_before() -> None:
    session = Session(tls_settings(), 0.0)
    deadline = session.next_deadline()
    assert deadline == HANDSHAKE_TIMEOUT
    session.handle_timeout(deadline - 1e-6)
    assert session.take_commands() == []
    assert session.state is State.HANDSHAKE
    session.handle_timeout(deadline)
    assert session.take_commands() == [Command.ABORT]
    assert (session.state, session.reason) == (State.CLOSED, CloseReason.TLS_HANDSHAKE_TIMEOUT)


def test_after_a_proxy_header_the_handshake_deadline_still_counts_from_the_accept() -> None:
    session = Session(settings(tls=True, handshake_timeout=HANDSHAKE_TIMEOUT), 0.0, proxied=True)
    session.receive_data(V1, 4.0)
    assert session.state is State.HANDSHAKE
    assert Command.OPEN not in session.take_commands()
    assert session.next_deadline() == HANDSHAKE_TIMEOUT
    session.handshake_done(5.0)
    assert session.take_commands()[-1] is Command.OPEN
    assert session.client == SOURCE


# stop, refuse, greeting


def test_stop_while_waiting_for_the_header_closes_with_server_stopping() -> None:
    session = Session(settings(), 0.0, proxied=True)
    session.receive_data(V1[:5], 0.5)
    assert session.stop(1.0, unread=3) == b""
    assert session.take_commands()[-1] is Command.CLOSE
    assert (session.state, session.reason) == (State.CLOSING, CloseReason.SERVER_STOPPING)


def test_stop_during_the_handshake_closes_with_server_stopping() -> None:
    session = Session(tls_settings(), 0.0)
    assert session.stop(1.0) == b""
    assert session.take_commands()[-1] in {Command.CLOSE, Command.ABORT}
    assert session.reason is CloseReason.SERVER_STOPPING
    assert session.state in {State.CLOSING, State.CLOSED}


@pytest.mark.parametrize(
    "reason",
    [CloseReason.REFUSED_BUSY, CloseReason.REFUSED_STOPPING, CloseReason.REFUSED_PER_ADDRESS],
)
def test_refuse_during_the_handshake_sends_nothing(reason: CloseReason) -> None:
    """A TLS client could not read a plain-text error line."""
    session = Session(tls_settings(), 0.0)
    assert session.refuse(reason, 0.0) == b""
    assert session.take_commands()[-1] is Command.CLOSE
    assert session.reason is reason
    session.receive_data(b"\x16\x03\x01", 0.5)
    assert session.bytes_sent == 0


def test_refuse_while_waiting_for_the_header_sends_the_busy_line() -> None:
    session = Session(settings(), 0.0, proxied=True)
    assert session.refuse(CloseReason.REFUSED_BUSY, 0.0) == BUSY_REPLY
    assert Command.SHUT_WRITE in session.take_commands()
    assert session.receive_data(V1 + b"data", 0.5) == b""
    assert session.bytes_sent == len(BUSY_REPLY)
    assert session.bytes_discarded == session.bytes_received == len(V1 + b"data")


INFO: dict[str, object] = {
    "client": "203.0.113.5:4000",
    "server": "127.0.0.1:7",
    "proxy": "127.0.0.1:50000",
    "proxy_destination": "198.51.100.1:80",
    "tls": None,
}


@pytest.mark.parametrize("framing", ["raw", "line"])
def test_opened_with_greeting_info_sends_one_json_line_first(framing: str) -> None:
    driven = Driven(settings(greeting="info", framing=framing))
    out = driven.read(V1 + b"held\n", info=INFO)
    line, rest = out.split(b"\n", 1)
    assert json.loads(line) == INFO
    assert rest == b"held\n"
    assert driven.session.bytes_sent == len(out)
    assert driven.session.bytes_received == len(b"held\n")


def test_opened_without_greeting_ignores_info() -> None:
    driven = Driven(settings(greeting="off"))
    assert driven.read(V1 + b"x", info=INFO) == b"x"


# Admission of a proxy's connections


def networks(*texts: str) -> tuple[Network, ...]:
    return tuple(parse_network(text) for text in texts)


def test_a_proxys_connection_counts_only_in_the_total() -> None:
    """The proxy's own address is neither access-listed nor limited per address at accept."""
    admission = Admission(
        max_connections=3,
        max_per_address=1,
        access=AccessList(deny=networks("127.0.0.0/8")),
        trusted_proxies=networks("127.0.0.0/8"),
    )
    assert admission.admit("127.0.0.1", proxy=True) is None
    assert admission.admit("127.0.0.1", proxy=True) is None
    assert admission.connections_from("127.0.0.1") == 0
    assert admission.active == 2
    assert admission.admit("127.0.0.1", proxy=True, stopping=True) is CloseReason.REFUSED_STOPPING
    assert admission.admit("127.0.0.1", proxy=True) is None
    assert admission.admit("127.0.0.1", proxy=True) is CloseReason.REFUSED_BUSY


def test_admit_client_applies_the_access_list_to_the_real_client() -> None:
    admission = Admission(access=AccessList(deny=networks("198.18.0.0/15")))
    assert admission.admit("127.0.0.1", proxy=True) is None
    assert admission.admit_client("198.18.0.7") is CloseReason.REFUSED_DENIED
    assert admission.admit_client("203.0.113.5") is None
    allow_only = Admission(access=AccessList(allow=networks("203.0.113.0/24")))
    assert allow_only.admit_client("203.0.113.5") is None
    assert allow_only.admit_client("192.0.2.1") is CloseReason.REFUSED_DENIED
    assert allow_only.admit_client("::ffff:203.0.113.9") is None


def test_admit_client_applies_the_per_address_limit_and_release_frees_it() -> None:
    admission = Admission(max_per_address=1)
    for _ in range(3):
        assert admission.admit("127.0.0.1", proxy=True) is None
    assert admission.admit_client("203.0.113.5") is None
    assert admission.admit_client("203.0.113.5") is CloseReason.REFUSED_PER_ADDRESS
    assert admission.admit_client("203.0.113.6") is None
    assert admission.connections_from("203.0.113.5") == 1
    admission.release("203.0.113.5")
    assert admission.connections_from("203.0.113.5") == 0
    assert admission.admit_client("::ffff:203.0.113.5") is None  # the same client
    admission.release(None)  # the refused one: only the total
    assert admission.active == 1
    admission.release("203.0.113.6")
    assert admission.active == 0


@pytest.mark.parametrize(
    ("host", "trusted"),
    [
        ("192.0.2.7", True),
        ("::ffff:192.0.2.7", True),
        ("127.0.0.1", False),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("not an address", False),
    ],
)
def test_is_trusted_proxy(host: str, trusted: bool) -> None:
    admission = Admission(trusted_proxies=networks("192.0.2.0/24", "2001:db8::/32"))
    assert admission.is_trusted_proxy(host) is trusted


def test_with_no_trusted_proxies_nobody_is_trusted() -> None:
    assert not Admission().is_trusted_proxy("127.0.0.1")


clients = st.integers(0, 4).map(lambda n: f"203.0.113.{n}")
proxy_ops = st.lists(st.one_of(st.tuples(st.just("open"), clients), st.just(("close", ""))))


@given(proxy_ops, st.integers(1, 5), st.integers(0, 2))
def test_proxied_connections_hold_the_limits_under_any_sequence(
    ops: list[tuple[str, str]], max_connections: int, max_per_address: int
) -> None:
    """Against a plain model: a proxy's connections count in the total at accept and under
    their client after the header; a refused client frees only the total."""
    admission = Admission(max_connections, max_per_address)
    open_clients: list[str] = []
    for op, client in ops:
        if op == "close":
            if open_clients:
                admission.release(open_clients.pop(0))
            continue
        if len(open_clients) >= max_connections:
            assert admission.admit("127.0.0.1", proxy=True) is CloseReason.REFUSED_BUSY
            continue
        assert admission.admit("127.0.0.1", proxy=True) is None
        expected = (
            CloseReason.REFUSED_PER_ADDRESS
            if max_per_address and open_clients.count(client) >= max_per_address
            else None
        )
        assert admission.admit_client(client) is expected
        if expected is None:
            open_clients.append(client)
        else:
            admission.release(None)
        assert admission.active == len(open_clients)
        assert admission.connections_from(client) == open_clients.count(client)
        assert admission.connections_from("127.0.0.1") == 0
