"""Routing: rules map series attributes to a model; phase, derived and localizers need a rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import Settings
from node.errors import ConfigError
from node.worker.assemble import SeriesAttributes, read_headers, series_attributes
from node.worker.routing import route, validate_rules
from tests.worker.conftest import (
    PROSTATE,
    SIEMENS_MAGNITUDE,
    SIEMENS_PHASE,
    STUDYFORREST,
    series_files,
)


def attrs_of(folder: Path) -> SeriesAttributes:
    return series_attributes(read_headers(series_files(folder)[:3]))


def settings_with(rules: list[dict[str, object]], bundle: str | None = None) -> Settings:
    data: dict[str, object] = {"routing": {"rules": rules}}
    if bundle:
        data["model"] = {"bundle": bundle}
    return Settings.model_validate(data)


def make_attrs(**kw: object) -> SeriesAttributes:
    base: dict[str, object] = {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "modality": "MR",
        "body_part": "BRAIN",
        "series_description": "t1_mprage_sag",
        "image_type": ("ORIGINAL", "PRIMARY", "M", "ND"),
    }
    base.update(kw)
    return SeriesAttributes(**base)  # type: ignore[arg-type]


def test_default_rules_on_the_real_series() -> None:
    settings = Settings()
    rules, model = list(settings.routing.rules), settings.model
    magnitude = route(attrs_of(SIEMENS_MAGNITUDE), rules, model)
    assert not magnitude.skipped and magnitude.rule is not None
    assert magnitude.rule.name == "brain-t1-mr" and magnitude.bundle is None
    assert magnitude.rule.min_abnormal_slices == 3

    phase = route(attrs_of(SIEMENS_PHASE), rules, model)
    assert phase.skipped
    assert phase.reason is not None and "phase image" in phase.reason
    assert "brain-t1-mr" in phase.reason and "score_derived" in phase.reason

    derived = route(attrs_of(STUDYFORREST), rules, model)
    assert derived.skipped and derived.reason is not None and "derived image" in derived.reason

    # Another body part is still MR: the brain model scores it (and should flag it).
    assert not route(attrs_of(PROSTATE), rules, model).skipped


def test_no_rule_matches_gives_the_reason() -> None:
    settings = Settings()
    r = route(make_attrs(modality="CT"), list(settings.routing.rules), settings.model)
    assert r.skipped
    assert r.reason == "no routing rule matches (brain-t1-mr: modality CT is not MR)"
    r = route(make_attrs(), [], settings.model)
    assert r.skipped and r.reason == "no routing rule is configured"


def test_score_derived_rule_takes_phase_images() -> None:
    settings = settings_with(
        [
            {"name": "mr", "modality": "MR"},
            {"name": "phase", "modality": "MR", "image_type": ["P"], "score_derived": True,
             "model": "/models/phase", "min_abnormal_slices": 5},
        ]
    )
    r = route(attrs_of(SIEMENS_PHASE), list(settings.routing.rules), settings.model)
    assert r.rule is not None and r.rule.name == "phase"
    assert r.bundle == Path("/models/phase") and r.rule.min_abnormal_slices == 5


def test_conditions_and_first_match_wins() -> None:
    settings = settings_with(
        [
            {"name": "knee", "modality": "MR", "body_part": "knee", "model": "/m/knee"},
            {"name": "t2", "modality": "MR", "series_description": r"\bt2\b"},
            {"name": "any-mr", "modality": "mr"},
        ],
        bundle="/m/default",
    )
    rules, model = list(settings.routing.rules), settings.model
    assert route(make_attrs(body_part="KNEE"), rules, model).bundle == Path("/m/knee")
    t2 = route(make_attrs(series_description="AX T2 FLAIR"), rules, model)
    assert t2.rule is not None and t2.rule.name == "t2" and t2.bundle == Path("/m/default")
    other = route(make_attrs(series_description="T2star"), rules, model)
    assert other.rule is not None and other.rule.name == "any-mr"


def test_localizers_by_image_type_or_description() -> None:
    settings = Settings()
    rules, model = list(settings.routing.rules), settings.model
    loc = route(make_attrs(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), rules, model)
    assert loc.skipped and loc.reason is not None and "localizer" in loc.reason
    scout = route(make_attrs(series_description="AAHead_Scout_64ch"), rules, model)
    assert scout.skipped and scout.reason is not None and "localizer" in scout.reason
    survey = route(make_attrs(series_description="SURVEY"), rules, model)
    assert survey.skipped
    assert not route(make_attrs(series_description="T1 MPRAGE"), rules, model).skipped


def test_enhanced_mr_phase_component() -> None:
    settings = Settings()
    r = route(
        make_attrs(image_type=("ORIGINAL", "PRIMARY", "T1", "NONE"), complex_component="PHASE"),
        list(settings.routing.rules),
        settings.model,
    )
    assert r.skipped and r.reason is not None and "Complex Image Component" in r.reason


def test_bad_pattern_refused_at_start_up() -> None:
    settings = settings_with([{"name": "bad", "series_description": "t1("}])
    with pytest.raises(ConfigError, match="bad series_description pattern"):
        validate_rules(settings)
