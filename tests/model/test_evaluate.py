"""The evaluation pipeline on the tiny bundle (one subject, one artifact) and its metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import load_bundle
from node.model.data import load_nifti
from node.model.evaluate import EvalConfig, auroc, average_precision, run_evaluation, tpr_at_fpr
from tests.helpers.tiny_bundle import IXI


def test_metrics_on_known_scores() -> None:
    normal = np.array([3.0, 4.0, 5.0, 6.0])
    assert auroc(normal, np.array([0.0, 1.0])) == 1.0  # abnormal scores lower: perfect
    assert auroc(normal, np.array([10.0, 11.0])) == 0.0
    assert auroc(normal, normal) == pytest.approx(0.5)
    assert average_precision(normal, np.array([0.0, 1.0])) == 1.0
    assert tpr_at_fpr(normal, np.array([0.0, 4.5]), 0.01) == 0.5


def test_run_evaluation_writes_report(tiny_bundle_path: Path, tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle_path)
    vol = load_nifti(IXI / "IXI015-HH-1258_T1.nii.gz")
    cfg = EvalConfig(artifacts=("spike",), severities=("moderate",), planes=("axial",),
                     mcmc_subjects=1, mcmc_slices=2)
    metrics = run_evaluation(bundle, [vol], [vol], tmp_path, cfg)
    cond = metrics["conditions"]["spike/moderate"]
    for name in ("final", "importance", "plain", "mcmc", "kl", "elbo", "qc", "recon_error"):
        assert 0.0 <= cond["scores"][name]["auroc_matched"] <= 1.0
    assert 0.0 <= metrics["fpr_at_threshold"] <= 1.0 and metrics["speed_slices_per_s"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["conditions"]
    assert "Position-matched" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "roc_spike.png").stat().st_size > 0
    again = run_evaluation(bundle, [vol], [vol], tmp_path / "again", cfg,
                           records=tmp_path / "records.pkl")
    assert json.dumps(again["conditions"]) == json.dumps(metrics["conditions"])  # NaN-safe
