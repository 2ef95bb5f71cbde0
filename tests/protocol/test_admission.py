"""Admission: access lists and connection limits, decided on addresses and counts alone."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpecho.protocol import AccessList, Admission, CloseReason, parse_network
from tcpecho.protocol.admission import client_address


def networks(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(parse_network(text) for text in texts)


def test_deny_wins_over_allow_on_ipv4_and_ipv6() -> None:
    access = AccessList(
        allow=networks("10.0.0.0/8", "2001:db8::/32"), deny=networks("10.1.0.0/16", "2001:db8::1")
    )
    admission = Admission(access=access)
    assert admission.admit("10.2.3.4") is None
    assert admission.admit("2001:db8::2") is None
    assert admission.admit("10.1.2.3") is CloseReason.REFUSED_DENIED
    assert admission.admit("2001:db8::1") is CloseReason.REFUSED_DENIED
    assert admission.admit("192.0.2.1") is CloseReason.REFUSED_DENIED  # not allowed
    assert admission.active == 2


def test_an_ipv4_mapped_ipv6_peer_is_judged_as_its_ipv4_address() -> None:
    admission = Admission(access=AccessList(deny=networks("192.0.2.0/24")))
    assert client_address("::ffff:192.0.2.7") == ipaddress.IPv4Address("192.0.2.7")
    assert admission.admit("::ffff:192.0.2.7") is CloseReason.REFUSED_DENIED


def test_a_denied_client_learns_nothing_not_even_that_the_server_is_busy() -> None:
    admission = Admission(max_connections=1, access=AccessList(deny=networks("192.0.2.9")))
    assert admission.admit("127.0.0.1") is None
    assert admission.admit("192.0.2.9") is CloseReason.REFUSED_DENIED
    assert admission.admit("127.0.0.2") is CloseReason.REFUSED_BUSY


def test_per_address_limit_counts_each_address_apart_and_release_frees_a_place() -> None:
    admission = Admission(max_connections=10, max_per_address=2)
    assert admission.admit("127.0.0.1") is None
    assert admission.admit("127.0.0.1") is None
    assert admission.admit("127.0.0.1") is CloseReason.REFUSED_PER_ADDRESS
    assert admission.admit("127.0.0.2") is None
    admission.release("127.0.0.1")
    assert admission.admit("127.0.0.1") is None
    assert admission.connections_from("127.0.0.1") == 2


def test_a_stopping_server_refuses_everyone_but_the_denied_get_no_reason() -> None:
    admission = Admission(access=AccessList(deny=networks("192.0.2.0/24")))
    assert admission.admit("127.0.0.1", stopping=True) is CloseReason.REFUSED_STOPPING
    assert admission.admit("192.0.2.1", stopping=True) is CloseReason.REFUSED_DENIED


@pytest.mark.parametrize("text", ["10.0.0.0/33", "not-an-address", "", "1.2.3.4/"])
def test_a_bad_network_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"does not appear to be an IPv4 or IPv6|not a valid"):
        parse_network(text)


addresses = st.integers(0, 7).map(lambda n: f"10.0.0.{n}")
operations = st.lists(st.tuples(st.booleans(), addresses), max_size=60)


@given(operations, st.integers(1, 6), st.integers(0, 3))
def test_the_limits_hold_under_any_sequence_of_connects_and_closes(
    ops: list[tuple[bool, str]], max_connections: int, max_per_address: int
) -> None:
    """Against a plain model: admitted while under both limits, refused with the right reason
    otherwise, and the counts never pass the limits."""
    admission = Admission(max_connections, max_per_address)
    open_now: list[str] = []
    for connect, host in ops:
        if not connect:
            if host in open_now:
                open_now.remove(host)
                admission.release(host)
            continue
        if len(open_now) >= max_connections:
            expected: CloseReason | None = CloseReason.REFUSED_BUSY
        elif max_per_address and open_now.count(host) >= max_per_address:
            expected = CloseReason.REFUSED_PER_ADDRESS
        else:
            expected = None
        assert admission.admit(host) is expected
        if expected is None:
            open_now.append(host)
        assert admission.active == len(open_now) <= max_connections
        assert admission.connections_from(host) == open_now.count(host)


ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
ipv4_nets = st.tuples(ipv4, st.integers(0, 32)).map(
    lambda t: ipaddress.IPv4Network((t[0], t[1]), strict=False)
)


@given(st.lists(ipv4_nets, max_size=4), st.lists(ipv4_nets, max_size=4), ipv4)
def test_permits_is_deny_first_then_allow_if_any(
    allow: list[ipaddress.IPv4Network],
    deny: list[ipaddress.IPv4Network],
    address: ipaddress.IPv4Address,
) -> None:
    access = AccessList(allow=tuple(allow), deny=tuple(deny))
    in_deny = any(int(n.network_address) <= int(address) <= int(n.broadcast_address) for n in deny)
    in_allow = any(
        int(n.network_address) <= int(address) <= int(n.broadcast_address) for n in allow
    )
    assert access.permits(address) == (not in_deny and (not allow or in_allow))


def test_ipv6_clients_are_counted_per_64_by_default_and_per_address_at_128() -> None:
    per_64 = Admission(max_connections=10, max_per_address=1)
    assert per_64.admit("2001:db8:1:2::1") is None
    assert per_64.admit("2001:db8:1:2::ffff") is CloseReason.REFUSED_PER_ADDRESS
    assert per_64.admit("2001:db8:1:3::1") is None  # another /64
    per_64.release("2001:db8:1:2::1")
    assert per_64.admit("2001:db8:1:2::ffff") is None
    per_address = Admission(max_connections=10, max_per_address=1, ipv6_prefix=128)
    assert per_address.admit("2001:db8:1:2::1") is None
    assert per_address.admit("2001:db8:1:2::ffff") is None
    assert per_address.admit("2001:db8:1:2::1") is CloseReason.REFUSED_PER_ADDRESS
