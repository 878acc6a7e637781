"""SSRF guard for the URLs clients hand us: init images to fetch, webhooks to POST to.

A URL passes when it is http(s) and every address its host resolves to is a public unicast
address, unless the host, or a CIDR holding its address, is in DARKROOM_URL_ALLOWLIST.
"""

from __future__ import annotations

import ipaddress
import socket
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


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UnsafeURLError(f"the host {host} cannot be resolved") from None
    found = {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}
    return tuple(sorted(found, key=str))


def _allowed(host: str, address: IPAddress, allowlist: list[str]) -> bool:
    if host.lower() in (entry.lower() for entry in allowlist):
        return True
    if any(address in network for network in _networks(allowlist)):
        return True
    return _is_public(address)


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
