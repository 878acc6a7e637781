"""The SSRF guard. check_url only resolves: literal IPs and /etc/hosts names never leave the box."""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any

import httpx
import pytest

from darkroom import urlguard
from darkroom.urlguard import UnsafeURLError, check_url
from tests.support.servers import WebhookReceiver

PUBLIC = "93.184.216.34"


def test_public_literal_ip_passes() -> None:
    checked = check_url(f"http://{PUBLIC}/hook?x=1", [])
    assert checked.url == f"http://{PUBLIC}/hook?x=1"
    assert checked.host == PUBLIC
    assert checked.port == 80
    assert checked.addresses == (ipaddress.ip_address(PUBLIC),)


def test_https_default_and_explicit_ports() -> None:
    assert check_url(f"https://{PUBLIC}/", []).port == 443
    assert check_url(f"https://{PUBLIC}:8443/", []).port == 8443
    v6 = check_url("http://[2606:2800:220:1:248:1893:25c8:1946]:81/", [])
    assert v6.port == 81
    assert v6.addresses == (ipaddress.ip_address("2606:2800:220:1:248:1893:25c8:1946"),)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.1.2.3:8080/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://[ff02::1]/",
        "http://localhost/",
        "https://127.0.0.1:443/",
    ],
)
def test_non_public_addresses_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURLError, match="non-public address"):
        check_url(url, [])


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://{PUBLIC}/file",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        f"//{PUBLIC}/",
        "http:///path-only",
        "not a url",
    ],
)
def test_other_schemes_and_hostless_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURLError, match="only http and https"):
        check_url(url, [])


def test_allowlist_by_cidr() -> None:
    assert check_url("http://127.0.0.1:9000/", ["127.0.0.1/32"]).port == 9000
    assert check_url("http://10.1.2.3/", ["10.0.0.0/8"]).host == "10.1.2.3"
    assert check_url("http://[::1]/", ["::1/128"]).addresses == (ipaddress.ip_address("::1"),)
    with pytest.raises(UnsafeURLError):
        check_url("http://127.0.0.2/", ["127.0.0.1/32"])
    with pytest.raises(UnsafeURLError):
        check_url("http://10.0.0.1/", ["192.168.0.0/16"])


def test_allowlist_by_host_name() -> None:
    # localhost comes from /etc/hosts: no DNS query is sent.
    checked = check_url("http://localhost:8000/hook", ["LocalHost"])
    assert checked.host == "localhost"
    assert all(address.is_loopback for address in checked.addresses)
    with pytest.raises(UnsafeURLError):
        check_url("http://localhost:8000/hook", ["otherhost", "10.0.0.0/8"])
    # A name on the list does not allow other hosts by address.
    with pytest.raises(UnsafeURLError):
        check_url("http://127.0.0.1/", ["localhost"])


@pytest.mark.parametrize("url", [f"http://{PUBLIC}:99999/", f"http://{PUBLIC}:abc/"])
def test_bad_port_is_an_unsafe_url(url: str) -> None:
    with pytest.raises(UnsafeURLError):
        check_url(url, [])


def test_pinned_request_targets_the_checked_address_and_keeps_the_host() -> None:
    checked = check_url("https://localhost:8443/a/b?c=1", ["localhost"])
    pinned = checked.pinned()
    assert pinned.url in ("https://127.0.0.1:8443/a/b?c=1", "https://[::1]:8443/a/b?c=1")
    assert pinned.host_header == "localhost:8443"
    assert pinned.extensions == {"sni_hostname": "localhost"}


def test_pinned_http_request_reaches_the_checked_address(receiver: WebhookReceiver) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    checked = check_url(f"http://localhost:{port}/hook", ["localhost", "127.0.0.1/32", "::1/128"])
    pinned = checked.pinned()
    if "[::1]" in pinned.url:
        pytest.skip("localhost resolved to ::1 first; the receiver listens on 127.0.0.1 only")
    response = httpx.post(pinned.url, content=b"{}", headers={"host": pinned.host_header})
    assert response.status_code == 200
    [seen] = receiver.snapshot()
    assert seen.headers["host"] == f"localhost:{port}"


class _Resolver:
    """socket.getaddrinfo answering each name from `answers` (changeable), counting calls."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, host: str, port: int, *_args: Any, **_kwargs: Any) -> Any:
        self.asked.append(host)
        address = self.answers[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> _Resolver:
    fake = _Resolver({"hooks.example": PUBLIC, "other.example": PUBLIC})
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(urlguard, "_resolved", {})
    return fake


def test_a_resolution_is_reused_briefly_for_the_same_name_only(resolver: _Resolver) -> None:
    check_url("http://hooks.example/a", [])
    check_url("https://hooks.example/b", [])  # another port: resolved on its own
    check_url("http://hooks.example/c", [])
    check_url("http://other.example/a", [])
    assert resolver.asked == ["hooks.example", "hooks.example", "other.example"]


def test_a_reused_resolution_is_still_checked_against_the_allowlist(resolver: _Resolver) -> None:
    resolver.answers["hooks.example"] = "10.0.0.7"
    assert check_url("http://hooks.example/", ["10.0.0.0/8"]).addresses == (
        ipaddress.ip_address("10.0.0.7"),
    )
    with pytest.raises(UnsafeURLError, match="non-public"):
        check_url("http://hooks.example/", [])
    assert resolver.asked == ["hooks.example"]


def test_a_rebound_name_is_refused_once_its_short_reuse_ends(
    resolver: _Resolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether an answer is reused or fresh, the request is pinned to an address that passed:
    # a name rebound to a private address is refused as soon as the new answer is used.
    monkeypatch.setattr(urlguard, "RESOLVED_REUSE_S", 0.3)
    assert check_url("http://hooks.example/", []).addresses == (ipaddress.ip_address(PUBLIC),)
    resolver.answers["hooks.example"] = "127.0.0.1"
    assert check_url("http://hooks.example/", []).pinned().url == f"http://{PUBLIC}:80/"
    time.sleep(0.35)
    with pytest.raises(UnsafeURLError, match="non-public"):
        check_url("http://hooks.example/", [])
    assert resolver.asked == ["hooks.example", "hooks.example"]


def test_a_failed_resolution_is_not_kept(resolver: _Resolver) -> None:
    del resolver.answers["hooks.example"]

    def refuse(host: str, *_args: Any, **_kwargs: Any) -> Any:
        resolver.asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no such name")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        with pytest.raises(UnsafeURLError, match="cannot be resolved"):
            check_url("http://hooks.example/", [])
    resolver.answers["hooks.example"] = PUBLIC
    assert check_url("http://hooks.example/", []).host == "hooks.example"
    assert resolver.asked == ["hooks.example", "hooks.example"]
