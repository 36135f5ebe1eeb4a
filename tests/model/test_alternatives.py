"""Alternative scores: the final score is the lowest of the main score and the mapped
alternatives, calibrated on that minimum (node.model.scoring, item 4)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from node.model.bundle import load_bundle
from node.model.scoring import (
    AlternativeScore,
    ScoreConfig,
    absolute_score,
    match_scales,
    series_shift,
    stack_scores,
)
from tests.helpers.tiny_bundle import calibrate_cli, calibration_axial_scores


def _components(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"log_likelihood": rng.normal(-1000, 50, n), "png_nats": rng.normal(800, 40, n),
            "tail": rng.normal(3, 0.5, n)}


def test_final_score_is_the_lowest_mapped_part() -> None:
    comp = _components(40)
    fg = np.ones(40, dtype=bool)
    single = ScoreConfig(complexity=True, complexity_weight=0.5, tail_weight=4.0,
                         max_series_shift=30.0, reference_median=5.0)
    part = ScoreConfig(complexity=True, complexity_weight=1.0, tail_weight=0.0,
                       max_series_shift=50.0, shift_quantile=0.75, reference_median=-3.0)
    main = absolute_score(comp, single, 100, 2.0)
    shift = series_shift(main, fg, single)
    alt_abs = absolute_score(comp, part, 100, 2.0)
    alt_final = alt_abs - series_shift(alt_abs, fg, part)
    gain, offset = match_scales(main - shift, alt_final)
    alt = AlternativeScore(complexity_weight=1.0, tail_weight=0.0, max_series_shift=50.0,
                           shift_quantile=0.75, reference_median=-3.0, gain=gain, offset=offset)
    cfg = replace(single, alternatives=(alt,))

    final, absolute, got_shift = stack_scores(comp, fg, cfg, 100, 2.0)
    assert np.allclose(absolute, main) and got_shift == shift
    assert np.allclose(final, np.minimum(main - shift, offset + gain * alt_final))
    # Each part decides some slices: the minimum is not just one of them.
    assert 0 < np.sum(np.isclose(final, main - shift)) < 40
    assert np.allclose(stack_scores(comp, fg, single, 100, 2.0)[0], main - shift)


def test_zero_complexity_weight_turns_the_correction_off() -> None:
    cfg = ScoreConfig(complexity_weight=0.75, tail_weight=8.0)
    part = cfg.part(AlternativeScore(complexity_weight=0.0, tail_weight=2.0,
                                     max_series_shift=10.0))
    assert not part.complexity and part.tail_weight == 2.0 and part.alternatives == ()


def test_scales_are_matched_at_the_first_percentile_and_median() -> None:
    rng = np.random.default_rng(1)
    main = rng.normal(-5000, 800, 5000)
    other = rng.normal(300, 20, 5000)
    gain, offset = match_scales(main, other)
    mapped = offset + gain * other
    assert np.quantile(mapped, 0.01) == pytest.approx(np.quantile(main, 0.01))
    assert np.quantile(mapped, 0.5) == pytest.approx(np.quantile(main, 0.5))


def test_alternatives_survive_model_json() -> None:
    alt = AlternativeScore(complexity_weight=1.0, tail_weight=0.0, max_series_shift=7000.0,
                           gain=1.3, offset=-200.0)
    cfg = ScoreConfig(alternatives=(alt,))
    back = ScoreConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_calibrate_fits_the_maps_and_holds_the_rate(tiny_bundle_path: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "alt"
    proc = calibrate_cli(tiny_bundle_path, out, "--alternative",
                         "complexity_weight=0.5,tail_weight=4,max_series_shift=2000,"
                         "shift_quantile=0.75")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    (alt,) = bundle.scoring.alternatives
    assert alt.complexity_weight == 0.5 and alt.shift_quantile == 0.75
    assert alt.gain > 0 and (alt.gain, alt.offset) != (1.0, 0.0)
    assert alt.reference_median != 0.0
    recal = bundle.meta["training"]["recalibrations"][-1]
    assert recal["changes"]["alternatives"][0]["tail_weight"] == 4.0

    # The threshold holds its rate on the calibration slices, whose scores are the minimum.
    finals, mains = [], []
    for scores in calibration_axial_scores(bundle):
        fg = scores.foreground
        finals.append(scores.log_likelihood[fg])
        mains.append((scores.extra["absolute"] - scores.series_shift)[fg])
    final, main = np.concatenate(finals), np.concatenate(mains)
    assert final.size >= 50
    assert np.all(final <= main + 1e-6)
    assert np.mean(final < bundle.threshold) <= bundle.target_fpr + 1.0 / final.size

    # 'none' removes them again; --version names the new bundle and records the source's.
    plain = tmp_path / "plain"
    proc = calibrate_cli(out, plain, "--alternative", "none", "--version", "0.2.0-site")
    assert proc.returncode == 0, proc.stderr
    again = load_bundle(plain)
    assert again.scoring.alternatives == ()
    assert again.version == "0.2.0-site" and bundle.version != "0.2.0-site"
    assert again.meta["training"]["recalibrations"][-1]["from_version"] == bundle.version
    assert f"{again.name} 0.2.0-site written to" in proc.stdout
    # Without it the version stays.
    assert "from_version" not in recal and load_bundle(out).version == bundle.version


def test_calibrate_rejects_a_malformed_alternative(tiny_bundle_path: Path,
                                                   tmp_path: Path) -> None:
    proc = calibrate_cli(tiny_bundle_path, tmp_path / "x", "--alternative",
                         "complexity_weight=1,tail=0")
    assert proc.returncode == 2
    assert "tail" in proc.stderr and "--alternative" in proc.stderr
    assert not (tmp_path / "x").exists()
