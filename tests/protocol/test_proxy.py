"""The PROXY protocol header, v1 and v2: parsed in any chunking, encoded, and refused when bad."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpecho.protocol import (
    MAX_V1_LENGTH,
    MAX_V2_BLOCK_LENGTH,
    MAX_V2_LENGTH,
    PROXY_V1_SIGNATURE,
    PROXY_V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
)
from tcpecho.protocol.proxy import encode_v1, encode_v2, parse, starts_like_header

V2 = PROXY_V2_SIGNATURE
# Addresses and ports of a v2 TCP-over-IPv4 header: 192.0.2.1:56324 -> 192.0.2.11:443.
INET_BLOCK = bytes([192, 0, 2, 1, 192, 0, 2, 11]) + (56324).to_bytes(2, "big") + b"\x01\xbb"

Endpoint = tuple[str, int]

ports = st.integers(0, 65535)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
endpoint_pairs = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=5)
valid_headers = st.one_of(
    endpoint_pairs.map(lambda pair: encode_v1(*pair)),
    st.tuples(endpoint_pairs, tlv_lists).map(lambda t: encode_v2(*t[0], t[1])),
    tlv_lists.map(lambda tlvs: encode_v2(None, None, tlvs)),
    st.just(b"PROXY UNKNOWN\r\n"),
    st.just(b"PROXY UNKNOWN anything here is ignored\r\n"),
)


def outcome(data: bytes) -> ProxyHeader | str | None:
    """What parse says: a header, None, or the error's message."""
    try:
        return parse(data)
    except ProxyHeaderError as error:
        return str(error)


@given(endpoint_pairs)
def test_v1_round_trip_for_any_ipv4_or_ipv6_addresses_and_ports(
    pair: tuple[Endpoint, Endpoint],
) -> None:
    source, destination = pair
    encoded = encode_v1(source, destination)
    protocol = b"TCP4" if "." in source[0] and ":" not in source[0] else b"TCP6"
    assert encoded.startswith(b"PROXY " + protocol + b" ")
    assert len(encoded) <= MAX_V1_LENGTH
    assert parse(encoded) == ProxyHeader(
        version=1, local=False, source=source, destination=destination, length=len(encoded)
    )


@given(endpoint_pairs, tlv_lists)
def test_v2_round_trip_for_any_addresses_ports_and_tlvs(
    pair: tuple[Endpoint, Endpoint], tlvs: list[tuple[int, bytes]]
) -> None:
    source, destination = pair
    encoded = encode_v2(source, destination, tlvs)
    assert parse(encoded) == ProxyHeader(
        version=2,
        local=False,
        source=source,
        destination=destination,
        tlvs=tuple(tlvs),
        length=len(encoded),
    )


@given(valid_headers, st.binary(max_size=40))
def test_every_proper_prefix_is_incomplete_and_the_bytes_after_the_header_are_left(
    header: bytes, trailing: bytes
) -> None:
    """Fed a byte at a time, parse says None until the last byte, never raises, and then
    takes exactly the header's bytes, whatever the client sent after it."""
    for end in range(len(header)):
        assert parse(header[:end]) is None
    parsed = parse(header)
    assert parsed is not None
    assert parsed.length == len(header)
    assert parse(header + trailing) == parsed


starts = st.sampled_from(
    [b"", PROXY_V1_SIGNATURE, b"PROXY TCP4 ", b"PROXY UNKNOWN", V2, V2 + b"\x21", V2 + b"\x21\x11"]
)


@given(starts, st.binary(max_size=200))
def test_any_bytes_raise_only_proxy_header_error_and_a_decision_never_changes(
    start: bytes, tail: bytes
) -> None:
    """Random bytes (some after a real signature, to get past it): parse returns None, a
    header or ProxyHeaderError on every prefix, and once it has answered, more bytes give the
    same answer."""
    data = start + tail
    decided: ProxyHeader | str | None = None
    for end in range(len(data) + 1):
        result = outcome(data[:end])
        if decided is not None:
            assert result == decided
        decided = result


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY v1 or v2 signature"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY v1 or v2 signature"),
        (b"\r\n\r\n\x00\r\nQUIT\r\n", "no PROXY v1 or v2 signature"),
        (V2 + b"\x11", "PROXY v2: bad version 0x1"),
        (V2 + b"\xf1", "PROXY v2: bad version 0xf"),
        (V2 + b"\x22", "PROXY v2: unknown command 0x2"),
        (V2 + b"\x21\x41", "PROXY v2: unknown address family 0x4"),
        (V2 + b"\x21\x13", "PROXY v2: unknown transport protocol 0x3"),
        (V2 + b"\x21\x12", r"PROXY v2: datagram \(UDP\) transport on a TCP server"),
        (V2 + b"\x21\x22", r"PROXY v2: datagram \(UDP\) transport on a TCP server"),
        (
            V2 + b"\x21\x11" + (MAX_V2_BLOCK_LENGTH + 1).to_bytes(2, "big"),
            "PROXY v2: address block of 4097 bytes, over the 4096-byte cap",
        ),
        (V2 + b"\x21\x11\x00\x0b" + INET_BLOCK[:11], "11 bytes too short for AF_INET$"),
        (V2 + b"\x21\x21\x00\x0c" + INET_BLOCK, "12 bytes too short for AF_INET6$"),
        (V2 + b"\x21\x31\x00\x24" + bytes(36), "36 bytes too short for AF_UNIX$"),
        (
            V2 + b"\x21\x11\x00\x11" + INET_BLOCK + b"\x05\x00\x03ab",
            "PROXY v2: TLV 0x05 runs past the address block",
        ),
        (
            V2 + b"\x21\x11\x00\x0e" + INET_BLOCK + b"\x05\x00",
            "PROXY v2: TLV header runs past the address block",
        ),
        (b"PROXY UNKNOWN " + b"x" * 93, "PROXY v1: no CRLF within 107 bytes"),
        (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "PROXY v1: no CRLF within 107 bytes"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "PROXY v1: CR or LF alone in the line"),
        (b"PROXY UNKNOWN\rx", "PROXY v1: CR or LF alone in the line"),
        (b"PROXY UNKNOWN\n\r\n", "PROXY v1: CR or LF alone in the line"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY v1: protocol not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY v1: protocol not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX\r\n", "PROXY v1: protocol not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY \r\n", "PROXY v1: protocol not TCP4, TCP6 or UNKNOWN"),
    ],
)
def test_a_malformed_header_is_refused_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse(data)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "not 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "not 4 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "not 4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "not 4 fields"),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "not 4 fields"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 1.2.3.4 256.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP4 \xef\xbc\x91.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP6 ::1 12345::1 1 2\r\n", "bad TCP6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "bad port"),
    ],
)
def test_bad_v1_fields_addresses_and_ports_are_refused(line: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=f"^PROXY v1: {message}"):
        parse(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        b" ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
    ],
)
def test_the_spec_longest_v1_lines_and_edge_values_are_accepted(line: bytes) -> None:
    header = parse(line)
    assert header is not None
    assert not header.local
    assert header.length == len(line)


def test_v1_unknown_is_local_and_whatever_follows_it_on_the_line_is_ignored() -> None:
    """The spec's worst case, 107 bytes with the CRLF, is still a header."""
    worst = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(worst) == MAX_V1_LENGTH
    for line in (b"PROXY UNKNOWN\r\n", worst):
        assert parse(line + b"hello\n") == ProxyHeader(
            version=1, local=True, source=None, destination=None, length=len(line)
        )


def test_v1_addresses_are_given_in_ipaddress_compressed_form() -> None:
    header = parse(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 2001:db8::2 1 2\r\n")
    assert header is not None
    assert header.source == ("2001:db8::1", 1)


def test_haproxy_health_check_is_a_16_byte_local_header_with_no_addresses() -> None:
    """HAProxy's ``send-proxy-v2`` health check: LOCAL, AF_UNSPEC/UNSPEC, length 0."""
    health_check = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert encode_v2(None, None) == health_check
    assert parse(health_check + b"ping\n") == ProxyHeader(
        version=2, local=True, source=None, destination=None, length=16
    )


@pytest.mark.parametrize(
    "header",
    [
        V2 + b"\x20\x11\x00\x0c" + INET_BLOCK,  # addresses sent anyway
        V2 + b"\x20\x00\x00\x07\x05\x00\x04uid1",  # TLVs after a LOCAL, as HAProxy may send
        V2 + b"\x20\x00\x00\x02\xff\xff",  # not even valid TLVs: the block is not read
        V2 + b"\x20\xff\x00\x00",  # the family is ignored for LOCAL, as the spec says
    ],
)
def test_a_local_header_skips_its_whole_address_block(header: bytes) -> None:
    assert parse(header + b"data") == ProxyHeader(
        version=2, local=True, source=None, destination=None, length=len(header)
    )


@pytest.mark.parametrize("family", [b"\x01", b"\x02", b"\x10", b"\x20", b"\x30"])
def test_a_proxy_header_with_an_unspecified_family_or_protocol_is_treated_as_local(
    family: bytes,
) -> None:
    header = V2 + b"\x21" + family + b"\x00\x0c" + INET_BLOCK
    assert parse(header) == ProxyHeader(
        version=2, local=True, source=None, destination=None, length=len(header)
    )


def test_addresses_then_tlvs_are_read_and_every_value_recovered() -> None:
    """An IPv6 header with ALPN, a 128-byte unique id, an SSL TLV (holding its own sub-TLVs,
    returned undecoded) and an empty NOOP: the addresses' 36 bytes are skipped exactly."""
    unique_id = bytes(range(128))
    ssl = b"\x01\x00\x00\x00\x00" + b"\x21\x00\x07TLSv1.3"
    tlvs = [(0x01, b"h2"), (0x05, unique_id), (0x20, ssl), (0x04, b"")]
    block = (
        ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("2001:db8::2").packed
        + (56324).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
        + b"\x01\x00\x02h2"
        + b"\x05\x00\x80"
        + unique_id
        + b"\x20\x00\x0f"
        + ssl
        + b"\x04\x00\x00"
    )
    header = V2 + b"\x21\x21" + len(block).to_bytes(2, "big") + block
    assert encode_v2(("2001:db8::1", 56324), ("2001:db8::2", 443), tlvs) == header
    assert parse(header + b"hello") == ProxyHeader(
        version=2,
        local=False,
        source=("2001:db8::1", 56324),
        destination=("2001:db8::2", 443),
        tlvs=tuple(tlvs),
        length=len(header),
    )


def test_an_af_unix_header_is_valid_with_no_addresses_and_its_tlvs_read() -> None:
    header = V2 + b"\x21\x31\x00\xdf" + bytes(216) + b"\x02\x00\x04host"
    assert parse(header) == ProxyHeader(
        version=2,
        local=False,
        source=None,
        destination=None,
        tlvs=((0x02, b"host"),),
        length=len(header),
    )


def test_a_v2_header_at_the_cap_is_taken_and_one_byte_over_is_refused_at_16_bytes() -> None:
    padding = MAX_V2_BLOCK_LENGTH - len(INET_BLOCK) - 3
    at_cap = V2 + b"\x21\x11" + MAX_V2_BLOCK_LENGTH.to_bytes(2, "big") + INET_BLOCK
    at_cap += b"\x04" + padding.to_bytes(2, "big") + bytes(padding)
    assert len(at_cap) == MAX_V2_LENGTH
    header = parse(at_cap)
    assert header is not None
    assert header.length == MAX_V2_LENGTH
    assert header.tlvs == ((0x04, bytes(padding)),)
    over = V2 + b"\x21\x11" + (MAX_V2_BLOCK_LENGTH + 1).to_bytes(2, "big")
    with pytest.raises(ProxyHeaderError, match="over the 4096-byte cap"):
        parse(over)


def test_mixed_families_are_sent_as_ipv6_with_the_ipv4_address_mapped_as_haproxy_does() -> None:
    mapped = str(ipaddress.IPv6Address("::ffff:192.0.2.1"))
    for encoded in (
        encode_v1(("192.0.2.1", 1), ("2001:db8::1", 2)),
        encode_v2(("192.0.2.1", 1), ("2001:db8::1", 2)),
    ):
        header = parse(encoded)
        assert header is not None
        assert header.source == (mapped, 1)
        assert header.destination == ("2001:db8::1", 2)


@pytest.mark.parametrize(
    ("source", "destination", "message"),
    [
        (("example.com", 1), ("192.0.2.1", 2), "does not appear to be an IPv4 or IPv6"),
        (("fe80::1%eth0", 1), ("::1", 2), "cannot carry a scope id"),
        (("192.0.2.1", 65536), ("192.0.2.2", 2), "port out of range"),
        (("192.0.2.1", -1), ("192.0.2.2", 2), "port out of range"),
    ],
)
def test_encoders_refuse_what_a_header_cannot_carry(
    source: Endpoint, destination: Endpoint, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_v1(source, destination)
    with pytest.raises(ValueError, match=message):
        encode_v2(source, destination)


def test_encode_v2_refuses_one_address_alone_and_tlvs_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="both addresses, or neither"):
        encode_v2(("192.0.2.1", 1), None)
    with pytest.raises(ValueError, match="TLV type out of range"):
        encode_v2(None, None, [(256, b"")])
    with pytest.raises(ValueError, match="TLV value of 65536 bytes"):
        encode_v2(None, None, [(1, bytes(65536))])
    with pytest.raises(ValueError, match="address block of 65547 bytes over 65535"):
        encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), [(1, bytes(65532))])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"\r", None),
        (b"\r\n", None),
        (V2[:11], None),
        (V2, True),
        (V2 + b"\x21", True),
        (b"PRO", None),
        (b"PROXY", None),
        (b"PROXY ", True),
        (b"PROXY TCP4", True),
        (b"GET / HTTP/1.1\r\n", False),
        (b"hello\n", False),
        (b"\r\n\r\n\x01", False),
        (b"\n", False),
        (b"PROXY\t", False),
        (b"PROX\r", False),
    ],
)
def test_starts_like_header_answers_only_when_it_can_tell(
    data: bytes, expected: bool | None
) -> None:
    assert starts_like_header(data) is expected


@given(st.sampled_from([PROXY_V1_SIGNATURE, V2]), st.binary(max_size=20))
def test_starts_like_header_is_none_on_every_proper_prefix_of_a_signature_then_true(
    signature: bytes, tail: bytes
) -> None:
    for end in range(len(signature)):
        assert starts_like_header(signature[:end]) is None
    assert starts_like_header(signature + tail) is True


@given(st.sampled_from([b"", b"P", b"PROXY", b"\r\n", V2[:11]]), st.binary(max_size=20))
def test_starts_like_header_is_false_exactly_when_parse_finds_no_signature(
    start: bytes, tail: bytes
) -> None:
    data = start + tail
    refused = outcome(data) == "no PROXY v1 or v2 signature"
    assert (starts_like_header(data) is False) == refused
