"""Bundle loading (and what it says when a bundle is broken) and the scoring API."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.errors import ModelError
from node.model.bundle import MODEL_JSON, WEIGHTS, default_bundle_path, load_bundle


@pytest.fixture
def copy(tiny_bundle_path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle_path, dst)
    return dst


def _edit(path: Path, **changes) -> None:
    meta = json.loads((path / MODEL_JSON).read_text())
    meta.update(changes)
    (path / MODEL_JSON).write_text(json.dumps(meta))


def test_loads_and_describes_itself(tiny_bundle_path: Path) -> None:
    b = load_bundle(tiny_bundle_path)
    assert b.name == "tiny-test" and b.version == "0.0.1"
    assert b.target_fpr == 0.01 and np.isfinite(b.threshold)
    assert b.meta["training"]["subjects"]["train"]
    assert "checkpoint.pt" not in {p.name for p in tiny_bundle_path.iterdir()}


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a folder"):
        load_bundle(tmp_path / "nope")


def test_missing_model_json(copy: Path) -> None:
    (copy / MODEL_JSON).unlink()
    with pytest.raises(ModelError, match=r"model\.json is missing"):
        load_bundle(copy)


def test_model_json_not_json(copy: Path) -> None:
    (copy / MODEL_JSON).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_bundle(copy)


def test_newer_format_version(copy: Path) -> None:
    _edit(copy, format_version=99)
    with pytest.raises(ModelError, match="format version 99"):
        load_bundle(copy)


def test_missing_entry(copy: Path) -> None:
    meta = json.loads((copy / MODEL_JSON).read_text())
    del meta["calibration"]
    (copy / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="lacks calibration"):
        load_bundle(copy)


def test_corrupt_weights_fail_checksum(copy: Path) -> None:
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(copy)


def test_missing_weights(copy: Path) -> None:
    (copy / WEIGHTS).unlink()
    with pytest.raises(ModelError, match=r"weights file weights\.pt is missing"):
        load_bundle(copy)


def test_architecture_mismatch(copy: Path) -> None:
    meta = json.loads((copy / MODEL_JSON).read_text())
    meta["architecture"]["latent_dim"] = 9
    (copy / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="do not match the architecture"):
        load_bundle(copy)


def _set(path: Path, section: str, key: str, value: object) -> None:
    meta = json.loads((path / MODEL_JSON).read_text())
    meta[section][key] = value
    (path / MODEL_JSON).write_text(json.dumps(meta))


@pytest.mark.parametrize(("section", "key", "value"), [
    ("scoring", "detail", None), ("scoring", "detail_step", None),
    ("preprocessing", "slab_mm", None), ("preprocessing", "slab_mm", 0),
])
def test_a_removed_part_that_was_off_is_dropped(tiny_bundle_path: Path, copy: Path,
                                                section: str, key: str, value: object) -> None:
    # Bundles written before the detail, detail step and slab options were removed carry
    # their settings; off, they are dropped and the bundle scores exactly as before.
    _set(copy, section, key, value)
    b = load_bundle(copy)
    assert key not in b.meta[section]
    images = [np.random.default_rng(i).random((90, 120)) * 500 for i in range(3)]
    before = load_bundle(tiny_bundle_path).score_slices(images)
    assert np.array_equal(b.score_slices(images).log_likelihood, before.log_likelihood)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("scoring", "detail", {"shift_quantile": 0.5, "weight": 900.0}),
    ("scoring", "detail_step", {}),
    ("preprocessing", "slab_mm", 2.0),
])
def test_a_removed_part_in_use_is_refused(copy: Path, section: str, key: str,
                                          value: object) -> None:
    _set(copy, section, key, value)
    with pytest.raises(ModelError, match=rf"{section}\.{key} = .*removed from the node \(its "
                                         r"last version is at commit 61ced1f; .*'Removed parts'"):
        load_bundle(copy)


def test_score_slices_any_size_and_plane(tiny_bundle_path: Path) -> None:
    b = load_bundle(tiny_bundle_path)
    rng = np.random.default_rng(0)
    images = [rng.random((300, 200)) * 1000 for _ in range(5)] + [rng.random((64, 64)) * 1000]
    spacing = [(0.7, 0.7)] * 5 + [None]
    s = b.score_slices(images, spacing)
    assert len(s) == 6
    for arr in (s.log_likelihood, s.kl, s.elbo, s.confidence):
        assert arr.shape == (6,) and np.isfinite(arr).all()
    assert s.abnormal.dtype == bool
    assert ((s.confidence >= 0) & (s.confidence <= 1)).all()
    assert s.estimator == "importance" and s.samples == 4 and s.threshold == b.threshold


def test_scores_are_reproducible_and_threshold_override(tiny_bundle_path: Path) -> None:
    b = load_bundle(tiny_bundle_path)
    images = [np.random.default_rng(i).random((90, 120)) * 500 for i in range(3)]
    a = b.score_slices(images)
    again = b.score_slices(images)
    assert np.array_equal(a.log_likelihood, again.log_likelihood)
    high = b.score_slices(images, threshold=1e12)
    assert high.threshold == 1e12 and high.abnormal.all()
    assert b.score_slices(images, estimator="plain").estimator == "plain"
    with pytest.raises(ModelError, match="unknown estimator"):
        b.score_slices(images, estimator="nope")


def test_empty_stack(tiny_bundle_path: Path) -> None:
    s = load_bundle(tiny_bundle_path).score_slices([])
    assert len(s) == 0


def test_default_bundle_path_points_into_the_package() -> None:
    assert default_bundle_path().parent.name == "models"
