"""The dashboard's access rules, without a server: loopback check, token forms, cookie signing."""

from __future__ import annotations

import base64

import pytest

from node.admin.auth import (
    authenticate,
    check_bind,
    is_loopback,
    is_public,
    make_session_cookie,
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
