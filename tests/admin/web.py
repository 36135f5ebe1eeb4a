"""Plain helpers of the dashboard tests: HTTP calls, settings, what a scored node offers."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import Settings


@dataclass
class Reply:
    """An HTTP answer, whatever its status."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    follow: bool = True,
) -> Reply:
    """GET (or POST with ``data``) ``url`` with urllib; 4xx/5xx are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=30) as resp:
            return Reply(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, dict(exc.headers.items()), exc.read())


def admin_settings(tmp_path: Path, **admin: Any) -> Settings:
    """Settings with a temp database and storage and the dashboard on a free loopback port."""
    (tmp_path / "storage").mkdir(exist_ok=True)
    return Settings.model_validate(
        {
            "storage": {"dir": str(tmp_path / "storage"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{tmp_path / 'queue.db'}"},
            "admin": {"bind_address": "127.0.0.1", "port": 0, **admin},
        }
    )


TOKEN = "admin-test-token"
#: The block of axial slices (inferior to superior) replaced by noise in the flagged series.
NOISE_BLOCK = (50, 58)


@dataclass(frozen=True)
class ScoredNode:
    """A running ``vaenode serve`` after real series were sent with storescu and scored.

    Attributes:
        base_url: the dashboard (token required).
        token: the admin token.
        series_uid: the series with a noise block (the one the browser test reviews).
        flagged, normal: its slices flagged and not, as stored by the worker.
        model: the model label of its verdict.
        abnormal: its series verdict.
        sent_series: Series Instance UIDs sent, in order.
        sent_instances: instances sent in all.
        database_url: the node's queue database.
    """

    base_url: str
    token: str
    series_uid: str
    flagged: int
    normal: int
    model: str
    abnormal: bool
    sent_series: tuple[str, ...]
    sent_instances: int
    database_url: str
