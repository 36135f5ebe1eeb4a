"""The C-STORE SCU against a real Orthanc, and against faults Orthanc cannot play."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, KeyObjectSelectionDocumentStorage

from node.errors import DeliveryError
from node.report.build import ReportIdentity, build_kos, build_sr
from node.report.push import Target, Timeouts, send_file
from tests.helpers.orthanc import Orthanc, free_port
from tests.helpers.reports import kos_references, make_verdict

IDENTITY = ReportIdentity(ae_title="VAENODE", software_version="0.1.0")
FAST = Timeouts(acse_s=5, dimse_s=5, network_s=5)


@pytest.fixture
def report_files(sources: list[Dataset], tmp_path: Path) -> tuple[Path, Path]:
    verdict = make_verdict(sources, {3, 4, 5})
    sr_path, kos_path = tmp_path / "sr.dcm", tmp_path / "kos.dcm"
    build_sr(verdict, sources, identity=IDENTITY).save_as(sr_path, enforce_file_format=True)
    kos = build_kos(verdict, sources, identity=IDENTITY)
    assert kos is not None
    kos.save_as(kos_path, enforce_file_format=True)
    return sr_path, kos_path


def test_sr_and_kos_arrive_in_orthanc_byte_for_byte(
    orthanc: Orthanc, report_files: tuple[Path, Path], sources: list[Dataset]
) -> None:
    target = Target(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)
    for path in report_files:
        assert send_file(path, target, calling_ae_title="VAENODE", timeouts=FAST) == 0x0000

    [sr] = orthanc.reports("SR")
    [kos] = orthanc.reports("KO")
    sent_sr = Path(report_files[0]).read_bytes()
    stored = orthanc.instance_bytes(orthanc.find_instances(SOPInstanceUID=sr.SOPInstanceUID)[0])
    # Orthanc keeps what it received; the dataset after the file meta is identical.
    assert stored[stored.index(b"DICM") :][-1000:] == sent_sr[-1000:]
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert kos_references(kos) == [sources[i].SOPInstanceUID for i in (3, 4, 5)]


def test_wrong_called_ae_title_is_a_rejection(
    orthanc: Orthanc, report_files: tuple[Path, Path]
) -> None:
    target = Target("NOT-ORTHANC", "127.0.0.1", orthanc.dicom_port)
    with pytest.raises(DeliveryError, match="rejected"):
        send_file(report_files[0], target, calling_ae_title="VAENODE", timeouts=FAST)
    assert orthanc.instance_ids() == []


def test_nobody_listening(report_files: tuple[Path, Path]) -> None:
    target = Target("PACS", "127.0.0.1", free_port())
    with pytest.raises(DeliveryError, match="cannot connect"):
        send_file(report_files[0], target, calling_ae_title="VAENODE", timeouts=FAST)


@pytest.fixture
def refusing_scp() -> Iterator[int]:
    """An SCP that accepts associations but answers every C-STORE "out of resources"."""

    def on_store(event: evt.Event) -> int:
        return 0xA700

    ae = AE(ae_title="FULLPACS")
    ae.add_supported_context(ComprehensiveSRStorage)
    ae.add_supported_context(KeyObjectSelectionDocumentStorage)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port
    finally:
        server.shutdown()


def test_failure_status_is_reported(refusing_scp: int, report_files: tuple[Path, Path]) -> None:
    target = Target("FULLPACS", "127.0.0.1", refusing_scp)
    with pytest.raises(DeliveryError, match="0xA700"):
        send_file(report_files[0], target, calling_ae_title="VAENODE", timeouts=FAST)


@pytest.fixture
def no_sr_scp() -> Iterator[int]:
    """An SCP that supports no SR storage: the presentation context is refused."""
    ae = AE(ae_title="IMGONLY")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage only
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        yield port
    finally:
        server.shutdown()


def test_refused_presentation_context(no_sr_scp: int, report_files: tuple[Path, Path]) -> None:
    target = Target("IMGONLY", "127.0.0.1", no_sr_scp)
    with pytest.raises(DeliveryError, match="refused the presentation context"):
        send_file(report_files[0], target, calling_ae_title="VAENODE", timeouts=FAST)


def test_unreadable_report_file(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError, match="cannot read"):
        send_file(
            tmp_path / "missing.dcm",
            Target("PACS", "127.0.0.1", free_port()),
            calling_ae_title="VAENODE",
            timeouts=FAST,
        )
