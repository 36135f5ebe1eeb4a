"""What the models page shows about each bundle the routing rules can pick.

The page reads each bundle's ``model.json`` as JSON and never loads the weights: the admin
layer has no business importing torch, and an admin looking at thresholds should not wait for
a model to load (or be blocked by a broken weights file, which the page then reports).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from node.config import DEFAULT_BUNDLE, RoutingRule, Settings
from node.worker.routing import describe_rule

# The bundle layout of node/model/bundle.py (MODEL_JSON), restated rather than imported:
# importing that module would import torch.
MODEL_JSON = "model.json"
# Sections of model.json worth listing as validation figures, when a bundle has them.
METRIC_SECTIONS = ("validation", "metrics", "evaluation")


@dataclass(frozen=True)
class BundleView:
    """One bundle as the models page lists it.

    Attributes:
        path: the bundle folder.
        label: "name version" (the label verdicts and review counts use), or the folder name.
        rules: routing rules that send series to this bundle.
        rule_conditions: each of those rules' conditions in words (same order).
        threshold: the threshold in force (the configured override, else the calibrated one).
        threshold_source: "configuration" or "calibration".
        target_fpr: the slice false-positive rate the threshold was calibrated for.
        estimator: the default marginal-likelihood estimator, and samples per slice.
        metrics: (name, value) validation figures from model.json, flattened.
        training: what the model was trained on (data, subjects, attribution), if stated.
        description: the bundle's own description.
        created: when the bundle was made.
        error: why model.json could not be read, if it could not.
    """

    path: Path
    label: str
    rules: tuple[str, ...]
    threshold: float | None
    threshold_source: str
    target_fpr: float | None
    estimator: str | None
    samples: int | None
    metrics: tuple[tuple[str, str], ...]
    training: str | None
    description: str | None = None
    created: str | None = None
    error: str | None = None
    rule_conditions: tuple[str, ...] = ()


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, float):
        out.append((prefix, f"{value:.6g}"))
    elif isinstance(value, int | str | bool):
        out.append((prefix, str(value)))
    elif isinstance(value, list) and len(value) <= 8 and all(
        isinstance(v, int | float | str) for v in value
    ):
        out.append((prefix, ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                      for v in value)))


def read_meta(path: Path) -> dict[str, Any]:
    """The parsed ``model.json`` of a bundle folder.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a JSON object.
    """
    meta = json.loads((path / MODEL_JSON).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{MODEL_JSON} is not a JSON object")
    return meta


def label_of(meta: dict[str, Any], path: Path) -> str:
    """The model label shown with verdicts: "name version"."""
    name = meta.get("name") or path.name
    version = meta.get("version")
    return f"{name} {version}" if version else str(name)


def bundles(settings: Settings) -> list[BundleView]:
    """Every bundle the routing rules can pick, with the rules that pick it."""
    default = Path(settings.model.bundle) if settings.model.bundle else DEFAULT_BUNDLE
    by_path: dict[Path, list[RoutingRule]] = {}
    for rule in settings.routing.rules:
        by_path.setdefault(Path(rule.model) if rule.model else default, []).append(rule)
    by_path.setdefault(default, [])
    return [
        replace(_view(path, tuple(r.name for r in rules), settings),
                rule_conditions=tuple(describe_rule(r) for r in rules))
        for path, rules in by_path.items()
    ]


def _view(path: Path, rules: tuple[str, ...], settings: Settings) -> BundleView:
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as exc:
        return BundleView(path=path, label=path.name, rules=rules, threshold=None,
                          threshold_source="", target_fpr=None, estimator=None, samples=None,
                          metrics=(), training=None, error=f"cannot read {MODEL_JSON}: {exc}")
    calibration = meta.get("calibration") or {}
    scoring = meta.get("scoring") or {}
    override = settings.model.threshold
    metrics: list[tuple[str, str]] = []
    for section in METRIC_SECTIONS:
        if section in meta:
            _flatten(section, meta[section], metrics)
    for key in ("threshold", "target_fpr"):
        if key in calibration:
            _flatten(f"calibration.{key}", calibration[key], metrics)
    training = _training_summary(meta)
    return BundleView(
        path=path,
        label=label_of(meta, path),
        rules=rules,
        threshold=float(override) if override is not None else _float(calibration.get("threshold")),
        threshold_source="configuration" if override is not None else "calibration",
        target_fpr=_float(calibration.get("target_fpr")),
        estimator=settings.model.estimator or scoring.get("estimator"),
        samples=settings.model.samples or _int(scoring.get("samples")),
        metrics=tuple(metrics),
        training=training,
        description=str(meta["description"]) if meta.get("description") else None,
        created=str(meta["created"]) if meta.get("created") else None,
    )


def _training_summary(meta: dict[str, Any]) -> str | None:
    """Data, subject counts and attribution of the training, without the epoch history."""
    lines: list[str] = []
    training = meta.get("training")
    if isinstance(training, dict):
        for source in training.get("data") or []:
            lines.append(f"data: {Path(str(source)).name}")
        subjects = training.get("subjects")
        if isinstance(subjects, dict):
            counts = ", ".join(f"{k} {len(v)}" for k, v in subjects.items() if isinstance(v, list))
            if counts:
                lines.append(f"subjects: {counts}")
    attribution = meta.get("data_attribution")
    if isinstance(attribution, dict):
        lines.extend(f"{k}: {v}" for k, v in attribution.items())
    elif attribution:
        lines.append(str(attribution))
    return "\n".join(lines) or None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
