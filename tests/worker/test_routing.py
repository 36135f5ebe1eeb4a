"""Routing: rules map series attributes to a model; phase, derived and localizers need a rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.config import Settings
from node.errors import ConfigError
from node.worker.acquisition import Acquisition, acquisition_of, series_acquisition
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

    # Another body part, and a T2: the brain T1 model is not asked (it would flag every slice).
    prostate = route(attrs_of(PROSTATE), rules, model)
    assert prostate.skipped and prostate.reason == (
        "no routing rule matches (brain-t1-mr: body part PROSTATE is not one of HEAD, BRAIN, SKULL)"
    )


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


def test_a_rule_for_one_scanner_by_station_name() -> None:
    """A site-calibrated bundle for one scanner: its rule comes first and takes only series
    whose Station Name it lists (case-insensitive); a series naming no station is not taken
    even with when_unstated = match; the general rule takes the rest."""
    settings = settings_with([
        {"name": "room3", "modality": "MR", "station_name": "mr room 3",
         "when_unstated": "match", "model": "/m/room3"},
        {"name": "brain", "modality": "MR"},
    ], bundle="/m/default")
    rules, model = list(settings.routing.rules), settings.model
    assert rules[0].station_name == ["MR ROOM 3"]
    assert route(make_attrs(station_name="MR Room 3"), rules, model).bundle == Path("/m/room3")
    for station in ("MR ROOM 1", None):
        other = route(make_attrs(station_name=station), rules, model)
        assert other.rule is not None and other.rule.name == "brain"
        assert other.bundle == Path("/m/default")
    skipped = route(make_attrs(station_name=None), rules[:1], model)
    assert skipped.reason == ("no routing rule matches (room3: station (not stated) is not "
                              "MR ROOM 3)")
    # The real Siemens series names its station; the header is read for routing.
    assert attrs_of(SIEMENS_MAGNITUDE).station_name == "MRC35389"
    siemens = settings_with([{"name": "trio", "station_name": ["MRC35389", "OTHER"]}])
    assert route(attrs_of(SIEMENS_MAGNITUDE), list(siemens.routing.rules),
                 siemens.model).rule is not None


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
    with pytest.raises(ConfigError, match="bad series description pattern"):
        validate_rules(settings)
    settings = settings_with([{"name": "bad", "exclude_series_description": "[tof"}])
    with pytest.raises(ConfigError, match="bad series description pattern"):
        validate_rules(settings)


def test_default_rule_takes_brain_t1_and_declines_other_mr() -> None:
    settings = Settings()
    rules, model = list(settings.routing.rules), settings.model

    def reason(**kw: object) -> str | None:
        return route(make_attrs(**kw), rules, model).reason

    t1 = {"acquisition": Acquisition(echo_time_ms=2.3, repetition_time_ms=2300.0)}
    assert reason(**t1) is None
    assert reason(body_part=None, **t1) is None  # Body Part Examined is often missing
    assert reason(body_part="HEAD", acquisition=Acquisition(echo_time_ms=15.0)) is None
    assert reason(acquisition=Acquisition()) is None  # times not stated: taken
    assert reason(body_part="KNEE", **t1) == (
        "no routing rule matches (brain-t1-mr: body part KNEE is not one of HEAD, BRAIN, SKULL)"
    )
    assert reason(series_description="AX T2 FLAIR", acquisition=Acquisition(echo_time_ms=120.0)) \
        == "no routing rule matches (brain-t1-mr: echo time 120 ms is outside 0-20 ms)"
    for description in ("tof_3d_multi-slab", "3D TOF", "SWI_Images", "MRA Circle of Willis"):
        why = reason(series_description=description, acquisition=Acquisition(echo_time_ms=3.6))
        assert why is not None and "is excluded" in why, description
    # Words that merely contain the letters are not excluded.
    assert reason(series_description="t1_mprage_sag_iso_stofan", **t1) is None
    # Whatever the description says: processed SWI by its Image Type, angiography by its flag.
    swi = reason(series_description="3D GRE", image_type=("ORIGINAL", "PRIMARY", "M", "SWI"),
                 **t1)
    assert swi == "no routing rule matches (brain-t1-mr: image type has SWI (excluded))"
    angio = reason(series_description="Circle of Willis",
                   acquisition=Acquisition(echo_time_ms=3.6, angio=True))
    assert angio == "no routing rule matches (brain-t1-mr: angiography (Angio Flag Y))"
    assert reason(acquisition=Acquisition(echo_time_ms=3.6, angio=False)) is None


def test_angio_flag_of_images_and_series() -> None:
    flagged, plain, silent, enhanced = Dataset(), Dataset(), Dataset(), Dataset()
    flagged.AngioFlag = "Y"
    plain.AngioFlag = "N"
    enhanced.ImageType = ["ORIGINAL", "PRIMARY", "ANGIO", "NONE"]
    assert [acquisition_of(ds).angio for ds in (flagged, plain, silent, enhanced)] == [
        True, False, None, True]
    assert series_acquisition([plain, flagged, silent]).angio is True  # any image says so
    assert series_acquisition([plain, silent]).angio is False
    assert series_acquisition([silent]).angio is None
    # A rule without exclude_angio does not look at the flag.
    settings = settings_with([{"name": "any", "modality": "MR"}])
    attrs = make_attrs(acquisition=Acquisition(angio=True))
    assert route(attrs, list(settings.routing.rules), settings.model).rule is not None


def test_acquisition_conditions_and_unstated_values() -> None:
    settings = settings_with([
        {"name": "strict", "modality": "MR", "body_part": ["brain"],
         "repetition_time_ms": [300, 800], "acquisition_contrast": "t1",
         "when_unstated": "skip"},
        {"name": "lenient", "modality": "MR", "acquisition_contrast": ["T1", "MIXED"]},
    ])
    rules, model = list(settings.routing.rules), settings.model
    assert rules[0].body_part == ["BRAIN"] and rules[0].acquisition_contrast == ["T1"]
    full = Acquisition(echo_time_ms=12.0, repetition_time_ms=500.0, contrast="T1")
    r = route(make_attrs(acquisition=full), rules, model)
    assert r.rule is not None and r.rule.name == "strict"
    r = route(make_attrs(body_part=None, acquisition=full), rules, model)
    assert r.rule is not None and r.rule.name == "lenient"
    # No contrast stated: the strict rule declines, the lenient one (match) takes it.
    r = route(make_attrs(acquisition=Acquisition(repetition_time_ms=500.0)), rules, model)
    assert r.rule is not None and r.rule.name == "lenient"
    r = route(make_attrs(acquisition=Acquisition(repetition_time_ms=500.0)), rules[:1], model)
    assert r.reason == (
        "no routing rule matches (strict: acquisition contrast not stated (when_unstated = skip))"
    )
    r = route(make_attrs(acquisition=Acquisition(repetition_time_ms=2000.0, contrast="T2")),
              rules, model)
    assert r.reason == (
        "no routing rule matches (strict: repetition time 2000 ms is outside 300-800 ms; "
        "lenient: acquisition contrast T2 is not one of T1, MIXED)"
    )


@pytest.mark.parametrize("bounds", [[20, 10], [-1, 5], [1, 2, 3]])
def test_bad_time_ranges_refused(bounds: list[float]) -> None:
    with pytest.raises(ValueError, match="echo_time_ms"):
        settings_with([{"name": "bad", "echo_time_ms": bounds}])


def test_acquisition_read_from_classic_and_enhanced_headers() -> None:
    classic = Dataset()
    classic.EchoTime = "4.92"
    classic.RepetitionTime = 488
    assert acquisition_of(classic) == Acquisition(echo_time_ms=4.92, repetition_time_ms=488.0)
    classic.EchoTime = ["15", "90"]  # a multi-valued (dual echo) header: the longer counts
    assert acquisition_of(classic).echo_time_ms == 90.0
    classic.EchoTime = ""
    assert acquisition_of(classic).echo_time_ms is None

    enhanced = Dataset()
    enhanced.AcquisitionContrast = "T1"
    echo, timing, shared, frame = Dataset(), Dataset(), Dataset(), Dataset()
    echo.EffectiveEchoTime = 2.26
    timing.RepetitionTime = 1900.0
    frame.MREchoSequence = [echo]
    shared.MRTimingAndRelatedParametersSequence = [timing]
    enhanced.PerFrameFunctionalGroupsSequence = [frame]
    enhanced.SharedFunctionalGroupsSequence = [shared]
    assert acquisition_of(enhanced) == Acquisition(echo_time_ms=2.26, repetition_time_ms=1900.0,
                                                   contrast="T1")
    assert acquisition_of(Dataset()) == Acquisition()
    # A multi-echo enhanced object: its longest echo counts.
    second, late = Dataset(), Dataset()
    late.EffectiveEchoTime = 95.0
    second.MREchoSequence = [late]
    enhanced.PerFrameFunctionalGroupsSequence = [frame, second]
    assert acquisition_of(enhanced).echo_time_ms == 95.0

    # The real series: the Siemens dual-echo field map (4.92 and 7.38 ms) counts its longer
    # echo; the prostate T2 states its times too.
    headers = read_headers(series_files(SIEMENS_MAGNITUDE))
    assert {acquisition_of(ds).echo_time_ms for ds in headers} == {4.92, 7.38}
    assert series_attributes(headers).acquisition == Acquisition(7.38, 488.0, None, angio=False)
    prostate = attrs_of(PROSTATE).acquisition
    assert prostate.echo_time_ms == 120.0 and prostate.repetition_time_ms is not None
