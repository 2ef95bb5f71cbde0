"""LineSplitter: how a byte stream is cut into lines, with no socket at all.

Every property is checked for any chunking of the stream (as reads of any size would cut it) and
for reads of odd sizes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpecho.protocol import MAX_LINE_LENGTH, LineSplitter, LineTooLong

# Pieces that line streams are built of: terminators, a lone "\r", and bytes that must be kept
# as they are (NUL, ESC, invalid UTF-8).
TOKENS = [b"a", b"b", b"xyz", b"\r", b"\n", b"\r\n", b"\x00", b"\x1b", b"\xff"]
line_streams = st.lists(st.sampled_from(TOKENS)).map(b"".join)
# A stream as the reads that delivered it: every chunk non-empty (b"" would mean EOF).
line_chunks = st.lists(line_streams.filter(bool))
ODD_READ_SIZES = [1, 3, 7, 10, 13]


def in_reads_of(data: bytes, size: int) -> list[bytes]:
    """``data`` as reads of ``size`` bytes (the last one shorter)."""
    return [data[start : start + size] for start in range(0, len(data), size)]


def feed_all(splitter: LineSplitter, chunks: list[bytes]) -> list[bytes]:
    return [line for chunk in chunks for line in splitter.feed(chunk)]


def content_length(line: bytes) -> int:
    """Length of a complete line without its terminator ("\\r\\n" or "\\n")."""
    return len(line) - (2 if line.endswith(b"\r\n") else 1)


@given(line_chunks)
def test_lines_end_exactly_at_each_newline_whatever_the_chunking(chunks: list[bytes]) -> None:
    """Each line is the bytes up to and including a "\\n"; the tail waits for flush()."""
    stream = b"".join(chunks)
    splitter = LineSplitter(max_length=len(stream) + 1)

    lines = feed_all(splitter, chunks)
    tail = splitter.flush()

    *contents, expected_tail = stream.split(b"\n")
    assert lines == [content + b"\n" for content in contents]
    assert tail == expected_tail
    assert b"".join(lines) + tail == stream


@pytest.mark.parametrize("size", ODD_READ_SIZES)
@given(stream=line_streams)
def test_reads_of_odd_sizes_give_the_same_lines_as_one_read(stream: bytes, size: int) -> None:
    """The lines do not depend on where the reads cut the stream."""
    whole = LineSplitter(max_length=len(stream) + 1)
    in_pieces = LineSplitter(max_length=len(stream) + 1)

    assert feed_all(in_pieces, in_reads_of(stream, size)) == whole.feed(stream)
    assert in_pieces.flush() == whole.flush()


@pytest.mark.parametrize(
    "chunks", [[b"one\r\ntwo\n"], [b"one\r", b"\ntwo\n"], [b"one", b"\r\ntwo\n"]]
)
def test_crlf_is_kept_as_received(chunks: list[bytes]) -> None:
    """A "\\r\\n" terminator stays in the line, even when a read ends between "\\r" and "\\n"."""
    assert feed_all(LineSplitter(), chunks) == [b"one\r\n", b"two\n"]


def test_a_lone_cr_does_not_end_a_line() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\rb") == []
    assert splitter.feed(b"\n") == [b"a\rb\n"]


def test_flush_returns_the_unterminated_tail_once() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"done\npart") == [b"done\n"]
    assert splitter.flush() == b"part"
    assert splitter.flush() == b""


def test_the_default_limit_is_max_line_length() -> None:
    assert LineSplitter().max_length == MAX_LINE_LENGTH


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
@pytest.mark.parametrize("size", [None, *ODD_READ_SIZES])
def test_a_line_of_exactly_max_length_is_accepted(terminator: bytes, size: int | None) -> None:
    """The limit counts the line without its terminator, so "\\r\\n" costs nothing."""
    line = b"x" * 16 + terminator
    stream = line + b"next\n"
    chunks = [stream] if size is None else in_reads_of(stream, size)

    assert feed_all(LineSplitter(max_length=16), chunks) == [line, b"next\n"]


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"])
def test_a_line_one_byte_over_max_length_is_refused(terminator: bytes) -> None:
    """LineTooLong carries the limit, the lines before the long one, and what it threw away."""
    long_line = b"x" * 17 + terminator
    splitter = LineSplitter(max_length=16)

    with pytest.raises(LineTooLong) as caught:
        splitter.feed(b"ok\n" + long_line + b"after\npart")

    assert caught.value.max_length == 16
    assert caught.value.lines == [b"ok\n"]
    assert caught.value.discarded == len(long_line + b"after\npart")


def test_an_unterminated_line_is_refused_before_its_newline_arrives() -> None:
    """The limit bounds memory: a line is refused as soon as it is too long, not at its end."""
    splitter = LineSplitter(max_length=16)
    assert splitter.feed(b"ok\n" + b"x" * 16) == [b"ok\n"]

    with pytest.raises(LineTooLong) as caught:
        splitter.feed(b"y")

    assert caught.value.lines == []
    assert caught.value.discarded == 17


def test_a_full_length_line_may_wait_for_the_newline_after_its_cr() -> None:
    """max_length bytes and a "\\r" are held: the "\\n" that follows makes a valid line."""
    splitter = LineSplitter(max_length=16)
    assert splitter.feed(b"x" * 16 + b"\r") == []
    assert splitter.feed(b"\n") == [b"x" * 16 + b"\r\n"]


@given(chunks=line_chunks, max_length=st.integers(min_value=1, max_value=6))
def test_a_refusal_comes_at_the_first_long_line_and_accounts_for_every_byte(
    chunks: list[bytes], max_length: int
) -> None:
    """Lines before the first too-long line come out; the rest of what was fed is discarded."""
    stream = b"".join(chunks)
    splitter = LineSplitter(max_length=max_length)
    lines: list[bytes] = []
    fed = 0
    refused: LineTooLong | None = None
    for chunk in chunks:
        fed += len(chunk)
        try:
            lines += splitter.feed(chunk)
        except LineTooLong as exc:
            refused = exc
            lines += exc.lines
            break

    *contents, tail = stream.split(b"\n")
    complete = [content + b"\n" for content in contents]
    long_index = next(
        (i for i, line in enumerate(complete) if content_length(line) > max_length), None
    )
    assert all(content_length(line) <= max_length for line in lines)
    if long_index is not None:
        # A complete line is too long: refused at the latest when its newline arrives.
        assert refused is not None
        assert lines == complete[:long_index]
    elif refused is None:
        # Nothing refused: the tail waits, at most max_length bytes (+ a "\r" that may end it).
        assert lines == complete
        assert len(tail) <= max_length + 1
        assert len(tail) <= max_length or tail.endswith(b"\r")
    else:
        # Only the unterminated tail can be too long.
        assert lines == complete
        assert len(tail) > max_length
    if refused is not None:
        assert refused.max_length == max_length
        assert sum(map(len, lines)) + refused.discarded == fed
