"""Training: slices of normal volumes -> a VAE -> a calibrated bundle.

Steps (METHOD.md, Training): slice every volume in three planes, drop background slices,
split by subject into train and validation, minimize reconstruction loss + KL (the negative
ELBO; both models updated together), then calibrate the threshold on held-out subjects and
write the bundle.

The validation subjects are split again, by subject, into a calibration half (threshold,
confidence, reference series median) and an evaluation half (what ``vaenode evaluate``
measures by default), so that the reported false-positive rate is measured on slices the
threshold never saw.

Normal-variation augmentation (:mod:`node.model.augment`): every training slice is shown as
another scanner might have made it: orientation, position and size in the field of view,
resolution and slice thickness, sharpness, contrast, bias field, a low noise level, zeroed air.
The artifacts the node must notice (motion, ghosting, spikes, heavy noise) are never drawn.

Compression stage (``compress=True``, off by default; :mod:`node.model.compress`): a plain
autoencoder is trained first on the same (augmented) training slices, using the first
``compress_stages`` entries of ``channels``; the VAE then uses the remaining entries on the
autoencoder's standardized feature map. Both go into the bundle. The PNG complexity correction
is a pixel-space code length and is switched off for a compressed bundle.

Training data are :class:`~node.model.data.Volume` objects (NIfTI: sliced in three planes)
and :class:`~node.model.data.SeriesStack` objects (DICOM stacks assembled by the worker layer:
their own slices, in their acquisition plane). Both carry a ``subject`` for the split.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.model import calibrate
from node.model.augment import AugmentConfig, scanner_variation
from node.model.bundle import Bundle, resolve_device, save_bundle, station_scoring
from node.model.compress import FeatureAE, FeatureAEConfig, train_feature_ae
from node.model.data import (
    PLANES,
    SeriesStack,
    TrainingItem,
    Volume,
    foreground_mask,
    item_slice_spacing,
    item_stacks,
    plane_slices,
    split_subjects,
)
from node.model.positions import robust_level
from node.model.preprocess import PreprocessConfig, preprocess_stack, stack_scale
from node.model.scoring import (
    BackgroundPart,
    Profiles,
    ScoreConfig,
    absolute_score,
    background_final,
    fit_position_profiles,
    map_quantiles,
    match_scales,
    position_normalized,
    series_shift,
)
from node.model.vae import VAE, VAEConfig

log = logging.getLogger(__name__)

#: A new network's name and version, unless ``vaenode train --name/--version`` say otherwise.
DEFAULT_NAME = "brain-t1"
DEFAULT_VERSION = "0.1.0"


@dataclass
class TrainConfig:
    """Options of ``vaenode train`` (stored in model.json under ``training``)."""

    epochs: int = 8
    latent_dim: int = 128
    image_size: int = 128
    spacing_mm: float = 2.0
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    heteroscedastic: bool = True
    sigma_min: float = 0.01
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 64
    lr: float = 1e-3
    kl_warmup_fraction: float = 0.1
    augment: bool = True
    variation: AugmentConfig = field(default_factory=AugmentConfig)
    center_head: bool = True
    init_bundle: str | None = None
    planes: tuple[str, ...] = PLANES
    max_train_slices: int | None = None  # tiny runs (tests): cap on training slices
    target_fpr: float = 0.01
    estimator: str = "importance"
    samples: int = 8
    complexity: bool = True
    tail_weight: float = 0.0
    series_relative: bool = True
    max_series_shift: float = 0.0
    compress: bool = False
    compress_dim: int = 8
    compress_stages: int = 2
    # None: "brain-t1" at a version marked as trained here for a new network (never the shipped
    # brain-t1 0.1.0's identity); adapting (``init_bundle``), the starting bundle's name and its
    # version marked as adapted, so that the new network never takes the identity of a shipped
    # or starting one (station references are learned per name and version, and reports name
    # the model that judged).
    name: str | None = None
    version: str | None = None
    device: str = "auto"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for model.json."""
        out = asdict(self)
        out["channels"] = list(self.channels)
        out["planes"] = list(self.planes)
        out["variation"] = self.variation.to_dict()
        return out


@dataclass
class SliceSet:
    """Preprocessed slices in memory (float16) with their subject, plane and stack (a number
    per stack, whose slices are consecutive and in order: for the thicker-slice variation)."""

    x: torch.Tensor
    subjects: list[str]
    planes: list[str]
    stacks: torch.Tensor | None = None

    def subset(self, pick: torch.Tensor) -> SliceSet:
        """The slices at the sorted indices ``pick``."""
        return SliceSet(self.x[pick], [self.subjects[i] for i in pick],
                        [self.planes[i] for i in pick],
                        None if self.stacks is None else self.stacks[pick])

    def neighbours(self, idx: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
        """For the slices ``idx``, their ``count`` nearest neighbours in their own stack,
        nearest first on alternating sides (next, previous, next but one...), each the slice
        itself where the stack ends."""
        if self.stacks is None or count <= 0:
            return ()
        out = []
        for k in range(count):
            step = (k // 2 + 1) * (1 if k % 2 == 0 else -1)
            j = (idx + step).clamp(0, len(self.x) - 1)
            same = self.stacks[j] == self.stacks[idx]
            out.append(self.x[torch.where(same, j, idx)].float())
        return tuple(out)


def volume_stacks(
    volume: TrainingItem, planes: Sequence[str]
) -> list[tuple[str, list[np.ndarray], list[tuple[float, float] | None]]]:
    """The item's stacks per plane: (plane, slices, (row, col) spacing per slice)."""
    return [(plane, list(stack), spacings) for plane, stack, spacings in
            item_stacks(volume, planes)]


def build_slices(
    volumes: Sequence[TrainingItem], planes: Sequence[str], pcfg: PreprocessConfig
) -> SliceSet:
    """Foreground slices of all volumes/stacks on the model grid, scaled per stack as in
    scoring."""
    xs: list[torch.Tensor] = []
    subjects: list[str] = []
    plane_of: list[str] = []
    stack_of: list[int] = []
    for vol in volumes:
        for plane, stack, spacings in item_stacks(vol, planes):
            keep = foreground_mask(stack)
            if not keep.any():
                continue
            scale = stack_scale(list(stack), pcfg.norm_percentile)
            kept = [spacings[i] for i in np.flatnonzero(keep)]
            x = preprocess_stack(list(stack[keep]), kept, pcfg, scale)
            xs.append(x.half())
            subjects += [vol.subject] * len(x)
            plane_of += [plane] * len(x)
            stack_of += [len(xs)] * len(x)
    if not xs:
        raise ValueError("no foreground slices in the training data")
    return SliceSet(torch.cat(xs), subjects, plane_of, torch.tensor(stack_of))


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_vae(
    train_set: SliceSet,
    val_set: SliceSet | None,
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    report: Callable[[str], None] | None = None,
    feature_ae: FeatureAE | None = None,
    init: VAE | None = None,
    clip_max: float = PreprocessConfig.clip_max,
) -> tuple[VAE, dict[str, Any]]:
    """Minimize the negative ELBO on ``train_set``; returns the model and a training history.

    ``init``: a trained VAE of the same architecture to start from (adapting a bundle to a
    scanner's own series) instead of random weights; it is copied, not changed.
    ``clip_max``: the preprocessing's upper clip, which the scanner variation keeps.

    With ``feature_ae`` (the compression stage) every batch is augmented in pixel space, then
    encoded by the frozen autoencoder, and the VAE models the feature map.

    The loss is the per-slice negative ELBO (-log p(x|z) for one z ~ q(z|x), plus KL) averaged
    over the batch and divided by the pixel count (same minimum, a gradient scale that does not
    depend on the grid size). The KL weight ramps from 0 to 1 over the first
    ``kl_warmup_fraction`` of the steps (a standard way to keep the encoder from collapsing to
    the prior early); from then on it is the plain sum of METHOD.md.
    """
    say = report or log.info
    gen = _seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = resolve_device(cfg.device)
    vcfg = vae_config(cfg)
    model = VAE(vcfg)
    if init is not None:
        if init.cfg != vcfg:
            raise ValueError(f"the starting weights' architecture {init.cfg} is not {vcfg}")
        model.load_state_dict(init.state_dict())
    model = model.to(dev)
    encode = _feature_fn(feature_ae, dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(train_set.x)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.kl_warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    pixels = vcfg.in_channels * vcfg.image_size**2  # modelled values per slice
    history: dict[str, Any] = {"epochs": []}
    step = 0
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "rec": 0.0, "kl": 0.0}
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            xb = train_set.x[idx].float()
            if cfg.augment:
                xb = scanner_variation(xb, cfg.variation, gen, clip_max,
                                       train_set.neighbours(idx, cfg.variation.slab_neighbours))
            xb = encode(xb.to(dev))
            out = model(xb)
            beta = min(1.0, (step + 1) / warm)
            loss = (out["rec"] + beta * out["kl"]).mean() / pixels
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            step += 1
            rec, kl = out["rec"].detach(), out["kl"].detach()
            sums["loss"] += float((rec + kl).mean())
            sums["rec"] += float(rec.mean())
            sums["kl"] += float(kl.mean())
            if step % 50 == 0:
                say(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{total} "
                    f"-elbo/slice {float((rec + kl).mean()):.0f} "
                    f"kl {float(kl.mean()):.0f} "
                    f"{step * cfg.batch_size / (time.time() - t0):.0f} slices/s")
        entry = {k: v / steps_per_epoch for k, v in sums.items()}
        entry["epoch"] = epoch + 1
        if val_set is not None and len(val_set.x):
            entry["val_neg_elbo"] = validation_loss(model, val_set, dev, encode=encode)
        entry["elapsed_s"] = round(time.time() - t0, 1)
        history["epochs"].append(entry)
        say(f"epoch {epoch + 1} done: train -elbo {entry['loss']:.0f}"
            + (f", val -elbo {entry['val_neg_elbo']:.0f}" if "val_neg_elbo" in entry else "")
            + f" ({entry['elapsed_s']:.0f} s)")
        if checkpoint is not None:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch + 1, "config": cfg.to_dict()}, checkpoint)
    history["train_seconds"] = round(time.time() - t0, 1)
    history["train_slices"] = n
    return model.cpu().eval(), history


def vae_config(cfg: TrainConfig) -> VAEConfig:
    """The VAE's architecture: on pixels, or on the compression stage's feature map."""
    if not cfg.compress:
        return VAEConfig(cfg.image_size, cfg.latent_dim, tuple(cfg.channels),
                         cfg.heteroscedastic, cfg.sigma_min)
    ae = feature_ae_config(cfg)
    rest = tuple(cfg.channels[cfg.compress_stages :])
    if not rest:
        raise ValueError(f"--compress needs more than {cfg.compress_stages} channel stages "
                         f"(channels {list(cfg.channels)}): the VAE keeps the rest")
    return VAEConfig(ae.side, cfg.latent_dim, rest, cfg.heteroscedastic, cfg.sigma_min,
                     in_channels=ae.feature_dim)


def feature_ae_config(cfg: TrainConfig) -> FeatureAEConfig:
    """The compression stage's architecture: the first ``compress_stages`` channel stages."""
    if cfg.compress_stages < 1 or cfg.compress_dim < 1:
        raise ValueError("compress_stages and compress_dim must be at least 1")
    return FeatureAEConfig(cfg.image_size, tuple(cfg.channels[: cfg.compress_stages]),
                           cfg.compress_dim)


def _feature_fn(
    feature_ae: FeatureAE | None, dev: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Batch -> what the VAE models: the batch itself, or the frozen autoencoder's features."""
    if feature_ae is None:
        return lambda x: x
    ae = feature_ae.to(dev).eval()

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ae.features(x)

    return encode


@torch.no_grad()
def validation_loss(
    model: VAE,
    val_set: SliceSet,
    dev: torch.device,
    limit: int = 2048,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Mean one-sample negative ELBO per slice on (up to ``limit``) validation slices."""
    model.eval()
    torch.manual_seed(1234)
    step = max(1, len(val_set.x) // limit)
    x = val_set.x[::step][:limit]
    total = 0.0
    for start in range(0, len(x), 128):
        xb = x[start : start + 128].float().to(dev)
        out = model(encode(xb) if encode is not None else xb)
        total += float(out["loss"].sum())
    model.train()
    return total / len(x)


def stack_components(
    bundle: Bundle, volumes: Sequence[TrainingItem], planes: Sequence[str]
) -> list[dict[str, Any]]:
    """The estimator components of every stack (volume x plane), from which any way of forming
    the score can be computed without running the model again."""
    out = []
    for vol in volumes:
        descending = isinstance(vol, SeriesStack) and vol.descending
        for plane, images, spacing in volume_stacks(vol, planes):
            gap = item_slice_spacing(vol, plane)
            x, fg = bundle.preprocess_stack(images, spacing)
            out.append({"subject": vol.subject, "plane": plane, "descending": descending,
                         "slice_spacing_mm": gap, "foreground": fg,
                         "components": bundle.components(x)})
    return out


MIN_POSITION_SUBJECTS = 3  # leave-one-subject-out needs others to fit the profiles from
#: Fewest subjects of a site calibration (``recalibrate(site=True)``): with 3 IXI subjects the
#: leave-one-subject-out profiles came from 2 subjects each, the threshold fell from -29,015
#: (6 subjects) to -52,518 and a simulated motion block went from 57% flagged to 7%.
SITE_MIN_SUBJECTS = 6
#: A stack is position referenced when its foreground slices span at least this fraction of
#: the calibration stacks' median span in its plane (scoring item 5).
MIN_COVERAGE = 0.8


def calibrate_bundle(bundle: Bundle, volumes: Sequence[TrainingItem], planes: Sequence[str],
                     target_fpr: float, *, tissue_quantile: float | None = None,
                     threshold: float | None = None,
                     background_rate: float | None = None) -> dict[str, Any]:
    """Set the reference series quantiles, the alternatives' maps, the position profiles, the
    threshold and the normal quantiles in place (see :mod:`node.model.scoring`).

    ``tissue_quantile``: fit the tissue credit (scoring item 7) on these slices, crediting
    tissue beyond that quantile of their counts (None: the bundle's credit, if any, as it
    is). ``threshold``: keep this threshold instead of the ``target_fpr`` quantile.
    ``background_rate`` (with ``threshold``): the background part's map puts that quantile of
    its calibration values on the kept threshold and its median on the main score's median,
    so that the part alone flags that share of the calibration slices (None: its 1st
    percentile and median onto the main score's, as an alternative's).

    Returns the calibration entry of model.json.
    """
    stacks = stack_components(bundle, volumes, planes)
    pixels, clip_max = bundle.modelled_values, bundle.preprocess.clip_max

    def with_reference(part: ScoreConfig) -> tuple[ScoreConfig, list[float], list[np.ndarray]]:
        """``part`` with its reference quantile set, the per-series quantiles, and its
        shifted scores of every calibration stack."""
        absolute = [absolute_score(s["components"], part, pixels, clip_max) for s in stacks]
        meds = [float(np.quantile(a[s["foreground"]], part.shift_quantile))
                for a, s in zip(absolute, stacks, strict=True)
                if s["foreground"].sum() >= part.min_series_slices]
        part = replace(part, reference_median=float(np.median(meds)) if meds else 0.0)
        finals = [a - series_shift(a, s["foreground"], part)
                  for a, s in zip(absolute, stacks, strict=True)]
        return part, meds, finals

    def foreground(per_stack: list[np.ndarray]) -> np.ndarray:
        parts = [v[s["foreground"]] for v, s in zip(per_stack, stacks, strict=True)]
        return np.concatenate(parts) if parts else np.zeros(0)

    main_cfg = replace(bundle.scoring, alternatives=(), background=None, position_profiles={},
                       position_min_extent_mm={}, fallback_gain=1.0, fallback_offset=0.0)
    if tissue_quantile is not None:
        plain = replace(main_cfg, tissue_slope=0.0, tissue_reference=0.0, tissue_ceiling=0.0)
        slope, reference, ceiling = calibrate.fit_tissue_credit(
            foreground([absolute_score(s["components"], plain, pixels, clip_max)
                        for s in stacks]),
            foreground([np.asarray(s["components"]["tissue_pixels"]) for s in stacks]),
            tissue_quantile)
        main_cfg = replace(main_cfg, tissue_slope=slope, tissue_reference=reference,
                           tissue_ceiling=ceiling)
    main_cfg, medians, finals = with_reference(main_cfg)
    main_scores = foreground(finals)
    if main_scores.size == 0:
        raise ValueError("no foreground calibration slices")
    if main_cfg.position_bins > 0:  # the coverage check of item 5
        main_cfg = replace(main_cfg, position_min_extent_mm=_coverage(stacks))
    alternatives = []
    for alt in bundle.scoring.alternatives:
        part, _, alt_finals = with_reference(main_cfg.part(alt))
        gain, offset = match_scales(main_scores, foreground(alt_finals))
        alternatives.append(replace(alt, reference_median=part.reference_median, gain=gain,
                                    offset=offset))
        finals = [np.minimum(f, offset + gain * a) for f, a in zip(finals, alt_finals,
                                                                    strict=True)]
    background = bundle.scoring.background
    if background_rate is not None and (background is None or threshold is None):
        raise ValueError("a background rate needs a background part and a kept threshold")
    if background is not None:  # item 6 of node.model.scoring: like an alternative
        values = [np.asarray(s["components"][background.component], dtype=np.float64)
                  for s in stacks]
        quantiles = [float(np.quantile(v[s["foreground"]], background.shift_quantile))
                     for v, s in zip(values, stacks, strict=True)
                     if s["foreground"].sum() >= main_cfg.min_series_slices]
        background = replace(background, reference_median=float(np.median(quantiles))
                             if quantiles else 0.0)
        with_bg = replace(main_cfg, background=background)
        bg_finals = [background_final(s["components"], s["foreground"], with_bg)
                     for s in stacks]
        low, mid = np.quantile(foreground(bg_finals), [0.01, 0.5])
        if not mid > low:
            raise ValueError("the background part does not vary on the calibration slices "
                             "(no pixels outside the decoder's head mask?)")
        if background_rate is None:
            gain, offset = match_scales(main_scores, foreground(bg_finals))
        else:
            assert threshold is not None  # checked above
            median = float(np.median(main_scores))
            if not median > threshold:
                raise ValueError(f"the main score's median ({median:.1f}) is not above the "
                                 f"kept threshold ({threshold:.1f})")
            gain, offset = map_quantiles(foreground(bg_finals), background_rate, threshold,
                                         median)
        background = replace(background, gain=gain, offset=offset)
        finals = [np.minimum(f, offset + gain * b) for f, b in zip(finals, bg_finals,
                                                                   strict=True)]
    scoring = replace(main_cfg, alternatives=tuple(alternatives), background=background)
    if scoring.position_bins > 0:
        scoring, finals = _position_reference(scoring, stacks, finals, target_fpr)
    scores = foreground(finals)
    kept = threshold is not None
    if threshold is None:
        threshold = calibrate.threshold_at_fpr(scores, target_fpr)
    bundle.scoring = scoring
    bundle.meta["scoring"] = scoring.to_dict()
    bundle.threshold = threshold
    bundle.target_fpr = target_fpr
    bundle.quantiles = calibrate.reference_quantiles(scores)
    entry = {
        "threshold": threshold,
        "target_fpr": target_fpr,
        "quantiles": bundle.quantiles,
        "slices": int(scores.size),
        "series": len(stacks),
        "subjects": sorted({v.subject for v in volumes}),
        "series_median_spread": [float(np.min(medians)), float(np.max(medians))] if medians else [],
        "method": ("kept from the bundle calibrated before (--keep-threshold); quantiles of "
                   "normal calibration slices" if kept else
                   "target_fpr quantile of normal calibration slices (series-shifted scores"
                   + (", position referenced leaving each subject out)"
                      if scoring.position_bins > 0 else ")")),
    }
    if kept:
        entry["flagged"] = float(np.mean(scores < threshold))
    if background_rate is not None:
        entry["background_rate"] = background_rate
    if tissue_quantile is not None:
        entry["tissue_credit"] = {"quantile": tissue_quantile,
                                  "slope": scoring.tissue_slope,
                                  "reference": scoring.tissue_reference,
                                  "ceiling": scoring.tissue_ceiling}
    bundle.meta["calibration"] = entry
    return entry


def _coverage(stacks: list[dict[str, Any]]) -> dict[str, float]:
    """Per plane, the least span of a stack's foreground slices (mm) for the position
    reference: ``MIN_COVERAGE`` times the calibration stacks' median span."""
    spans: dict[str, list[float]] = {}
    for s in stacks:
        if s["slice_spacing_mm"] is not None:
            spans.setdefault(s["plane"], []).append(
                float(s["foreground"].sum()) * s["slice_spacing_mm"])
    return {plane: MIN_COVERAGE * float(np.median(v)) for plane, v in spans.items()}


def _canonical(stacks: list[dict[str, Any]], values: list[np.ndarray],
               subject: str | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(plane, values, foreground) of each stack in its plane's anatomical direction (a
    stack that runs the other way flipped), for :func:`fit_position_profiles`; ``subject``:
    leave that subject's stacks out."""
    return [(s["plane"], v[::-1] if s["descending"] else v,
             s["foreground"][::-1] if s["descending"] else s["foreground"])
            for s, v in zip(stacks, values, strict=True) if s["subject"] != subject]


def _subject_profiles(
    cfg: ScoreConfig, stacks: list[dict[str, Any]], values: list[np.ndarray],
) -> tuple[dict[str, Profiles], Profiles]:
    """Position profiles of ``values`` (item 5's bins): per calibration subject, those fitted
    on the OTHER subjects' stacks (what a subject's own values are referenced with when the
    threshold is set, so that the profiles' noise counts), and those of all stacks (stored).

    Raises:
        ValueError: fewer than ``MIN_POSITION_SUBJECTS`` subjects.
    """
    subjects = sorted({s["subject"] for s in stacks})
    if len(subjects) < MIN_POSITION_SUBJECTS:
        raise ValueError(f"the position reference needs at least {MIN_POSITION_SUBJECTS} "
                         f"calibration subjects, got {len(subjects)}")
    bins, least = cfg.position_bins, cfg.min_series_slices
    without = {subject: fit_position_profiles(_canonical(stacks, values, subject), bins, least)
               for subject in subjects}
    return without, fit_position_profiles(_canonical(stacks, values), bins, least)


def _position_reference(
    scoring: ScoreConfig, stacks: list[dict[str, Any]], finals: list[np.ndarray],
    target_fpr: float,
) -> tuple[ScoreConfig, list[np.ndarray]]:
    """The position profiles fitted on all calibration stacks, and each stack's scores
    referenced with the profiles of the OTHER subjects (what the threshold is set on; item 5
    of :mod:`node.model.scoring`), and the map of unreferenced scores onto their scale.
    ``scoring`` carries the coverage check already (``_coverage``, set by the caller)."""
    without, profiles = _subject_profiles(scoring, stacks, finals)
    level, spread = robust_level(np.concatenate([f[s["foreground"]]
                                                 for f, s in zip(finals, stacks, strict=True)]))
    scoring = replace(scoring, position_median=level, position_spread=spread)
    held_out = [position_normalized(f, s["foreground"],
                                    replace(scoring, position_profiles=without[s["subject"]]),
                                    s["plane"], s["descending"], s["slice_spacing_mm"])
                for s, f in zip(stacks, finals, strict=True)]
    gain, offset = match_scales(
        np.concatenate([h[s["foreground"]] for h, s in zip(held_out, stacks, strict=True)]),
        np.concatenate([f[s["foreground"]] for f, s in zip(finals, stacks, strict=True)]),
        low=target_fpr)
    return replace(scoring, position_profiles=profiles, fallback_gain=gain,
                   fallback_offset=offset), held_out


def run_training(
    volumes: Sequence[TrainingItem],
    cfg: TrainConfig,
    out_dir: Path,
    command: str = "",
    data_sources: Sequence[str] = (),
    attribution: dict[str, Any] | None = None,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Everything ``vaenode train`` does: split, slice, train, calibrate, write the bundle.

    ``volumes`` mixes NIfTI volumes and DICOM stacks; several items may share a subject (the
    stacks of one patient): the split keeps them on one side.

    With ``cfg.init_bundle`` (adapting a bundle to one scanner's own normal series), training
    starts from that bundle's weights with its architecture, preprocessing and way of forming
    the score, and every held-out subject calibrates (a scanner's series are too few to keep
    an evaluation half aside).
    """
    say = report or log.info
    if not volumes:
        raise ValueError("no training volumes or series")
    base: Bundle | None = None
    if cfg.init_bundle:
        from node.model.bundle import load_bundle

        base = load_bundle(Path(cfg.init_bundle))
        if base.feature_ae is not None or cfg.compress:
            raise ValueError("adapting a bundle with a compression stage is not supported")
        arch = base.model.cfg
        cfg = replace(cfg, latent_dim=arch.latent_dim, image_size=arch.image_size,
                      channels=tuple(arch.channels), heteroscedastic=arch.heteroscedastic,
                      sigma_min=arch.sigma_min, spacing_mm=base.preprocess.spacing_mm,
                      center_head=base.preprocess.center_head)
    subjects = [v.subject for v in volumes]
    train_ids, val_ids = split_subjects(subjects, cfg.val_fraction, cfg.seed)
    # Validation subjects: calibration half and evaluation half (by subject).
    rng = random.Random(cfg.seed + 1)
    shuffled = val_ids[:]
    rng.shuffle(shuffled)
    n_cal = max(1, (len(shuffled) + 1) // 2) if shuffled else 0
    if base is not None:
        n_cal = len(shuffled)
    cal_ids = sorted(shuffled[:n_cal])
    eval_ids = sorted(shuffled[n_cal:])
    by_id: dict[str, list[TrainingItem]] = {}
    for v in volumes:
        by_id.setdefault(v.subject, []).append(v)
    train_vols = [v for s in train_ids for v in by_id[s]]
    cal_vols = [v for s in cal_ids for v in by_id[s]] or train_vols[:1]
    n_dicom = sum(isinstance(v, SeriesStack) for v in volumes)
    if n_dicom:
        say(f"{len(volumes) - n_dicom} NIfTI volume(s), {n_dicom} DICOM stack(s)")
    pcfg = base.preprocess if base is not None else PreprocessConfig(
        image_size=cfg.image_size, spacing_mm=cfg.spacing_mm, center_head=cfg.center_head)
    say(f"{len(train_ids)} training subjects, {len(cal_ids)} calibration, "
        f"{len(eval_ids)} evaluation")
    train_set = build_slices(train_vols, cfg.planes, pcfg)
    if cfg.max_train_slices is not None and len(train_set.x) > cfg.max_train_slices:
        pick = torch.randperm(len(train_set.x), generator=torch.Generator().manual_seed(cfg.seed))
        pick = pick[: cfg.max_train_slices].sort().values
        train_set = train_set.subset(pick)
    val_set = build_slices(cal_vols, cfg.planes, pcfg) if val_ids else None
    n_val = 0 if val_set is None else len(val_set.x)
    say(f"{len(train_set.x)} training slices, {n_val} validation")
    out_dir.mkdir(parents=True, exist_ok=True)
    feature_ae: FeatureAE | None = None
    compression: dict[str, Any] | None = None
    if cfg.compress:
        acfg = feature_ae_config(cfg)
        vae_config(cfg)  # fail before training the first stage when the VAE cannot follow
        say(f"compression stage: autoencoder to {acfg.feature_dim} x {acfg.side} x "
            f"{acfg.side} features")
        gen = _seed_everything(cfg.seed)
        feature_ae, ae_history = train_feature_ae(
            train_set.x, acfg, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            generator=gen, device=resolve_device(cfg.device),
            augment=((lambda xb: scanner_variation(xb, cfg.variation, gen, pcfg.clip_max))
                     if cfg.augment else None), report=say,
        )
        compression = {"history": ae_history}
    model, history = train_vae(train_set, val_set, cfg, checkpoint=out_dir / "checkpoint.pt",
                               report=report, feature_ae=feature_ae,
                               init=base.model if base is not None else None,
                               clip_max=pcfg.clip_max)
    scoring = base.scoring if base is not None else ScoreConfig(
        estimator=cfg.estimator, samples=cfg.samples,
        complexity=cfg.complexity and not cfg.compress,
        tail_weight=cfg.tail_weight, series_relative=cfg.series_relative,
        max_series_shift=cfg.max_series_shift,
    )
    name, version = bundle_identity(cfg, base)
    meta: dict[str, Any] = {
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "description": "VAE of normal brain T1-weighted MR slices (any plane); scores each slice "
        "by its log marginal likelihood (see scoring).",
        "preprocessing": pcfg.to_dict(),
        "scoring": scoring.to_dict(),
        "calibration": {"threshold": 0.0, "target_fpr": cfg.target_fpr,
                        "quantiles": [0.0] * len(calibrate.QUANTILE_LEVELS)},
        "training": {
            "command": command,
            "config": cfg.to_dict(),
            "data": list(data_sources),
            "subjects": {"train": train_ids, "calibration": cal_ids, "evaluation": eval_ids},
            "history": history,
            "torch": torch.__version__,
        },
        "data_attribution": attribution or {},
    }
    if base is not None:  # a derivative of the starting bundle: its data's terms carry over
        meta["training"]["init"] = {"bundle": str(base.path), "name": base.name,
                                    "version": base.version}
        meta["data_attribution"] = {**base.meta.get("data_attribution", {}),
                                    **meta["data_attribution"]}
        if "station_scoring" in base.meta:  # the score stations learn comes with the score
            meta["station_scoring"] = dict(base.meta["station_scoring"])
    if compression is not None:
        meta["compression"] = compression
    bundle = Bundle(out_dir, meta, model, feature_ae=feature_ae)
    say("calibrating the threshold on held-out normal subjects")
    calibrate_bundle(bundle, cal_vols, cfg.planes, cfg.target_fpr)
    last = history["epochs"][-1] if history["epochs"] else {}
    bundle.meta["validation"] = {"val_neg_elbo": last.get("val_neg_elbo"),
                                 "train_neg_elbo": last.get("loss")}
    save_bundle(out_dir, bundle.model, bundle.meta, feature_ae=feature_ae)
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)  # training state, not part of a bundle
    say(f"bundle written to {out_dir} (threshold {bundle.threshold:.1f})")
    return out_dir


def bundle_identity(cfg: TrainConfig, base: Bundle | None) -> tuple[str, str]:
    """The new bundle's name and version: ``cfg``'s where given; otherwise, for a new network,
    "brain-t1" at 0.1.0 followed by ``+trained.`` and the UTC time, and for an adapted one the
    starting bundle's name with its version followed by ``+adapted.`` and the UTC time: a
    version of its own, never a shipped bundle's (``brain-t1`` 0.1.0 ships)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    if base is None:
        return cfg.name or DEFAULT_NAME, cfg.version or f"{DEFAULT_VERSION}+trained.{stamp}"
    return cfg.name or base.name, cfg.version or f"{base.version}+adapted.{stamp}"


#: The background part's cap is this many times the largest shift normal site variants need.
SITE_CAP_FACTOR = 1.25


def site_variant_stacks(
    bundle: Bundle, volumes: Sequence[Volume], rng: np.random.Generator,
) -> Iterator[tuple[str, str, torch.Tensor, np.ndarray]]:
    """Each volume's axial stack, then those of its normal site variants
    (:func:`node.model.artifacts.site_variants`), preprocessed for ``bundle``: (subject,
    variant name or ``original``, slices, foreground mask). What the series-shift caps are
    fitted on (here and in ``bench/select_score.py``); ``rng`` draws the variants' noise."""
    from node.model.artifacts import site_variants

    for vol in volumes:
        for name, data in {"original": vol.data, **site_variants(vol.data, rng)}.items():
            images, spacing = plane_slices(Volume(vol.subject, data, vol.spacing, ""), "axial")
            x, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
            yield vol.subject, name, x, fg


def fit_site_cap(
    bundle: Bundle, volumes: Sequence[TrainingItem], quantile: float, seed: int = 0,
    **settings: Any,
) -> dict[str, Any]:
    """The series-shift cap of the background part, fitted as ``bench/select_score.py`` fits
    the other parts' caps: each NIfTI calibration volume's axial stack and its normal site
    variants (:func:`node.model.artifacts.site_variants`: contrast curves, smoothing, added
    noise) give the ``quantile`` quantile of their foreground values of the part's component
    (``background`` or ``background_residual``, computed with ``settings``: ``component`` and
    the mask's, keyword arguments of :meth:`Bundle.background_values`); the cap is
    ``SITE_CAP_FACTOR`` times the largest distance of any of them from the median over the
    unaltered stacks.

    Returns:
        ``cap`` and, per variant name, the largest distance it needed (``needs``).

    Raises:
        ValueError: no NIfTI volume with enough foreground slices to fit it on.
    """
    rng = np.random.default_rng(seed)
    found: dict[str, list[float]] = {}
    nifti = [v for v in volumes if isinstance(v, Volume)]  # a DICOM stack has no 3D volume
    for _subject, name, x, fg in site_variant_stacks(bundle, nifti, rng):
        if int(fg.sum()) < bundle.scoring.min_series_slices:
            continue
        values = bundle.background_values(x, **settings)
        found.setdefault(name, []).append(float(np.quantile(values[fg], quantile)))
    if not found.get("original"):
        raise ValueError(f"the background part's cap needs NIfTI calibration volumes with at "
                         f"least {bundle.scoring.min_series_slices} foreground axial slices")
    ref = float(np.median(found["original"]))
    needs = {name: max(abs(v - ref) for v in vals) for name, vals in found.items()}
    return {"cap": SITE_CAP_FACTOR * max(needs.values()), "needs": needs}


def recalibrate(
    bundle: Bundle,
    volumes: Sequence[TrainingItem],
    out_dir: Path,
    changes: dict[str, Any],
    target_fpr: float | None = None,
    command: str = "",
    site: bool = False,
    version: str | None = None,
    keep_threshold: bool = False,
    background_rate: float | None = None,
) -> Path:
    """Write a copy of ``bundle`` with other score settings, calibrated again.

    The weights are unchanged; ``changes`` are :class:`ScoreConfig` fields (tail weight,
    series shift cap, complexity correction...). The calibration subjects are the bundle's
    own (``training.subjects.calibration``), found among ``volumes``; with ``site``, every
    subject of ``volumes`` (a site's own normal series: everything calibration sets, the
    series references, the maps, the position profiles and the threshold, is then fitted on
    them; the caps are kept unless a change adds a part without one), and the recalibrated
    bundle is checked on them with a simulated motion block
    (:func:`node.model.site_check.motion_check`, recorded as ``site_check``).
    ``changes["background"]`` adds the background part (a dict of :class:`BackgroundPart`
    fields, or None to remove it); without ``max_series_shift`` its cap is fitted by
    :func:`fit_site_cap`. ``changes["tissue_credit"]`` fits the tissue credit at that
    quantile of the calibration slices' tissue counts (None removes it). ``keep_threshold``:
    the copy keeps the bundle's threshold (its quantiles are recomputed); with it,
    ``background_rate`` sets the share of the calibration slices the background part alone
    flags (:func:`calibrate_bundle`). ``version``: the
    copy's version (its reports name it, so a PACS can tell findings of the recalibrated
    bundle from the original's); the source's is recorded.
    """
    if version is not None and not version.strip():
        raise ValueError("the bundle version must not be empty")
    ids = set(bundle.meta.get("training", {}).get("subjects", {}).get("calibration", []))
    cal = list(volumes) if site else [v for v in volumes if v.subject in ids]
    if not cal:
        raise ValueError("none of the bundle's calibration subjects is in the given data")
    subjects = len({v.subject for v in cal})
    if site and subjects < SITE_MIN_SUBJECTS:
        raise ValueError(f"a site calibration needs normal series of at least "
                         f"{SITE_MIN_SUBJECTS} subjects (patients), got {subjects}")
    record: dict[str, Any] = {"site": True} if site else {}
    change = changes.get("background")
    if change is not None:
        if bundle.feature_ae is not None:
            raise ValueError("the background part needs a pixel-space model (this bundle has a "
                             "compression stage)")
        part = BackgroundPart(**{**change, "max_series_shift": 0.0})
        if change.get("max_series_shift") is None:  # fit the cap on site variants
            fitted = fit_site_cap(bundle, cal, part.shift_quantile,
                                  component=part.component,
                                  background_level=part.head_level,
                                  background_dilation=part.dilation)
            changes = {**changes, "background": {**change, "max_series_shift": fitted["cap"]}}
            record["background_cap"] = {"fitted": fitted["cap"], "factor": SITE_CAP_FACTOR,
                                        "site_variant_needs": fitted["needs"]}
    changes = dict(changes)
    if "tissue_credit" in changes and changes["tissue_credit"] is None:  # remove it
        changes.update(tissue_slope=0.0, tissue_reference=0.0, tissue_ceiling=0.0)
    tissue_quantile = changes.pop("tissue_credit", None)
    if "station_scoring" in changes:  # not calibrated here: each station's reference does it
        station = changes.pop("station_scoring")
        record["station_scoring"] = station
        if station is None:
            bundle.meta.pop("station_scoring", None)
        else:
            bundle.meta["station_scoring"] = dict(station)
    scoring = ScoreConfig.from_dict({**bundle.scoring.to_dict(), **changes})
    bundle.scoring = scoring
    bundle.meta["scoring"] = scoring.to_dict()
    planes = bundle.meta.get("training", {}).get("config", {}).get("planes", list(PLANES))
    calibrate_bundle(bundle, cal, planes, target_fpr or bundle.target_fpr,
                     tissue_quantile=tissue_quantile,
                     threshold=bundle.threshold if keep_threshold else None,
                     background_rate=background_rate)
    # As loading the written bundle builds it: on the calibrated score settings.
    bundle.station_scoring = station_scoring(bundle.meta)
    if site:  # does the site-calibrated bundle still see motion in the site's own series?
        from node.model.site_check import motion_check

        record["site_check"] = motion_check(bundle, cal)
    if version is not None:
        record["from_version"] = bundle.version
        bundle.version = bundle.meta["version"] = version.strip()
    if tissue_quantile is not None:
        record["tissue_credit"] = tissue_quantile
    if keep_threshold:
        record["kept_threshold"] = bundle.threshold
    if background_rate is not None:
        record["background_rate"] = background_rate
    bundle.meta.setdefault("training", {}).setdefault("recalibrations", []).append(
        {"command": command, "changes": changes, **record,
         "date": datetime.now(UTC).isoformat(timespec="seconds")}
    )
    save_bundle(out_dir, bundle.model, bundle.meta, feature_ae=bundle.feature_ae)
    return out_dir
