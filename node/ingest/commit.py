"""Group commit: one database transaction (one WAL fsync) for instances of many associations.

Each association runs in its own thread and must not answer Success before its instance's row
is durable. With SQLite every commit is an fsync and the write lock serializes them, so four
senders at once would queue behind each other's fsyncs. Instead, association threads hand their
rows to one committer thread, which takes every row waiting at that moment, records them in a
single transaction and then wakes each sender. One sender alone pays only a thread hand-off.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from node.queue import repo

log = logging.getLogger(__name__)

#: Most rows in one transaction; bounds the latency one batch adds to the first row in it.
MAX_BATCH = 64


@dataclass
class _Pending:
    record: repo.InstanceRecord
    future: Future[repo.RecordResult] = field(default_factory=Future)


class GroupCommitter:
    """A thread that records instances in batches; :meth:`submit` returns a future."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the committer thread."""
        self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def submit(self, record: repo.InstanceRecord) -> Future[repo.RecordResult]:
        """Queue one row; the future resolves once it is committed, or with the error."""
        pending = _Pending(record)
        self._queue.put(pending)
        return pending.future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with self._session_factory.begin() as session:
                results = [repo.record_instance(session, p.record) for p in batch]
        except Exception as exc:
            if len(batch) == 1:
                log.exception("cannot record instance",
                              extra={"sop_uid": batch[0].record.sop_instance_uid})
                batch[0].future.set_exception(exc)
                return
            # One bad row must not fail the others (or a PostgreSQL insert race): one by one.
            for pending in batch:
                self._commit([pending])
            return
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)
