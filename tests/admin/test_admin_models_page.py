"""The models page facts come from a real bundle's model.json (weights are never loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from node.admin.models_page import bundles
from node.config import Settings


def _settings(bundle: Path, **model: object) -> Settings:
    return Settings.model_validate(
        {
            "model": {"bundle": str(bundle), **model},
            "routing": {"rules": [{"name": "mr", "modality": "MR"},
                                  {"name": "ct-other", "modality": "CT", "model": "/nowhere"}]},
        }
    )


def test_bundle_facts_match_model_json(tiny_bundle: Path) -> None:
    meta = json.loads((tiny_bundle / "model.json").read_text())
    views = {v.path: v for v in bundles(_settings(tiny_bundle))}
    view = views[tiny_bundle]
    assert view.error is None
    assert view.label == f"{meta['name']} {meta['version']}"
    assert view.rules == ("mr",)
    assert view.rule_conditions == (
        "modality MR; not phase, derived or localizer images; flagged from 1 abnormal slice(s)",
    )
    assert view.threshold == meta["calibration"]["threshold"]
    assert view.threshold_source == "calibration"
    assert view.target_fpr == meta["calibration"]["target_fpr"]
    assert view.estimator == meta["scoring"]["estimator"]
    names = dict(view.metrics)
    assert "validation.val_neg_elbo" in names and "calibration.target_fpr" in names
    assert view.training and "IXI" in view.training


def test_configured_threshold_overrides_and_a_missing_bundle_is_reported(tiny_bundle: Path) -> None:
    views = {v.path: v for v in bundles(_settings(tiny_bundle, threshold=-123.0))}
    assert views[tiny_bundle].threshold == -123.0
    assert views[tiny_bundle].threshold_source == "configuration"
    missing = views[Path("/nowhere")]
    assert missing.error and "model.json" in missing.error and missing.rules == ("ct-other",)


def test_default_rule_conditions_in_words() -> None:
    (view,) = bundles(Settings())
    assert view.rules == ("brain-t1-mr",)
    assert view.rule_conditions == (
        "modality MR; body part HEAD or BRAIN or SKULL (or not stated); description not matching "
        "/(?<![a-z])(tof|angio|mra|swi|swan)/; image type without SWI; not angiography (Angio "
        "Flag); echo time 0-20 ms (or not stated); not phase, derived or localizer images; "
        "flagged from 3 abnormal slice(s)",
    )
