"""Real scanners' normal brain T1 series, as the scanners wrote them, through the node.

The six Siemens Prisma series of ``../shared/data/dicom/`` (2D FLASH sagittal in four patient
positions; XA30 3D TFL as enhanced multi-frame) and the studyforrest T1 (another site's
scanner, converted from NIfTI: DERIVED, so scored through a rule with ``score_derived``) are
sent with DCMTK ``storescu`` to ``vaenode serve`` with the shipped config's routing rule and
no model named, so the default bundle scores them (``node/models/brain-t1-multiscanner``; the
earlier default ``brain-t1`` 0.1.0 flags 4 to 14 slices of each Prisma series: issue 18),
as ``make run`` serves; each must end ``done`` with a normal
verdict, at most 2% of its slices flagged (issue 18's target), and its SR in a real Orthanc
must say so. Station learning is on as shipped: these are each station's first series,
judged out of the box.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from node.model.bundle import default_bundle_path
from node.queue.models import Series
from tests.helpers.dcmtk import storescu
from tests.helpers.node import RunningNode, start_node
from tests.helpers.node import wait_for as wait
from tests.helpers.orthanc import Orthanc
from tests.helpers.reports import measurement_groups
from tests.helpers.series import DATA

pytestmark = pytest.mark.e2e

DICOM = DATA / "dicom"
REPO = Path(__file__).resolve().parents[2]
#: ``VAENODE_TEST_BUNDLE`` names another bundle; unset, the node loads its default.
BUNDLE = os.environ.get("VAENODE_TEST_BUNDLE")
_META = json.loads((Path(BUNDLE or default_bundle_path()) / "model.json").read_text())
#: (name, version) of the bundle the series must be scored by.
SCORED_BY = (_META["name"], _META["version"])
SCANNER_SERIES = ("siemens_prisma_t1_fl2d_sag_hfs", "siemens_prisma_t1_fl2d_sag_hfp",
                  "siemens_prisma_t1_fl2d_sag_hfdl", "siemens_prisma_t1_fl2d_sag_hfdr",
                  "siemens_prisma_xa30_t1_tfl_5", "siemens_prisma_xa30_t1_tfl_6")
CONVERTED = "studyforrest_t1w"
#: The studyforrest series' description; the rule that scores its derived images takes only it.
CONVERTED_DESCRIPTION = "^anat-T1w$"
MAX_FLAGGED = 0.02
#: "Imaging Series Quality" / "Image Quality" answer of a flagged series or image (RID14).
NON_DIAGNOSTIC = "RID14"


@dataclass(frozen=True)
class Sent:
    name: str
    study_instance_uid: str
    series_instance_uid: str


def shipped_rules() -> list[dict[str, object]]:
    """The shipped config's routing rules, then one that scores the converted series."""
    rules = tomllib.loads((REPO / "config" / "node.toml").read_text())["routing"]["rules"]
    derived = {"name": "studyforrest-converted", "modality": "MR",
               "series_description": CONVERTED_DESCRIPTION, "score_derived": True,
               "min_abnormal_slices": 3}
    return [derived, *rules]


def first_header(folder: Path) -> Dataset:
    return pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)


@dataclass
class Run:
    node: RunningNode
    orthanc: Orthanc
    sent: list[Sent]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    for name in (*SCANNER_SERIES, CONVERTED):
        if not (DICOM / name).is_dir():
            pytest.fail(f"real series {name} not found under {DICOM}")
    workdir = tmp_path_factory.mktemp("real")
    orthanc = Orthanc(workdir=workdir / "orthanc", ae_title="PACS")
    orthanc.start()
    node = start_node(workdir / "node", sections={
        "queue": {"series_idle_s": 2.0, "check_interval_s": 0.3},
        "worker": {"enabled": True, "poll_interval_s": 0.3, "lease_s": 300.0},
        "model": {"device": "cpu", **({"bundle": BUNDLE} if BUNDLE else {})},
        "routing": {"rules": shipped_rules()},
        "delivery": {"retry_base_s": 0.5, "retry_max_s": 2.0, "poll_interval_s": 0.3,
                     "destinations": [{"name": "pacs", "ae_title": orthanc.ae_title,
                                       "host": "127.0.0.1", "port": orthanc.dicom_port}]},
    })
    try:
        sent = []
        for name in (*SCANNER_SERIES, CONVERTED):
            folder = DICOM / name
            proc = storescu(node.port, [folder], called_aet=node.ae_title, calling_aet="SCANNER")
            assert proc.returncode == 0, proc.stderr
            ds = first_header(folder)
            sent.append(Sent(name, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
        wait("an SR for every series", lambda: all(sr_of(orthanc, s) for s in sent), 600, node)
        yield Run(node, orthanc, sent)
    finally:
        node.stop()
        orthanc.stop(graceful=False)


def sr_of(orthanc: Orthanc, sent: Sent) -> list[Dataset]:
    out = []
    for ds in orthanc.reports("SR", sent.study_instance_uid):
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        if any(s.SeriesInstanceUID == sent.series_instance_uid for s in evidence):
            out.append(ds)
    return out


def test_each_real_series_is_done_and_normal(run: Run) -> None:
    with run.node.session() as session:
        rows = {s.series_instance_uid: s for s in session.scalars(select(Series))}
    for sent in run.sent:
        row = rows[sent.series_instance_uid]
        assert (str(row.status), row.abnormal) == ("done", False), (
            f"{sent.name}: {row.status}, {row.abnormal_slices} of {row.scored_slices} flagged")
        assert row.abnormal_slices <= MAX_FLAGGED * row.scored_slices, sent.name
        expected_rule = "studyforrest-converted" if sent.name == CONVERTED else "brain-t1-mr"
        assert row.routing_rule == expected_rule, sent.name
        assert (row.model_name, row.model_version) == SCORED_BY, sent.name


def test_each_sr_in_orthanc_says_normal(run: Run) -> None:
    for sent in run.sent:
        [sr] = sr_of(run.orthanc, sent)
        groups = measurement_groups(sr)
        summary = groups[-1]
        assert summary.evaluations["Imaging Series Quality"] != NON_DIAGNOSTIC, sent.name
        images = groups[:-1]
        flagged = sum(g.evaluations["Image Quality"] == NON_DIAGNOSTIC for g in images)
        assert summary.measurements["Number of scored images"] == len(images), sent.name
        assert summary.measurements["Number of non-diagnostic images"] == flagged, sent.name
        assert flagged <= MAX_FLAGGED * len(images), (
            f"{sent.name}: {flagged} of {len(images)} slices flagged in its SR")
        assert summary.texts["Station reference"].startswith("Reference: out of the box")
