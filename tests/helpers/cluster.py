"""A deployment of several real nodes for tests and the cluster benchmark: receivers
(``vaenode serve`` with the worker off) and workers (``vaenode worker``), each its own process
with its own configuration file and folder, on one PostgreSQL database and one storage folder.

::

    pg = start_postgres(tmp / "pg")
    deployment = Deployment(tmp / "nodes", pg.new_database("c1"), tmp / "shared")
    r1 = deployment.receiver("r1")
    w1 = deployment.worker("w1", sections={"model": {...}})
    ...
    deployment.stop()
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from node.queue.models import Series, SeriesEvent
from tests.helpers.node import RunningNode, start_node

T = TypeVar("T")


def merge(*layers: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Sections merged key by key, later layers winning."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, keys in (layer or {}).items():
            out.setdefault(name, {}).update(keys)
    return out


@dataclass
class Deployment:
    """Nodes on one database (``url``) and one storage folder (``storage``).

    ``common``: sections every node gets (a destination, short intervals...).
    """

    root: Path
    url: str
    storage: Path
    common: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    nodes: dict[str, RunningNode] = field(default_factory=dict)

    def sections(self, name: str, extra: Mapping[str, Mapping[str, Any]] | None
                 ) -> dict[str, dict[str, Any]]:
        base = {
            "database": {"url": self.url},
            "storage": {"dir": str(self.storage), "min_free_mb": 0},
            "cluster": {"node_name": name, "heartbeat_s": 1.0, "takeover_check_s": 1.0},
            "dicom": {"listener_processes": 1},
        }
        return merge(base, self.common, extra)

    def receiver(self, name: str, sections: Mapping[str, Mapping[str, Any]] | None = None,
                 port: int | None = None) -> RunningNode:
        """Start (or start again, same port) ``vaenode serve`` with the worker off."""
        node = start_node(self.root / name, port=port,
                          sections=merge(self.sections(name, sections),
                                         {"worker": {"enabled": False}}))
        self.nodes[name] = node
        return node

    def worker(self, name: str, sections: Mapping[str, Mapping[str, Any]] | None = None
               ) -> RunningNode:
        """Start (or start again) ``vaenode worker``."""
        node = start_node(self.root / name, command="worker", port=0,
                          sections=merge(self.sections(name, sections),
                                         {"worker": {"enabled": True}}))
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        """Stop every node still running, all at once (SIGTERM, then SIGKILL if it hangs)."""

        def stop_one(node: RunningNode) -> None:
            with contextlib.suppress(Exception):
                node.stop(timeout_s=30)

        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            list(pool.map(stop_one, self.nodes.values()))

    def logs(self) -> str:
        """The tail of every node's log, for a failure message."""
        return "\n".join(f"--- {name}\n{node.log_text()[-3000:]}"
                         for name, node in self.nodes.items())

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session on the shared database (for assertions)."""
        engine = create_engine(self.url)
        try:
            with sessionmaker(engine, expire_on_commit=False)() as session:
                yield session
        finally:
            engine.dispose()

    def wait(self, what: str, check: Callable[[], T | None], timeout_s: float,
             every_s: float = 0.2) -> T:
        """Poll ``check`` until it returns something truthy; raise with the logs otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(every_s)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{self.logs()}")

    def events(self, series_uid: str) -> list[tuple[str, str | None, str]]:
        """(to_status, reason, actor) of every event of one series, in order."""
        with self.session() as session:
            return [(str(e.to_status), e.reason, e.actor) for e in session.scalars(
                select(SeriesEvent).join(Series, Series.id == SeriesEvent.series_id)
                .where(Series.series_instance_uid == series_uid).order_by(SeriesEvent.id))]
