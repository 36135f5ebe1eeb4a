"""``vaenode train`` and ``vaenode evaluate``: make a model bundle and measure it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from node.commands.common import ConfigOption, setup

IXI_ATTRIBUTION = {
    "dataset": "IXI (Information eXtraction from Images), Imperial College London",
    "url": "https://brain-development.org/ixi-dataset/",
    "license": "CC BY-SA 3.0",
    "credit": "Data provided by the IXI project (T1-weighted, Hammersmith Hospital, Philips 3T; "
    "copies downsampled to 2 mm by their redistributor)",
}


def _load_volumes(paths: list[Path]) -> list:
    """NIfTI files and folders of them; DICOM folders go through the worker's assembler."""
    from node.errors import ModelError
    from node.model.data import find_nifti, load_nifti

    files = find_nifti(paths)
    if not files:
        raise ModelError(
            "no NIfTI volumes found under " + ", ".join(map(str, paths))
            + " (DICOM series folders: convert to NIfTI first)"
        )
    return [load_nifti(p) for p in files]


def _load_training_data(paths: list[Path]) -> list:
    """NIfTI volumes and DICOM series (stacks assembled by the worker layer), mixed freely.

    Raises:
        ModelError: a path does not exist, or nothing usable was found; the message says what
            was found instead (broken series and their reasons, files that are neither).
    """
    from node.errors import ModelError
    from node.model.data import find_nifti, load_nifti
    from node.worker.training_data import load_dicom_stacks

    vols: list = [load_nifti(p) for p in find_nifti(paths)]
    try:
        dicom = load_dicom_stacks(paths)
    except Exception as exc:  # AssemblyError for a missing path; keep one error type here
        raise ModelError(f"cannot read training data: {exc}") from exc
    for problem in dicom.problems:
        typer.echo(f"skipped: {problem}", err=True)
    if not vols and not dicom.stacks:
        where = ", ".join(map(str, paths))
        detail = "; ".join(dicom.problems[:3])
        raise ModelError(
            f"no training data under {where}: no NIfTI volume and no readable DICOM series"
            + (f" ({detail})" if detail else "")
            + (f"; {dicom.other_files} other file(s) ignored" if dicom.other_files else "")
        )
    return vols + dicom.stacks


def train(
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="NIfTI files, DICOM series, or folders of them.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training slices.")] = 8,
    latent: Annotated[int, typer.Option(help="Latent attributes.")] = 128,
    image_size: Annotated[int, typer.Option(help="Model grid side in pixels.")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed (split, init, order).")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Subjects held out.")] = 0.2,
    batch_size: Annotated[int, typer.Option(help="Slices per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    samples: Annotated[int, typer.Option(help="Default Monte-Carlo samples.")] = 8,
    target_fpr: Annotated[float, typer.Option(help="Calibration false-positive rate.")] = 0.01,
    tail_weight: Annotated[float, typer.Option(help="Extra weight of worst 1% pixels.")] = 0.0,
    max_series_shift: Annotated[float, typer.Option(help="Cap of series shift, nats.")] = 0.0,
    complexity: Annotated[bool, typer.Option(help="PNG complexity correction.")] = True,
    augment: Annotated[bool, typer.Option(help="Normal-variation augmentation.")] = True,
    variation: Annotated[list[str] | None, typer.Option(
        help="Change one range of the scanner variation, name=value (a range: lo,hi), e.g. "
             "scale=0.8,1.3; repeatable. Names: the fields of node.model.augment.AugmentConfig."
    )] = None,
    heteroscedastic: Annotated[
        bool, typer.Option(help="Per-pixel decoder variance (else one learned global value).")
    ] = True,
    max_train_slices: Annotated[int | None, typer.Option(help="Cap (tiny runs).")] = None,
    compress: Annotated[
        bool, typer.Option(help="Compression stage: an autoencoder first, the VAE on its features.")
    ] = False,
    compress_dim: Annotated[int, typer.Option(help="Feature channels of --compress.")] = 8,
    name: Annotated[str | None, typer.Option(
        help="Bundle name; default brain-t1, or with --init the starting bundle's.")] = None,
    version: Annotated[str | None, typer.Option(
        help="Bundle version; default 0.1.0+trained.<UTC time>, or with --init the starting "
             "bundle's followed by +adapted.<UTC time> (a version of its own, never a shipped "
             "bundle's: stations learn it afresh).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda...")] = "auto",
    init: Annotated[Path | None, typer.Option(
        "--init", help="Start from this bundle's weights (its architecture, preprocessing and "
                       "score settings) instead of random ones: adapt it to a scanner's own "
                       "normal series, e.g. with --epochs 4 --lr 0.0002.")] = None,
    from_queue: Annotated[bool, typer.Option(
        "--from-queue", help="Adapt to one station's stored normal series (--station): the "
                             "learning series its station reference kept (reviews first); "
                             "starts from --init, default the shipped model.")
    ] = False,
    station: Annotated[str | None, typer.Option(
        help="Station Name (0008,1010) whose series --from-queue takes.")] = None,
    protocol: Annotated[str | None, typer.Option(
        help="With --from-queue: that protocol's learning series only (as the Scanners page "
             "names it); default every protocol of the station.")] = None,
    min_series: Annotated[int, typer.Option(
        help="With --from-queue: refuse with fewer normal series than this.")] = 10,
    config: ConfigOption = None,
) -> None:
    """Train a VAE on normal volumes and series and write a calibrated model bundle."""
    settings = setup(config)
    from node.model.train import TrainConfig, run_training

    paths = list(data or [])
    if from_queue:
        if not station:
            raise typer.BadParameter("--from-queue needs --station", param_hint="--station")
        if init is None:
            from node.model.bundle import default_bundle_path

            init = default_bundle_path()
        paths += _station_normal_folders(settings, station, protocol, min_series)
    elif station or protocol is not None:
        raise typer.BadParameter("needs --from-queue", param_hint="--station/--protocol")
    if not paths:
        raise typer.BadParameter("give --data, or --from-queue with --station",
                                 param_hint="--data")
    from node.model.augment import AugmentConfig

    try:
        varied = AugmentConfig().with_settings(variation or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--variation") from None
    vols = _load_training_data(paths)
    cfg = TrainConfig(
        epochs=epochs, latent_dim=latent, image_size=image_size, seed=seed,
        val_fraction=val_fraction, batch_size=batch_size, lr=lr, samples=samples,
        target_fpr=target_fpr, tail_weight=tail_weight, max_series_shift=max_series_shift,
        complexity=complexity, augment=augment, variation=varied,
        heteroscedastic=heteroscedastic, max_train_slices=max_train_slices, compress=compress,
        compress_dim=compress_dim, name=name, version=version, device=device,
        init_bundle=str(init) if init is not None else None,
    )
    command = "vaenode " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    is_ixi = any("IXI" in v.subject for v in vols)
    run_training(vols, cfg, out, command=command, data_sources=[str(p) for p in paths],
                 attribution=IXI_ATTRIBUTION if is_ixi else {}, report=typer.echo)
    if from_queue and station:  # --from-queue without --station was refused above
        typer.echo(f"route {station}'s series to it: add this rule to the config before the "
                   "general ones (the shipped brain rule, narrowed to the station)\n"
                   + _station_rule(station, out))


def _station_rule(station: str, bundle: Path) -> str:
    """The shipped brain T1 routing rule narrowed to one station and scored with ``bundle``,
    as TOML (JSON string and list syntax is valid TOML for these values)."""
    import json

    from node.config import default_rules

    rule = default_rules()[0].model_copy(update={
        "name": f"{default_rules()[0].name} {station} (adapted)", "station_name": [station],
        "model": bundle.resolve()})
    lines = ["[[routing.rules]]"]
    for key, value in rule.model_dump(exclude_defaults=True).items():
        if isinstance(value, tuple):
            value = list(value)
        lines.append(f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    return "\n".join(lines)


def evaluate(
    data: Annotated[list[Path], typer.Option("--data", help="NIfTI files or folders.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, metrics.json...")],
    model: Annotated[Path | None, typer.Option("--model", help="Bundle folder.")] = None,
    max_subjects: Annotated[int | None, typer.Option(help="Use at most this many.")] = None,
    artifact: Annotated[list[str] | None, typer.Option(help="Artifacts (default: all).")] = None,
    samples: Annotated[int | None, typer.Option(help="Monte-Carlo samples.")] = None,
    mcmc_subjects: Annotated[int, typer.Option(help="Subjects also scored by mcmc.")] = 2,
    block_fraction: Annotated[float, typer.Option(help="Corrupted share of a series.")] = 0.3,
    seed: Annotated[int, typer.Option(help="Random seed of the corruptions.")] = 0,
    records: Annotated[Path | None, typer.Option(help="records.pkl of an earlier run.")] = None,
    sites: Annotated[int, typer.Option(
        min=0, help="Site sweep on this many of the subjects: each rendered as other scanners "
                    "would make it (node/model/sites.py), clean and with moderate artifact "
                    "blocks (0: no sweep).")] = 0,
    config: ConfigOption = None,
) -> None:
    """Measure a bundle on held-out subjects: clean vs TorchIO-corrupted slices, and with
    ``--sites`` per simulated site."""
    settings = setup(config)
    from node.model.artifacts import ARTIFACTS
    from node.model.bundle import load_bundle
    from node.model.evaluate import EvalConfig, run_evaluation

    bundle = load_bundle(model or settings.model.bundle)
    vols = _load_volumes(data)
    subjects = bundle.meta.get("training", {}).get("subjects", {})
    eval_ids = set(subjects.get("evaluation", []))
    ref_ids = set(subjects.get("calibration", []))
    chosen = [v for v in vols if v.subject in eval_ids] if eval_ids else vols
    if not chosen:
        chosen = vols
    reference = [v for v in vols if v.subject in ref_ids] or chosen[:1]
    if max_subjects:
        chosen = chosen[:max_subjects]
    typer.echo(f"evaluating {bundle.name} {bundle.version} on {len(chosen)} subjects")
    cfg = EvalConfig(artifacts=artifact or ARTIFACTS, samples=samples,
                     mcmc_subjects=mcmc_subjects, block_fraction=block_fraction, seed=seed)
    metrics = run_evaluation(bundle, chosen, reference, out, cfg, report=typer.echo,
                             records=records)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"false-positive rate at threshold: {100 * metrics['fpr_at_threshold']:.2f}%")
    if sites:
        from node.model.site_sweep import SweepConfig, sweep, write_sweep

        sweep_cfg = SweepConfig(artifacts=artifact or ARTIFACTS, seed=seed,
                                block_fraction=block_fraction)
        result = sweep(bundle, chosen[:sites], sweep_cfg, report=typer.echo)
        typer.echo(write_sweep(result, out))


def calibrate(
    model: Annotated[Path, typer.Option("--model", help="Bundle to start from.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write.")],
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="NIfTI files or folders (with --site also DICOM series).")] = None,
    tail_weight: Annotated[float | None, typer.Option(help="Extra weight, worst 1%.")] = None,
    max_series_shift: Annotated[float | None, typer.Option(help="Shift cap, nats.")] = None,
    complexity: Annotated[bool | None, typer.Option(help="PNG correction.")] = None,
    complexity_weight: Annotated[float | None, typer.Option(help="Weight of L(x).")] = None,
    shift_quantile: Annotated[float | None, typer.Option(help="Series shift quantile.")] = None,
    series_relative: Annotated[bool | None, typer.Option(help="Series shift.")] = None,
    samples: Annotated[int | None, typer.Option(help="Default Monte-Carlo samples.")] = None,
    target_fpr: Annotated[float | None, typer.Option(help="False-positive rate.")] = None,
    position_bins: Annotated[int | None, typer.Option(
        min=0, help="Position reference bins per plane (0: off).")] = None,
    alternative: Annotated[list[str] | None, typer.Option(
        help="Alternative score, e.g. complexity_weight=1,tail_weight=0,max_series_shift=7000,"
             "shift_quantile=0.75 (repeat for several; 'none' removes them). Replaces the "
             "bundle's.")] = None,
    background_part: Annotated[str | None, typer.Option(
        metavar="QUANTILE",
        help="Add the background part (the decoder's mean log-likelihood outside the head, "
             "node.model.scoring item 6) with its series shift at this quantile, e.g. 0.75; "
             "'none' removes it. Its cap is fitted on normal site variants of the calibration "
             "volumes unless --background-cap is given.")] = None,
    background_cap: Annotated[float | None, typer.Option(
        min=0.0, help="Cap of the background part's series shift (nats per pixel) instead of "
                      "fitting it; needs --background-part.")] = None,
    background_statistic: Annotated[str | None, typer.Option(
        metavar="STATISTIC",
        help="What the background part averages: 'log_likelihood' (all terms, the default) "
             "or 'residual' (-0.5 r^2 alone, each pixel's capped at 12.5, without the "
             "decoder's -log sigma); needs --background-part.")] = None,
    background_rate: Annotated[str | None, typer.Option(
        metavar="RATE",
        help="With --keep-threshold: map the background part so that it alone flags this "
             "share of the calibration slices (its RATE quantile onto the kept threshold, its "
             "median onto the main score's median), e.g. 0.005; default (or 'none'): its 1st "
             "percentile and median onto the main score's.")] = None,
    site: Annotated[bool, typer.Option(
        "--site",
        help="Calibrate on every subject in --data (a site's own normal series: NIfTI volumes "
             "or DICOM series folders, a DICOM series' subject being its Patient ID) instead "
             "of the bundle's own calibration subjects; at least 6 subjects.")] = False,
    from_queue: Annotated[bool, typer.Option(
        "--from-queue",
        help="With --site: also the stored series of the node's queue (--config) that a "
             "person reviewed as normal on the dashboard (a flagged one marked a false alarm, "
             "or a normal verdict confirmed), narrowed by --station, --calling-aet, "
             "--days.")] = False,
    station: Annotated[list[str] | None, typer.Option(
        help="With --from-queue: only series of this Station Name (repeat for several).")]
    = None,
    calling_aet: Annotated[list[str] | None, typer.Option(
        help="With --from-queue: only series sent by this AE title (repeat for several).")]
    = None,
    days: Annotated[int | None, typer.Option(
        min=1, help="With --from-queue: only series first received in the last N days.")]
    = None,
    station_score: Annotated[str | None, typer.Option(
        metavar="SETTINGS",
        help="The score station references learn, e.g. complexity_weight=0.75,tail_weight=4 "
             "(complexity correction and tail weight; the rest as the bundle's score), or "
             "'none' (stations learn the bundle's own score). Not calibrated here: each "
             "station's reference does that.")] = None,
    tissue_credit: Annotated[str | None, typer.Option(
        metavar="QUANTILE",
        help="Credit back the tissue pixels of a slice beyond this quantile of the calibration "
             "slices' counts, up to their largest count, at the nats per pixel the normal "
             "scores fall by (fitted; node.model.scoring item 7), e.g. 0.9; 'none' removes "
             "the credit.")] = None,
    keep_threshold: Annotated[bool, typer.Option(
        "--keep-threshold",
        help="Keep the source bundle's threshold instead of the target-FPR quantile of the "
             "recalibrated scores (their quantiles are still stored).")] = False,
    version: Annotated[str | None, typer.Option(
        help="Version of the written bundle (default: the source bundle's); its reports "
             "carry it.")] = None,
    config: ConfigOption = None,
) -> None:
    """Change how a bundle forms its score and calibrate its threshold again (same weights)."""
    settings = setup(config)
    from node.model.bundle import load_bundle
    from node.model.train import recalibrate

    given = {"tail_weight": tail_weight, "max_series_shift": max_series_shift,
             "complexity": complexity, "series_relative": series_relative, "samples": samples,
             "complexity_weight": complexity_weight, "shift_quantile": shift_quantile,
             "position_bins": position_bins}
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if alternative:
        changes["alternatives"] = [_parse_alternative(a) for a in alternative if a != "none"]
    if station_score is not None:
        changes["station_scoring"] = _parse_station_score(station_score)
    if tissue_credit is not None:
        changes["tissue_credit"] = _parse_quantile(tissue_credit, "--tissue-credit")
    if background_part is not None:
        changes["background"] = _parse_background_part(background_part, background_cap,
                                                       background_statistic)
    elif background_cap is not None or background_statistic is not None:
        raise typer.BadParameter("needs --background-part",
                                 param_hint="--background-cap/--background-statistic")
    rate = None
    if background_rate is not None:
        if not keep_threshold:
            raise typer.BadParameter("needs --keep-threshold", param_hint="--background-rate")
        rate = _parse_quantile(background_rate, "--background-rate")
    paths = list(data or [])
    if from_queue:
        if not site:
            raise typer.BadParameter("needs --site (the series are the site's)",
                                     param_hint="--from-queue")
        paths += _reviewed_normal_folders(settings, station or [], calling_aet or [], days)
    elif station or calling_aet or days is not None:
        raise typer.BadParameter("needs --from-queue", param_hint="--station/--calling-aet/--days")
    if not paths:
        raise typer.BadParameter("give --data, or --site --from-queue", param_hint="--data")
    bundle = load_bundle(model)
    command = "vaenode " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    volumes = _load_training_data(paths) if site else _load_volumes(paths)
    try:
        recalibrate(bundle, volumes, out, changes, target_fpr, command, site=site,
                    version=version, keep_threshold=keep_threshold, background_rate=rate)
    except ValueError as exc:  # data that cannot calibrate these settings; nothing written
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"bundle {bundle.name} {bundle.version} written to {out} "
               f"(threshold {bundle.threshold:.1f})")
    if site:
        check = bundle.meta["training"]["recalibrations"][-1]["site_check"]
        typer.echo(f"site check: a block of moderate motion over {100 * check['block'][0]:.0f}-"
                   f"{100 * check['block'][1]:.0f}% of each of the {check['series']} series: "
                   f"{100 * check['block_flagged']:.1f}% of its slices flagged, "
                   f"{100 * check['elsewhere_flagged']:.1f}% of the others")
        if check["blind"]:
            typer.echo("warning: the site-calibrated bundle barely flags motion in these series: "
                       "too few or too varied normal series, images too unlike the model's "
                       "training data for a recalibration alone (then train on the site's data), "
                       "or a bundle whose own score barely sees motion (brain-t1-multiscanner "
                       "out of the box: its stations' learning judges by its station score)",
                       err=True)


def _station_normal_folders(settings: Any, station: str, protocol: str | None,
                            min_series: int) -> list[Path]:
    """The storage folders of a station's normal series as its learning kept them
    (:func:`node.worker.station.normal_series_folders`), each named on the console.

    Raises:
        NodeError: fewer than ``min_series``.
    """
    from node.errors import NodeError
    from node.queue.db import make_engine, make_read_session_factory
    from node.worker.station import normal_series_folders

    with make_read_session_factory(make_engine(settings.database))() as session:
        folders = normal_series_folders(session, settings.storage.dir, station, protocol)
    if len(folders) < min_series:
        raise NodeError(f"station {station} has {len(folders)} stored normal learning series"
                        + (f" of protocol '{protocol}'" if protocol else "")
                        + f" in the queue, fewer than --min-series {min_series}")
    for folder in folders:
        if not folder.is_dir():
            raise NodeError(f"the stored images of series {folder.name} are not at {folder} "
                            "([storage].dir is relative to the working directory: run from "
                            "the node's, or give an absolute path)")
        typer.echo(f"from the queue: series {folder.name} (station {station})")
    return folders


def _reviewed_normal_folders(settings: Any, stations: list[str], calling_aets: list[str],
                             days: int | None) -> list[Path]:
    """The storage folders of the queue's series a person reviewed as normal
    (:func:`node.admin.reviews.reviewed_normal`), each named on the console.

    Raises:
        NodeError: there are none.
    """
    from datetime import timedelta

    from node.admin.reviews import reviewed_normal
    from node.errors import NodeError
    from node.queue.db import make_engine, make_read_session_factory
    from node.queue.models import utcnow

    since = utcnow() - timedelta(days=days) if days is not None else None
    with make_read_session_factory(make_engine(settings.database))() as session:
        rows = [(s.study_instance_uid, s.series_instance_uid, s.station_name, s.calling_aet)
                for s in reviewed_normal(session, stations=stations, calling_aets=calling_aets,
                                         since=since)]
    if not rows:
        raise NodeError("no stored series reviewed as normal in the queue"
                        + (f" for station {', '.join(stations)}" if stations else "")
                        + (f" from {', '.join(calling_aets)}" if calling_aets else "")
                        + (f" in the last {days} days" if days is not None else "")
                        + " (mark false alarms or confirm normal verdicts on the dashboard)")
    folders = [settings.storage.dir / study / series for study, series, _s, _a in rows]
    for folder, (_study, series, station_name, aet) in zip(folders, rows, strict=True):
        if not folder.is_dir():
            raise NodeError(f"the stored images of series {series} are not at {folder} "
                            "([storage].dir is relative to the working directory: run from "
                            "the node's, or give an absolute path)")
        typer.echo(f"from the queue: series {series} (station {station_name or '-'}, "
                   f"AE {aet or '-'})")
    return folders


def _numbers(text: str, allowed: set[str], expected: str, hint: str) -> dict[str, float]:
    """``key=number,...`` with keys from ``allowed`` (the option ``hint``'s value); exits 2,
    saying ``expected``, when an item is not one of them or not a number."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise typer.BadParameter(f"{item!r}: expected {expected}", param_hint=hint)
        try:
            out[key] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{key}: {value!r} is not a number",
                                     param_hint=hint) from None
    return out


def _parse_alternative(text: str) -> dict[str, float]:
    """``key=value,...`` of :class:`node.model.scoring.AlternativeScore`; exits 2 when wrong."""
    from node.model.scoring import AlternativeScore

    allowed = {"complexity_weight", "tail_weight", "max_series_shift", "shift_quantile"}
    out = _numbers(text, allowed, f"KEY=VALUE with KEY one of {', '.join(sorted(allowed))}",
                   "--alternative")
    missing = {"complexity_weight", "tail_weight", "max_series_shift"} - set(out)
    if missing:
        raise typer.BadParameter(f"{text!r} lacks {', '.join(sorted(missing))}",
                                 param_hint="--alternative")
    AlternativeScore(**out)
    return out


def _parse_station_score(text: str) -> dict[str, Any] | None:
    """``--station-score``: ``complexity_weight=W,tail_weight=T`` (either or both), or 'none';
    exits 2 when wrong."""
    if text.strip() == "none":
        return None
    out: dict[str, Any] = _numbers(text, {"complexity_weight", "tail_weight"},
                                   "complexity_weight=W or tail_weight=T", "--station-score")
    for key, number in out.items():
        if not number >= 0.0:
            raise typer.BadParameter(f"{key} must be 0 or more, got {number:g}",
                                     param_hint="--station-score")
    if not out:
        raise typer.BadParameter("give complexity_weight=W and/or tail_weight=T, or 'none'",
                                 param_hint="--station-score")
    if "complexity_weight" in out:
        out["complexity"] = out["complexity_weight"] > 0.0
    return out


def _parse_quantile(value: str, option: str) -> float | None:
    """A quantile in (0, 1), or None for 'none'; exits 2 when it is neither."""
    if value.strip().lower() == "none":
        return None
    try:
        q = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a quantile or 'none'",
                                 param_hint=option) from None
    if not 0.0 < q < 1.0:
        raise typer.BadParameter(f"{value!r}: a quantile is in (0, 1)", param_hint=option)
    return q


def _parse_background_part(quantile: str, cap: float | None,
                           statistic: str | None = None) -> dict[str, Any] | None:
    """``--background-part``: a quantile in (0, 1), or 'none' (remove); exits 2 when wrong."""
    if quantile.strip().lower() == "none":
        if cap is not None or statistic is not None:
            raise typer.BadParameter("'none' takes no cap or statistic",
                                     param_hint="--background-cap/--background-statistic")
        return None
    from node.model.scoring import BACKGROUND_STATISTICS

    if statistic is not None and statistic not in BACKGROUND_STATISTICS:
        raise typer.BadParameter(f"{statistic!r}: expected one of "
                                 f"{', '.join(BACKGROUND_STATISTICS)}",
                                 param_hint="--background-statistic")
    out: dict[str, Any] = {"shift_quantile": _parse_quantile(quantile, "--background-part")}
    if cap is not None:
        out["max_series_shift"] = cap
    if statistic is not None:
        out["statistic"] = statistic
    return out


def register(app: typer.Typer) -> None:
    """Add the model commands to the ``vaenode`` app."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("calibrate")(calibrate)
