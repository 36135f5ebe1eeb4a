"""Broken but legal series through the whole node to a real PACS (issue 19, items 3, 4, 9).

One node (SCP, worker with a tiny real bundle, outbox) and a real Orthanc. DCMTK ``storescu``
sends two real Siemens MR series (Trio, Prisma), changed as anonymizers and broken senders
change them:

- every Type 2 patient and study attribute the SR and KOS headers copy, removed (Patient
  Birth Date among them): the series must reach Orthanc as an SR all the same;
- Modality removed from the first instances sent, and one more instance of the series with an
  unknown VR (pynetdicom, refused at ingest): the series must still be scored, with every
  other image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from node.queue.models import Series
from node.report.header import HEADER_TYPE2_KEYWORDS
from tests.helpers.dcmtk import storescu
from tests.helpers.node import scoring_sections, start_node
from tests.helpers.orthanc import Orthanc
from tests.hostile.conftest import DATA, series_files
from tests.hostile.corpus import SOP_INSTANCE_TAG, Source, with_value
from tests.hostile.peers import MR_IMAGE, RawStoreSCU, conformance_answer

pytestmark = pytest.mark.e2e

STRIPPED = DATA / "siemens_trio_gre_field_mapping_2"
NO_MODALITY = DATA / "siemens_prisma_t1_fl2d_sag_hfs"
#: Instances of NO_MODALITY, first in Instance Number and sent first, without Modality.
WITHOUT_MODALITY = 3


def _rewrite(folder: Path, out: Path, change: Callable[[int, pydicom.Dataset], None]
             ) -> list[Path]:
    """The series in ``folder`` written to ``out`` in Instance Number order, each dataset
    passed to ``change`` (with its position) first; returns the files in that order."""
    datasets = sorted((pydicom.dcmread(p) for p in series_files(folder)),
                      key=lambda ds: int(ds.InstanceNumber))
    out.mkdir(parents=True)
    paths = []
    for position, ds in enumerate(datasets):
        change(position, ds)
        path = out / f"{position:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.helpers.tiny_bundle import make_tiny_bundle

    work = tmp_path_factory.mktemp("report-node")
    bundle = make_tiny_bundle(work / "bundle")

    def strip(_: int, ds: pydicom.Dataset) -> None:
        for keyword in HEADER_TYPE2_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)

    def drop_modality(position: int, ds: pydicom.Dataset) -> None:
        if position < WITHOUT_MODALITY:
            del ds.Modality

    stripped = _rewrite(STRIPPED, work / "stripped", strip)
    no_modality = _rewrite(NO_MODALITY, work / "no-modality", drop_modality)
    orthanc = Orthanc(workdir=work / "orthanc", ae_title="PACS")
    orthanc.start()
    node = None
    try:
        node = start_node(work / "node",
                          sections=scoring_sections(bundle, orthanc.dicom_port))
        # The unknown-VR instance of the second series, first: refused, the series goes on.
        bad = Source.read(no_modality[-1])
        bad_uid = bad.sop_instance + ".9"
        data = with_value(bad, SOP_INSTANCE_TAG, bad_uid.encode()) + (
            b"\xe1\x7f\x10\x00ZZ\x02\x00ab")
        scu = RawStoreSCU(node, (MR_IMAGE,))
        try:
            bad_status = scu.store(data, sop_class=bad.sop_class, sop_instance=bad_uid,
                                   syntax=bad.syntax)
        finally:
            scu.release()
        for files in (stripped, no_modality):
            result = storescu(node.port, files, calling_aet="SCANNER1")
            assert result.returncode == 0, result.stdout + result.stderr
        uids = {name: str(pydicom.dcmread(files[0], stop_before_pixels=True)
                          .SeriesInstanceUID)
                for name, files in (("stripped", stripped), ("no_modality", no_modality))}

        def finished() -> dict[str, Series] | None:
            with node.session() as session:
                rows = {name: session.scalar(select(Series)
                                             .where(Series.series_instance_uid == uid))
                        for name, uid in uids.items()}
            done = all(r is not None and str(r.status) in ("done", "failed", "skipped")
                       for r in rows.values())
            return rows if done else None  # type: ignore[return-value]

        rows = node.wait_for("both series finished", finished, 180)
        done = sum(str(r.status) == "done" for r in rows.values())
        reports = node.wait_for(f"{done} SR(s) in Orthanc",
                                lambda: (found := orthanc.reports("SR")) and len(found) >= done
                                and found, 60) if done else []
        yield {"rows": rows, "reports": reports, "uids": uids, "bad_status": bad_status,
               "sent": {"stripped": len(stripped), "no_modality": len(no_modality)},
               "node": node}
    finally:
        if node is not None:
            node.stop()
        orthanc.stop(graceful=False)


def test_a_series_without_its_type_2_header_attributes_reaches_pacs_as_an_sr(
        scored: dict[str, Any]) -> None:
    row = scored["rows"]["stripped"]
    assert str(row.status) == "done", row.status_reason
    srs = [ds for ds in scored["reports"]
           if ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
           .SeriesInstanceUID == scored["uids"]["stripped"]]
    assert len(srs) == 1
    promised = conformance_answer("Type 2 patient or study attributes missing")
    for keyword in HEADER_TYPE2_KEYWORDS:  # present, and empty (Type 2), as promised
        assert f"`{keyword}`" in promised, keyword
        assert keyword in srs[0] and not srs[0][keyword].value, keyword


def test_a_series_whose_first_instances_lack_modality_is_scored_whole(
        scored: dict[str, Any]) -> None:
    assert "every image is scored" in conformance_answer("Modality missing from some images")
    row = scored["rows"]["no_modality"]
    assert str(row.status) == "done", row.status_reason
    assert row.modality == "MR"
    assert row.scored_slices == scored["sent"]["no_modality"]


def test_an_unknown_vr_instance_costs_its_series_nothing(scored: dict[str, Any]) -> None:
    assert "scored with the instances that were stored" in conformance_answer(
        "one instance of the series refused")
    assert scored["bad_status"] == 0xC210
    row = scored["rows"]["no_modality"]
    assert str(row.status) == "done" and row.instance_count == scored["sent"]["no_modality"]

