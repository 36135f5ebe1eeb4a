"""Scheduled job: delete the images of series finished long ago (``[storage].retention_days``).

The node is a quality gate, not an archive: scanners send their images to the PACS as well,
and the node's copies serve scoring, re-scoring and the dashboard's thumbnails. Kept forever
they fill the disk, and then C-STORE answers "out of resources" (``[storage].min_free_mb``)
and scanners see failures. So the images of a series that has been done, skipped or failed,
with nothing received for it, for ``retention_days`` are deleted; its row, status history,
verdict, slice scores and reports (small, and what a re-delivery sends) stay, and
``purged_at`` says when. Such a series can no longer be scored again. A late instance of it
is stored and reopens it, but the worker does not score a part as the whole series (it is
skipped with the reason, the earlier verdict and reports stand) unless the whole series was
sent again.

Rows first, files after the commit: a crash in between leaves files no row points to, never a
row pointing at a missing file. Each run then also removes such leftovers: files in the
folders of series purged in the last :data:`LEFTOVER_WINDOW_DAYS` days that no row points to
(a late instance that reopened the series has its row) and that were last written over
:data:`LEFTOVER_MIN_AGE_S` ago (an instance being stored has no row for a moment).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from pathlib import Path

from apscheduler.schedulers.base import BaseScheduler
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.errors import QueueConflict
from node.queue import repo
from node.queue.models import Series, utcnow

log = logging.getLogger(__name__)

JOB_ID = "storage.retention"
#: Series purged per transaction batch of one run (the next run takes the rest).
BATCH = 500
#: How far back each run looks for files a purge left behind (a crash, a failed unlink).
LEFTOVER_WINDOW_DAYS = 30.0
#: A file younger than this may be an instance whose row is being committed: never a leftover.
LEFTOVER_MIN_AGE_S = 3600.0


def _remove(storage: Path, rel: str) -> bool:
    """Delete one stored file and the folders it leaves empty (series, then study); never
    anything outside the storage folder (``storage`` is resolved by the caller)."""
    path = storage / rel
    if storage not in path.resolve().parents:
        log.warning("not deleting %s: outside the storage folder", rel)
        return False
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot delete stored instance %s: %s", rel, exc)
        return False
    for folder in (path.parent, path.parent.parent):
        if folder == storage or storage not in folder.parents:
            break
        try:
            folder.rmdir()
        except OSError:  # not empty (other series of the study), or already gone
            break
    return True


def purge_expired(
    session_factory: sessionmaker[Session],
    storage: Path,
    retention_days: float,
    now: datetime | None = None,
) -> int:
    """Delete the images of every series expired at ``now``; returns how many series."""
    if retention_days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    reason = f"images deleted: finished and quiet for {retention_days:g} days (retention)"
    with session_factory() as session:
        ids = repo.expired_series_ids(session, cutoff, BATCH)
    root = storage.resolve()
    purged = 0
    for series_id in ids:
        try:
            with session_factory.begin() as session:
                paths = repo.purge_images(session, series_id, cutoff, reason)
                uid = session.scalar(select(Series.series_instance_uid)
                                     .where(Series.id == series_id))
        except QueueConflict as exc:  # an instance arrived, or it is being scored again
            log.debug("series not purged: %s", exc)
            continue
        removed = sum(_remove(root, rel) for rel in paths)
        purged += 1
        log.info("series images deleted (retention)",
                 extra={"series_uid": uid, "instances": len(paths), "files_removed": removed,
                        "retention_days": retention_days})
    remove_leftovers(session_factory, root, now)
    return purged


def remove_leftovers(session_factory: sessionmaker[Session], storage: Path,
                     now: datetime | None = None) -> int:
    """Delete the files that purges of the last days left behind; returns how many."""
    now = now or utcnow()
    root = storage.resolve()
    newest = time.time() - LEFTOVER_MIN_AGE_S
    with session_factory() as session:
        purged = repo.purged_series_since(session, now - timedelta(days=LEFTOVER_WINDOW_DAYS))
    removed = 0
    for series_id, study_uid, series_uid in purged:
        folder = root / study_uid / series_uid
        if not folder.is_dir():
            continue
        with session_factory() as session:
            kept = {Path(p) for p in repo.instance_paths(session, series_id)}
        here = 0
        for file in sorted(folder.glob("*.dcm")):
            rel = file.relative_to(root)
            try:
                if rel in kept or file.stat().st_mtime > newest:
                    continue
            except FileNotFoundError:
                continue
            here += _remove(root, str(rel))
        if here:
            log.warning("removed files an earlier purge left behind",
                        extra={"series_uid": series_uid, "files_removed": here})
        removed += here
    return removed


def install(scheduler: BaseScheduler, settings: Settings,
            session_factory: sessionmaker[Session]) -> None:
    """Add the retention job to the service's scheduler (none when ``retention_days`` is 0)."""
    st = settings.storage
    if st.retention_days <= 0:
        log.info("retention off: every received image is kept ([storage].retention_days = 0)")
        return
    log.info("retention: images of series finished and quiet for %g days are deleted "
             "(checked every %g s)", st.retention_days, st.retention_check_s,
             extra={"storage": str(st.dir)})
    scheduler.add_job(
        purge_expired,
        "interval",
        seconds=st.retention_check_s,
        args=(session_factory, st.dir, st.retention_days),
        id=JOB_ID,
        max_instances=1,
        coalesce=True,
        replace_existing=True,
        next_run_time=utcnow() + timedelta(seconds=60),
    )
