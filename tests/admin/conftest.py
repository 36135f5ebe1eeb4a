"""Fixtures of the dashboard tests: a migrated database, a real dashboard server, a scored node."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from node.admin.app import RunningDashboard, start_in_thread
from node.config import Settings
from tests.admin.web import NOISE_BLOCK, TOKEN, ScoredNode, admin_settings
from tests.helpers.db import migrated_database


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build dashboard settings on this test's temp folder (admin keys as arguments)."""
    return lambda **admin: admin_settings(tmp_path, **admin)


@pytest.fixture
def session_factory_for() -> Iterator[Callable[[Settings], sessionmaker[Session]]]:
    """Migrate the settings' database to head and return a session factory on it."""
    with contextlib.ExitStack() as stack:
        yield lambda settings: stack.enter_context(migrated_database(settings.database))


@pytest.fixture
def run_dashboard() -> Iterator[Callable[[Settings, sessionmaker[Session]], RunningDashboard]]:
    """Start real dashboards (uvicorn on loopback); all are stopped at the end of the test."""
    running: list[RunningDashboard] = []

    def start(settings: Settings, session_factory: sessionmaker[Session]) -> RunningDashboard:
        dashboard = start_in_thread(settings, session_factory)
        running.append(dashboard)
        return dashboard

    yield start
    for dashboard in running:
        dashboard.stop()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny but real model bundle, trained once per test session by the project's code."""
    from tests.helpers.tiny_bundle import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))


# --- a real node that received and scored series --------------------------------------------

def _wait(what: str, check: Callable[[], bool], timeout_s: float, node: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise RuntimeError(f"vaenode serve exited ({node.proc.returncode}) while waiting for "
                               f"{what}:\n{node.log_text()[-4000:]}")
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}:\n{node.log_text()[-4000:]}")


@pytest.fixture(scope="session")
def scored_node(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path
) -> Iterator[ScoredNode]:
    """Start ``vaenode serve`` (SCP, worker, outbox, dashboard) with a real Orthanc as PACS,
    send two real series with DCMTK ``storescu``, and wait until both are scored and their
    reports delivered.

    Series 1: an IXI T1 volume written as DICOM with a block of slices replaced by noise
    (flagged by any model of normal brains). Series 2: a real Siemens scanner series.
    """
    import numpy as np
    from sqlalchemy import select

    from node.admin import queries, verdicts
    from node.queue.models import Series
    from tests.helpers.dcmtk import env as dcmtk_env
    from tests.helpers.dcmtk import tool
    from tests.helpers.node import free_port, scoring_sections, start_node
    from tests.helpers.orthanc import Orthanc
    from tests.helpers.series import DICOM, IXI, load_volume, write_series

    storescu = tool("storescu")
    workdir = tmp_path_factory.mktemp("scored-node")
    volume, spacing = load_volume(IXI / "IXI056-HH-1327_T1.nii.gz")
    rng = np.random.default_rng(0)
    noisy = volume.astype(np.float64).copy()
    lo, hi = NOISE_BLOCK
    noisy[:, :, lo:hi] = rng.uniform(0, float(np.percentile(volume, 99)), noisy[:, :, lo:hi].shape)
    flagged_series = write_series(noisy, spacing, workdir / "series-noise",
                                  series_description="T1 axial noise block",
                                  corrupted=range(lo, hi))
    real_files = sorted((DICOM / "siemens_trio_gre_field_mapping_2").glob("*.dcm"))
    sent = (flagged_series.series_instance_uid,
            str(_read_uid(real_files[0], "SeriesInstanceUID")))

    orthanc = Orthanc(workdir=workdir / "orthanc", ae_title="PACS")
    orthanc.start()
    admin_port = free_port()
    node = None
    try:
        node = start_node(workdir / "node", sections={
            **scoring_sections(tiny_bundle, orthanc.dicom_port, rule="brain-t1-mr"),
            "admin": {"enabled": True, "bind_address": "127.0.0.1", "port": admin_port,
                      "token": TOKEN},
        })
        base = f"http://127.0.0.1:{admin_port}"
        _wait("the dashboard", lambda: _port_open(admin_port), 30, node)
        for files in (flagged_series.paths, real_files):
            subprocess.run(
                [storescu, "-aet", "SCANNER1", "-aec", node.ae_title, "127.0.0.1",
                 str(node.port), *map(str, files)],
                check=True, env=dcmtk_env(), capture_output=True, timeout=120,
            )

        def all_done() -> bool:
            with node.session() as session:
                states = dict(session.execute(
                    select(Series.series_instance_uid, Series.status)
                    .where(Series.series_instance_uid.in_(sent))).all())
            return all(str(states.get(uid)) == "done" for uid in sent)

        _wait("both series scored", all_done, 180, node)
        _wait("both reports in Orthanc", lambda: len(orthanc.reports("SR")) >= 2, 120, node)
        with node.session() as session:
            row = queries.get_series(session, flagged_series.series_instance_uid)
            assert row is not None
            scores = verdicts.slice_scores(session, row.id)
            verdict = verdicts.series_verdict(session, row.id)
        assert verdict is not None
        yield ScoredNode(
            base_url=base,
            token=TOKEN,
            series_uid=flagged_series.series_instance_uid,
            flagged=sum(s.abnormal for s in scores),
            normal=sum(not s.abnormal for s in scores),
            model=verdict.model,
            abnormal=verdict.abnormal,
            sent_series=sent,
            sent_instances=len(flagged_series.paths) + len(real_files),
            database_url=node.db_url,
        )
    finally:
        if node is not None:
            node.stop()
        orthanc.stop(graceful=False)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _read_uid(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))
