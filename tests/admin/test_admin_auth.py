"""The dashboard's access rules, without a server: loopback check, token forms, cookie signing."""

from __future__ import annotations

import base64

import pytest

from node.admin.auth import (
    allowed_hosts,
    authenticate,
    check_bind,
    host_allowed,
    is_loopback,
    is_public,
    make_session_cookie,
    request_host,
    same_origin,
)
from node.config import AdminSettings
from node.errors import ConfigError


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("dashboard.example.org", False),
    ],
)
def test_is_loopback(address: str, expected: bool) -> None:
    assert is_loopback(address) is expected


def test_non_loopback_without_token_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"admin\.token"):
        check_bind(AdminSettings(bind_address="0.0.0.0"))
    with pytest.raises(ConfigError, match=r"admin\.token"):
        check_bind(AdminSettings(bind_address="10.0.0.5", token="   "))


def test_loopback_without_token_and_any_bind_with_token_are_allowed() -> None:
    check_bind(AdminSettings(bind_address="127.0.0.1"))
    check_bind(AdminSettings(bind_address="0.0.0.0", token="s3cret"))


def test_no_token_configured_lets_everything_in() -> None:
    assert authenticate(None, None, None) is not None


def test_bearer_basic_and_cookie_are_accepted_wrong_ones_are_not() -> None:
    token = "s3cret-token"
    assert authenticate(token, None, None) is None
    assert authenticate(token, f"Bearer {token}", None).method == "bearer"  # type: ignore[union-attr]
    assert authenticate(token, "Bearer wrong", None) is None
    basic = base64.b64encode(f"alice:{token}".encode()).decode()
    identity = authenticate(token, f"Basic {basic}", None)
    assert identity is not None and identity.name == "alice" and identity.method == "basic"
    bad_basic = base64.b64encode(b"alice:nope").decode()
    assert authenticate(token, f"Basic {bad_basic}", None) is None
    assert authenticate(token, "Basic !!!notbase64", None) is None
    cookie = make_session_cookie(token, "bob")
    identity = authenticate(token, None, cookie)
    assert identity is not None and identity.name == "bob" and identity.method == "cookie"


def test_cookie_is_bound_to_the_token_and_the_name() -> None:
    cookie = make_session_cookie("old-token", "bob")
    assert authenticate("new-token", None, cookie) is None
    forged = make_session_cookie("s3cret", "bob").replace(
        base64.urlsafe_b64encode(b"bob").decode().rstrip("="),
        base64.urlsafe_b64encode(b"eve").decode().rstrip("="),
    )
    assert authenticate("s3cret", None, forged) is None
    # The cookie is not the token: it cannot be replayed as a Bearer credential.
    assert "s3cret" not in cookie


def test_public_paths() -> None:
    assert is_public("/healthz") and is_public("/login") and is_public("/static/site.css")
    assert not is_public("/") and not is_public("/metrics") and not is_public("/series/1.2.3")


def test_same_origin() -> None:
    assert same_origin(None, "127.0.0.1:8080")
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("https://Node.example:8443", "node.example:8443")
    assert not same_origin("http://evil.example", "127.0.0.1:8080")
    assert not same_origin("http://127.0.0.1:9999", "127.0.0.1:8080")
    assert not same_origin("null", "127.0.0.1:8080")


@pytest.mark.parametrize(("header", "host"), [
    ("127.0.0.1:8080", "127.0.0.1"), ("LOCALHOST", "localhost"), ("[::1]:8080", "::1"),
    ("vaenode.hospital.org.", "vaenode.hospital.org"), ("", None), (None, None),
    ("[::1", None), ("a:b", None), ("a:123456", None), (":80", None),
])
def test_request_host(header: str | None, host: str | None) -> None:
    assert request_host(header) == host


def test_only_the_dashboards_own_names_are_answered() -> None:
    default = allowed_hosts(AdminSettings())
    assert default == {"localhost", "127.0.0.1", "::1"}
    assert host_allowed("localhost:8080", default) and host_allowed("[::1]:8080", default)
    assert not host_allowed("evil.example:8080", default)
    assert not host_allowed("127.0.0.1.evil.example", default)
    assert not host_allowed(None, default)
    beyond = allowed_hosts(AdminSettings(bind_address="10.1.2.3", token="t",
                                         allowed_hosts=["*.hospital.org"]))
    assert beyond == {"*.hospital.org", "10.1.2.3"}  # the loopback names only if listed
    assert host_allowed("vaenode.hospital.org", beyond) and host_allowed("10.1.2.3:80", beyond)
    assert not host_allowed("hospital.org.evil.example", beyond)
    assert not host_allowed("localhost", beyond)
    everywhere = allowed_hosts(AdminSettings(bind_address="0.0.0.0", token="t"))
    assert "0.0.0.0" not in everywhere
    assert host_allowed("anything", frozenset({"*"}))


def test_allowed_hosts_and_trusted_proxies_are_checked_at_start() -> None:
    settings = AdminSettings(allowed_hosts=["Vaenode.Hospital.ORG.", "[::1]"],
                             trusted_proxies=["127.0.0.1", "10.0.0.0/8", "::1"])
    assert settings.allowed_hosts == ["vaenode.hospital.org", "::1"]
    assert settings.trusted_proxies == ["127.0.0.1", "10.0.0.0/8", "::1"]
    for bad in (["evil host"], ["*evil"], ["a:80"], ["http://x"]):
        with pytest.raises(ValueError, match="allowed_hosts"):
            AdminSettings(allowed_hosts=bad)
    for bad in (["*"], ["proxy.hospital.org"], ["10.0.0.0/33"]):
        with pytest.raises(ValueError, match="trusted_proxies"):
            AdminSettings(trusted_proxies=bad)
