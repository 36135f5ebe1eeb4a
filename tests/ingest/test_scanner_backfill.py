"""``vaenode db fill-scanners``: series rows stored before revision 0011 get their scanner from
their stored files; nothing else changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.ingest.store import Store
from node.queue.models import Instance, Series, utcnow
from tests.helpers.synthetic import write_ct_series

VAENODE = Path(sys.executable).with_name("vaenode")


def _send(store: Store, folder: Path, *, station: str | None = "CT ROOM 1",
          scanner: bool = True) -> str:
    """Store a 3-instance series through ingest; its Series Instance UID."""
    paths = write_ct_series(folder, 3)
    for path in paths:
        ds = pydicom.dcmread(path)
        if not scanner:
            del ds.StationName, ds.Manufacturer, ds.ManufacturerModelName
        elif station is not None:
            ds.StationName = station
        ds.save_as(path, enforce_file_format=True)
        store.accept(path.read_bytes(), calling_aet="GATEWAY", peer_address="127.0.0.1:1")
    return str(pydicom.dcmread(paths[0]).SeriesInstanceUID)


def _scanners(factory: sessionmaker[Session]) -> dict[str, tuple[str | None, ...]]:
    with factory() as s:
        return {uid: (st, mf, md) for uid, st, mf, md in s.execute(select(
            Series.series_instance_uid, Series.station_name, Series.manufacturer,
            Series.scanner_model))}


def test_fill_scanners_reads_the_first_stored_instance_of_rows_that_lack_it(
        tmp_path: Path, store: Store, session_factory: sessionmaker[Session]) -> None:
    sent = tmp_path / "sent"
    old = _send(store, sent / "old", station="MR ROOM 3")      # stored before 0011
    silent = _send(store, sent / "silent", scanner=False)      # its headers name no scanner
    purged = _send(store, sent / "purged", station="MR ROOM 1")  # retention deleted its images
    lost = _send(store, sent / "lost", station="MR ROOM 2")    # its first file is missing
    recent = _send(store, sent / "recent", station="MR ROOM 4")  # recorded by ingest
    storage = tmp_path / "storage"
    with session_factory.begin() as s:
        # What a database upgraded from before revision 0011 holds: empty scanner columns.
        s.execute(update(Series).where(Series.series_instance_uid != recent).values(
            station_name=None, manufacturer=None, scanner_model=None))
        s.execute(update(Series).where(Series.series_instance_uid == purged).values(
            purged_at=utcnow()))
        # A row recorded by ingest whose model came later stays as it is (not all three empty).
        s.execute(update(Series).where(Series.series_instance_uid == recent).values(
            scanner_model=None))
    with session_factory() as s:
        # The first instance received, which the command reads. The purged series keeps its
        # files (rows change before files go): its row alone says the images are gone.
        (storage / s.scalars(select(Instance.path).join(Series).where(
            Series.series_instance_uid == lost).order_by(Instance.id).limit(1)).one()).unlink()
    before = _scanners(session_factory)
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "queue.db"}"\n'
                      f'[storage]\ndir = "{storage}"\n', encoding="utf-8")

    def run(*extra: str) -> str:
        proc = subprocess.run([str(VAENODE), "db", "fill-scanners", "--config", str(config),
                               *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    dry = run("--dry-run")
    assert dry.strip() == ("4 series lacked the scanner: would fill 1, 1 name none in their "
                           "headers, 2 have no stored image left to read (deleted by retention,"
                           " or missing)")
    assert _scanners(session_factory) == before

    assert "filled 1, 1 name none" in run()
    after = _scanners(session_factory)
    assert after[old] == ("MR ROOM 3", "Synthetic Medical", "Gen 1")
    assert after[silent] == (None, None, None)
    assert after[purged] == after[lost] == (None, None, None)
    assert after[recent] == ("MR ROOM 4", "Synthetic Medical", None)
    # Again: the filled row is no longer looked at.
    assert run().startswith("3 series lacked the scanner: filled 0, 1 name none")
