"""Who may connect: access lists and connection limits, decided on addresses and counts alone.

Pure: no sockets, no clock. An engine asks `Admission.admit` for every accepted connection,
and calls `Admission.release` when an admitted one ends.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import Counter
from dataclasses import dataclass

from tcpecho.protocol.session import CloseReason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A thread costs about 25 KiB plus its stack; an asyncio connection a few KiB. This bound keeps
# a flood of clients from exhausting descriptors or memory; raise it for load tests.
DEFAULT_MAX_CONNECTIONS = 1024
# One address may hold at most this many connections, so a single host cannot take every slot
# of --max-connections from everyone else. Generous for people and for NAT; a load test from one
# host, or a proxy that does not send the PROXY protocol, needs it raised (0: no limit).
DEFAULT_MAX_PER_ADDRESS = 256
# An IPv6 host usually has a whole /64 to itself (one per home or per VM): counted address by
# address, one client could take 256 places from each of its 2^64 addresses. So IPv6 clients
# are counted per /64 network by default (128: per address).
DEFAULT_IPV6_PREFIX = 64


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32`` or a single address. Raises ValueError.

    Host bits are allowed (``10.1.2.3/8`` means ``10.0.0.0/8``), as in most firewalls.
    """
    return ipaddress.ip_network(text.strip(), strict=False)


# Parsing an address costs ipaddress about 6 µs; clients mostly come back from the same few.
@functools.lru_cache(maxsize=4096)
def client_address(host: str) -> IPAddress | None:
    """The address a peer's host string names; IPv4-mapped IPv6 as plain IPv4. None when it
    is not an IP address at all."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class AccessList:
    """``deny`` wins over ``allow``; an empty ``allow`` allows every address not denied."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    def permits(self, address: IPAddress) -> bool:
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)


class Admission:
    """Counts admitted connections, in all and per address, and refuses those over a limit.

    Not thread-safe: a threaded caller holds its own lock around `admit` and `release`.
    """

    def __init__(
        self,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
        access: AccessList | None = None,
        trusted_proxies: tuple[Network, ...] = (),
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.access = access or AccessList()
        self.trusted_proxies = trusted_proxies
        self.ipv6_prefix = ipv6_prefix
        self.active = 0
        self._per_address: Counter[str] = Counter()

    def is_trusted_proxy(self, host: str) -> bool:
        """May ``host`` send a PROXY protocol header (``--proxy-trusted``)?"""
        address = client_address(host)
        return address is not None and any(address in net for net in self.trusted_proxies)

    def admit(
        self, host: str, *, stopping: bool = False, proxy: bool = False
    ) -> CloseReason | None:
        """Admit a client from ``host`` (and count it), or say why not.

        A denied address is refused before anything else: it learns nothing, not even that
        the server is busy. ``proxy``: ``host`` is a trusted proxy, whose connections carry
        other clients; only the total counts now, the rest once the client is known
        (`admit_client`).
        """
        address = client_address(host)
        if not proxy and address is not None and not self.access.permits(address):
            return CloseReason.REFUSED_DENIED
        if stopping:
            return CloseReason.REFUSED_STOPPING
        if self.active >= self.max_connections:
            return CloseReason.REFUSED_BUSY
        if not proxy:
            refusal = self._count(host, address)
            if refusal is not None:
                return refusal
        self.active += 1
        return None

    def admit_client(self, host: str) -> CloseReason | None:
        """A connection admitted from a proxy names its real client, ``host``: the access
        list and the per-address limit apply to it (counted until `release(host)`)."""
        address = client_address(host)
        if address is not None and not self.access.permits(address):
            return CloseReason.REFUSED_DENIED
        return self._count(host, address)

    def _key(self, host: str, address: IPAddress | None) -> str:
        """What the per-address limit counts a client under: its IPv4 address, its IPv6
        network (``ipv6_prefix``), or the host string when it is no IP address."""
        if address is None:
            return host
        if isinstance(address, ipaddress.IPv6Address) and self.ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False))
        return str(address)

    def _count(self, host: str, address: IPAddress | None) -> CloseReason | None:
        key = self._key(host, address)
        if self.max_per_address and self._per_address[key] >= self.max_per_address:
            return CloseReason.REFUSED_PER_ADDRESS
        self._per_address[key] += 1
        return None

    def release(self, host: str | None) -> None:
        """An admitted client is gone: ``host`` is the address it was counted under (None:
        a proxy's connection whose client was never counted)."""
        self.active -= 1
        if host is None:
            return
        address = client_address(host)
        key = self._key(host, address)
        self._per_address[key] -= 1
        if self._per_address[key] <= 0:
            del self._per_address[key]

    def connections_from(self, host: str) -> int:
        return self._per_address[self._key(host, client_address(host))]
