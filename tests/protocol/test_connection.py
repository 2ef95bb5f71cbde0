"""EchoConnection: the echo protocol pushed through in every chunking, with no socket at all."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpecho.protocol import DEFAULT_CONFIRM_PREFIX, EchoConnection, Framing, State

PREFIX = DEFAULT_CONFIRM_PREFIX.encode()
ODD_READ_SIZES = [1, 3, 7, 10, 13]

# Any bytes, as the non-empty reads that delivered them (b"" would mean EOF).
raw_chunks = st.lists(st.binary(min_size=1, max_size=64), max_size=20)
# Line streams: terminators, a lone "\r", and bytes that must be kept as they are.
TOKENS = [b"a", b"b", b"xyz", b"\r", b"\n", b"\r\n", b"\x00", b"\x1b", b"\xff"]
line_streams = st.lists(st.sampled_from(TOKENS)).map(b"".join)
line_chunks = st.lists(line_streams.filter(bool))
# Line contents that do not end in "\r" (so a line's terminator is unambiguous), with either
# terminator, and an unterminated tail.
contents = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r"))
terminated_lines = st.lists(st.tuples(contents, st.sampled_from([b"\n", b"\r\n"])), max_size=10)


def error_reply(max_length: int) -> bytes:
    return b"ERROR line too long: more than %d bytes without a newline\n" % max_length


def in_reads_of(data: bytes, size: int) -> list[bytes]:
    """``data`` as reads of ``size`` bytes (the last one shorter)."""
    return [data[start : start + size] for start in range(0, len(data), size)]


def run(conn: EchoConnection, chunks: list[bytes]) -> list[bytes]:
    """Feed every chunk, then EOF; return what each call returned (the EOF reply last)."""
    return [conn.receive_data(chunk) for chunk in [*chunks, b""]]


def expected_line_echo(stream: bytes, max_length: int) -> tuple[bytes, bool]:
    """What echo in line framing sends for ``stream`` then EOF, and whether it is refused.

    Lines are cut at "\\n"; a line's length does not count its terminator ("\\n" or "\\r\\n");
    the unterminated tail counts whole. The first line over the limit gets the error reply
    after the lines before it, and nothing more is sent.
    """
    *complete, tail = stream.split(b"\n")
    sent = b""
    for content in complete:
        if len(content.removesuffix(b"\r")) > max_length:
            return sent + error_reply(max_length), True
        sent += content + b"\n"
    if len(tail) > max_length:
        return sent + error_reply(max_length), True
    return sent + tail, False


# Raw framing


@given(raw_chunks)
def test_raw_echo_returns_any_bytes_in_any_chunking_exactly(chunks: list[bytes]) -> None:
    """Each read is sent back as it came: the output is the input, byte for byte."""
    conn = EchoConnection("raw", "echo")
    for chunk in chunks:
        assert conn.receive_data(chunk) == chunk
        assert list(conn.frames) == [chunk]
        assert conn.state is State.OPEN
    assert conn.bytes_received == sum(map(len, chunks))
    assert conn.bytes_discarded == 0


@pytest.mark.parametrize("size", ODD_READ_SIZES)
@given(stream=st.binary(max_size=300))
def test_raw_echo_in_reads_of_odd_sizes_returns_the_stream(stream: bytes, size: int) -> None:
    outputs = run(EchoConnection("raw"), in_reads_of(stream, size))
    assert b"".join(outputs) == stream


@pytest.mark.parametrize("framing", ["raw", "line"])
def test_eof_moves_the_state_to_done(framing: Framing) -> None:
    conn = EchoConnection(framing)
    conn.receive_data(b"hello\n")

    assert conn.receive_data(b"") == b""
    assert conn.state is State.DONE
    assert list(conn.frames) == []


@pytest.mark.parametrize("framing", ["raw", "line"])
def test_data_after_eof_is_discarded(framing: Framing) -> None:
    conn = EchoConnection(framing)
    conn.receive_data(b"")

    assert conn.receive_data(b"late") == b""
    assert conn.state is State.DONE
    assert conn.bytes_discarded == 4


@given(raw_chunks, st.binary(max_size=20))
def test_raw_confirm_sends_the_prefix_and_each_read_as_it_came(
    chunks: list[bytes], prefix: bytes
) -> None:
    conn = EchoConnection("raw", "confirm", confirm_prefix=prefix)
    for chunk in chunks:
        assert conn.receive_data(chunk) == prefix + chunk
    assert conn.receive_data(b"") == b""
    assert conn.state is State.DONE


def test_confirm_uses_the_default_prefix() -> None:
    assert EchoConnection("raw", "confirm").receive_data(b"hi") == b"Server received: hi"


# Line framing


@given(line_chunks)
def test_line_echo_returns_any_stream_in_any_chunking_exactly(chunks: list[bytes]) -> None:
    """Lines (with "\\r\\n" kept as received) and the tail at EOF add up to the input."""
    stream = b"".join(chunks)
    outputs = run(EchoConnection("line", "echo"), chunks)
    assert b"".join(outputs) == stream


@given(line_chunks)
def test_line_echo_replies_only_to_complete_lines_before_eof(chunks: list[bytes]) -> None:
    """Each reply is whole lines: everything up to the last newline received so far."""
    conn = EchoConnection("line")
    received = b""
    sent = b""
    for chunk in chunks:
        received += chunk
        out = conn.receive_data(chunk)
        sent += out
        assert sent == received[: received.rfind(b"\n") + 1]
        assert b"".join(list(conn.frames)) == out
    assert conn.state is State.OPEN


@pytest.mark.parametrize("size", ODD_READ_SIZES)
@given(stream=line_streams)
def test_line_echo_in_reads_of_odd_sizes_gives_the_same_lines(stream: bytes, size: int) -> None:
    one_read = EchoConnection("line")
    odd_reads = EchoConnection("line")
    lines_one = [one_read.receive_data(stream)] if stream else []
    lines_odd = [odd_reads.receive_data(chunk) for chunk in in_reads_of(stream, size)]

    assert b"".join(lines_odd) == b"".join(lines_one)
    assert odd_reads.receive_data(b"") == one_read.receive_data(b"")


def test_line_echo_sends_each_line_with_its_own_terminator() -> None:
    conn = EchoConnection("line")
    assert conn.receive_data(b"one\r\ntwo\nthr") == b"one\r\ntwo\n"
    assert list(conn.frames) == [b"one\r\n", b"two\n"]


def test_the_partial_last_line_is_echoed_at_eof() -> None:
    conn = EchoConnection("line")
    assert conn.receive_data(b"abc\nde") == b"abc\n"
    assert list(conn.frames) == [b"abc\n"]

    assert conn.receive_data(b"") == b"de"
    assert list(conn.frames) == [b"de"]
    assert conn.state is State.DONE


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
@pytest.mark.parametrize("size", ODD_READ_SIZES)
def test_a_line_of_exactly_max_line_length_is_accepted(terminator: bytes, size: int) -> None:
    stream = b"x" * 16 + terminator + b"y" * 16
    outputs = run(EchoConnection("line", max_line_length=16), in_reads_of(stream, size))

    assert b"".join(outputs) == stream


@pytest.mark.parametrize("size", [None, *ODD_READ_SIZES])
def test_a_too_long_line_gets_the_error_after_the_lines_before_it(size: int | None) -> None:
    """REJECTED; the long line and everything after it is discarded and counted."""
    stream = b"ok\r\nfine\n" + b"x" * 9 + b"\nlater\npart"
    chunks = [stream] if size is None else in_reads_of(stream, size)
    conn = EchoConnection("line", max_line_length=8)

    sent = b""
    for chunk in chunks:
        sent += conn.receive_data(chunk)

    assert sent == b"ok\r\nfine\nERROR line too long: more than 8 bytes without a newline\n"
    assert conn.state is State.REJECTED
    assert conn.error is not None
    assert conn.error.max_length == 8
    assert conn.bytes_discarded == len(stream) - len(b"ok\r\nfine\n")


def test_a_rejected_connection_discards_later_data_and_eof() -> None:
    conn = EchoConnection("line", max_line_length=4)
    assert conn.receive_data(b"toolong") == error_reply(4)
    assert list(conn.frames) == []

    assert conn.receive_data(b"more\n") == b""
    assert list(conn.frames) == []
    assert conn.bytes_discarded == 7 + 5
    assert conn.receive_data(b"") == b""
    assert conn.state is State.REJECTED


@given(chunks=line_chunks, max_length=st.integers(min_value=1, max_value=6))
def test_line_echo_matches_the_model_for_any_input_and_limit(
    chunks: list[bytes], max_length: int
) -> None:
    """Any stream, any chunking, a small limit: what is sent, the end state, what is discarded."""
    stream = b"".join(chunks)
    expected, refused = expected_line_echo(stream, max_length)
    conn = EchoConnection("line", max_line_length=max_length)

    sent = b"".join(run(conn, chunks))

    assert sent == expected
    if refused:
        assert conn.state is State.REJECTED
        replied = len(expected) - len(error_reply(max_length))
        assert conn.bytes_discarded == len(stream) - replied
    else:
        assert conn.state is State.DONE
        assert conn.bytes_discarded == 0


@given(terminated_lines, contents, st.binary(max_size=20))
def test_line_confirm_sends_prefix_content_and_newline_per_line(
    lines: list[tuple[bytes, bytes]], tail: bytes, prefix: bytes
) -> None:
    """The terminator ("\\n" or "\\r\\n") becomes "\\n"; the tail is confirmed at EOF."""
    stream = b"".join(content + terminator for content, terminator in lines) + tail
    conn = EchoConnection("line", "confirm", confirm_prefix=prefix)

    sent = b"".join(run(conn, in_reads_of(stream, 7) if stream else []))

    expected = b"".join(prefix + content + b"\n" for content, _ in lines)
    if tail:
        expected += prefix + tail + b"\n"
    assert sent == expected
    assert conn.state is State.DONE


def test_line_confirm_gives_each_line_its_own_reply() -> None:
    conn = EchoConnection("line", "confirm")
    assert conn.receive_data(b"hi\r\nyo\n") == b"Server received: hi\nServer received: yo\n"


def test_line_confirm_refuses_a_too_long_line_with_the_same_error() -> None:
    conn = EchoConnection("line", "confirm", max_line_length=4)
    assert conn.receive_data(b"ok\ntoolong\n") == b"Server received: ok\n" + error_reply(4)
    assert conn.state is State.REJECTED


# Byte accounting


@pytest.mark.parametrize("framing", ["raw", "line"])
@given(chunks=line_chunks, max_length=st.integers(min_value=1, max_value=6))
def test_every_byte_received_is_echoed_or_counted_as_discarded(
    framing: Framing, chunks: list[bytes], max_length: int
) -> None:
    """bytes_received == bytes replied to + bytes_discarded once the connection is closed.

    Before that only an unterminated line (line framing) is held back. Reads stop when the
    state leaves OPEN, as an engine's do.
    """
    conn = EchoConnection(framing, "echo", max_line_length=max_length)
    replied = 0
    for chunk in [*chunks, b""]:
        if conn.state is not State.OPEN:
            break
        out = conn.receive_data(chunk)
        replied += len(out.removesuffix(error_reply(max_length)) if conn.error else out)
        held = conn.bytes_received - replied - conn.bytes_discarded
        assert (held == 0) if framing == "raw" else (0 <= held <= max_length + 1)
    assert conn.state is not State.OPEN
    assert conn.bytes_received == replied + conn.bytes_discarded


# Edge cases of the byte accounting, the line limit at the end, and confirm's terminator.


def test_data_after_the_connection_is_closed_keeps_the_byte_accounting() -> None:
    """received == replied + discarded still holds when data arrives after REJECTED."""
    conn = EchoConnection("line", max_line_length=4)
    replied = len(conn.receive_data(b"ok\ntoolong")) - len(error_reply(4))
    conn.receive_data(b"more")

    assert conn.bytes_received == replied + conn.bytes_discarded


def test_a_tail_of_max_line_length_and_a_cr_is_refused_at_eof() -> None:
    """With no "\\n" to follow, the "\\r" is content: max_length + 1 bytes without a newline."""
    conn = EchoConnection("line", max_line_length=4)
    assert conn.receive_data(b"abcd\r") == b""

    assert conn.receive_data(b"") == error_reply(4)
    assert conn.state is State.REJECTED


def test_line_confirm_keeps_a_cr_that_is_content() -> None:
    """In "a\\r\\r\\n" the terminator is "\\r\\n" and the content is "a\\r"."""
    conn = EchoConnection("line", "confirm", confirm_prefix=b"> ")
    assert conn.receive_data(b"a\r\r\n") == b"> a\r\n"
