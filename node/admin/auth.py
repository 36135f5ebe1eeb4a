"""Who may see the dashboard: the loopback rule, the Host names, the token, the session cookie.

The dashboard shows series metadata and lets people re-score and re-deliver, so on any address
a stranger could reach it demands the configured token. On loopback it stays open: whoever can
reach 127.0.0.1 already has a shell on the node. A token is accepted three ways, so that
Prometheus (Bearer header), curl (basic auth password) and a browser (login form, then a signed
cookie) can all use it. The cookie never holds the token itself, only an HMAC keyed by it, so a
leaked cookie cannot be replayed as a Bearer token and changing the token logs everyone out.

Only requests addressed to one of the dashboard's own names are answered (``[admin]
allowed_hosts``, plus the bind address when it is not loopback): a web page an admin opens
elsewhere can point its own host name at 127.0.0.1 (DNS rebinding) and then read the open
loopback dashboard and post to it as same-origin; its requests still name that host.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import threading
import time
from dataclasses import dataclass

from node.config import AdminSettings
from node.errors import ConfigError

_UNSPECIFIED = frozenset({"0.0.0.0", "::"})

COOKIE_NAME = "vaenode_session"
# Paths served without credentials: the login form itself, static CSS, and the health probe
# (a load balancer or systemd watchdog asks it without secrets; it reveals only up/down).
PUBLIC_PATHS = frozenset({"/login", "/healthz"})
PUBLIC_PREFIXES = ("/static/",)
# Answered whatever the Host header names: a load balancer's health check names the address it
# probes, which need not be one of admin.allowed_hosts, and the answer is public anyway.
ANY_HOST_PATHS = frozenset({"/healthz"})


def is_loopback(address: str) -> bool:
    """True when ``address`` can only be reached from this machine.

    Args:
        address: the configured bind address (an IP literal or ``localhost``).

    Returns:
        True for 127.0.0.0/8, ::1 and ``localhost``; False for anything else, including
        0.0.0.0 and :: (every interface) and host names we cannot judge without resolving.
    """
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip()).is_loopback
    except ValueError:
        return False


def check_bind(settings: AdminSettings) -> None:
    """Refuse a dashboard that strangers could reach without a token.

    Raises:
        ConfigError: ``admin.bind_address`` is not loopback and ``admin.token`` is unset or
            blank; the message names both keys so the admin knows what to set.
    """
    if is_loopback(settings.bind_address):
        return
    if settings.token is None or not settings.token.strip():
        raise ConfigError(
            f"admin.token is required when admin.bind_address is {settings.bind_address!r} "
            "(not loopback): set admin.token or bind the dashboard to 127.0.0.1"
        )


def allowed_hosts(settings: AdminSettings) -> frozenset[str]:
    """The host names (lower case, IPv6 without brackets) the dashboard answers to:
    ``allowed_hosts``, and the bind address when it is a specific address beyond loopback."""
    hosts = set(settings.allowed_hosts)
    address = settings.bind_address.strip().lower().removeprefix("[").removesuffix("]")
    if not is_loopback(address) and address not in _UNSPECIFIED:
        hosts.add(address)
    return frozenset(hosts)


def request_host(header: str | None) -> str | None:
    """The host part of a ``Host`` header (lower case, IPv6 without brackets, no trailing
    dot), or None when the header is absent or not ``host[:port]``."""
    if not header:
        return None
    value = header.strip().lower()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            return None
    else:
        host, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return None
    host = host.rstrip(".")
    return host or None


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """True when the ``Host`` header names one of ``allowed`` (entries ``*`` and
    ``*.domain`` match any host and any subdomain)."""
    host = request_host(header)
    if host is None:
        return False
    if host in allowed or "*" in allowed:
        return True
    return any(p.startswith("*.") and host.endswith(p[1:]) for p in allowed)


@dataclass(frozen=True)
class Identity:
    """Who made a request, as far as the credentials say.

    Attributes:
        name: the reviewer's name (basic-auth user or the name typed at login); empty when
            the credential carries no name (Bearer token, or loopback without a token).
        method: how the request was let in: "open", "bearer", "basic" or "cookie".
    """

    name: str
    method: str


def _sign(token: str, name: str) -> str:
    return hmac.new(token.encode(), b"session:" + name.encode(), hashlib.sha256).hexdigest()


def make_session_cookie(token: str, name: str) -> str:
    """The cookie value a browser gets after logging in as ``name`` with ``token``."""
    encoded = base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")
    return f"{encoded}.{_sign(token, name)}"


def _read_session_cookie(token: str, value: str) -> str | None:
    encoded, _, signature = value.partition(".")
    try:
        name = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    if hmac.compare_digest(signature, _sign(token, name)):
        return name
    return None


def authenticate(
    token: str | None, authorization: str | None, cookie: str | None
) -> Identity | None:
    """Check a request's credentials against the configured token.

    Args:
        token: ``admin.token``; None means the dashboard is open (loopback only, enforced by
            :func:`check_bind` at start-up).
        authorization: the ``Authorization`` header, if any.
        cookie: the session cookie value, if any.

    Returns:
        The identity when the request may proceed, None when it must get 401.
    """
    if token is None:
        return Identity(name="", method="open")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials, token):
            return Identity(name="", method="bearer")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(credentials).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            if hmac.compare_digest(password, token):
                return Identity(name=user, method="basic")
    if cookie:
        name = _read_session_cookie(token, cookie)
        if name is not None:
            return Identity(name=name, method="cookie")
    return None


def same_origin(origin: str | None, host: str | None) -> bool:
    """True when a state-changing request comes from the dashboard's own pages.

    Browsers send ``Origin`` with every cross-site POST; a request without one (curl, a
    script with the token) is not a forgery and passes.

    Args:
        origin: the request's ``Origin`` header.
        host: the request's ``Host`` header (host and port the client addressed).
    """
    if origin is None:
        return True
    if origin == "null" or host is None:
        return False
    _scheme, _, rest = origin.partition("://")
    return rest.rstrip("/").lower() == host.lower()


def is_public(path: str) -> bool:
    """True for the few paths served without credentials (login, health, static files)."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


#: Addresses the limiter keeps before it forgets those without a recent failure.
MAX_TRACKED_CLIENTS = 10_000


class FailureLimiter:
    """Refuses a client address for a while after too many wrong credentials.

    ``max_failures`` different wrong credentials (login form token, Bearer, Basic or session
    cookie) within ``window_s`` seconds from one address: that address gets 429 until the oldest
    of them is ``window_s`` old. The same wrong credential sent again counts once (a browser
    with a cookie from before a token change sends it with every image of a page), so only
    guessing counts. Guessing a token online then takes years instead of hours; a person who
    mistyped a few times is not stopped. Kept in memory (a restart forgets), per dashboard.
    """

    def __init__(self, max_failures: int = 10, window_s: float = 60.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> dict[str, float]:
        seen = self._failures.setdefault(client, {})
        for key in [k for k, at in seen.items() if at <= now - self.window_s]:
            del seen[key]
        return seen

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may present credentials again; 0.0 when it may now."""
        now = time.monotonic()
        with self._lock:
            seen = self._recent(client, now)
            if len(seen) < self.max_failures:
                if not seen:
                    self._failures.pop(client, None)
                return 0.0
            return max(0.0, min(seen.values()) + self.window_s - now)

    def record_failure(self, client: str, credential: str) -> None:
        """``client`` presented ``credential`` and it was wrong."""
        now = time.monotonic()
        key = hashlib.sha256(credential.encode("utf-8", "replace")).hexdigest()
        with self._lock:
            if len(self._failures) >= MAX_TRACKED_CLIENTS:
                # Many addresses (a scan): forget those without a recent failure (bounded memory).
                for other in list(self._failures):
                    if not self._recent(other, now):
                        del self._failures[other]
            self._recent(client, now).setdefault(key, now)

    def tracked_clients(self) -> int:
        """Addresses with wrong credentials on record."""
        with self._lock:
            return len(self._failures)


def presented_credential(authorization: str | None, cookie: str | None) -> str | None:
    """What a request offered as credentials (for :class:`FailureLimiter`), or None."""
    if authorization:
        return "authorization:" + authorization
    if cookie:
        return "cookie:" + cookie
    return None
