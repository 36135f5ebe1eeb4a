"""Training: reproducible with a seed, split by subject, background slices dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from node.model.bundle import load_bundle
from node.model.data import foreground_mask, split_subjects
from tests.helpers.tiny_bundle import make_tiny_bundle


def test_same_seed_same_weights(tiny_bundle_path: Path, tmp_path: Path) -> None:
    again = make_tiny_bundle(tmp_path / "again", seed=0)
    a, b = load_bundle(tiny_bundle_path), load_bundle(again)
    for (name, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                   strict=True):
        assert torch.equal(pa, pb), name
    assert a.threshold == b.threshold
    other = load_bundle(make_tiny_bundle(tmp_path / "other", seed=1))
    assert not torch.equal(other.model.encoder.head.weight, a.model.encoder.head.weight)


def test_split_is_by_subject_and_reproducible() -> None:
    subjects = [f"S{i}" for i in range(20)] * 3
    train, val = split_subjects(subjects, 0.25, seed=3)
    assert set(train).isdisjoint(val) and len(val) == 5 and len(train) == 15
    assert split_subjects(subjects, 0.25, seed=3) == (train, val)
    assert split_subjects(subjects, 0.25, seed=4) != (train, val)


def test_background_slices_are_dropped() -> None:
    stack = np.zeros((10, 32, 32), dtype=np.float32)
    stack[3:7, 8:24, 8:24] = 100.0
    stack[0, 0, 0] = 100.0  # a lone bright pixel is not tissue
    assert foreground_mask(stack).tolist() == [False] * 3 + [True] * 4 + [False] * 3


def test_bundle_records_training_subjects(tiny_bundle_path: Path) -> None:
    subjects = load_bundle(tiny_bundle_path).meta["training"]["subjects"]
    assert set(subjects["train"]).isdisjoint(subjects["calibration"])


def test_adapting_a_bundle_starts_from_its_weights(tiny_bundle_path: Path,
                                                    tmp_path: Path) -> None:
    """``vaenode train --init``: the architecture, preprocessing and score settings come from
    the starting bundle, training moves its weights, every held-out subject calibrates."""
    from node.model.data import load_nifti
    from node.model.train import TrainConfig, run_training
    from tests.helpers.tiny_bundle import IXI, SUBJECTS

    base = load_bundle(tiny_bundle_path)
    vols = [load_nifti(IXI / name) for name in SUBJECTS]
    cfg = TrainConfig(epochs=1, seed=5, val_fraction=0.34, batch_size=16, max_train_slices=32,
                      planes=("axial",), samples=4, lr=1e-4, device="cpu", name="tiny-test",
                      version="0.0.1-site", init_bundle=str(tiny_bundle_path))
    out = load_bundle(run_training(vols, cfg, tmp_path / "adapted"))
    assert out.model.cfg == base.model.cfg and out.preprocess == base.preprocess
    assert out.meta["training"]["init"] == {"bundle": str(tiny_bundle_path),
                                            "name": "tiny-test", "version": "0.0.1"}
    subjects = out.meta["training"]["subjects"]
    assert subjects["evaluation"] == [] and len(subjects["calibration"]) == 1
    moved = [not torch.equal(a, b) for a, b in zip(out.model.state_dict().values(),
                                                   base.model.state_dict().values(),
                                                   strict=True)]
    assert any(moved)
    # fine-tuning at a small rate stays near the start (random weights would be far)
    w0, w1 = base.model.encoder.head.weight.detach(), out.model.encoder.head.weight.detach()
    assert float((w1 - w0).norm()) < 0.5 * float(w0.norm())


def test_an_adapted_bundle_keeps_the_station_score_and_takes_a_version_of_its_own(
        tiny_bundle_path: Path, tmp_path: Path) -> None:
    """Adapting a bundle that declares a station score: the adapted one declares the same (its
    stations learn that score), and without --name/--version it is the starting bundle's name
    at a version of its own, never the starting bundle's identity."""
    import json
    import shutil

    from node.model.data import load_nifti
    from node.model.train import TrainConfig, run_training
    from tests.helpers.tiny_bundle import IXI, SUBJECTS

    start = tmp_path / "start"
    shutil.copytree(tiny_bundle_path, start)
    meta = json.loads((start / "model.json").read_text())
    meta["station_scoring"] = {"complexity": True, "complexity_weight": 1.0, "tail_weight": 8.0}
    (start / "model.json").write_text(json.dumps(meta))
    base = load_bundle(start)
    cfg = TrainConfig(epochs=1, seed=5, val_fraction=0.34, batch_size=16, max_train_slices=32,
                      planes=("axial",), samples=4, lr=1e-4, device="cpu",
                      init_bundle=str(start))
    out = load_bundle(run_training([load_nifti(IXI / n) for n in SUBJECTS], cfg,
                                   tmp_path / "adapted"))
    assert out.meta["station_scoring"] == meta["station_scoring"]
    assert out.station_scoring is not None and base.station_scoring is not None
    assert [getattr(out.station_scoring, k) for k in meta["station_scoring"]] == [
        getattr(base.station_scoring, k) for k in meta["station_scoring"]] == [True, 1.0, 8.0]
    assert out.name == base.name and out.version.startswith(f"{base.version}+adapted.")
    assert out.version != base.version


def test_a_new_network_never_takes_the_shipped_bundles_identity() -> None:
    """Without --name/--version a freshly trained bundle is "brain-t1" at a version of its own:
    the shipped opt-in bundle is brain-t1 0.1.0, and stations learn per name and version."""
    from node.model.train import TrainConfig, bundle_identity

    name, version = bundle_identity(TrainConfig(), None)
    assert name == "brain-t1" and version.startswith("0.1.0+trained.") and version != "0.1.0"
    assert bundle_identity(TrainConfig(name="mine", version="2.0"), None) == ("mine", "2.0")
