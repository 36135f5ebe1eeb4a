"""The compression stage: a feature autoencoder first, then the VAE on its features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from node.errors import ModelError
from node.model.bundle import FEATURE_WEIGHTS, MODEL_JSON, load_bundle
from node.model.compress import FeatureAE, FeatureAEConfig
from node.model.data import load_nifti
from node.model.likelihood import estimate
from node.model.train import TrainConfig, run_training
from tests.helpers.tiny_bundle import IXI, SUBJECTS


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle with the compression stage (64 x 64 grid -> 4 x 16 x 16 features)."""
    if not IXI.is_dir():
        pytest.skip(f"IXI data not found at {IXI}")
    cfg = TrainConfig(
        epochs=1, latent_dim=8, image_size=64, spacing_mm=4.0, channels=(4, 8, 16, 16),
        seed=0, val_fraction=0.34, batch_size=16, max_train_slices=64, planes=("axial",),
        samples=4, name="tiny-compressed", version="0.0.1", device="cpu",
        max_series_shift=1000.0, compress=True, compress_dim=4,
    )
    vols = [load_nifti(IXI / n) for n in SUBJECTS]
    return run_training(vols, cfg, tmp_path_factory.mktemp("c") / "tiny")


@pytest.fixture
def copy(compressed: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(compressed, dst)
    return dst


def test_model_json_declares_both_stages(compressed: Path) -> None:
    meta = json.loads((compressed / MODEL_JSON).read_text())
    comp = meta["compression"]
    assert comp["type"] == "conv-ae" and comp["feature_dim"] == 4
    assert comp["channels"] == [4, 8] and comp["file"] == FEATURE_WEIGHTS
    assert len(comp["sha256"]) == 64 and comp["history"]["epochs"]
    # The VAE keeps the remaining stages and models the 4 x 16 x 16 feature map.
    arch = meta["architecture"]
    assert (arch["in_channels"], arch["image_size"], arch["channels"]) == (4, 16, [16, 16])
    assert meta["preprocessing"]["image_size"] == 64
    assert meta["scoring"]["complexity"] is False  # a pixel code length: off in feature space
    assert (compressed / FEATURE_WEIGHTS).is_file()


def test_loads_and_scores_through_the_features(compressed: Path) -> None:
    b = load_bundle(compressed)
    assert b.feature_ae is not None and b.modelled_values == 4 * 16 * 16
    images = [np.random.default_rng(i).random((120, 90)) * 800 for i in range(4)]
    s = b.score_slices(images, [(2.0, 2.0)] * 4)
    for arr in (s.log_likelihood, s.kl, s.elbo, s.confidence, s.raw_log_likelihood):
        assert arr.shape == (4,) and np.isfinite(arr).all()
    assert np.isfinite(b.threshold)
    # score_slices really encodes with the autoencoder: the VAE's estimate on the features
    # of the preprocessed stack is the raw log-likelihood it reports.
    x, _ = b.preprocess_stack(images, [(2.0, 2.0)] * 4)
    with torch.no_grad():
        feats = b.feature_ae.features(x)
        est = estimate(b.model, feats, "importance", 4,
                       generator=torch.Generator().manual_seed(0))
    assert feats.shape == (4, 4, 16, 16)
    assert np.allclose(est.log_likelihood.double().numpy(), s.raw_log_likelihood, rtol=1e-4)


@pytest.mark.parametrize("estimator", ["plain", "mcmc"])
def test_other_estimators_work_on_features(compressed: Path, estimator: str) -> None:
    b = load_bundle(compressed)
    images = [np.random.default_rng(9).random((64, 64)) * 500 for _ in range(2)]
    s = b.score_slices(images, estimator=estimator, samples=4)
    assert np.isfinite(s.log_likelihood).all() and s.estimator == estimator


def test_feature_weights_missing(copy: Path) -> None:
    (copy / FEATURE_WEIGHTS).unlink()
    with pytest.raises(ModelError, match=r"compression stage .* feature_ae\.pt is missing"):
        load_bundle(copy)


def test_compression_entry_missing(copy: Path) -> None:
    meta = json.loads((copy / MODEL_JSON).read_text())
    del meta["compression"]
    (copy / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"4-channel features but model\.json declares no"):
        load_bundle(copy)


def test_feature_shape_mismatch(copy: Path) -> None:
    meta = json.loads((copy / MODEL_JSON).read_text())
    meta["compression"]["feature_dim"] = 5
    (copy / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="gives 5 x 16 x 16 features but the VAE models 4"):
        load_bundle(copy)


def test_feature_weights_of_another_autoencoder(copy: Path) -> None:
    other = FeatureAE(FeatureAEConfig(64, (4, 8, 8), 4))  # one stage too many
    torch.save(other.state_dict(), copy / FEATURE_WEIGHTS)
    meta = json.loads((copy / MODEL_JSON).read_text())
    del meta["compression"]["sha256"]
    (copy / MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"autoencoder weights feature_ae\.pt do not match"):
        load_bundle(copy)


def test_standardized_features() -> None:
    torch.manual_seed(0)
    ae = FeatureAE(FeatureAEConfig(32, (4,), 3))
    x = torch.rand(20, 1, 32, 32) * 2
    ae.fit_standardization(x)
    f = ae.features(x).detach()
    assert f.shape == (20, 3, 16, 16)
    assert torch.allclose(f.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(f.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-2)


def test_compress_needs_stages_left_for_the_vae(tmp_path: Path) -> None:
    cfg = TrainConfig(image_size=64, channels=(4, 8), compress=True, compress_stages=2)
    vols = [load_nifti(IXI / SUBJECTS[0])] if IXI.is_dir() else []
    if not vols:
        pytest.skip("IXI data not found")
    with pytest.raises(ValueError, match="VAE keeps the rest"):
        run_training(vols, cfg, tmp_path / "x")
