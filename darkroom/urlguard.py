"""SSRF guard for the URLs clients hand us: init images to fetch, webhooks to POST to.

A URL passes when it is http(s) and every address its host resolves to is a public unicast
address, unless the host, or a CIDR holding its address, is in DARKROOM_URL_ALLOWLIST.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURLError(ValueError):
    """The URL may not be fetched or posted to; the message says why, for the client."""


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the guard, with the addresses it was checked against."""

    url: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]

    def pinned(self) -> PinnedRequest:
        """The request aimed at the checked address itself, so no second DNS answer is used.

        Resolving again at connect time would let a host pass the check and then point at a
        private address (DNS rebinding). The URL gets the address; `Host` and, for https, the
        TLS server name (which certificate verification uses) keep the original host.
        """
        parts = urlsplit(self.url)
        address = self.addresses[0]
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{literal}:{self.port}"
        host_header = parts.netloc.rpartition("@")[2]
        extensions = {"sni_hostname": self.host} if parts.scheme == "https" else {}
        return PinnedRequest(parts._replace(netloc=netloc).geturl(), host_header, extensions)


@dataclass(frozen=True)
class PinnedRequest:
    """What an HTTP client needs to reach a checked URL at its checked address."""

    url: str
    host_header: str
    extensions: dict[str, str]


def check_url(url: str, allowlist: list[str]) -> CheckedURL:
    """Resolve `url`'s host and refuse it unless every address is public or allow-listed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURLError("only http and https URLs are accepted")
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # urlsplit refuses ports like ':99999' or ':abc' only when asked
        raise UnsafeURLError("the URL's port is not a number from 1 to 65535") from None
    addresses = _resolve(host, port)
    for address in addresses:
        if not _allowed(host, address, allowlist):
            raise UnsafeURLError(f"the host {host} resolves to a non-public address")
    return CheckedURL(url=url, host=host, port=port, addresses=addresses)


#: How long a successful resolution is reused for the same host name and port. Safe because
#: what protects against DNS rebinding is pinning, not resolving often: every address used is
#: one that the check (run on every call, cached answer or not) passed, and the request goes to
#: that address, never to a fresh answer. Reuse only makes an answer up to this old, as any
#: resolver cache does, and never lends it to another name. Failures are not kept. A webhook
#: attempt resolved its receiver's host per attempt: a resolver query per POST to one host.
RESOLVED_REUSE_S = 1.0
#: Resolutions kept at most; past it, the whole store is dropped (it refills within a second).
RESOLVED_KEPT = 256
_resolved: dict[tuple[str, int], tuple[float, tuple[IPAddress, ...]]] = {}


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    key = (host, port)
    now = time.monotonic()
    kept = _resolved.get(key)
    if kept is not None and kept[0] > now:
        return kept[1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UnsafeURLError(f"the host {host} cannot be resolved") from None
    found = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    addresses = tuple(sorted(found, key=str))
    if len(_resolved) >= RESOLVED_KEPT:
        _resolved.clear()
    _resolved[key] = (now + RESOLVED_REUSE_S, addresses)
    return addresses


def _allowed(host: str, address: IPAddress, allowlist: list[str]) -> bool:
    names, networks = _allowlist(tuple(allowlist))
    if host.lower() in names:
        return True
    if any(address in network for network in networks):
        return True
    return _is_public(address)


@functools.lru_cache(maxsize=16)
def _allowlist(
    allowlist: tuple[str, ...],
) -> tuple[frozenset[str], tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]:
    """The allow-list's entries as lower-case names and as networks, parsed once per list
    (each attempt parsed them again, for each address)."""
    return frozenset(entry.lower() for entry in allowlist), tuple(_networks(list(allowlist)))


#: Ranges that Python's `is_global` (3.11) counts as global but that reach no public host:
#: IPv6 site-local (deprecated, still routed inside some sites), the IPv6 documentation
#: prefix of RFC 9637, and the deprecated 6to4 relay anycast prefix.
_NOT_PUBLIC = tuple(
    ipaddress.ip_network(cidr) for cidr in ("fec0::/10", "3fff::/20", "192.88.99.0/24")
)


def _is_public(address: IPAddress) -> bool:
    """Global unicast only. An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4) is
    judged by that IPv4 address too: 2002:7f00:1:: reaches 127.0.0.1 through a 6to4 relay."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return _is_public(address.ipv4_mapped)
        if address.sixtofour is not None and not _is_public(address.sixtofour):
            return False
        if address.is_site_local:
            return False
    if any(address in network for network in _NOT_PUBLIC):
        return False
    return address.is_global and not address.is_multicast and not address.is_reserved


def _networks(allowlist: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for entry in allowlist:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue  # a host name, matched by name above
    return networks
