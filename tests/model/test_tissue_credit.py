"""The tissue credit (node.model.scoring, item 7): tissue beyond a reference count credited back
at the rate normal scores fall by, up to a ceiling, nothing changed below it, a kept threshold,
and bundles without it scoring and writing ``model.json`` as before."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from node.model.bundle import load_bundle
from node.model.calibrate import fit_tissue_credit
from node.model.data import FOREGROUND_LEVEL, load_nifti, plane_slices
from node.model.scoring import ScoreConfig, absolute_score, stack_scores, tissue_pixels
from tests.helpers.tiny_bundle import IXI, SUBJECTS, calibrate_cli

PIXELS, CLIP = 16384, 1.5


def components(tissue: list[float]) -> dict[str, np.ndarray]:
    n = len(tissue)
    return {"log_likelihood": np.full(n, 20000.0), "tail": np.zeros(n),
            "png_nats": np.zeros(n), "tissue_pixels": np.array(tissue)}


def test_tissue_beyond_the_reference_is_credited_up_to_the_ceiling() -> None:
    plain = ScoreConfig(complexity=False)
    credited = replace(plain, tissue_slope=3.5, tissue_reference=8000.0, tissue_ceiling=9500.0)
    comp = components([5000.0, 8000.0, 8001.0, 9000.0, 9500.0, 16000.0])
    before = absolute_score(comp, plain, PIXELS, CLIP)
    after = absolute_score(comp, credited, PIXELS, CLIP)
    assert list(after - before) == pytest.approx([0.0, 0.0, 3.5, 3500.0, 5250.0, 5250.0])
    # Without a credit the count is not needed; with one it is.
    del comp["tissue_pixels"]
    assert np.array_equal(absolute_score(comp, plain, PIXELS, CLIP), before)
    with pytest.raises(ValueError, match="tissue_pixels"):
        absolute_score(comp, credited, PIXELS, CLIP)


def test_model_json_has_the_credit_only_when_there_is_one() -> None:
    plain = ScoreConfig()
    assert "tissue_slope" not in plain.to_dict() and "tissue_reference" not in plain.to_dict()
    assert "tissue_ceiling" not in plain.to_dict()
    credited = replace(plain, tissue_slope=3.69, tissue_reference=7714.0, tissue_ceiling=9612.0)
    data = json.loads(json.dumps(credited.to_dict()))
    assert (data["tissue_slope"], data["tissue_reference"], data["tissue_ceiling"]) == (
        3.69, 7714.0, 9612.0)
    assert ScoreConfig.from_dict(data) == credited
    assert ScoreConfig.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="ceiling"):
        ScoreConfig.from_dict({**data, "tissue_ceiling": 5000.0})


def test_the_slope_and_reference_are_fitted_on_normal_slices() -> None:
    rng = np.random.default_rng(0)
    tissue = rng.uniform(3000.0, 9500.0, 2000)
    scores = 50000.0 - 3.7 * tissue + rng.normal(0.0, 800.0, tissue.size)
    slope, reference, ceiling = fit_tissue_credit(scores, tissue, 0.9)
    assert slope == pytest.approx(3.7, rel=0.03)
    assert reference == pytest.approx(float(np.quantile(tissue, 0.9)))
    assert ceiling == tissue.max()
    with pytest.raises(ValueError, match="do not fall with tissue"):
        fit_tissue_credit(-scores, tissue, 0.9)
    with pytest.raises(ValueError, match="differing tissue counts"):
        fit_tissue_credit(scores, np.full(tissue.size, 5000.0), 0.9)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        fit_tissue_credit(scores, tissue, 1.0)


def test_the_count_is_the_model_grid_pixels_above_the_foreground_level() -> None:
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, :2, :3] = 0.5
    x[1, 0, :, :] = FOREGROUND_LEVEL  # at the level: not above it
    x[1, 0, 0, 0] = 1.2
    assert list(tissue_pixels(x)) == [6.0, 1.0]


def test_calibrate_fits_the_credit_and_can_keep_the_threshold(tiny_bundle_path: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "credited"
    proc = calibrate_cli(tiny_bundle_path, out, "--tissue-credit", "0.9", "--keep-threshold")
    assert proc.returncode == 0, proc.stderr
    source, bundle = load_bundle(tiny_bundle_path), load_bundle(out)
    assert bundle.threshold == source.threshold
    credit = bundle.scoring
    assert credit.tissue_slope > 0.0 and 0.0 < credit.tissue_reference < credit.tissue_ceiling
    recal = bundle.meta["training"]["recalibrations"][-1]
    assert recal["tissue_credit"] == 0.9 and recal["kept_threshold"] == source.threshold
    entry = bundle.meta["calibration"]
    assert (entry["tissue_credit"]["reference"], entry["tissue_credit"]["ceiling"]) == (
        credit.tissue_reference, credit.tissue_ceiling)
    assert entry["method"].startswith("kept from the bundle calibrated before")
    # On a stack, before any series shift (the tiny bundle has one, recalibrated on the
    # credited scores): slices with no more tissue than the reference score exactly as
    # before; the others score higher by the slope per pixel beyond it.
    images, spacing = plane_slices(load_nifti(IXI / SUBJECTS[0]), "sagittal")
    x, fg = source.preprocess_stack(list(images), [spacing] * len(images))
    comp = source.components(x, device="cpu")
    grid = (source.modelled_values, source.preprocess.clip_max)
    before = stack_scores(comp, fg, source.scoring, *grid)[1]
    after = stack_scores(comp, fg, bundle.scoring, *grid)[1]
    excess = np.clip(comp["tissue_pixels"], credit.tissue_reference,
                     credit.tissue_ceiling) - credit.tissue_reference
    assert excess.any() and not excess.all()
    assert after - before == pytest.approx(credit.tissue_slope * excess)
    # Recalibrating keeps the credit; 'none' removes it (and the threshold is the target
    # quantile again without --keep-threshold).
    again = tmp_path / "again"
    assert calibrate_cli(out, again).returncode == 0
    assert load_bundle(again).scoring.tissue_slope == bundle.scoring.tissue_slope
    plain = tmp_path / "plain"
    assert calibrate_cli(again, plain, "--tissue-credit", "none").returncode == 0
    assert load_bundle(plain).scoring.tissue_slope == 0.0
    assert "tissue_slope" not in json.loads((plain / "model.json").read_text())["scoring"]
    # ... to exactly the source recalibrated without it.
    base = tmp_path / "base"
    assert calibrate_cli(tiny_bundle_path, base).returncode == 0
    assert load_bundle(plain).threshold == pytest.approx(load_bundle(base).threshold)


@pytest.mark.parametrize("value", ["1.5", "most"])
def test_calibrate_rejects_a_bad_tissue_credit(tiny_bundle_path: Path, tmp_path: Path,
                                               value: str) -> None:
    proc = calibrate_cli(tiny_bundle_path, tmp_path / "x", "--tissue-credit", value)
    assert proc.returncode == 2 and "--tissue-credit" in proc.stderr
    assert not (tmp_path / "x").exists()
