"""Durable storage of received instances: bytes in, a complete file and its queue row out.

Knows nothing of pynetdicom: :meth:`Store.accept` takes the instance exactly as received
(preamble, file meta and the dataset bytes of the wire) and either returns once the file and its
database rows are durable, or raises an :class:`~node.errors.IngestError` having written nothing
that a reader could mistake for an instance.

The order is what makes a crash harmless: the file is written under a temporary name in its
final folder, fsynced, renamed into place and the folder fsynced; only then is the row
committed (SQLite ``synchronous=FULL``). A crash before the rename leaves a temporary file that
:meth:`Store.recover` removes at the next start; a crash between the rename and the commit
leaves a complete file without a row, never a row without a complete file. The peer got no
Success in either case and sends the instance again.
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
from node.ingest.parse import ParsedInstance, parse_instance
from node.queue import repo
from node.queue.models import utcnow

log = logging.getLogger(__name__)

#: Suffix of files being written; never a valid instance, removed by :meth:`Store.recover`.
PARTIAL_SUFFIX = ".part"
_MB = 1024 * 1024


@dataclass(frozen=True)
class StoredInstance:
    """What :meth:`Store.accept` stored."""

    parsed: ParsedInstance
    path: Path
    size_bytes: int
    new_instance: bool


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
    """

    def __init__(
        self,
        settings: StorageSettings,
        session_factory: sessionmaker[Session],
        *,
        fsync: bool = True,
    ) -> None:
        self.root = Path(settings.dir).resolve()
        self.min_free_bytes = settings.min_free_mb * _MB
        self._session_factory = session_factory
        self._fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

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
            DiskFull: free space is below the configured minimum; nothing was written.
            StorageFailure: the file or the row could not be written.
        """
        parsed = parse_instance(data)
        self._check_free_space()
        rel = Path(parsed.study_instance_uid, parsed.series_instance_uid,
                   f"{parsed.sop_instance_uid}.dcm")
        path = self.root / rel
        try:
            self._write_file(path, data)
        except OSError as exc:
            raise StorageFailure(f"cannot write {rel}: {exc}") from exc
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
            calling_aet=calling_aet,
            peer_address=peer_address,
            received_at=utcnow(),
        )
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
        if self.min_free_bytes <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            log.warning(
                "storage below its free-space minimum: refusing instances",
                extra={"free_mb": free // _MB, "min_free_mb": self.min_free_bytes // _MB,
                       "storage": str(self.root)},
            )
            raise DiskFull(f"{free // _MB} MiB free on {self.root}, "
                           f"below the minimum of {self.min_free_bytes // _MB} MiB")

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
        if self._fsync:
            _fsync_dir(folder)

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
        """Remove temporary files a crash left behind; returns how many were removed."""
        removed = 0
        for tmp in self.root.rglob(f".*{PARTIAL_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning("removed partial files left by an interrupted transfer",
                        extra={"count": removed, "storage": str(self.root)})
        return removed
