"""Durable storage of received instances: bytes in, a complete file and its queue row out.

Knows nothing of pynetdicom: :meth:`Store.accept` takes the instance exactly as received
(preamble, file meta and the dataset bytes of the wire) and either returns once the file and its
database rows are durable, or raises an :class:`~node.errors.IngestError` having written nothing
that a reader could mistake for an instance.

The order is what makes a crash harmless: the file is written under a temporary name in its
final folder, fsynced, and renamed into place, so a name in storage always holds a complete
file. Then two flushes run at once: the folder's fsync (makes the new name durable) and the
row's commit (SQLite ``synchronous=FULL``, grouped with other associations' rows by
:class:`~node.ingest.commit.GroupCommitter`). Success is answered after both. After a crash:
a temporary file is removed by :meth:`Store.sweep_partials`; a complete file without a row is
harmless (the peer got no Success and sends it again, replacing it); and a row committed while
its folder's fsync had not finished, whose name the crash lost, is found by
:meth:`Store.recover` (such a row belongs to a ``receiving`` series: the same transaction made
its series ``receiving``) and deleted; its peer got no Success either. So every row points to
a complete file, and every instance that got Success is there.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.config import StorageSettings
from node.errors import DiskFull, StorageFailure
from node.ingest.commit import GroupCommitter, Ticket
from node.ingest.parse import ParsedInstance, parse_instance
from node.ingest.sop_class import check_sop_class
from node.queue import repo
from node.queue.models import utcnow

log = logging.getLogger(__name__)

#: Suffix of files being written; never a valid instance, removed by :meth:`Store.sweep_partials`.
PARTIAL_SUFFIX = ".part"
#: Prefix of report files being written (node/report/service.py), swept the same way.
REPORT_TEMP_PREFIX = ".tmp-"
_MB = 1024 * 1024


@dataclass(frozen=True)
class StoredInstance:
    """What :meth:`Store.accept` stored."""

    parsed: ParsedInstance
    path: Path
    size_bytes: int
    new_instance: bool


def free_space_shortfall(folder: Path, min_free_mb: int) -> str | None:
    """Why C-STORE is refused for lack of space on ``folder``'s file system (below
    ``[storage].min_free_mb``), or None when it is not (or the minimum is 0)."""
    if min_free_mb <= 0:
        return None
    free = shutil.disk_usage(folder).free
    if free >= min_free_mb * _MB:
        return None
    return f"{free // _MB} MiB free on {folder}, below the minimum of {min_free_mb} MiB"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Writes instances under ``<dir>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` and records them.

    Args:
        settings: storage folder and minimum free space.
        session_factory: sessions on the queue database.
        fsync: False only for throw-away benchmarks of the non-durable path; the service
            always passes True.
        commit_lock: a file shared by the stores of several listener processes of one node;
            see :mod:`node.ingest.commit`. None (one listener process): no such lock.
    """

    def __init__(
        self,
        settings: StorageSettings,
        session_factory: sessionmaker[Session],
        *,
        fsync: bool = True,
        commit_lock: Path | None = None,
    ) -> None:
        self.root = Path(settings.dir).resolve()
        self.min_free_bytes = settings.min_free_mb * _MB
        self._session_factory = session_factory
        self._fsync = fsync
        self._committer = GroupCommitter(session_factory, lock_path=commit_lock)
        self.root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Start group commit (the service does; without it each row commits on its own)."""
        self._committer.start()

    def close(self) -> None:
        """Commit what is queued and stop group commit."""
        self._committer.stop()

    # --- the hot path ----------------------------------------------------------------------

    def accept(
        self, data: bytes, *, calling_aet: str | None = None, peer_address: str | None = None
    ) -> StoredInstance:
        """Validate, write and record one received instance.

        Args:
            data: preamble, ``DICM``, file meta and the dataset bytes exactly as received.
            calling_aet: the sender's AE title, recorded on the series.
            peer_address: ``host:port`` of the sender, recorded on the series.

        Returns:
            What was stored, once file and rows are durable.

        Raises:
            Undecodable, MissingAttribute, InvalidUID: the instance is malformed; nothing was
                written.
            SopClassMismatch: the request's SOP class is not the data set's, or not a storage
                class; nothing was written.
            DiskFull: free space is below the configured minimum; nothing was written.
            StorageFailure: the file or the row could not be written.
        """
        parsed = parse_instance(data)
        check_sop_class(parsed)
        self._check_free_space()
        rel = Path(parsed.study_instance_uid, parsed.series_instance_uid,
                   f"{parsed.sop_instance_uid}.dcm")
        path = self.root / rel
        record = repo.InstanceRecord(
            study_instance_uid=parsed.study_instance_uid,
            series_instance_uid=parsed.series_instance_uid,
            sop_instance_uid=parsed.sop_instance_uid,
            sop_class_uid=parsed.sop_class_uid,
            transfer_syntax_uid=parsed.transfer_syntax_uid,
            path=str(rel),
            size_bytes=len(data),
            instance_number=parsed.instance_number,
            modality=parsed.modality,
            series_description=parsed.series_description,
            body_part=parsed.body_part,
            station_name=parsed.station_name,
            manufacturer=parsed.manufacturer,
            scanner_model=parsed.scanner_model,
            calling_aet=calling_aet,
            peer_address=peer_address,
            received_at=utcnow(),
        )
        ticket = self._committer.submit(record)
        if ticket is not None:
            result = self._store_grouped(ticket, path, data)
        else:
            self._write(path, data)
            if self._fsync:
                _fsync_dir(path.parent)
            result = self._record(record)
        if result.stale_path is not None and result.stale_path != record.path:
            # The instance moved to another series; its old file is no longer referenced.
            (self.root / result.stale_path).unlink(missing_ok=True)
        log.debug(
            "stored instance",
            extra={"sop_uid": parsed.sop_instance_uid, "series_uid": parsed.series_instance_uid,
                   "peer": peer_address},
        )
        return StoredInstance(parsed, path, len(data), result.new_instance)

    def _check_free_space(self) -> None:
        shortfall = free_space_shortfall(self.root, self.min_free_bytes // _MB)
        if shortfall is not None:
            log.warning(
                "storage below its free-space minimum: refusing instances",
                extra={"storage": str(self.root), "min_free_mb": self.min_free_bytes // _MB},
            )
            raise DiskFull(shortfall)

    def _make_dirs(self, folder: Path) -> None:
        """Create the study and series folders, fsyncing each parent whose entries changed."""
        missing = []
        current = folder
        while current != self.root and not current.is_dir():
            missing.append(current)
            current = current.parent
        for directory in reversed(missing):
            try:
                directory.mkdir()
            except FileExistsError:
                continue  # another association created it a moment ago
            if self._fsync:
                _fsync_dir(directory.parent)

    def _write_file(self, path: Path, data: bytes) -> None:
        folder = path.parent
        self._make_dirs(folder)
        tmp = folder / f".{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self._write_file(path, data)
        except OSError as exc:
            raise StorageFailure(f"cannot write {path.relative_to(self.root)}: {exc}") from exc

    def _store_grouped(self, ticket: Ticket, path: Path, data: bytes) -> repo.RecordResult:
        """Write the file while the committer prepares the row; sync the folder while it
        commits; return when both are durable."""
        written = False
        try:
            self._write(path, data)
            written = True
        finally:
            ticket.file_ready(written)
        dir_error: OSError | None = None
        if self._fsync:
            try:
                _fsync_dir(path.parent)  # while the committer flushes the WAL
            except OSError as exc:
                dir_error = exc
        try:
            result = ticket.future.result()
        except Exception as exc:
            raise StorageFailure(f"cannot record instance: {exc}") from exc
        if dir_error is not None:
            # The row is committed but the name may not survive a power loss: no Success.
            # Store.recover() removes such a row at the next start if its file is gone.
            raise StorageFailure(f"cannot sync {path.parent}: {dir_error}") from dir_error
        return result

    def _record(self, record: repo.InstanceRecord) -> repo.RecordResult:
        # A concurrent first instance of the same series (or the same instance) on another
        # association can win the insert on PostgreSQL; the second try then updates.
        for attempt in (1, 2):
            try:
                with self._session_factory.begin() as session:
                    return repo.record_instance(session, record)
            except IntegrityError as exc:
                if attempt == 2:
                    raise StorageFailure(f"cannot record instance: {exc}") from exc
            except Exception as exc:
                raise StorageFailure(f"cannot record instance: {exc}") from exc
        raise AssertionError("unreachable")

    # --- start-up --------------------------------------------------------------------------

    def recover(self) -> int:
        """Undo what a crash left half done in the database; returns the rows removed.

        Removes rows of ``receiving`` series whose file is missing (see the module docstring for
        why only those can be). Reads only those rows' files, so it is quick whatever the size
        of the archive. Run before the listener starts; :meth:`sweep_partials` removes the
        temporary files.
        """
        with self._session_factory.begin() as session:
            missing = [instance_id for instance_id, rel in repo.receiving_instances(session)
                       if not self._present(rel)]
            repo.drop_instances(session, missing)
        if missing:
            log.warning("removed rows whose file a crash lost before it was acknowledged",
                        extra={"count": len(missing)})
        return len(missing)

    def _present(self, rel: str) -> bool:
        """Whether the stored file ``rel`` exists. A miss is checked again by listing its
        folder: on a network file system shared with other receivers a name one of them made
        a moment ago may be missing from this machine's cache of names, and a row is never
        dropped on a stale cache."""
        path = self.root / rel
        if path.is_file():
            return True
        try:
            return path.name in os.listdir(path.parent)
        except FileNotFoundError:
            return False

    def sweep_partials(self, started_before: float) -> int:
        """Remove temporary files (instances, reports) last written before ``started_before``
        (a ``time.time()``); returns how many.

        Temporary names start with a dot and no reader takes them for an instance, so this
        need not finish before the listener starts: ``serve`` runs it in the background, and
        walking a large archive does not hold up start-up. Only files older than this start
        are removed, never one a transfer of this run is writing.
        """
        removed = 0
        for tmp in self.root.rglob(".*"):
            name = tmp.name
            if not (name.endswith(PARTIAL_SUFFIX) or name.startswith(REPORT_TEMP_PREFIX)):
                continue
            try:
                if tmp.is_file() and tmp.stat().st_mtime < started_before:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # renamed into place or removed meanwhile
        level = logging.WARNING if removed else logging.INFO
        log.log(level, "storage swept: %d temporary file(s) left by interrupted writes removed",
                removed, extra={"count": removed, "storage": str(self.root)})
        return removed
