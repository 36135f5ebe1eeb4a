"""Which model scores a series: the routing rules of ``[[routing.rules]]``.

A model of normal brain T1 images says nothing useful about a phase map, a localizer or a
derived reformat, and a PACS admin wants to see why a series was not scored rather than a wall
of false alarms. So: the first rule whose conditions all hold picks the model bundle; phase,
derived and localizer images match only rules with ``score_derived = true``; a series that no
rule takes is ``skipped`` with the reason.

Conditions of a rule (each one that is set must hold): ``modality`` (equal, case-insensitive),
``body_part`` (Body Part Examined, equal, case-insensitive), ``series_description`` (regular
expression, case-insensitive search), ``image_type`` (every listed value present in Image Type).
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
            f"routing rule: bad series_description pattern {expression!r}: {exc}"
        ) from exc


def _mismatch(rule: RoutingRule, attrs: SeriesAttributes) -> str | None:
    """The first condition of ``rule`` that ``attrs`` fails, or None when all hold."""
    if rule.modality and (attrs.modality or "").upper() != rule.modality.upper():
        return f"modality {attrs.modality or 'absent'} is not {rule.modality}"
    if rule.body_part and (attrs.body_part or "").upper() != rule.body_part.upper():
        return f"body part {attrs.body_part or 'absent'} is not {rule.body_part}"
    if rule.series_description and not _pattern(rule.series_description).search(
        attrs.series_description or ""
    ):
        return f"series description {attrs.series_description!r} does not match"
    missing = [v for v in rule.image_type if v.upper() not in attrs.image_type]
    if missing:
        return f"image type lacks {', '.join(missing)}"
    return None


def validate_rules(settings: Settings) -> None:
    """Check the rules' patterns at start-up, so a typo stops the node instead of every series.

    Raises:
        ConfigError: a ``series_description`` is not a valid regular expression.
    """
    for rule in settings.routing.rules:
        if rule.series_description:
            _pattern(rule.series_description)


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
