"""Which model scores a series: the routing rules of ``[[routing.rules]]``.

A model of normal brain T1 images says nothing useful about a phase map, a localizer or a
derived reformat, and a PACS admin wants to see why a series was not scored rather than a wall
of false alarms. So: the first rule whose conditions all hold picks the model bundle; phase,
derived and localizer images match only rules with ``score_derived = true``; a series that no
rule takes is ``skipped`` with the reason.

Conditions of a rule (each one that is set must hold): ``modality`` (equal, case-insensitive),
``station_name`` (Station Name, one of the listed values, case-insensitive; a series that
names no station declines whatever ``when_unstated`` says: a rule for one scanner, say with
a bundle calibrated on that scanner's normal series, must not take another's),
``body_part`` (Body Part Examined, one of the listed values, case-insensitive),
``series_description`` (regular expression, case-insensitive search),
``exclude_series_description`` (a match declines), ``image_type`` (every listed value present
in Image Type), ``exclude_image_type`` (any listed value present declines), ``exclude_angio``
(Angio Flag Y declines), ``echo_time_ms`` and ``repetition_time_ms`` (inclusive ranges) and
``acquisition_contrast`` (enhanced MR; one of the listed values): see
:mod:`node.worker.acquisition`. Body part, times and contrast are often missing from headers
(Body Part Examined is optional and many brain series lack it); ``when_unstated`` says whether
a condition on a value the series does not state holds (``match``, the default) or declines it.

The shipped default rule (:func:`node.config.default_rules`) sends the default brain T1 model
only MR series that say they are of the head (or say nothing), with an echo time of at most
20 ms, and not angiography or susceptibility-weighted (by description, Image Type SWI and
Angio Flag): out of the box the node does not flag
every knee, prostate, T2 or diffusion series of a department as a quality issue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from node.config import ModelSettings, RoutingRule, Settings
from node.errors import ConfigError
from node.worker.assemble import SeriesAttributes

#: Image Type value 3 of phase images (PS3.3 C.8.3.1.1.1: M, P, R, I; vendors write PHASE).
PHASE_VALUES = frozenset({"P", "PHASE"})
#: Series descriptions of localizers when Image Type does not say LOCALIZER (vendor habits).
# Letters may not touch the word ("Scout" in "AAHead_Scout_64ch" counts, "scouting" not).
LOCALIZER_DESCRIPTION = re.compile(
    r"(?<![a-z])(localizer|localiser|scout|survey|3[- ]?plane[ _-]?loc)(?![a-z])|^loc(?![a-z])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Route:
    """The outcome of routing one series.

    Attributes:
        rule: the rule that matched; None when the series is to be skipped.
        bundle: the model bundle folder; None means the default model shipped with the node.
        reason: why the series is skipped (None when a rule matched).
    """

    rule: RoutingRule | None
    bundle: Path | None
    reason: str | None

    @property
    def skipped(self) -> bool:
        """True when no rule takes the series."""
        return self.rule is None


def not_primary_reason(attrs: SeriesAttributes) -> str | None:
    """Why a series is phase, derived or a localizer (the images not scored by default)."""
    image_type = set(attrs.image_type)
    values = attrs.image_type
    if (len(values) > 2 and values[2] in PHASE_VALUES) or "PHASE" in image_type:
        return "phase image (Image Type " + "\\".join(values) + ")"
    if (attrs.complex_component or "").upper() == "PHASE":
        return "phase image (Complex Image Component PHASE)"
    if "LOCALIZER" in image_type:
        return "localizer (Image Type " + "\\".join(values) + ")"
    if values and values[0] == "DERIVED":
        return "derived image (Image Type " + "\\".join(values) + ")"
    if attrs.series_description and LOCALIZER_DESCRIPTION.search(attrs.series_description):
        return f"localizer (Series Description {attrs.series_description!r})"
    return None


@lru_cache(maxsize=64)
def _pattern(expression: str) -> re.Pattern[str]:
    try:
        return re.compile(expression, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(
            f"routing rule: bad series description pattern {expression!r}: {exc}"
        ) from exc


def _stated(rule: RoutingRule, what: str) -> str | None:
    """The verdict on a condition the series does not state: met, or this reason."""
    return None if rule.when_unstated == "match" else f"{what} not stated (when_unstated = skip)"


def _in_range(value: float | None, bounds: tuple[float, float] | None, what: str,
              rule: RoutingRule) -> str | None:
    if bounds is None:
        return None
    if value is None:
        return _stated(rule, what)
    low, high = bounds
    if low <= value <= high:
        return None
    return f"{what} {value:g} ms is outside {low:g}-{high:g} ms"


def _one_of(value: str | None, allowed: list[str], what: str, rule: RoutingRule) -> str | None:
    if not allowed:
        return None
    if value is None:
        return _stated(rule, what)
    if value.upper() in allowed:
        return None
    return f"{what} {value} is not " + (
        allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed))


def _mismatch(rule: RoutingRule, attrs: SeriesAttributes) -> str | None:
    """The first condition of ``rule`` that ``attrs`` fails, or None when all hold."""
    if rule.modality and (attrs.modality or "").upper() != rule.modality.upper():
        return f"modality {attrs.modality or 'absent'} is not {rule.modality}"
    if rule.station_name and (attrs.station_name or "").upper() not in rule.station_name:
        return (f"station {attrs.station_name or '(not stated)'} is not "
                + " or ".join(rule.station_name))
    if why := _one_of(attrs.body_part, rule.body_part, "body part", rule):
        return why
    description = attrs.series_description or ""
    if rule.series_description and not _pattern(rule.series_description).search(description):
        return f"series description {attrs.series_description!r} does not match"
    if rule.exclude_series_description and _pattern(rule.exclude_series_description).search(
        description
    ):
        return f"series description {attrs.series_description!r} is excluded"
    missing = [v for v in rule.image_type if v.upper() not in attrs.image_type]
    if missing:
        return f"image type lacks {', '.join(missing)}"
    if excluded := [v for v in rule.exclude_image_type if v in attrs.image_type]:
        return f"image type has {', '.join(excluded)} (excluded)"
    acquisition = attrs.acquisition
    if rule.exclude_angio and acquisition.angio:
        return "angiography (Angio Flag Y)"
    if why := _in_range(acquisition.echo_time_ms, rule.echo_time_ms, "echo time", rule):
        return why
    if why := _in_range(acquisition.repetition_time_ms, rule.repetition_time_ms,
                        "repetition time", rule):
        return why
    return _one_of(acquisition.contrast, rule.acquisition_contrast, "acquisition contrast", rule)


def describe_rule(rule: RoutingRule) -> str:
    """The conditions of a rule in words, for the models page."""
    unstated = " (or not stated)" if rule.when_unstated == "match" else ""
    parts: list[str] = []
    if rule.modality:
        parts.append(f"modality {rule.modality.upper()}")
    if rule.station_name:
        parts.append("station " + " or ".join(rule.station_name))
    if rule.body_part:
        parts.append("body part " + " or ".join(rule.body_part) + unstated)
    if rule.series_description:
        parts.append(f"description matching /{rule.series_description}/")
    if rule.exclude_series_description:
        parts.append(f"description not matching /{rule.exclude_series_description}/")
    if rule.image_type:
        parts.append("image type with " + ", ".join(rule.image_type))
    if rule.exclude_image_type:
        parts.append("image type without " + ", ".join(rule.exclude_image_type))
    if rule.exclude_angio:
        parts.append("not angiography (Angio Flag)")
    for what, bounds in (("echo time", rule.echo_time_ms),
                         ("repetition time", rule.repetition_time_ms)):
        if bounds is not None:
            parts.append(f"{what} {bounds[0]:g}-{bounds[1]:g} ms{unstated}")
    if rule.acquisition_contrast:
        parts.append("contrast " + " or ".join(rule.acquisition_contrast) + unstated)
    parts.append("phase, derived and localizer images too" if rule.score_derived
                 else "not phase, derived or localizer images")
    parts.append(f"flagged from {rule.min_abnormal_slices} abnormal slice(s)")
    return "; ".join(parts)


def validate_rules(settings: Settings) -> None:
    """Check the rules' patterns at start-up, so a typo stops the node instead of every series.

    Raises:
        ConfigError: a ``series_description`` or ``exclude_series_description`` is not a valid
            regular expression.
    """
    for rule in settings.routing.rules:
        for expression in (rule.series_description, rule.exclude_series_description):
            if expression:
                _pattern(expression)


def route(attrs: SeriesAttributes, rules: list[RoutingRule], model: ModelSettings) -> Route:
    """Pick the rule and model bundle for a series, or say why it is skipped.

    Args:
        attrs: the series' routing attributes (:func:`node.worker.assemble.series_attributes`).
        rules: ``settings.routing.rules``, in order; the first that matches wins.
        model: ``settings.model``: its ``bundle`` is used by rules that name none.

    Returns:
        A :class:`Route`; ``route.skipped`` with ``route.reason`` when no rule takes it.
    """
    special = not_primary_reason(attrs)
    declined: list[str] = []
    for rule in rules:
        why = _mismatch(rule, attrs)
        if why is None and special is not None and not rule.score_derived:
            why = f"{special}, and the rule does not score those (score_derived = false)"
        if why is None:
            return Route(rule=rule, bundle=rule.model or model.bundle, reason=None)
        declined.append(f"{rule.name}: {why}")
    if not rules:
        return Route(rule=None, bundle=None, reason="no routing rule is configured")
    reason = "no routing rule matches (" + "; ".join(declined) + ")"
    return Route(rule=None, bundle=None, reason=reason)
