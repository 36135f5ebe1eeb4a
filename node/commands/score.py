"""``vaenode score PATH...``: score DICOM series and NIfTI volumes from the command line.

DICOM files and folders are grouped by series and assembled exactly as the worker does (each
instance, or each frame of a multi-frame instance, is one slice scored in its own plane); NIfTI
volumes are reoriented to RAS and cut into axial slices as the model's training data were.

Output: a readable table and a verdict per series, or with ``--json`` one JSON object per line
per slice, ``{series_instance_uid, sop_instance_uid, frame, slice_index, log_likelihood, kl,
elbo, abnormal, confidence}``, then one per series, ``{series_instance_uid, slices,
abnormal_slices, abnormal}``. Other tools read exactly these names: change them only with care.
For NIfTI volumes ``series_instance_uid`` is the file path, and ``sop_instance_uid`` and
``frame`` are null.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from node.commands.common import ConfigOption, setup
from node.errors import NodeError

if TYPE_CHECKING:
    from node.config import Settings
    from node.report.content import SliceVerdict
    from node.worker.score import BundleCache, ScoredSeries, ScoringOptions


ESTIMATORS = ("importance", "plain", "mcmc")


@dataclass(frozen=True)
class _Scored:
    """One scored series or volume, ready to print."""

    uid: str
    label: str
    scored: ScoredSeries
    min_abnormal_slices: int
    model: str

    @property
    def abnormal(self) -> bool:
        return self.scored.abnormal_slices >= self.min_abnormal_slices


def _finite(value: float) -> float | None:
    # JSON has no NaN or infinity; a slice the model cannot score shows as null.
    return value if math.isfinite(value) else None


def slice_record(series_uid: str, s: SliceVerdict, *, nifti: bool = False) -> dict[str, Any]:
    """The JSON object of one slice (field names are a contract, see the module docstring)."""
    return {
        "series_instance_uid": series_uid,
        "sop_instance_uid": None if nifti else s.sop_instance_uid,
        "frame": s.frame,
        "slice_index": s.index,
        "log_likelihood": _finite(s.log_likelihood),
        "kl": _finite(s.kl),
        "elbo": _finite(s.elbo),
        "abnormal": bool(s.abnormal),
        "confidence": _finite(s.confidence),
    }


def series_record(item: _Scored) -> dict[str, Any]:
    """The JSON object of one series (field names are a contract)."""
    return {
        "series_instance_uid": item.uid,
        "slices": len(item.scored.slices),
        "abnormal_slices": item.scored.abnormal_slices,
        "abnormal": item.abnormal,
    }


def _print_table(item: _Scored, nifti: bool) -> None:
    s = item.scored
    typer.echo(f"\n{item.label}")
    typer.echo(f"  model {item.model}, {s.estimator} estimator, {s.samples} samples, "
               f"threshold {s.threshold:.1f}")
    ident = "slice" if nifti else "SOP instance UID (frame)"
    typer.echo(f"  {'#':>4}  {'log p(x)':>12}  {'KL':>9}  {'ELBO':>12}  {'conf':>5}  "
               f"{'verdict':<8} {ident}")
    for v in s.slices:
        where = f"{v.index}" if nifti else v.sop_instance_uid + (
            f" ({v.frame})" if v.frame is not None else "")
        verdict = "ABNORMAL" if v.abnormal else "normal"
        typer.echo(f"  {v.index:>4}  {v.log_likelihood:>12.1f}  {v.kl:>9.1f}  {v.elbo:>12.1f}  "
                   f"{v.confidence:>5.2f}  {verdict:<8} {where}")
    verdict = "ABNORMAL" if item.abnormal else "normal"
    typer.echo(f"  verdict: {verdict} ({s.abnormal_slices} of {len(s.slices)} slices below the "
               f"threshold; the series is abnormal from {item.min_abnormal_slices})")


def _split_paths(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(NIfTI files, other files) named or found under ``paths``."""
    from node.model.data import is_nifti

    nifti: list[Path] = []
    other: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files = [path]
        else:
            raise NodeError(f"no such file or folder: {path}")
        for f in files:
            (nifti if is_nifti(f) else other).append(f)
    # A file named twice (a folder and a file in it) is scored once.
    return list(dict.fromkeys(nifti)), list(dict.fromkeys(other))


def _min_abnormal(settings: Settings, rule_value: int | None, override: int | None) -> int:
    if override is not None:
        return override
    if rule_value is not None:
        return rule_value
    rules = settings.routing.rules
    return rules[0].min_abnormal_slices if rules else 1


def _score_dicom(
    files: list[Path], settings: Settings, bundles: BundleCache, model: Path | None,
    options: ScoringOptions, min_abnormal: int | None, emit: Any,
) -> tuple[int, list[str]]:
    from node.errors import AssemblyError, ModelError
    from node.worker.assemble import assemble_series, find_series
    from node.worker.routing import route
    from node.worker.score import score_series

    found, unused = find_series(files)
    for path in unused:
        typer.echo(f"vaenode score: not DICOM, ignored: {path}", err=True)
    errors: list[str] = []
    for group in found:
        try:
            series = assemble_series(list(group.paths))
            decision = route(series.attributes, list(settings.routing.rules), settings.model)
            bundle_path = model or (decision.bundle if decision.rule else settings.model.bundle)
            bundle = bundles.get(bundle_path)
            scored = score_series(series, bundle, options)
        except (AssemblyError, ModelError) as exc:
            errors.append(f"series {group.series_instance_uid}: {exc}")
            typer.echo(f"vaenode score: series {group.series_instance_uid}: {exc}", err=True)
            continue
        attrs = series.attributes
        label = (f"Series {attrs.series_instance_uid}: {attrs.modality or '?'} "
                 f"{attrs.series_description or ''}".rstrip()
                 + f", {len(scored.slices)} slices in {len(series.stacks)} stack(s)")
        if decision.rule is None:
            label += f" [the node would skip it: {decision.reason}]"
        rule_min = decision.rule.min_abnormal_slices if decision.rule else None
        emit(_Scored(attrs.series_instance_uid, label, scored,
                     _min_abnormal(settings, rule_min, min_abnormal),
                     f"{bundle.name} {bundle.version}"), False)
    return len(found), errors


def _score_nifti(
    files: list[Path], settings: Settings, bundles: BundleCache, model: Path | None,
    options: ScoringOptions, min_abnormal: int | None, emit: Any,
) -> list[str]:
    from node.errors import ModelError
    from node.model.data import load_nifti, plane_slices, slice_spacing
    from node.report.content import SliceVerdict
    from node.worker.score import ScoredSeries, score_note

    errors: list[str] = []
    for path in files:
        try:
            volume = load_nifti(path)
            stack, spacing = plane_slices(volume, "axial")
            bundle = bundles.get(model or settings.model.bundle)
            scores = bundle.score_slices(
                list(stack), [spacing] * len(stack), estimator=options.estimator,
                samples=options.samples, threshold=options.threshold,
                batch_size=options.batch_size, device=options.device,
                progress=options.progress, plane="axial",
                slice_spacing_mm=slice_spacing(volume, "axial"),
            )
        except ModelError as exc:
            errors.append(f"{path}: {exc}")
            typer.echo(f"vaenode score: {path}: {exc}", err=True)
            continue
        verdicts = tuple(
            SliceVerdict(
                sop_instance_uid=f"{path.name}#{k}", sop_class_uid="nifti", frame=None, index=k,
                log_likelihood=float(scores.log_likelihood[k]), kl=float(scores.kl[k]),
                elbo=float(scores.elbo[k]), abnormal=bool(scores.abnormal[k]),
                confidence=min(1.0, max(0.0, float(scores.confidence[k]))),
                foreground=bool(scores.foreground[k]),
            )
            for k in range(len(stack))
        )
        scored = ScoredSeries(verdicts, scores.threshold, scores.estimator, scores.samples,
                              score_note(bundle, scores.estimator))
        label = f"Volume {path}: {len(stack)} axial slices of {stack.shape[1]}x{stack.shape[2]}"
        emit(_Scored(str(path), label, scored, _min_abnormal(settings, None, min_abnormal),
                     f"{bundle.name} {bundle.version}"), True)
    return errors


def score(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders, NIfTI volumes.")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Model bundle folder (default: as the "
                                  "node routes the series, else the config's model.bundle, "
                                  "else the shipped model).")
    ] = None,
    estimator: Annotated[
        str | None, typer.Option("--estimator", "-e", help="importance, plain or mcmc "
                                 "(default: the config's model.estimator, else the bundle's).")
    ] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", "-n", min=1, help="Monte-Carlo samples per slice.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Threshold on log p(x) (default: the "
                                   "config's, else the bundle's calibrated one).")
    ] = None,
    min_abnormal_slices: Annotated[
        int | None, typer.Option("--min-abnormal-slices", min=1, help="Abnormal slices that make "
                                 "a series abnormal (default: the routing rule's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress",
                                  help="Progress bar on stderr (default: when it is a terminal).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Score DICOM series and NIfTI volumes; print per-slice scores and a verdict per series."""
    settings = setup(config)
    if estimator is not None and estimator not in ESTIMATORS:
        raise typer.BadParameter(f"{estimator!r}; one of {', '.join(ESTIMATORS)}",
                                 param_hint="--estimator")
    from node.worker.score import BundleCache, ScoringOptions

    options = ScoringOptions(
        estimator=estimator or settings.model.estimator,
        samples=samples or settings.model.samples,
        threshold=threshold if threshold is not None else settings.model.threshold,
        batch_size=settings.worker.batch_size,
        device=settings.model.device,
        progress=sys.stderr.isatty() if progress is None else progress,
    )
    nifti, other = _split_paths(paths)
    bundles = BundleCache()

    def emit(item: _Scored, is_nifti: bool) -> None:
        if as_json:
            for v in item.scored.slices:
                typer.echo(json.dumps(slice_record(item.uid, v, nifti=is_nifti)))
            typer.echo(json.dumps(series_record(item)))
        else:
            _print_table(item, is_nifti)

    n_series, errors = 0, list[str]()
    if other:
        n_series, errors = _score_dicom(other, settings, bundles, model, options,
                                        min_abnormal_slices, emit)
    errors += _score_nifti(nifti, settings, bundles, model, options, min_abnormal_slices, emit)
    total = n_series + len(nifti)
    if total == 0:
        raise NodeError("no DICOM series or NIfTI volume found under "
                        + ", ".join(str(p) for p in paths))
    if errors:
        raise NodeError(f"{len(errors)} of {total} series could not be scored")


def register(app: typer.Typer) -> None:
    """Add ``vaenode score`` to the command."""
    app.command("score")(score)
