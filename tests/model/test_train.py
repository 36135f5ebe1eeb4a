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
