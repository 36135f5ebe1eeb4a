"""``vaenode train --from-queue --station``: the series a station's learning kept as its
normal (:func:`node.worker.station.normal_series_folders`) adapt a bundle's network to that
station, no labels needed; the command prints the routing rule that sends the station's
series to the new bundle."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from node.config import DatabaseSettings, RoutingSettings
from node.model.bundle import load_bundle
from node.queue import references as refs
from node.queue.models import Series
from tests.helpers.db import migrated_database
from tests.helpers.learning import add_learning_series, site_scores
from tests.helpers.node import VAENODE
from tests.helpers.series import write_nifti_series
from tests.helpers.tiny_bundle import IXI, SUBJECTS

pytestmark = pytest.mark.skipif(not IXI.is_dir(), reason=f"IXI data not found at {IXI}")

TINY = ("--epochs", "1", "--max-train-slices", "32", "--batch-size", "16", "--samples", "4",
        "--lr", "0.0001", "--val-fraction", "0.34", "--device", "cpu", "--seed", "3")


def _train(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VAENODE), "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_train_adapts_to_the_series_a_station_learned_as_normal(
        tiny_bundle_path: Path, tmp_path: Path) -> None:
    database = DatabaseSettings(url=f"sqlite:///{tmp_path / 'queue.db'}")
    storage = tmp_path / "storage"
    config = tmp_path / "node.toml"
    config.write_text(f'[database]\nurl = "{database.url}"\n[storage]\ndir = "{storage}"\n',
                      encoding="utf-8")
    site = site_scores(5, seed=2)
    site[1] = site[1] - 30000.0  # a bad learning series: the station's learning leaves it out
    with migrated_database(database) as factory:
        with factory() as session:
            reference = refs.ensure_reference(session, refs.StationKey(
                station="MR ROOM 3", station_source="station_name", scanner_model="Prisma",
                protocol="t1 axial", model_name="brain-t1", model_version="0.1.0"))
        ids = [add_learning_series(factory, reference.id, s, storage=storage) for s in site]
        with factory() as session:
            rows = {s.id: s for s in session.query(Series).all()}
    # The learning rows' folders hold the station's real images (IXI subjects as its series).
    for n, series_id in enumerate(ids):
        folder = storage / rows[series_id].study_instance_uid / rows[series_id].series_instance_uid
        for empty in folder.glob("*.dcm"):
            empty.unlink()
        write_nifti_series(IXI / SUBJECTS[n % 3], folder, patient_id=f"ROOM3-{n}")

    out = tmp_path / "room3"
    proc = _train(tmp_path, "--from-queue", "--station", "mr room 3", "--init",
                  str(tiny_bundle_path), "--min-series", "3", "--out", str(out),
                  "--config", str(config), *TINY)
    assert proc.returncode == 0, proc.stderr
    taken = [rows[i].series_instance_uid for i in ids if i != ids[1]]
    assert [line.split()[4] for line in proc.stdout.splitlines()
            if line.startswith("from the queue: series")] == taken
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["init"]["bundle"] == str(tiny_bundle_path)
    # Its own identity: the starting bundle's name, a version of its own (stations learn it
    # afresh; its reports do not claim to be the bundle it came from).
    base = load_bundle(tiny_bundle_path)
    assert meta["name"] == base.name
    assert re.fullmatch(re.escape(base.version) + r"\+adapted\.\d{14}", meta["version"])
    subjects = meta["training"]["subjects"]
    assert sorted(subjects["train"] + subjects["calibration"]) == [
        "ROOM3-0", "ROOM3-2", "ROOM3-3", "ROOM3-4"]
    assert load_bundle(out).threshold is not None
    # The printed rule routes the station's brain series to the new bundle.
    rule_text = proc.stdout[proc.stdout.index("[[routing.rules]]"):]
    [rule] = RoutingSettings(**tomllib.loads(rule_text)["routing"]).rules
    assert rule.station_name == ["MR ROOM 3"] and rule.model == out.resolve()
    assert rule.body_part == ["HEAD", "BRAIN", "SKULL"] and rule.exclude_angio

    # Refusals: fewer kept series than --min-series (nothing written), another protocol,
    # --station without --from-queue, --from-queue without --station.
    few = _train(tmp_path, "--from-queue", "--station", "MR ROOM 3", "--init",
                 str(tiny_bundle_path), "--out", str(tmp_path / "few"), "--config",
                 str(config), *TINY)
    assert few.returncode == 1 and "4 stored normal learning series" in few.stderr
    assert "--min-series 10" in few.stderr and not (tmp_path / "few").exists()
    other = _train(tmp_path, "--from-queue", "--station", "MR ROOM 3", "--protocol",
                   "T2 axial", "--min-series", "1", "--out", str(tmp_path / "t2"),
                   "--config", str(config))
    assert other.returncode == 1 and "0 stored normal learning series" in other.stderr
    stray = _train(tmp_path, "--station", "MR ROOM 3", "--out", str(tmp_path / "s"),
                   "--data", str(IXI / SUBJECTS[0]))
    assert stray.returncode == 2 and "--from-queue" in stray.stderr
    lone = _train(tmp_path, "--from-queue", "--out", str(tmp_path / "l"), "--config",
                  str(config))
    assert lone.returncode == 2 and "--station" in lone.stderr
