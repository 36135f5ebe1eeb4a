"""A real dashboard server: never unguarded beyond loopback; with a token, 401 without it."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

import pytest

from node.admin import auth as auth_module
from node.admin.app import create_app, start_in_thread
from node.admin.auth import FailureLimiter
from node.errors import ConfigError
from tests.admin.web import http


def test_create_app_refuses_non_loopback_without_token(make_settings, session_factory_for) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(bind_address="0.0.0.0")
    with pytest.raises(ConfigError, match=r"admin\.token"):
        create_app(settings, session_factory_for(settings))


def test_loopback_without_token_is_open(make_settings, session_factory_for, run_dashboard) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings()
    dash = run_dashboard(settings, session_factory_for(settings))
    base = f"http://127.0.0.1:{dash.port}"
    assert http(f"{base}/queue").status == 200
    assert http(f"{base}/metrics").status == 200


@pytest.fixture
def guarded(make_settings, session_factory_for, run_dashboard) -> Callable[[str], str]:  # type: ignore[no-untyped-def]
    settings = make_settings(token="s3cret-token")
    dash = run_dashboard(settings, session_factory_for(settings))
    return lambda path: f"http://127.0.0.1:{dash.port}{path}"


@pytest.mark.parametrize(
    "path", ["/", "/queue", "/series/1.2.3", "/deliveries", "/alerts", "/associations", "/models",
             "/metrics",
             "/instances/1.2.3/thumbnail.png"],
)
def test_with_token_requests_without_it_get_401(guarded, path: str) -> None:  # type: ignore[no-untyped-def]
    reply = http(guarded(path), follow=False)
    assert reply.status == 401
    assert reply.headers.get("www-authenticate", "").startswith("Bearer")
    wrong = http(guarded(path), headers={"Authorization": "Bearer nope"}, follow=False)
    assert wrong.status == 401


def test_with_token_bearer_and_basic_get_in(guarded) -> None:  # type: ignore[no-untyped-def]
    ok = http(guarded("/queue"), headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status == 200 and "Queue" in ok.text
    basic = base64.b64encode(b"alice:s3cret-token").decode()
    ok = http(guarded("/metrics"), headers={"Authorization": f"Basic {basic}"})
    assert ok.status == 200 and "vaenode_series" in ok.text


def test_browser_gets_the_login_form_and_then_a_cookie(guarded) -> None:  # type: ignore[no-untyped-def]
    page = http(guarded("/queue"), headers={"Accept": "text/html"})
    assert page.status == 401 and 'name="token"' in page.text
    bad = http(guarded("/login"), data=urllib.parse.urlencode(
        {"name": "bob", "token": "wrong", "next": "/queue"}).encode(), follow=False)
    assert bad.status == 401 and "set-cookie" not in {k.lower() for k in bad.headers}
    good = http(guarded("/login"), data=urllib.parse.urlencode(
        {"name": "bob", "token": "s3cret-token", "next": "/queue"}).encode(), follow=False)
    assert good.status == 303 and good.headers["location"] == "/queue"
    cookie = good.headers["set-cookie"].split(";")[0]
    assert "s3cret-token" not in cookie
    assert "HttpOnly" in good.headers["set-cookie"]
    page = http(guarded("/queue"), headers={"Cookie": cookie})
    assert page.status == 200 and "signed in as bob" in page.text


def test_guessing_the_token_is_stopped_mistyping_is_not(guarded) -> None:  # type: ignore[no-untyped-def]
    """Ten different wrong tokens from one address within a minute: 429 with Retry-After, for
    the right token and the login form too. The same wrong credential again and again (a
    browser's cookie from before a token change) counts once."""
    stale = "vaenode_session=bob.0123456789abcdef"
    for _ in range(25):
        assert http(guarded("/queue"), headers={"Cookie": stale}).status == 401
    assert http(guarded("/queue"), headers={"Authorization": "Bearer s3cret-token"}).status == 200

    for n in range(9):  # with the stale cookie: ten different wrong credentials
        guess = {"Authorization": f"Bearer guess{n}"}
        assert http(guarded("/metrics"), headers=guess).status == 401
    refused = http(guarded("/queue"), headers={"Authorization": "Bearer s3cret-token"})
    assert refused.status == 429 and int(refused.headers["retry-after"]) >= 1
    login = http(guarded("/login"), data=urllib.parse.urlencode(
        {"name": "bob", "token": "s3cret-token", "next": "/queue"}).encode(), follow=False)
    assert login.status == 429
    assert http(guarded("/healthz")).status == 200  # no credentials: not refused


def test_failure_limiter_forgets_after_its_window() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=0.3)
    for guess in ("a", "b", "a", "c"):
        limiter.record_failure("10.1.1.1", guess)
    assert limiter.retry_after("10.1.1.1") > 0
    assert limiter.retry_after("10.1.1.2") == 0.0
    time.sleep(0.35)
    assert limiter.retry_after("10.1.1.1") == 0.0


def test_failure_limiter_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "MAX_TRACKED_CLIENTS", 50)
    limiter = FailureLimiter(max_failures=3, window_s=0.2)
    for i in range(50):
        limiter.record_failure(f"10.0.0.{i}", "guess")
    time.sleep(0.25)  # all of them stale now
    limiter.record_failure("10.9.9.9", "guess")
    assert limiter.tracked_clients() == 1


def test_login_does_not_redirect_off_site(guarded) -> None:  # type: ignore[no-untyped-def]
    reply = http(guarded("/login"), data=urllib.parse.urlencode(
        {"name": "bob", "token": "s3cret-token", "next": "//evil.example/"}).encode(),
        follow=False)
    assert reply.status == 303 and reply.headers["location"] == "/queue"


def test_healthz_is_public_and_checks_db_and_storage(make_settings, session_factory_for,  # type: ignore[no-untyped-def]
                                                     run_dashboard, tmp_path) -> None:
    settings = make_settings(token="s3cret-token")
    dash = run_dashboard(settings, session_factory_for(settings))
    url = f"http://127.0.0.1:{dash.port}/healthz"
    assert http(url).status == 200
    (tmp_path / "storage").rmdir()
    reply = http(url)
    assert reply.status == 503 and "storage" in reply.text


@pytest.mark.e2e
def test_vaenode_serve_refuses_an_unguarded_public_dashboard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The real command: exit status 2, a message naming admin.token, nothing listening."""
    from tests.helpers.node import VAENODE, free_port, node_sections, to_toml

    port = free_port()
    sections = node_sections(tmp_path, port, {"admin": {"enabled": True,
                                                        "bind_address": "0.0.0.0", "port": 0}})
    config = tmp_path / "node.toml"
    config.write_text(to_toml(sections), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAENODE_")}
    result = subprocess.run([str(VAENODE), "serve", "--config", str(config)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "admin.token" in result.stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the DICOM port must not be open"


def test_dashboard_over_https_with_token(make_settings, session_factory_for,  # type: ignore[no-untyped-def]
                                         run_dashboard, tmp_path) -> None:
    """admin.tls_cert_file/tls_key_file: HTTPS, the token still required over it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "admin.crt", tmp_path / "admin.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    settings = make_settings(token="s3cret-token", tls_cert_file=str(cert), tls_key_file=str(key))
    dash = run_dashboard(settings, session_factory_for(settings))
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{dash.port}/queue"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, context=context, timeout=30)
    assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": "Bearer s3cret-token"})
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        assert reply.status == 200 and b"Queue" in reply.read()
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on TLS port
        urllib.request.urlopen(f"http://127.0.0.1:{dash.port}/healthz", timeout=10).read()


def test_tls_files_must_exist(make_settings, session_factory_for, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(tls_cert_file=str(tmp_path / "no.crt"),
                             tls_key_file=str(tmp_path / "no.key"))
    with pytest.raises(ConfigError, match="admin TLS file not found"):
        start_in_thread(settings, session_factory_for(settings))


def test_cross_site_posts_are_refused(make_settings, session_factory_for, run_dashboard) -> None:  # type: ignore[no-untyped-def]
    """An open loopback dashboard needs no cookie, so a foreign page's form could act: the
    Origin check refuses it; the dashboard's own pages (same origin) and scripts pass."""
    settings = make_settings()
    dash = run_dashboard(settings, session_factory_for(settings))
    url = f"http://127.0.0.1:{dash.port}/series/1.2.3/actions"
    form = urllib.parse.urlencode({"action": "retry"}).encode()
    forged = http(url, data=form, headers={"Origin": "http://evil.example"}, follow=False)
    assert forged.status == 403
    own = http(url, data=form, headers={"Origin": f"http://127.0.0.1:{dash.port}"}, follow=False)
    assert own.status == 404  # past the check: the series does not exist
    assert http(url, data=form, follow=False).status == 404


@pytest.mark.e2e
def test_vaenode_serve_stops_when_the_dashboard_port_is_taken(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A dashboard that cannot listen stops start-up before the DICOM port opens."""
    from tests.helpers.node import VAENODE, free_port, node_sections, to_toml

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        admin_port = taken.getsockname()[1]
        port = free_port()
        sections = node_sections(tmp_path, port, {"admin": {"enabled": True,
                                                            "port": admin_port}})
        config = tmp_path / "node.toml"
        config.write_text(to_toml(sections), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAENODE_")}
        result = subprocess.run([str(VAENODE), "serve", "--config", str(config)], env=env,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"could not listen on 127.0.0.1:{admin_port}" in result.stderr
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
