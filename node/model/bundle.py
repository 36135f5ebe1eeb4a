"""Model bundles: a folder with ``model.json`` and the weights, and the scoring API on it.

A bundle carries everything scoring needs, so that a bundle trained elsewhere scores the same
way here: architecture, preprocessing, how the score is formed, the calibrated threshold and
the normal score distribution behind the confidence, plus the training data and its
attribution. Loading checks the format version, the architecture against the weights and the
weights' checksum, and says what is wrong when something is.

Scoring API (used by the worker and ``vaenode score``)::

    bundle = load_bundle()                      # the default model in node/models/
    scores = bundle.score_slices(images, spacings)
    scores.log_likelihood, scores.abnormal, scores.confidence, ...

``images`` is ONE stack (a series, or one orientation of it) in slice order, because the score
is relative to its own series (see :mod:`node.model.scoring`).

A bundle trained with the compression stage (:mod:`node.model.compress`) also holds the feature
autoencoder (``feature_ae.pt``, declared under ``compression`` in ``model.json``): slices are
encoded by it and the VAE's estimators score the feature map.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from node.config import DEFAULT_BUNDLE
from node.errors import ModelError
from node.model import calibrate
from node.model.compress import FeatureAE, FeatureAEConfig
from node.model.likelihood import (
    BACKGROUND_DILATION,
    BACKGROUND_LEVEL,
    ESTIMATORS,
    BackgroundStatistics,
    background_statistics,
    estimate,
)
from node.model.preprocess import PreprocessConfig, preprocess_stack, stack_scale
from node.model.removed import drop_removed
from node.model.scoring import (
    ScoreConfig,
    png_nats,
    stack_foreground,
    stack_scores,
    tissue_pixels,
)
from node.model.vae import VAE, VAEConfig

log = logging.getLogger(__name__)

FORMAT = "vaenode-bundle"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "weights.pt"
FEATURE_WEIGHTS = "feature_ae.pt"
#: Per-slice estimator outputs of :meth:`Bundle.components` (besides ``png_nats``).
COMPONENTS = ("log_likelihood", "kl", "elbo", "tail", "rec_error", "plain", "background",
              "background_residual")


def default_bundle_path() -> Path:
    """The default model shipped with the node (:data:`node.config.DEFAULT_BUNDLE`)."""
    return DEFAULT_BUNDLE


def resolve_device(device: str) -> torch.device:
    """``auto`` picks the GPU when present; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}: {exc}") from exc


@dataclass
class SliceScores:
    """Scores of one stack, one entry per slice in the order given.

    Attributes:
        log_likelihood: the thresholded score: log marginal likelihood (nats), complexity
            corrected, tail weighted, series shifted and position referenced as the bundle
            says (see :mod:`node.model.scoring`).
        kl: KL divergence of the attribute distributions to N(0, I) (match likelihood).
        elbo: evidence lower bound (nats).
        abnormal: verdict per slice (``log_likelihood < threshold`` on foreground slices).
        confidence: confidence of the verdict in [0, 1] (see :mod:`node.model.calibrate`).
        raw_log_likelihood: the estimator's log p(x) before any correction.
        foreground: False for leading/trailing background slices (never abnormal).
        threshold: the threshold used.
        estimator: the estimator used.
        samples: Monte-Carlo samples per slice.
        series_shift: nats subtracted from every slice of this stack.
        station_score: the bundle's station score per slice (``station_scoring`` in
            ``model.json``), the score a station's reference learns from and judges once
            calibrated; None when the bundle declares none (the station then learns
            ``log_likelihood``).
    """

    log_likelihood: np.ndarray
    kl: np.ndarray
    elbo: np.ndarray
    abnormal: np.ndarray
    confidence: np.ndarray
    raw_log_likelihood: np.ndarray
    foreground: np.ndarray
    threshold: float
    estimator: str
    samples: int
    series_shift: float = 0.0
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    station_score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.log_likelihood)


class Bundle:
    """A loaded model: the VAE in eval mode, the optional feature autoencoder (compression
    stage) and the settings of ``model.json``."""

    def __init__(
        self, path: Path, meta: dict[str, Any], model: VAE, feature_ae: FeatureAE | None = None
    ) -> None:
        self.path = path
        self.meta = meta
        self.model = model.eval()
        self.feature_ae = feature_ae.eval() if feature_ae is not None else None
        self.preprocess = PreprocessConfig.from_dict(meta["preprocessing"])
        self.scoring = ScoreConfig.from_dict(meta["scoring"])
        self.station_scoring = station_scoring(meta)
        cal = meta["calibration"]
        self.threshold: float = float(cal["threshold"])
        self.target_fpr: float = float(cal["target_fpr"])
        self.quantiles: list[float] = [float(v) for v in cal["quantiles"]]
        self.name: str = str(meta["name"])
        self.version: str = str(meta["version"])

    def __repr__(self) -> str:
        return f"Bundle({self.name} {self.version} at {self.path})"

    def preprocess_stack(
        self,
        images: Sequence[np.ndarray],
        pixel_spacing: Sequence[tuple[float, float] | None] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Model-grid tensor of a stack and its foreground mask (leading/trailing background)."""
        arrays = [np.nan_to_num(np.asarray(im, dtype=np.float32)) for im in images]
        scale = stack_scale(arrays, self.preprocess.norm_percentile) if arrays else 1.0
        x = preprocess_stack(arrays, pixel_spacing, self.preprocess, scale=scale)
        return x, stack_foreground(arrays, scale)

    @torch.no_grad()
    def components(
        self,
        x: torch.Tensor,
        *,
        estimator: str | None = None,
        samples: int | None = None,
        batch_size: int = 32,
        device: str = "auto",
        seed: int = 0,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Estimator outputs for preprocessed slices: log_likelihood, kl, elbo, tail, rec_error,
        plain, background, background_residual, png_nats and tissue_pixels, the background
        ones with the bundle's background part's mask settings, else the defaults. Scores are
        reproducible: the Monte-Carlo draws come from ``seed``."""
        estimator = estimator or self.scoring.estimator
        samples = samples or self.scoring.samples
        if estimator not in ESTIMATORS:
            raise ModelError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
        dev = resolve_device(device)
        model = self.model.to(dev)
        ae = self.feature_ae.to(dev) if self.feature_ae is not None else None
        gen = torch.Generator(device=dev).manual_seed(seed)
        where = self._mask_settings()
        parts: dict[str, list[np.ndarray]] = {}
        starts = range(0, len(x), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="scoring", unit="batch")
        for start in starts:
            xb = x[start : start + batch_size].to(dev)
            if ae is not None:  # compression stage: the VAE models the features
                xb = ae.features(xb)
            est = estimate(model, xb, estimator, samples, generator=gen, **where)
            for key in COMPONENTS:
                parts.setdefault(key, []).append(getattr(est, key).double().cpu().numpy())
        out = {k: np.concatenate(v) for k, v in parts.items()}
        if not parts:
            out = {k: np.zeros(0) for k in COMPONENTS}
        out["png_nats"] = png_nats(x, self.preprocess.clip_max) if len(x) else np.zeros(0)
        out["tissue_pixels"] = tissue_pixels(x) if len(x) else np.zeros(0)
        return out

    def _mask_settings(self) -> dict[str, Any]:
        """The head-mask settings of the background component (the bundle's background
        part's, else the defaults of :func:`node.model.likelihood.estimate`)."""
        bg = self.scoring.background
        if bg is None:
            return {}
        return {"background_level": bg.head_level, "background_dilation": bg.dilation}

    @torch.no_grad()
    def background_values(
        self, x: torch.Tensor, *, component: str = "background", batch_size: int = 64,
        device: str = "auto", **settings: Any,
    ) -> np.ndarray:
        """One background component alone, ``background`` or ``background_residual`` (a
        :class:`~node.model.scoring.BackgroundPart`'s ``component``), from one encode and one
        decode per slice at z = the posterior mean (no Monte-Carlo samples), for fitting the
        background part's series-shift cap on many series; the same values as
        :meth:`components` gives with the same mask settings (``settings``: keyword arguments
        of :func:`node.model.likelihood.estimate` such as ``background_dilation``; default:
        the bundle's).

        Raises:
            ModelError: another component, or a bundle with a compression stage.
        """
        if component not in BackgroundStatistics._fields:
            raise ModelError(f"unknown background component {component!r}; expected one of "
                             f"{BackgroundStatistics._fields}")
        if self.feature_ae is not None:
            raise ModelError("the background part needs a pixel-space model (this bundle has a "
                             "compression stage)")
        where = {**self._mask_settings(), **settings}
        level = where.get("background_level", BACKGROUND_LEVEL)
        dev = resolve_device(device)
        model = self.model.to(dev)
        out: list[np.ndarray] = [np.zeros(0)]
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(dev)
            mu, _ = model.encode(xb)
            mean, log_sigma = model.decode(mu)
            stats = background_statistics(
                xb, mean, log_sigma, level, where.get("background_dilation", BACKGROUND_DILATION))
            out.append(getattr(stats, component).double().cpu().numpy())
        return np.concatenate(out)

    @property
    def modelled_values(self) -> int:
        """Values the VAE models per slice: pixels, or feature-map entries when compressed."""
        cfg = self.model.cfg
        return cfg.in_channels * cfg.image_size**2

    def score_slices(
        self,
        images: Sequence[np.ndarray],
        pixel_spacing: Sequence[tuple[float, float] | None] | None = None,
        *,
        estimator: str | None = None,
        samples: int | None = None,
        threshold: float | None = None,
        batch_size: int = 32,
        device: str = "auto",
        progress: bool = False,
        plane: str | None = None,
        descending: bool = False,
        slice_spacing_mm: float | None = None,
    ) -> SliceScores:
        """Score one stack of 2D slices (any size and plane) and classify each slice.

        Args:
            images: 2D arrays in modality units (rescale applied), one series, in slice order.
            pixel_spacing: (row, col) mm per slice, or None where unknown (the longer side is
                then assumed to span ``default_fov_mm``).
            estimator: ``importance``, ``plain`` or ``mcmc``; default: the bundle's.
            samples: Monte-Carlo samples per slice; default: the bundle's.
            threshold: overrides the calibrated threshold (e.g. from the configuration).
            batch_size: slices per model call.
            device: ``auto``, ``cpu``, ``cuda``...
            progress: show a progress bar.
            plane: ``axial``, ``coronal`` or ``sagittal`` when known, for the position
                reference (:mod:`node.model.scoring`, item 5); None: unknown, global score.
            descending: the slices run against the plane's anatomical direction (left to
                right, posterior to anterior, inferior to superior).
            slice_spacing_mm: distance between slices along the normal, for the position
                reference's coverage check (None: unknown, no position reference when the
                bundle checks coverage).

        Returns:
            A :class:`SliceScores` with one entry per input slice.

        Raises:
            ModelError: an unknown estimator or device.
        """
        est = estimator or self.scoring.estimator
        n_samples = samples or self.scoring.samples
        thr = self.threshold if threshold is None else float(threshold)
        x, fg = self.preprocess_stack(images, pixel_spacing)
        comp = self.components(
            x, estimator=est, samples=n_samples, batch_size=batch_size, device=device,
            progress=progress,
        )
        score, absolute, shift = stack_scores(comp, fg, self.scoring, self.modelled_values,
                                              self.preprocess.clip_max, plane, descending,
                                              slice_spacing_mm)
        station = None
        if self.station_scoring is not None:
            station, _, _ = stack_scores(comp, fg, self.station_scoring, self.modelled_values,
                                         self.preprocess.clip_max, plane, descending,
                                         slice_spacing_mm)
        abnormal = (score < thr) & fg
        conf = calibrate.confidence(score, thr, self.quantiles)
        conf = np.where(fg | abnormal, conf, np.maximum(conf, 0.0))
        return SliceScores(
            log_likelihood=score,
            kl=comp["kl"],
            elbo=comp["elbo"],
            abnormal=abnormal,
            confidence=conf,
            raw_log_likelihood=comp["log_likelihood"],
            foreground=fg,
            threshold=thr,
            estimator=est,
            samples=n_samples,
            series_shift=shift,
            extra={"absolute": absolute, **comp},
            station_score=station,
        )


def station_scoring(meta: dict[str, Any]) -> ScoreConfig | None:
    """The score a station's reference learns, or None: ``station_scoring`` in ``model.json``
    holds the settings in which it differs from ``scoring`` (same components, another
    weighting).

    Why a second weighting: out of the box a score must not flag another scanner's normal
    series, so it leaves out what differs between scanners (the complexity correction, a heavy
    tail); a station's reference is that scanner's own normal, so what it learns may keep the
    parts that see motion and ghosting (node/models/README.md). It is that weighting alone:
    the bundle's alternatives and background part are mapped onto the bundle's own score's
    scale by calibration, which places them nowhere in particular on another weighting's.
    """
    over = meta.get("station_scoring")
    if over is None:
        return None
    if not isinstance(over, dict):
        raise TypeError(f"station_scoring must be an object, got {type(over).__name__}")
    return ScoreConfig.from_dict({**meta["scoring"], "alternatives": (), "background": None,
                                  **over})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(
    out_dir: Path, model: VAE, meta: dict[str, Any], feature_ae: FeatureAE | None = None
) -> Path:
    """Write weights (float16, to keep the shipped bundle small) and ``model.json``.

    ``meta`` must hold name, version, preprocessing, scoring and calibration; format,
    architecture and the weights' checksum are filled in here. With ``feature_ae`` (the
    compression stage) its weights go to ``feature_ae.pt`` (float32: they are small) and
    ``compression`` in ``model.json`` describes them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    weights = out_dir / WEIGHTS
    torch.save(state, weights)
    meta = dict(meta)
    if feature_ae is not None:
        fweights = out_dir / FEATURE_WEIGHTS
        torch.save({k: v.detach().cpu().float() for k, v in feature_ae.state_dict().items()},
                   fweights)
        meta["compression"] = {
            **{k: v for k, v in dict(meta.get("compression") or {}).items()
               if k not in ("type", "file", "sha256")},
            "type": "conv-ae", **feature_ae.cfg.to_dict(),
            "file": FEATURE_WEIGHTS, "sha256": _sha256(fweights),
        }
    else:
        meta.pop("compression", None)
        (out_dir / FEATURE_WEIGHTS).unlink(missing_ok=True)
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "architecture": {"type": "conv-vae", **model.cfg.to_dict()},
        "weights": {"file": WEIGHTS, "dtype": "float16", "sha256": _sha256(weights)},
    }
    (out_dir / MODEL_JSON).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return out_dir


_REQUIRED = ("name", "version", "architecture", "preprocessing", "scoring", "calibration")


def load_bundle(path: Path | None = None) -> Bundle:
    """Load a bundle folder (default: :func:`default_bundle_path`).

    A setting of a removed part (:mod:`node.model.removed`) is dropped where it turned the
    part off; ``meta`` then lacks it.

    Raises:
        ModelError: the folder, ``model.json`` or the weights are missing or unreadable, the
            format is not one this code reads, a required entry is missing, a removed part is
            used, the checksum does not match, or the weights do not fit the architecture. The
            message names the cause.
    """
    path = Path(path) if path is not None else default_bundle_path()
    if not path.is_dir():
        raise ModelError(f"model bundle not found: {path} is not a folder")
    meta_path = path / MODEL_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"model bundle {path}: {MODEL_JSON} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model bundle {path}: {MODEL_JSON} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"model bundle {path}: {MODEL_JSON} is not a {FORMAT} description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"model bundle {path}: format version {meta.get('format_version')!r}, this node "
            f"reads version {FORMAT_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ModelError(f"model bundle {path}: {MODEL_JSON} lacks {', '.join(missing)}")
    for section in ("preprocessing", "scoring"):
        if isinstance(meta[section], dict):
            try:
                meta[section] = drop_removed(section, meta[section])
            except ModelError as exc:
                raise ModelError(f"model bundle {path}: {MODEL_JSON} {exc}") from None
    try:
        arch = dict(meta["architecture"])
        if arch.pop("type", None) != "conv-vae":
            raise ModelError(f"model bundle {path}: unknown architecture type")
        cfg = VAEConfig.from_dict(arch)
        PreprocessConfig.from_dict(meta["preprocessing"])
        ScoreConfig.from_dict(meta["scoring"])
        station_scoring(meta)
        float(meta["calibration"]["threshold"])
        float(meta["calibration"]["target_fpr"])
        if len(meta["calibration"]["quantiles"]) != len(calibrate.QUANTILE_LEVELS):
            raise ModelError(f"model bundle {path}: calibration quantiles have the wrong length")
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelError(f"model bundle {path}: {MODEL_JSON} has a bad entry: {exc}") from exc
    feature_ae = _load_feature_ae(path, meta, cfg)
    if feature_ae is None and cfg.image_size != meta["preprocessing"].get("image_size"):
        raise ModelError(f"model bundle {path}: architecture and preprocessing image sizes differ")
    wmeta = meta.get("weights", {})
    weights = path / str(wmeta.get("file", WEIGHTS))
    if not weights.is_file():
        raise ModelError(f"model bundle {path}: weights file {weights.name} is missing")
    if "sha256" in wmeta and _sha256(weights) != wmeta["sha256"]:
        raise ModelError(f"model bundle {path}: {weights.name} does not match its sha256 checksum")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise ModelError(f"model bundle {path}: cannot read {weights.name}: {exc}") from exc
    model = VAE(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, AttributeError) as exc:
        raise ModelError(
            f"model bundle {path}: weights do not match the architecture in {MODEL_JSON}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return Bundle(path, meta, model, feature_ae=feature_ae)


def _load_feature_ae(path: Path, meta: dict[str, Any], vae: VAEConfig) -> FeatureAE | None:
    """The compression stage's autoencoder when ``model.json`` declares one, checked against
    the VAE it feeds and the preprocessing grid; None for a pixel-space bundle."""
    comp = meta.get("compression")
    if comp is None:
        if vae.in_channels != 1:
            raise ModelError(
                f"model bundle {path}: the VAE models {vae.in_channels}-channel features but "
                f"{MODEL_JSON} declares no compression stage (feature autoencoder)"
            )
        return None
    try:
        if comp.get("type") != "conv-ae":
            raise ModelError(f"model bundle {path}: unknown compression type {comp.get('type')!r}")
        acfg = FeatureAEConfig.from_dict(comp)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise ModelError(f"model bundle {path}: {MODEL_JSON} has a bad compression entry: {exc}") \
            from exc
    if acfg.image_size != meta["preprocessing"].get("image_size"):
        raise ModelError(f"model bundle {path}: feature autoencoder and preprocessing image "
                         "sizes differ")
    if (acfg.feature_dim, acfg.side) != (vae.in_channels, vae.image_size):
        raise ModelError(
            f"model bundle {path}: the feature autoencoder gives {acfg.feature_dim} x "
            f"{acfg.side} x {acfg.side} features but the VAE models {vae.in_channels} x "
            f"{vae.image_size} x {vae.image_size}"
        )
    fweights = path / str(comp.get("file", FEATURE_WEIGHTS))
    if not fweights.is_file():
        raise ModelError(
            f"model bundle {path}: {MODEL_JSON} declares a compression stage but the feature "
            f"autoencoder weights file {fweights.name} is missing"
        )
    if "sha256" in comp and _sha256(fweights) != comp["sha256"]:
        raise ModelError(f"model bundle {path}: {fweights.name} does not match its sha256 checksum")
    ae = FeatureAE(acfg)
    try:
        state = torch.load(fweights, map_location="cpu", weights_only=True)
        ae.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:  # torch raises several types for a corrupt or mismatched file
        raise ModelError(
            f"model bundle {path}: feature autoencoder weights {fweights.name} do not match the "
            f"compression entry of {MODEL_JSON}: {str(exc).splitlines()[0]}"
        ) from exc
    return ae
