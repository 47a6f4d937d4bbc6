"""This machine's addresses as `ip -j address` reports them, read in a namespace of the test's own."""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Address, IPv6Address

import pytest

from kvmconf.errors import KvmconfError
from kvmconf.interfaces import interface_addresses, parse_addresses


def test_each_interface_with_its_ipv4_and_ipv6_addresses(netns: str) -> None:
    ip = ["ip", "-n", netns]
    assert interface_addresses(netns) == {"lo": set()}  # a new namespace: loopback down, no address
    subprocess.run([*ip, "link", "add", "uplink0", "type", "veth", "peer", "name", "peer0"], check=True)
    subprocess.run([*ip, "address", "add", "192.0.2.7/24", "dev", "uplink0"], check=True)
    # nodad: without it the address stays "tentative" (still listed) until duplicate detection ends
    subprocess.run([*ip, "address", "add", "2001:db8::7/64", "dev", "uplink0", "nodad"], check=True)
    assert interface_addresses(netns) == {"lo": set(), "peer0": set(),
                                         "uplink0": {IPv4Address("192.0.2.7"), IPv6Address("2001:db8::7")}}


def test_reachable_only_leaves_out_loopback_and_link_local_addresses(netns: str) -> None:
    # fab kvm-setup refuses to make an interface with an address a bridge port: the fe80:: one that every interface
    # has once up, and loopback's, are no address the host is reached at.
    ip = ["ip", "-n", netns]
    subprocess.run([*ip, "link", "set", "lo", "up"], check=True)
    subprocess.run([*ip, "link", "add", "uplink0", "type", "veth", "peer", "name", "peer0"], check=True)
    subprocess.run([*ip, "address", "add", "192.0.2.7/24", "dev", "uplink0"], check=True)
    subprocess.run([*ip, "address", "add", "fe80::7/64", "dev", "uplink0", "nodad"], check=True)
    shown = subprocess.run([*ip, "-j", "address", "show"], check=True, capture_output=True, text=True).stdout
    assert parse_addresses(shown) == {"lo": {IPv4Address("127.0.0.1"), IPv6Address("::1")}, "peer0": set(),
                                      "uplink0": {IPv4Address("192.0.2.7"), IPv6Address("fe80::7")}}
    assert parse_addresses(shown, reachable_only=True) == {"lo": set(), "peer0": set(),
                                                           "uplink0": {IPv4Address("192.0.2.7")}}


def test_a_failing_ip_command_is_an_error_with_what_it_said() -> None:
    with pytest.raises(KvmconfError) as failed:
        interface_addresses("kvmconf-no-such-netns")
    assert str(failed.value) == ("`ip -n kvmconf-no-such-netns -j address show` failed with exit status 255:"
                                 ' Cannot open network namespace "kvmconf-no-such-netns": No such file or directory')
