"""Check that this node's storage folder is the deployment's shared folder.

Receivers write instances and workers read them (and write reports that the delivering node
reads) through one folder mounted at the same path on every machine. A node whose network
file system is not mounted sees an empty local folder at that path and would store
acknowledged instances where no worker can read them. So the first node of a deployment gives
the folder an identity, kept in the database (table ``cluster``) and in a marker file
:data:`MARKER` at the folder's top; every node compares the two at start and refuses to start
when they differ or the marker is missing, and ``/healthz`` answers 503 without the marker
(a load balancer then takes the receiver out).

The first node writes the marker before it commits the identity: a node starting at the same
moment waits on the row's unique key, and once the row is committed the marker is there.
Only with a shared database; a node alone on SQLite keeps its folder as it always did.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.errors import ConfigError
from node.queue.models import ClusterInfo, utcnow

log = logging.getLogger(__name__)

MARKER = ".vaenode-storage"


def read_marker(storage: Path) -> str | None:
    """The identity in the folder's marker file, or None without one."""
    try:
        return (storage / MARKER).read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        return None


def _write_marker(storage: Path, storage_id: str) -> None:
    storage.mkdir(parents=True, exist_ok=True)
    tmp = storage / f".{MARKER}.{uuid.uuid4().hex[:8]}.part"
    with tmp.open("w", encoding="ascii") as fh:
        fh.write(storage_id + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, storage / MARKER)


def check_shared_storage(session_factory: sessionmaker[Session], storage: Path) -> str:
    """Give the shared folder its identity (first node) or check it; returns the identity.

    Raises:
        ConfigError: the folder has no marker although the deployment has one (not mounted?),
            or it belongs to another deployment.
    """
    storage = Path(storage)
    new_id = str(uuid.uuid4())
    try:
        with session_factory.begin() as session:
            existing = session.scalar(select(ClusterInfo.storage_id).where(ClusterInfo.id == 1))
            if existing is None:
                session.execute(insert(ClusterInfo).values(id=1, storage_id=new_id,
                                                           created_at=utcnow()))
                # A marker of an earlier database (one made again) is replaced: the folder is
                # this database's now.
                _write_marker(storage, new_id)
                log.info("shared storage folder marked", extra={"storage": str(storage),
                                                                "storage_id": new_id})
                return new_id
    except IntegrityError:  # another node marked it at the same moment
        with session_factory() as session:
            existing = session.scalar(select(ClusterInfo.storage_id).where(ClusterInfo.id == 1))
    assert existing is not None
    found = read_marker(storage)
    if found is None:
        raise ConfigError(
            f"the storage folder {storage} has no {MARKER}, but this deployment's shared folder "
            f"does (id {existing}): is the shared file system mounted at {storage} on this "
            "machine? ([storage].dir, docs/cluster.md)")
    if found != existing:
        raise ConfigError(
            f"the storage folder {storage} belongs to another deployment ({MARKER} says "
            f"{found}, this database's folder is {existing}): check [storage].dir and "
            "[database].url")
    return existing
