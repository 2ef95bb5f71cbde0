"""The PROXY protocol, v1 (text) and v2 (binary): parse and encode the header a proxy sends.

A proxy (HAProxy, a cloud load balancer) that speaks it sends one header before the client's
first byte, naming the real client and the address it connected to. The format is HAProxy's
doc/proxy-protocol.txt. Pure: no sockets, no clock, no logging; `parse` is fed the bytes
received so far and says "not yet", "here is the header and how long it was", or raises.

Who is trusted to send a header is the engine's business: the spec forbids guessing whether
one is present, so `starts_like_header` is only for a server told that one may be.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

PROXY_V1_SIGNATURE = b"PROXY "
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's longest line, CRLF included: "PROXY UNKNOWN" with two full-length IPv6 addresses
# and two five-digit ports. A line with no CRLF by then is not a header.
MAX_V1_LENGTH = 107
# Signature, version and command, family and protocol, length of the address block.
V2_FIXED_LENGTH = 16
# The spec allows an address block (addresses, then TLVs) of up to 65,535 bytes; we hold the
# header in memory until it is whole, so we cap it. HAProxy's own TLVs come to under 1 KiB:
# AF_UNIX addresses (216 bytes), ALPN, authority (<= 255 bytes in HAProxy), unique id (<= 128),
# a CRC32C, and an SSL TLV with the TLS version, client CN, cipher and algorithm names (it does
# not send the client certificate); HAProxy's own receiver refuses any TLV value over 1,024
# bytes (HA_PP2_MAX_ALLOC). 4 KiB leaves room for cloud load balancers' TLVs and a few custom
# ones, and a length over it is refused as soon as the 16 fixed bytes arrive.
MAX_V2_BLOCK_LENGTH = 4096
MAX_V2_LENGTH = V2_FIXED_LENGTH + MAX_V2_BLOCK_LENGTH

_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
_FAMILY_NAMES = {_AF_INET: "AF_INET", _AF_INET6: "AF_INET6", _AF_UNIX: "AF_UNIX"}
# Source and destination addresses, then source and destination ports.
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
_UNIX_ADDRESSES_LENGTH = 2 * 108
_TLV_HEADER = struct.Struct("!BH")
_MAX_PORT = 65535

Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyHeaderError(ValueError):
    """The bytes cannot begin a valid PROXY header. The message is a short phrase for a log
    line; it never quotes the bytes received."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyHeader:
    """A parsed header.

    ``local``: the connection is the proxy's own (v2 LOCAL, as in health checks, or v1
    ``UNKNOWN``, or v2 with an unspecified family or protocol): use the real peer's address.
    ``source`` is the real client and ``destination`` the address it connected to, as
    ``(host, port)``; both None when ``local``, and for an AF_UNIX client (which is proxied,
    not local, but has no address to give). ``tlvs`` are v2's (type, value) pairs in order,
    undecoded (a CRC32C among them is not checked). ``length`` is how many bytes the header
    took: the client's data starts there.
    """

    version: int
    local: bool
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    length: int


def starts_like_header(data: bytes) -> bool | None:
    """True if ``data`` starts with a whole v1 or v2 signature, False if it cannot, None
    when too few bytes have come to tell (``b"PRO"``, ``b"\\r\\n"``, ``b""``)."""
    if PROXY_V2_SIGNATURE.startswith(data[: len(PROXY_V2_SIGNATURE)]):
        return True if len(data) >= len(PROXY_V2_SIGNATURE) else None
    if PROXY_V1_SIGNATURE.startswith(data[: len(PROXY_V1_SIGNATURE)]):
        return True if len(data) >= len(PROXY_V1_SIGNATURE) else None
    return False


def parse(data: bytes) -> ProxyHeader | None:
    """Parse the header at the start of ``data``; the bytes after ``length`` are the client's.

    Returns None while the bytes are a proper prefix of a valid header: call again with more.
    Raises `ProxyHeaderError` as soon as they cannot begin one: no signature, a bad version,
    command, family or protocol, a v1 line with no CRLF in `MAX_V1_LENGTH` bytes or with bad
    fields, a v2 address block over `MAX_V2_BLOCK_LENGTH` or too short for its family, a TLV
    running past the block. Once parse has returned a header or raised, more data never
    changes the answer.

    v2 over UDP (DGRAM) is refused: this is a TCP server, and a datagram's header would name
    a client that is not the one on this connection. A LOCAL header's address block is
    skipped unread, TLVs and family included, as the spec says.
    """
    if PROXY_V2_SIGNATURE.startswith(data[: len(PROXY_V2_SIGNATURE)]):
        return _parse_v2(data)
    if PROXY_V1_SIGNATURE.startswith(data[: len(PROXY_V1_SIGNATURE)]):
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY v1 or v2 signature")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end >= 0:
        line = data[:end]
    else:
        line = data[:MAX_V1_LENGTH]
        # A CR at the end may be the first half of the CRLF, its LF still to come.
        line = line.removesuffix(b"\r")
    # The spec: "must not tolerate a single CR or LF character to end the line".
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("PROXY v1: CR or LF alone in the line")
    if end < 0:
        if len(data) >= MAX_V1_LENGTH:
            raise ProxyHeaderError("PROXY v1: no CRLF within 107 bytes")
        return None
    fields = line.split(b" ")  # single spaces only: a double space makes an empty field
    if fields[1] == b"UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(version=1, local=True, source=None, destination=None, length=end + 2)
    if fields[1] == b"TCP4":
        version = 4
    elif fields[1] == b"TCP6":
        version = 6
    else:
        raise ProxyHeaderError("PROXY v1: protocol not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError("PROXY v1: not 4 fields after the protocol, one space apart")
    source = (_v1_host(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_host(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(
        version=1, local=False, source=source, destination=destination, length=end + 2
    )


def _v1_host(text: bytes, version: int) -> str:
    try:
        # ipaddress refuses IPv4's leading zeros (octal or not, the spec forbids them) but
        # takes IPv6 scope ids ("fe80::1%eth0"), which are not addresses on the wire.
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        address = None
    if address is None or address.version != version or b"%" in text:
        raise ProxyHeaderError(f"PROXY v1: bad TCP{version} address")
    return str(address)


def _v1_port(text: bytes) -> int:
    # bytes.isdigit is ASCII only, so no sign, space or other script's digits get through.
    if not text.isdigit() or len(text) > 5 or (text.startswith(b"0") and text != b"0"):
        raise ProxyHeaderError("PROXY v1: bad port")
    port = int(text)
    if port > _MAX_PORT:
        raise ProxyHeaderError("PROXY v1: bad port")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    # Each fixed byte is checked as soon as it arrives, so garbage is refused early.
    if len(data) <= len(PROXY_V2_SIGNATURE):
        return None
    version, command = data[12] >> 4, data[12] & 0xF
    if version != 2:
        raise ProxyHeaderError(f"PROXY v2: bad version {version:#x}")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2: unknown command {command:#x}")
    if len(data) < 14:
        return None
    family, protocol = data[13] >> 4, data[13] & 0xF
    if command == _PROXY:
        _check_family_and_protocol(family, protocol)
    if len(data) < V2_FIXED_LENGTH:
        return None
    block_length = int.from_bytes(data[14:16], "big")
    if block_length > MAX_V2_BLOCK_LENGTH:
        raise ProxyHeaderError(
            f"PROXY v2: address block of {block_length} bytes, over the "
            f"{MAX_V2_BLOCK_LENGTH}-byte cap"
        )
    length = V2_FIXED_LENGTH + block_length
    if len(data) < length:
        return None
    if command == _LOCAL or _UNSPEC in (family, protocol):
        # The spec: LOCAL is the proxy's own connection (a health check); for an unspecified
        # family or protocol the receiver "should ignore address information".
        return ProxyHeader(version=2, local=True, source=None, destination=None, length=length)
    return _parse_v2_addresses(family, data[V2_FIXED_LENGTH:length], length)


def _check_family_and_protocol(family: int, protocol: int) -> None:
    if family > _AF_UNIX:
        raise ProxyHeaderError(f"PROXY v2: unknown address family {family:#x}")
    if protocol > _DGRAM:
        raise ProxyHeaderError(f"PROXY v2: unknown transport protocol {protocol:#x}")
    if protocol == _DGRAM and family != _AF_UNSPEC:
        raise ProxyHeaderError("PROXY v2: datagram (UDP) transport on a TCP server")


def _parse_v2_addresses(family: int, block: bytes, length: int) -> ProxyHeader:
    size = {_AF_INET: _INET.size, _AF_INET6: _INET6.size}.get(family, _UNIX_ADDRESSES_LENGTH)
    if len(block) < size:
        raise ProxyHeaderError(
            f"PROXY v2: address block of {len(block)} bytes too short for {_FAMILY_NAMES[family]}"
        )
    source: Address | None = None
    destination: Address | None = None
    if family != _AF_UNIX:
        layout = _INET if family == _AF_INET else _INET6
        source_host, destination_host, source_port, destination_port = layout.unpack_from(block)
        source = (str(ipaddress.ip_address(source_host)), source_port)
        destination = (str(ipaddress.ip_address(destination_host)), destination_port)
    return ProxyHeader(
        version=2,
        local=False,
        source=source,
        destination=destination,
        tlvs=_parse_tlvs(block[size:]),
        length=length,
    )


def _parse_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 0
    while offset < len(block):
        if offset + _TLV_HEADER.size > len(block):
            raise ProxyHeaderError("PROXY v2: TLV header runs past the address block")
        kind, size = _TLV_HEADER.unpack_from(block, offset)
        offset += _TLV_HEADER.size
        if offset + size > len(block):
            raise ProxyHeaderError(f"PROXY v2: TLV {kind:#04x} runs past the address block")
        tlvs.append((kind, block[offset : offset + size]))
        offset += size
    return tuple(tlvs)


def _endpoints(source: Address, destination: Address) -> tuple[IPAddress, IPAddress]:
    """Both addresses, in one family. Like HAProxy, IPv4 beside IPv6 is sent IPv4-mapped.
    Raises ValueError for a host that is not an IP address or a port out of range."""
    addresses = []
    for host, port in (source, destination):
        address = ipaddress.ip_address(host)
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            raise ValueError(f"a PROXY header cannot carry a scope id: {host!r}")
        if not 0 <= port <= _MAX_PORT:
            raise ValueError(f"port out of range: {port}")
        addresses.append(address)
    first, second = addresses
    if first.version != second.version:
        first, second = _as_ipv6(first), _as_ipv6(second)
    return first, second


def _as_ipv6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def encode_v1(source: Address, destination: Address) -> bytes:
    """``PROXY TCP4 ...\\r\\n`` or ``PROXY TCP6 ...\\r\\n`` by the addresses' family.

    Raises ValueError for a host that is not an IP address (or has a scope id) or a port
    out of range.
    """
    source_host, destination_host = _endpoints(source, destination)
    protocol = "TCP4" if source_host.version == 4 else "TCP6"
    line = f"PROXY {protocol} {source_host} {destination_host} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A v2 PROXY (TCP over IPv4 or IPv6) header, or LOCAL when both addresses are None, then
    ``tlvs`` in order (HAProxy sends its TLVs after a LOCAL header too; `parse` skips them).

    Raises ValueError for one address without the other, a bad host or port, a TLV type
    outside 0-255, or a block over the format's 65,535 bytes (`parse` takes only up to
    `MAX_V2_BLOCK_LENGTH`).
    """
    tlv_bytes = b"".join(_encode_tlv(kind, value) for kind, value in tlvs)
    if source is None and destination is None:
        command_byte, family_byte, addresses = 0x20 | _LOCAL, 0x00, b""
    elif source is None or destination is None:
        raise ValueError("encode_v2 needs both addresses, or neither for LOCAL")
    else:
        source_host, destination_host = _endpoints(source, destination)
        ipv4 = source_host.version == 4
        command_byte = 0x20 | _PROXY
        family_byte = ((_AF_INET if ipv4 else _AF_INET6) << 4) | _STREAM
        layout = _INET if ipv4 else _INET6
        addresses = layout.pack(
            source_host.packed, destination_host.packed, source[1], destination[1]
        )
    block = addresses + tlv_bytes
    if len(block) > 0xFFFF:
        raise ValueError(f"PROXY v2 address block of {len(block)} bytes over 65535")
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", command_byte, family_byte, len(block)) + block


def _encode_tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF:
        raise ValueError(f"TLV type out of range: {kind}")
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV value of {len(value)} bytes over 65535")
    return _TLV_HEADER.pack(kind, len(value)) + value
