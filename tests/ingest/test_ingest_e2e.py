"""The node's listener against real peers: DCMTK tools and a pynetdicom SCU, on 127.0.0.1.

Every test starts ``vaenode serve`` as a subprocess (tests/helpers/node.py) and stops it by PID.
"Stored as sent" is checked against DCMTK's storescp in bit-preserving mode (+B), which writes
the dataset bytes exactly as they came over the wire: storescu re-encodes what it reads from a
file (group lengths, padding), so the file itself is not what was sent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import uid as U
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from node.ingest.parse import parse_instance
from node.ingest.store import PARTIAL_SUFFIX
from node.queue.models import Association, Instance, Series, SeriesEvent
from node.queue.states import SeriesState
from tests.helpers import dcmtk
from tests.helpers.ingest_data import DATA_SERIES, DICOM_DATA, dataset_bytes, pydicom_data_dir
from tests.helpers.node import RunningNode, free_port, start_node
from tests.helpers.synthetic import write_ct_series

pytestmark = pytest.mark.e2e

# storescu option that proposes a file's own (compressed) transfer syntax, so it is sent as is.
PROPOSE = {
    U.JPEG2000Lossless: "-xv", U.JPEG2000: "-xw", U.JPEGLosslessSV1: "-xs",
    U.JPEGBaseline8Bit: "-xy", U.JPEGExtended12Bit: "-xx", U.JPEGLSLossless: "-xt",
    U.JPEGLSNearLossless: "-xu", U.RLELossless: "-xr", U.ExplicitVRBigEndian: "-xb",
    U.ImplicitVRLittleEndian: "-xi", U.DeflatedExplicitVRLittleEndian: "-xd",
}


# Files DCMTK itself cannot read (storescu stops with "missing SOP class (or instance)").
STORESCU_CANNOT_READ = ("explicit_VR-UN.dcm",)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    running = start_node(tmp_path / "node")
    yield running
    running.kill()


@pytest.fixture
def reference(tmp_path: Path) -> Iterator[dcmtk.StoreScp]:
    scp = dcmtk.start_storescp(tmp_path / "reference", free_port())
    yield scp
    scp.stop()


def _by_sop_uid(files: list[Path]) -> dict[str, bytes]:
    out = {}
    for path in files:
        raw = path.read_bytes()
        out[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = raw
    return out


def _stored(node: RunningNode) -> dict[str, bytes]:
    return _by_sop_uid([p for p in node.storage.rglob("*.dcm") if p.is_file()])


def _send_both(node: RunningNode, reference: dcmtk.StoreScp, paths: list[Path],
               extra: tuple[str, ...] = ()) -> None:
    for port, aec in ((node.port, node.ae_title), (reference.port, "STORESCP")):
        done = dcmtk.storescu(port, paths, called_aet=aec, extra=extra)
        assert done.returncode == 0, done.stderr + done.stdout


def _assert_stored_as_sent(node: RunningNode, reference: dcmtk.StoreScp, expected: int) -> None:
    ours, sent = _stored(node), _by_sop_uid([p for p in reference.folder.iterdir()
                                             if p.is_file()])
    assert len(sent) == expected and set(ours) == set(sent)
    for sop_uid, raw in sent.items():
        assert dataset_bytes(ours[sop_uid]) == dataset_bytes(raw), sop_uid
        ts_ours = pydicom.dcmread(pydicom.filebase.DicomBytesIO(ours[sop_uid]),
                                  stop_before_pixels=True).file_meta.TransferSyntaxUID
        ts_sent = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw),
                                  stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ts_ours == ts_sent, sop_uid
    with node.session() as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar() == expected
        paths = s.execute(select(Instance.path, Instance.size_bytes)).all()
    for rel, size in paths:
        assert (node.storage / rel).stat().st_size == size


def _series_counts(node: RunningNode) -> dict[str, int]:
    with node.session() as s:
        return dict(s.execute(select(Series.series_instance_uid, Series.instance_count)).all())


def test_echoscu(node: RunningNode) -> None:
    done = dcmtk.echoscu(node.port)
    assert done.returncode == 0, done.stderr
    with node.session() as s:
        assert s.execute(select(Association.result, Association.calling_aet)).all() == [
            ("released", "ECHOSCU")]


def test_generated_series_of_200(node: RunningNode, reference: dcmtk.StoreScp,
                                 tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "src", 200)
    _send_both(node, reference, paths)
    _assert_stored_as_sent(node, reference, 200)
    series_uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    assert _series_counts(node) == {series_uid: 200}
    with node.session() as s:
        series = s.execute(select(Series)).scalar_one()
    assert series.status is SeriesState.RECEIVING and series.calling_aet == "STORESCU"
    assert series.modality == "CT" and series.series_description == "synthetic ingest series"
    assert series.station_name == "CT ROOM 1"  # the scanner, whatever AE it called with


def test_every_shared_series(node: RunningNode, reference: dcmtk.StoreScp) -> None:
    folders = [DICOM_DATA / name for name in DATA_SERIES]
    expected = {}
    for folder in folders:
        files = sorted(folder.glob("*.dcm"))
        assert files, folder
        expected[str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)] = \
            len(files)
    _send_both(node, reference, folders)
    _assert_stored_as_sent(node, reference, sum(expected.values()))
    assert _series_counts(node) == expected


def test_pydicom_data_compressed_and_unusual(node: RunningNode, reference: dcmtk.StoreScp
                                             ) -> None:
    sendable = []
    for path in sorted(pydicom_data_dir().glob("*.dcm")):
        raw = path.read_bytes()
        if raw[128:132] != b"DICM" or path.name in STORESCU_CANNOT_READ:
            continue  # no file meta, or DCMTK cannot read it: storescu cannot send it
        try:
            parse_instance(raw)
        except Exception:
            continue  # broken on purpose (truncated, invalid UIDs): covered by refusal tests
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sendable.append((path, ds.file_meta.TransferSyntaxUID, str(ds.SOPInstanceUID)))
    syntaxes = {ts for _, ts, _ in sendable}
    assert {U.JPEGBaseline8Bit, U.JPEGLosslessSV1, U.JPEGLSLossless, U.JPEG2000Lossless,
            U.JPEG2000, U.RLELossless, U.ExplicitVRBigEndian} <= syntaxes
    # Several files share a SOP Instance UID (one image in several encodings): send in batches
    # of distinct UIDs and compare each batch as it lands, before a later one replaces it.
    batches: list[tuple[str, list[Path]]] = []
    for syntax in sorted(syntaxes):
        pending = [(p, u) for p, ts, u in sendable if ts == syntax]
        while pending:
            seen: set[str] = set()
            batch = [(p, u) for p, u in pending if not (u in seen or seen.add(u))]
            pending = [item for item in pending if item not in batch]
            batches.append((syntax, [p for p, _ in batch]))
    for syntax, paths in batches:
        extra = ("-R", PROPOSE[syntax]) if syntax in PROPOSE else ("-R",)
        _send_both(node, reference, paths, extra=extra)
        received = [p for p in reference.folder.iterdir() if p.is_file()]
        sent, ours = _by_sop_uid(received), _stored(node)
        assert len(sent) == len(paths), syntax
        for sop_uid, raw in sent.items():
            assert dataset_bytes(ours[sop_uid]) == dataset_bytes(raw), (syntax, sop_uid)
            assert pydicom.dcmread(node.storage.rglob(f"{sop_uid}.dcm").__next__(),
                                   stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        for path in received:
            path.unlink()
    with node.session() as s:
        rows = s.execute(select(func.count()).select_from(Instance)).scalar()
    assert rows == len({u for _, _, u in sendable}) == len(_stored(node))


def _four_storescu_at_once(node: RunningNode, tmp_path: Path) -> None:
    folders = [tmp_path / f"src{i}" for i in range(4)]
    for i, folder in enumerate(folders):
        write_ct_series(folder, 200, seed=i)
    procs = [subprocess.Popen(dcmtk.storescu_cmd(node.port, [folder], calling_aet=f"SCU{i}"),
                              env=dcmtk.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i, folder in enumerate(folders)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    counts = _series_counts(node)
    assert sorted(counts.values()) == [200, 200, 200, 200]
    assert len(_stored(node)) == 800
    with node.session() as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar() == 800
        results = s.execute(select(Association.result)).scalars().all()
    assert results == ["released"] * 4


def _listener_pids(node: RunningNode) -> list[int]:
    # The port opens when the first child listens; the main process logs this line once every
    # child has reported, a moment later (on a busy machine, after start_node has returned).
    deadline = time.monotonic() + 30
    while not (found := re.search(r"listener processes ready .*pids=([0-9,]+)",
                                  node.log_text())):
        assert time.monotonic() < deadline, node.log_text()
        time.sleep(0.05)
    return [int(pid) for pid in found.group(1).split(",")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("processes", [1, 2])
def test_four_storescu_at_once(tmp_path: Path, processes: int) -> None:
    node = start_node(tmp_path / "node", sections={"dicom": {"listener_processes": processes}})
    try:
        _four_storescu_at_once(node, tmp_path)
        log = node.log_text()
        if processes == 1:
            assert "listener processes ready" not in log
        else:
            assert len(_listener_pids(node)) == 2
            assert "max_associations_each=8,8" in log
            for index in range(processes):
                assert re.search(rf"DICOM listener ready .*listener={index}", log), log
            # Each connection went to the listener with fewer open (node/ingest/dispatch.py).
            accepted = [line for line in log.splitlines() if "association accepted" in line]
            per_listener = [sum(f"listener={index}" in line for line in accepted)
                            for index in range(processes)]
            assert per_listener == [2, 2], accepted
        assert node.stop() == 0
    finally:
        node.kill()


def test_a_dead_listener_process_is_logged_and_restarted(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", sections={"dicom": {"listener_processes": 2}})
    try:
        first, second = _listener_pids(node)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "listener process restarted" not in node.log_text():
            assert time.monotonic() < deadline, node.log_text()
            time.sleep(0.1)
        assert "listener process died" in node.log_text()
        assert _alive(second)
        paths = write_ct_series(tmp_path / "src", 3, rows=64, columns=64)
        for _ in range(6):  # while the dead one restarts, and after
            assert dcmtk.storescu(node.port, paths).returncode == 0
        assert len(_stored(node)) == 3
        assert node.stop() == 0
        assert not _alive(second)
    finally:
        node.kill()


def test_kill_9_of_the_main_process_ends_the_listener_processes(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", sections={"dicom": {"listener_processes": 2}})
    pids = _listener_pids(node)
    node.kill()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "listener processes outlived the main process"
        time.sleep(0.05)
    assert dcmtk.echoscu(node.port).returncode != 0


def test_access_control(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", sections={
        "dicom": {"allowed_calling_aets": ["GOODSCU", "HOSTSCU@10.9.9.9"]}})
    try:
        bad = dcmtk.echoscu(node.port, calling_aet="BADSCU")
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stderr + bad.stdout
        wrong_host = dcmtk.echoscu(node.port, calling_aet="HOSTSCU")
        assert wrong_host.returncode != 0
        wrong_called = dcmtk.echoscu(node.port, called_aet="SOMEONE", calling_aet="GOODSCU")
        assert wrong_called.returncode != 0
        assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
        assert dcmtk.echoscu(node.port, calling_aet="GOODSCU").returncode == 0
        with node.session() as s:
            results = s.execute(select(Association.calling_aet, Association.result)
                                .order_by(Association.id)).all()
        assert [r[0] for r in results] == ["BADSCU", "HOSTSCU", "GOODSCU", "GOODSCU"]
        assert all(r[1].startswith("rejected") for r in results[:3])
        assert results[3][1] == "released"
        assert "association rejected" in node.log_text() and "peer=127.0.0.1:" in node.log_text()
    finally:
        node.kill()


def _write_raw(path: Path, meta_sop_uid: str, body: bytes, template: Path) -> Path:
    """A file whose meta names ``meta_sop_uid`` and whose dataset bytes are ``body``."""
    raw = template.read_bytes()
    head = raw[: len(raw) - len(dataset_bytes(raw))]
    ds = pydicom.dcmread(template, stop_before_pixels=True)
    old = str(ds.file_meta.MediaStorageSOPInstanceUID).encode()
    assert len(meta_sop_uid) <= len(old)
    padded = meta_sop_uid.encode() + b"\x00" * (len(old) - len(meta_sop_uid))
    path.write_bytes(head.replace(old, padded) + body)
    return path


def test_refusals_and_the_association_goes_on(node: RunningNode, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    good = write_ct_series(tmp_path / "src", 3, rows=64, columns=64)
    ds = pydicom.dcmread(good[0])
    ds.SOPInstanceUID = "../../x"
    import io
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    traversal = _write_raw(tmp_path / "traversal.dcm", "../../x", dataset_bytes(buf.getvalue()),
                           good[0])
    body = dataset_bytes(good[1].read_bytes())
    truncated = _write_raw(tmp_path / "truncated.dcm",
                           str(pydicom.dcmread(good[1]).SOPInstanceUID), body[: len(body) // 2],
                           good[1])
    garbage = _write_raw(tmp_path / "garbage.dcm", "1.2.3.4.5",
                         bytes(range(256)) * 40, good[2])

    # Send the bytes as they are, without pydicom decoding and re-encoding them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(CTImageStorage, [U.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        statuses = {name: assoc.send_c_store(path).Status for name, path in [
            ("traversal", traversal), ("truncated", truncated), ("garbage", garbage),
            ("good", good[2])]}
    finally:
        assoc.release()
    assert statuses["traversal"] == 0xC212
    assert statuses["truncated"] == 0xC210
    assert statuses["garbage"] == 0xC210
    assert statuses["good"] == 0x0000
    assert list(_stored(node)) == [str(pydicom.dcmread(good[2]).SOPInstanceUID)]
    assert not [p for p in tmp_path.rglob("x*") if p.is_file()]
    assert not list(node.storage.rglob(f"*{PARTIAL_SUFFIX}"))
    with node.session() as s:
        assoc_row = s.execute(select(Association)).scalar_one()
    assert (assoc_row.instance_count, assoc_row.failed_count) == (1, 3)
    log = node.log_text()
    assert "instance refused" in log and "peer=127.0.0.1:" in log


def test_kill_9_mid_transfer_then_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    paths = write_ct_series(tmp_path / "src", 200, rows=256, columns=256)
    uid_of = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    node = start_node(tmp_path / "node")
    succeeded: list[Path] = []
    sending_over = threading.Event()

    def kill_when_busy() -> None:
        while len(succeeded) < 60 and not sending_over.is_set():
            time.sleep(0.001)
        node.kill()

    # A daemon, and told when sending is over: a sender that stops early must fail this test,
    # never leave a thread that keeps pytest from exiting.
    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="CRASHSCU")
    ae.add_requested_context(CTImageStorage, [U.ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    try:
        # pynetdicom's requestor can lose a C-STORE response to its own reactor thread on a
        # loaded machine (a DIMSE timeout, then an abort); a new association resends from the
        # first unacknowledged instance, as a scanner would. Only the kill ends the sending.
        for _ in range(5):
            if node.proc.poll() is not None:
                break
            assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            if not assoc.is_established:
                break
            for path in paths[len(succeeded):]:
                status = assoc.send_c_store(path)
                if not assoc.is_established or getattr(status, "Status", None) != 0x0000:
                    break
                succeeded.append(path)
            assoc.abort()
            if len(succeeded) == len(paths):
                break
    finally:
        sending_over.set()
        killer.join(timeout=60)
        node.kill()
    assert 60 <= len(succeeded) < 200

    restarted = start_node(tmp_path / "node", port=node.port)
    try:
        # The temporary files of the killed run are swept in the background after start-up.
        deadline = time.monotonic() + 30
        while "storage swept" not in restarted.log_text():
            assert time.monotonic() < deadline, restarted.log_text()[-2000:]
            time.sleep(0.1)
        assert not list(restarted.storage.rglob(f"*{PARTIAL_SUFFIX}"))
        with restarted.session() as s:
            rows = dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).all())
        for rel in rows.values():  # every row points to a complete file
            assert parse_instance((restarted.storage / rel).read_bytes())
        for path in restarted.storage.rglob("*.dcm"):  # no file is partial, row or not
            assert parse_instance(path.read_bytes())
        assert {uid_of[p] for p in succeeded} <= set(rows)
        rest = [p for p in paths if p not in succeeded]
        done = dcmtk.storescu(restarted.port, rest)
        assert done.returncode == 0, done.stderr
        assert _series_counts(restarted) == {
            str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID): 200}
        assert len(_stored(restarted)) == 200
    finally:
        restarted.kill()


def test_series_is_queued_after_the_idle_time(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node",
                      sections={"queue": {"series_idle_s": 1.0, "check_interval_s": 0.2,
                                          "complete_on_release": False}})
    try:
        assert dcmtk.storescu(node.port, write_ct_series(tmp_path / "src", 3)).returncode == 0
        deadline = time.monotonic() + 20
        status = None
        while time.monotonic() < deadline:
            with node.session() as s:
                status = s.execute(select(Series.status)).scalar_one()
            if status is SeriesState.QUEUED:
                break
            time.sleep(0.2)
        assert status is SeriesState.QUEUED
        with node.session() as s:
            history = s.execute(select(SeriesEvent.from_status, SeriesEvent.to_status)
                                .order_by(SeriesEvent.id)).all()
        assert [tuple(h) for h in history] == [(None, "receiving"), ("receiving", "queued")]
    finally:
        node.kill()


def _statuses(node: RunningNode) -> dict[str, SeriesState]:
    with node.session() as s:
        return dict(s.execute(select(Series.series_instance_uid, Series.status)).all())


def _series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_released_series_is_queued_without_the_idle_time(tmp_path: Path,
                                                             processes: int) -> None:
    """storescu releases its association after the last instance: its series (here two in one
    association) are queued a settle time later, not after the (here 10-minute) idle time; an
    aborted association and a one-instance association are not taken as the end of their
    series."""
    node = start_node(tmp_path / "node", sections={
        "queue": {"series_idle_s": 600.0, "check_interval_s": 0.2, "release_settle_s": 0.5},
        "dicom": {"listener_processes": processes},
        "worker": {"enabled": False}})
    try:
        released = write_ct_series(tmp_path / "released", 5)
        released2 = write_ct_series(tmp_path / "released2", 3)
        aborted = write_ct_series(tmp_path / "aborted", 5)
        single = write_ct_series(tmp_path / "single", 1)
        assert dcmtk.storescu(node.port, aborted, extra=["--abort"]).returncode == 0
        assert dcmtk.storescu(node.port, single).returncode == 0
        assert dcmtk.storescu(node.port, [*released, *released2]).returncode == 0
        done = {_series_uid(released[0]), _series_uid(released2[0])}
        deadline = time.monotonic() + 30
        while (time.monotonic() < deadline
               and {u for u, st in _statuses(node).items() if st is SeriesState.QUEUED} != done):
            time.sleep(0.2)
        time.sleep(1.5)  # three settle times more for the other two to (wrongly) follow
        assert _statuses(node) == {_series_uid(released[0]): SeriesState.QUEUED,
                                   _series_uid(released2[0]): SeriesState.QUEUED,
                                   _series_uid(aborted[0]): SeriesState.RECEIVING,
                                   _series_uid(single[0]): SeriesState.RECEIVING}
        with node.session() as s:
            reasons = s.execute(select(SeriesEvent.reason)
                                .where(SeriesEvent.to_status == "queued")).scalars().all()
            results = sorted(s.execute(select(Association.result)).scalars())
        assert reasons == ["association released by the sender"] * 2
        # storescu's A-ABORT may be seen as the abort or as the connection closing first.
        assert results.count("released") == 2
        assert set(results) - {"released"} <= {"aborted", "connection closed"}
    finally:
        node.kill()


def test_a_series_sent_in_parts_waits_for_its_declared_count(tmp_path: Path) -> None:
    """A sender that stores a series in two associations with a pause longer than the settle
    time between them: its instances declare 6 images (Images in Acquisition), so the first
    association's release (3 of 6) does not end the series; the second's does."""
    node = start_node(tmp_path / "node", sections={
        "queue": {"series_idle_s": 600.0, "check_interval_s": 0.2, "release_settle_s": 0.5},
        "worker": {"enabled": False}})
    try:
        paths = write_ct_series(tmp_path / "parts", 6)
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.ImagesInAcquisition = 6
            ds.save_as(path, enforce_file_format=True)
        uid = _series_uid(paths[0])
        assert dcmtk.storescu(node.port, paths[:3]).returncode == 0
        time.sleep(2.0)  # four settle times and ten checks
        assert _statuses(node) == {uid: SeriesState.RECEIVING}
        with node.session() as s:
            series = s.execute(select(Series).where(Series.series_instance_uid == uid)).scalar_one()
            assert (series.instance_count, series.expected_instances) == (3, 6)
        assert dcmtk.storescu(node.port, paths[3:]).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _statuses(node)[uid] is not SeriesState.QUEUED:
            time.sleep(0.2)
        assert _statuses(node) == {uid: SeriesState.QUEUED}
        with node.session() as s:
            reasons = s.execute(select(SeriesEvent.reason)
                                .where(SeriesEvent.to_status == "queued")).scalars().all()
        assert reasons == ["association released by the sender"]
    finally:
        node.kill()


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_lets_the_transfer_finish_and_exits_0(tmp_path: Path, processes: int) -> None:
    paths = write_ct_series(tmp_path / "src", 200, rows=128, columns=128)
    node = start_node(tmp_path / "node", sections={"dicom": {"listener_processes": processes}})
    sender = subprocess.Popen(dcmtk.storescu_cmd(node.port, [tmp_path / "src"]),
                              env=dcmtk.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(list(node.storage.rglob("*.dcm"))) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert node.stop() == 0
    out, _ = sender.communicate(timeout=120)
    assert sender.returncode == 0, out
    assert len(list(node.storage.rglob("*.dcm"))) == len(paths)
    assert "DICOM listener stopped" in node.log_text()
    assert dcmtk.echoscu(node.port).returncode != 0  # no longer listening


def test_vaenode_echo(node: RunningNode) -> None:
    vaenode = Path(sys.executable).with_name("vaenode")
    ok = subprocess.run([str(vaenode), "echo", f"VAENODE@127.0.0.1:{node.port}",
                         "--config", str(node.config_path)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "Success" in ok.stdout, ok.stderr
    refused = subprocess.run([str(vaenode), "echo", f"VAENODE@127.0.0.1:{free_port()}",
                              "--config", str(node.config_path), "--timeout-s", "3"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "failed" in refused.stderr
    bad = subprocess.run([str(vaenode), "echo", "no-port-here", "--config",
                          str(node.config_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "AE@HOST:PORT" in bad.stderr


def _make_cert(folder: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A key and certificate (self-signed, or signed by ``ca``) made with the openssl tool."""
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-subj", f"/CN={name}", "-keyout", str(key)]
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", *new_key, "-days", "2",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-out", str(crt)],
                       check=True, capture_output=True)
    else:
        csr = folder / f"{name}.csr"
        subprocess.run(["openssl", "req", *new_key, "-out", str(csr)],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[1]),
                        "-CAkey", str(ca[0]), "-CAcreateserial", "-days", "2", "-out", str(crt)],
                       check=True, capture_output=True)
    return key, crt


@pytest.mark.parametrize("processes", [1, 2])
def test_dicom_tls_with_client_certificates(tmp_path: Path, processes: int) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = _make_cert(certs, "test-ca")
    node_key, node_crt = _make_cert(certs, "node", ca)
    client_key, client_crt = _make_cert(certs, "client", ca)
    stranger_key, stranger_crt = _make_cert(certs, "stranger")  # not signed by the CA
    node = start_node(tmp_path / "node", sections={"dicom": {
        "listener_processes": processes, "acse_timeout_s": 3.0, "tls": {
            "enabled": True, "cert_file": str(node_crt), "key_file": str(node_key),
            "ca_file": str(ca[1]), "require_client_cert": True}}})

    def echo(*tls: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dcmtk.tool("echoscu"), "-aec", "VAENODE", *tls, "127.0.0.1",
                               str(node.port)], env=dcmtk.env(), capture_output=True,
                              text=True, timeout=60)

    try:
        ok = echo("+tls", str(client_key), str(client_crt), "+cf", str(ca[1]))
        assert ok.returncode == 0, ok.stderr
        assert echo().returncode != 0  # plain TCP to a TLS port
        assert echo("+tls", str(stranger_key), str(stranger_crt),
                    "+cf", str(ca[1])).returncode != 0
        assert echo("+tla", "+cf", str(ca[1])).returncode != 0  # no client certificate
        # Failed handshakes cost nothing lasting: the node still serves, on every listener,
        # also while a peer holds a connection without starting its handshake (one listener
        # process: pynetdicom's accept loop did the handshake and waited on it forever), and
        # closes that one within the ACSE timeout.
        with socket.create_connection(("127.0.0.1", node.port), timeout=30) as silent:
            for _ in range(processes):
                again = echo("+tls", str(client_key), str(client_crt), "+cf", str(ca[1]))
                assert again.returncode == 0, again.stderr
            assert silent.recv(1) == b""
        log = node.log_text()
        assert "TLS handshake failed" in log and "Traceback" not in log, log[-3000:]
    finally:
        node.kill()


def test_below_the_free_space_floor_is_out_of_resources_and_nothing_is_lost(
        tmp_path: Path) -> None:
    """A real storescu against a node whose disk is "full" (its floor above the free space):
    every instance gets 0xA700, nothing is written or recorded, the node keeps serving, and
    after the floor is lowered (space freed) the sender's retry stores the whole series."""
    series = write_ct_series(tmp_path / "src", 5, rows=64, columns=64)
    workdir = tmp_path / "node"
    workdir.mkdir()
    floor_mb = shutil.disk_usage(workdir).free // (1 << 20) + 100_000
    node = start_node(workdir, sections={"storage": {"min_free_mb": floor_mb}})
    try:
        # -nh: go on after a refusal, so that every instance is tried.
        sent = dcmtk.storescu(node.port, series, called_aet=node.ae_title, extra=("-v", "-nh"))
        out = sent.stdout + sent.stderr
        assert out.count("Received Store Response (Refused: OutOfResources)") == 5, out
        assert not [p for p in node.storage.rglob("*") if p.is_file()]
        with node.session() as s:
            assert s.execute(select(func.count()).select_from(Instance)).scalar() == 0
        assert "storage below its free-space minimum" in node.log_text()
        assert dcmtk.echoscu(node.port, called_aet=node.ae_title).returncode == 0
    finally:
        node.stop()
    node = start_node(workdir, port=node.port, sections={"storage": {"min_free_mb": 0}})
    try:
        retry = dcmtk.storescu(node.port, series, called_aet=node.ae_title)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        assert len(_stored(node)) == 5
    finally:
        node.kill()


def test_too_many_associations_are_rejected_then_accepted_again(tmp_path: Path) -> None:
    """``max_associations`` open at once: the next one is rejected (transient, local limit
    exceeded: the sender may try again), logged and recorded; once one is released, accepted.
    Connections that never send an association request (port probes) take no slot."""
    node = start_node(tmp_path / "node", sections={"dicom": {"max_associations": 2}})
    ae = AE(ae_title="HOLDSCU")
    ae.add_requested_context(Verification)
    probes = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    for probe in probes[1:]:
        probe.close()  # closed probes linger in pynetdicom for the ACSE timeout
    held = [ae.associate("127.0.0.1", node.port, ae_title=node.ae_title) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = dcmtk.echoscu(node.port, called_aet=node.ae_title, calling_aet="THIRDSCU")
        out = third.stdout + third.stderr
        assert third.returncode != 0
        assert "Local Limit Exceeded" in out, out
        held.pop().release()
        deadline = time.monotonic() + 10
        while (again := dcmtk.echoscu(node.port, called_aet=node.ae_title,
                                      calling_aet="THIRDSCU")).returncode != 0:
            assert time.monotonic() < deadline, again.stdout + again.stderr
            time.sleep(0.2)
        with node.session() as s:
            rows = s.execute(select(Association.calling_aet, Association.result)
                             .where(Association.calling_aet == "THIRDSCU")
                             .order_by(Association.id)).all()
        assert rows[0] == ("THIRDSCU", "rejected: too many associations")
        assert rows[-1] == ("THIRDSCU", "released")
        assert "too many associations" in node.log_text()
    finally:
        for a in held:
            a.release()
        probes[0].close()
        node.kill()
