"""A bundle's station score: written by ``vaenode calibrate --station-score``, loaded, scored
beside the bundle's own score from the same components, and refused when malformed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.errors import ModelError
from node.model.bundle import MODEL_JSON, load_bundle, station_scoring
from node.model.scoring import AlternativeScore, BackgroundPart, ScoreConfig
from tests.helpers.tiny_bundle import calibrate_cli


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.random((96, 96)).astype(np.float32) * 800 for _ in range(10)]


def test_calibrate_writes_the_station_score_and_none_removes_it(tiny_bundle_path: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "station"
    proc = calibrate_cli(tiny_bundle_path, out, "--station-score",
                      "complexity_weight=1,tail_weight=8")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    assert bundle.meta["station_scoring"] == {"complexity_weight": 1.0, "tail_weight": 8.0,
                                              "complexity": True}
    assert bundle.station_scoring is not None
    assert (bundle.station_scoring.complexity_weight, bundle.station_scoring.tail_weight,
            bundle.station_scoring.complexity) == (1.0, 8.0, True)
    assert bundle.meta["training"]["recalibrations"][-1]["station_scoring"] == {
        "complexity_weight": 1.0, "tail_weight": 8.0, "complexity": True}
    # The bundle's own score is that of the same settings without it.
    plain = load_bundle(tiny_bundle_path)
    images = _images()
    own, base = bundle.score_slices(images), plain.score_slices(images)
    assert np.array_equal(own.log_likelihood, base.log_likelihood)
    assert base.station_score is None and own.station_score is not None

    # The station score is what a bundle scoring with those settings gives: the same
    # components, another weighting.
    alike = tmp_path / "alike"
    shutil.copytree(out, alike)
    meta = json.loads((alike / MODEL_JSON).read_text())
    meta["scoring"] = {**meta["scoring"], **meta.pop("station_scoring")}
    (alike / MODEL_JSON).write_text(json.dumps(meta))
    expected = load_bundle(alike).score_slices(images).log_likelihood
    assert np.allclose(own.station_score, expected)
    assert not np.allclose(own.station_score, own.log_likelihood)

    gone = tmp_path / "gone"
    proc = calibrate_cli(out, gone, "--station-score", "none")
    assert proc.returncode == 0, proc.stderr
    again = load_bundle(gone)
    assert "station_scoring" not in again.meta and again.station_scoring is None
    assert again.score_slices(images).station_score is None


def test_the_station_score_is_the_weighting_alone() -> None:
    # The bundle's alternatives and background part are mapped onto its own score's scale:
    # the station weighting leaves them out and keeps the rest of the bundle's settings.
    own = ScoreConfig(samples=8, tail_weight=1.0, alternatives=(
        AlternativeScore(complexity_weight=1.0, tail_weight=0.0, max_series_shift=5.0,
                         gain=2.0, offset=-10.0),),
        background=BackgroundPart(statistic="residual", gain=9e4, offset=4e4))
    meta = {"scoring": own.to_dict(), "station_scoring": {"complexity_weight": 1.0,
                                                          "tail_weight": 8.0,
                                                          "complexity": True}}
    got = station_scoring(meta)
    assert got is not None
    assert got.alternatives == () and got.background is None
    assert (got.samples, got.complexity, got.complexity_weight, got.tail_weight) == (
        8, True, 1.0, 8.0)
    assert station_scoring({"scoring": own.to_dict()}) is None


@pytest.mark.parametrize(("setting", "message"), [
    ("colour=1", "expected complexity_weight=W or tail_weight=T"),
    ("tail_weight=lots", "tail_weight: 'lots' is not a number"),
    ("tail_weight=-1", "tail_weight must be 0 or more, got -1"),
])
def test_calibrate_refuses_a_malformed_station_score(tiny_bundle_path: Path, tmp_path: Path,
                                                    setting: str, message: str) -> None:
    out = tmp_path / "bad"
    proc = calibrate_cli(tiny_bundle_path, out, "--station-score", setting)
    assert proc.returncode == 2
    assert message in " ".join(proc.stderr.replace("\u2502", " ").split())
    assert not out.exists()


@pytest.mark.parametrize("station", ["heavy", {"tail_weigth": 8.0}])
def test_a_malformed_station_score_in_model_json_is_refused(tiny_bundle_path: Path,
                                                           tmp_path: Path,
                                                           station: object) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle_path, copy)
    meta = json.loads((copy / MODEL_JSON).read_text())
    meta["station_scoring"] = station
    (copy / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="has a bad entry"):
        load_bundle(copy)
