"""Which addresses the platform may send webhooks to: public ones, and networks an operator allows.

A webhook URL is checked twice. When it is given (a notification's `webhook_url`, a
user's), every address its host resolves to must be allowed, or the request gets a 422
naming the field. When a try is sent, the address actually connected to is checked again
before a byte goes out (tasks/webhook.py): a name that resolved to a public address at
validation and to an internal one later (DNS rebinding) is refused then.

Refused unless inside WEBHOOK_ALLOWED_NETWORKS: loopback, private (RFC 1918, unique local),
link-local (which holds the cloud metadata address 169.254.169.254), multicast, reserved,
unspecified, shared (100.64/10), and every other address not globally routable.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A name resolved at validation is trusted this long: a burst of notifications to one
# receiver asks the resolver once.
RESOLVE_CACHE_SECONDS = 60.0


class RefusedAddress(Exception):
    """The destination is not one the platform may send to."""


@functools.lru_cache(maxsize=8)
def parse_networks(raw: str) -> tuple[Network, ...]:
    """WEBHOOK_ALLOWED_NETWORKS: comma-separated CIDRs (`127.0.0.0/8, ::1/128`)."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",")
                 if part.strip())  # fmt: skip


def allowed(address: str | IPAddress, networks: Iterable[Network] = ()) -> bool:
    """Whether the platform may connect to `address`."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    if any(ip in net for net in networks):
        return True
    return ip.is_global and not ip.is_multicast


@functools.lru_cache(maxsize=1024)
def _resolve(host: str, port: int, _bucket: int) -> tuple[str, ...]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(info[4][0] for info in infos))


def resolve(host: str, port: int) -> tuple[str, ...]:
    """Every address `host` resolves to (cached for RESOLVE_CACHE_SECONDS)."""
    return _resolve(host, port, int(time.monotonic() // RESOLVE_CACHE_SECONDS))


def check_url(url: str, networks: Iterable[Network] = ()) -> None:
    """Raise RefusedAddress when `url`'s host resolves to an address not allowed.

    A host that does not resolve now is let through: it may resolve by the time of the
    try, which checks the address it connects to anyway.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise RefusedAddress("has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RefusedAddress("has an invalid port") from exc
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError):
        return
    if not all(allowed(a, networks) for a in addresses):
        raise RefusedAddress(
            "points at an address the platform does not send to (loopback, private, "
            "link-local, multicast or reserved); an operator can allow networks with "
            "WEBHOOK_ALLOWED_NETWORKS"
        )
