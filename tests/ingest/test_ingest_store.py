"""Store.accept with raw bytes: what it writes, what it refuses, what a crash leaves."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import StorageSettings
from node.errors import DiskFull, InvalidUID, Undecodable
from node.ingest.store import PARTIAL_SUFFIX, Store
from node.queue.models import Instance, Series
from tests.helpers.synthetic import write_ct_series


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_stores_bytes_unchanged_with_rows(tmp_path: Path, store: Store,
                                          session_factory: sessionmaker[Session]) -> None:
    paths = write_ct_series(tmp_path / "src", 3)
    for path in paths:
        stored = store.accept(path.read_bytes(), calling_aet="SCU", peer_address="127.0.0.1:9")
        assert stored.path.read_bytes() == path.read_bytes()
        ds = pydicom.dcmread(path)
        assert stored.path == (store.root / ds.StudyInstanceUID / ds.SeriesInstanceUID
                               / f"{ds.SOPInstanceUID}.dcm")
    with session_factory() as s:
        series = s.execute(select(Series)).scalar_one()
        rows = s.execute(select(Instance)).scalars().all()
    assert series.instance_count == 3 and series.calling_aet == "SCU"
    assert series.modality == "CT" and series.body_part == "HEAD"
    assert (series.station_name, series.manufacturer, series.scanner_model) == (
        "CT ROOM 1", "Synthetic Medical", "Gen 1")
    assert sorted(r.instance_number for r in rows) == [1, 2, 3]
    assert all((store.root / r.path).stat().st_size == r.size_bytes for r in rows)


def test_duplicate_replaces_file_and_keeps_one_row(tmp_path: Path, store: Store,
                                                   session_factory: sessionmaker[Session]) -> None:
    path = write_ct_series(tmp_path / "src", 1)[0]
    ds = pydicom.dcmread(path)
    first = store.accept(path.read_bytes())
    ds.SeriesDescription = "sent again, changed"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    second = store.accept(buf.getvalue())
    assert not second.new_instance and second.path == first.path
    assert first.path.read_bytes() == buf.getvalue()
    with session_factory() as s:
        assert len(s.execute(select(Instance)).all()) == 1
        assert s.execute(select(Series.instance_count)).scalar_one() == 1
    assert [p.name for p in _files(store.root)] == [first.path.name]


def test_refused_instances_write_nothing(tmp_path: Path, store: Store,
                                         session_factory: sessionmaker[Session]) -> None:
    raw = write_ct_series(tmp_path / "src", 1)[0].read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../x"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(InvalidUID):
        store.accept(buf.getvalue())
    with pytest.raises(Undecodable):
        store.accept(raw[:-100])
    assert _files(store.root) == []
    assert not list(tmp_path.rglob("x")) and not list(tmp_path.parent.glob("x"))
    with session_factory() as s:
        assert s.execute(select(Series)).first() is None


def test_below_free_space_minimum_is_out_of_resources(
        tmp_path: Path, session_factory: sessionmaker[Session]) -> None:
    huge = Store(StorageSettings(dir=tmp_path / "st", min_free_mb=1 << 40), session_factory)
    raw = write_ct_series(tmp_path / "src", 1)[0].read_bytes()
    with pytest.raises(DiskFull) as info:
        huge.accept(raw)
    assert info.value.status == 0xA700
    assert _files(huge.root) == []


def test_sweep_removes_old_temporary_files_only(tmp_path: Path, store: Store) -> None:
    raw = write_ct_series(tmp_path / "src", 1)[0].read_bytes()
    kept = store.accept(raw).path
    partial = kept.parent / f".{kept.name}.abc{PARTIAL_SUFFIX}"
    partial.write_bytes(raw[:10])
    report_tmp = store.root / "reports" / "1.2" / "1.2.3" / ".tmp-abc.dcm"
    report_tmp.parent.mkdir(parents=True)
    report_tmp.write_bytes(b"half a report")
    old = time.time() - 60
    for path in (partial, report_tmp):
        os.utime(path, (old, old))
    fresh = kept.parent / f".{kept.name}.def{PARTIAL_SUFFIX}"  # a transfer of this run
    fresh.write_bytes(raw[:10])
    assert store.recover() == 0  # rows only: every row's file is there
    assert store.sweep_partials(started_before=time.time() - 1) == 2
    assert sorted(_files(store.root)) == sorted([kept, fresh])


def test_group_commit_from_many_threads(tmp_path: Path, store: Store,
                                        session_factory: sessionmaker[Session]) -> None:
    import threading

    folders = [write_ct_series(tmp_path / f"src{i}", 25, seed=i) for i in range(4)]
    store.start()
    errors: list[BaseException] = []

    def send(paths: list[Path]) -> None:
        try:
            for path in paths:
                store.accept(path.read_bytes())
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(paths,)) for paths in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    store.close()
    assert errors == []
    with session_factory() as s:
        counts = sorted(s.execute(select(Series.instance_count)).scalars())
        assert len(s.execute(select(Instance)).all()) == 100
    assert counts == [25, 25, 25, 25]


def test_recover_drops_rows_of_receiving_series_whose_file_is_gone(
        tmp_path: Path, store: Store, session_factory: sessionmaker[Session]) -> None:
    paths = write_ct_series(tmp_path / "src", 2)
    kept, lost = (store.accept(p.read_bytes()).path for p in paths)
    lost.unlink()  # what a power loss does to a rename whose folder fsync had not finished
    assert store.recover() == 1
    with session_factory() as s:
        assert s.execute(select(Series.instance_count)).scalar_one() == 1
        assert [r.path for r in s.execute(select(Instance)).scalars()] == [
            str(kept.relative_to(store.root))]
