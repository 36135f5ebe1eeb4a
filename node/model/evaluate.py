"""``vaenode evaluate``: how well a bundle separates clean slices from corrupted ones.

Protocol (all on subjects the model never trained on, by default the bundle's "evaluation"
subjects, which the threshold never saw either):
- normal: every foreground slice of each subject's clean volume, in all three planes;
- abnormal: for each artifact and severity, the volume is corrupted in 3D with TorchIO
  (:mod:`node.model.artifacts`), and a contiguous block of ``block_fraction`` of its axial
  foreground slices is spliced into the clean volume (a patient who moved during part of a
  multi-slice acquisition); the axial stack is scored as one series, and the block's slices are
  the abnormal ones;
- position-matched AUROC compares the block's slices with the clean slices at the same
  positions of the same subjects (the ends of a series look different from its middle, and the
  block sits mid-series); the plain AUROC compares them with all clean axial slices.
Scores compared: the bundle's score (``final``), its parts (``absolute``: the main score before
its series shift and without alternatives; ``corrected``: the full-weight complexity correction
alone, as Serra et al. define it), the raw ``importance`` and ``plain`` estimates, ``mcmc`` (on
a subset: it is slow), ``kl``, ``elbo``, the residual ``tail``, and two baselines:
reconstruction error and the training-free quality metrics (``qc``).

Every per-slice component is saved (``scores.npz``), so that another way of forming the score
can be measured without scoring again (:func:`rescore`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.model.artifacts import ARTIFACTS, SEVERITIES, corrupt_volume, splice_block
from node.model.baselines import qc_metrics, qc_reference, qc_score
from node.model.bundle import Bundle
from node.model.data import PLANES, Volume, plane_slices, slice_spacing
from node.model.scoring import ScoreConfig, absolute_score, stack_scores

log = logging.getLogger(__name__)

# Scores where a higher value means "more normal"; the others are negated for ROC analysis.
HIGHER_IS_NORMAL = {"final", "absolute", "corrected", "importance", "plain", "mcmc", "elbo"}
SCORES = ("final", "absolute", "corrected", "importance", "plain", "mcmc", "kl", "elbo", "tail",
          "recon_error", "qc")


@dataclass
class EvalConfig:
    """Options of an evaluation run."""

    artifacts: Sequence[str] = ARTIFACTS
    severities: Sequence[str] = SEVERITIES
    block_fraction: float = 0.3
    seed: int = 0
    mcmc_subjects: int = 2
    mcmc_slices: int = 12
    planes: Sequence[str] = PLANES
    samples: int | None = None
    time_scoring: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- metrics


def auroc(normal: np.ndarray, abnormal: np.ndarray) -> float:
    """Area under the ROC curve for "abnormal scores lower than normal" (Mann-Whitney U)."""
    normal, abnormal = np.asarray(normal, float), np.asarray(abnormal, float)
    if normal.size == 0 or abnormal.size == 0:
        return float("nan")
    both = np.concatenate([abnormal, normal])
    ranks = _rankdata(-both)  # low score = abnormal = high rank
    r_abn = ranks[: abnormal.size].sum()
    u = r_abn - abnormal.size * (abnormal.size + 1) / 2
    return float(u / (abnormal.size * normal.size))


def _rankdata(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v))
    sorted_v = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def average_precision(normal: np.ndarray, abnormal: np.ndarray) -> float:
    """Average precision of ranking abnormal slices first (lowest score first)."""
    scores = np.concatenate([abnormal, normal])
    labels = np.concatenate([np.ones(len(abnormal)), np.zeros(len(normal))])
    if len(abnormal) == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    hits = labels[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def tpr_at_fpr(normal: np.ndarray, abnormal: np.ndarray, fpr: float = 0.01) -> float:
    """Fraction of abnormal slices below the ``fpr`` quantile of the normal scores."""
    if len(normal) == 0 or len(abnormal) == 0:
        return float("nan")
    thr = np.quantile(normal, fpr)
    return float((np.asarray(abnormal) < thr).mean())


def roc_curve(normal: np.ndarray, abnormal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) for every threshold."""
    thr = np.unique(np.concatenate([normal, abnormal, [np.inf]]))
    fpr = np.array([(normal < t).mean() for t in thr])
    tpr = np.array([(abnormal < t).mean() for t in thr])
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


# ----------------------------------------------------------------------------- scoring


def _stack_record(
    bundle: Bundle, images: list[np.ndarray], spacing: tuple[float, float], samples: int | None,
    slice_spacing_mm: float,
) -> dict[str, Any]:
    x, fg = bundle.preprocess_stack(images, [spacing] * len(images))
    comp = bundle.components(x, samples=samples)
    comp.update({f"qc_{k}": v for k, v in qc_metrics(x).items()})
    return {"x": x, "foreground": fg, "components": comp, "slice_spacing_mm": slice_spacing_mm}


def collect(
    bundle: Bundle,
    volumes: Sequence[Volume],
    reference: Sequence[Volume],
    cfg: EvalConfig,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score clean and corrupted stacks; returns per-slice records (see module docstring)."""
    say = report or log.info
    ref_metrics: dict[str, list[np.ndarray]] = {}
    for vol in reference:
        images, spacing = plane_slices(vol, "axial")
        x, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
        for k, v in qc_metrics(x[fg]).items():
            ref_metrics.setdefault(k, []).append(v)
    qc_ref = qc_reference({k: np.concatenate(v) for k, v in ref_metrics.items()})
    clean: list[dict[str, Any]] = []
    corrupted: list[dict[str, Any]] = []
    timing = {"slices": 0, "seconds": 0.0}
    rng = np.random.default_rng(cfg.seed)
    for si, vol in enumerate(volumes):
        say(f"subject {vol.subject} ({si + 1}/{len(volumes)})")
        for plane in cfg.planes:
            images, spacing = plane_slices(vol, plane)
            gap = slice_spacing(vol, plane)
            if cfg.time_scoring:
                t0 = time.perf_counter()
                bundle.score_slices(list(images), [spacing] * len(images), samples=cfg.samples,
                                    slice_spacing_mm=gap)
                timing["seconds"] += time.perf_counter() - t0
                timing["slices"] += len(images)
            rec = _stack_record(bundle, list(images), spacing, cfg.samples, gap)
            rec.update(subject=vol.subject, plane=plane)
            clean.append(rec)
        axial = next(r for r in clean if r["subject"] == vol.subject and r["plane"] == "axial")
        fg_idx = np.flatnonzero(axial["foreground"])
        length = max(1, round(cfg.block_fraction * len(fg_idx)))
        for artifact in cfg.artifacts:
            for severity in cfg.severities:
                start = int(fg_idx[0] + rng.integers(0, max(1, len(fg_idx) - length + 1)))
                seed = int(rng.integers(0, 2**31 - 1))
                bad = corrupt_volume(vol.data, vol.spacing, artifact, severity, seed)
                spliced = splice_block(vol.data, bad, start, start + length, axis=2)
                images, spacing = plane_slices(
                    Volume(vol.subject, spliced, vol.spacing, vol.source), "axial"
                )
                rec = _stack_record(bundle, list(images), spacing, cfg.samples,
                                    slice_spacing(vol, "axial"))
                block = np.zeros(len(images), dtype=bool)
                block[start : start + length] = True
                rec.update(subject=vol.subject, artifact=artifact, severity=severity,
                           block=block)
                if severity == "moderate" and si < cfg.mcmc_subjects and cfg.mcmc_slices:
                    pick = np.flatnonzero(block)[: cfg.mcmc_slices]
                    rec["mcmc_index"] = pick
                    rec["mcmc"] = bundle.components(rec["x"][pick], estimator="mcmc",
                                                    samples=cfg.samples)["log_likelihood"]
                    axial.setdefault("mcmc_pairs", {})[(artifact, severity)] = (
                        pick,
                        bundle.components(axial["x"][pick], estimator="mcmc",
                                          samples=cfg.samples)["log_likelihood"],
                    )
                rec.pop("x")
                corrupted.append(rec)
        for r in clean:
            r.pop("x", None)
    return {"clean": clean, "corrupted": corrupted, "qc_reference": qc_ref, "timing": timing}


def _score_arrays(
    rec: dict[str, Any], bundle: Bundle, cfg: ScoreConfig, qc_ref: dict[str, tuple[float, float]]
) -> dict[str, np.ndarray]:
    comp = rec["components"]
    pixels = bundle.modelled_values
    # Corrupted records are axial stacks; every stack runs in its plane's anatomical direction.
    final, absolute, _ = stack_scores(comp, rec["foreground"], cfg, pixels,
                                      bundle.preprocess.clip_max, rec.get("plane", "axial"),
                                      slice_spacing_mm=rec.get("slice_spacing_mm"))
    corrected_cfg = ScoreConfig.from_dict({**cfg.to_dict(), "tail_weight": 0.0,
                                           "series_relative": False, "complexity": True,
                                           "complexity_weight": 1.0, "alternatives": ()})
    corrected = absolute_score(comp, corrected_cfg, pixels, bundle.preprocess.clip_max)
    qc = qc_score({k[3:]: v for k, v in comp.items() if k.startswith("qc_")}, qc_ref)
    return {
        "final": final, "absolute": absolute, "corrected": corrected,
        "importance": comp["log_likelihood"], "plain": comp["plain"], "kl": -comp["kl"],
        "elbo": comp["elbo"], "tail": -comp["tail"], "recon_error": -comp["rec_error"],
        "qc": -qc,
    }


def rescore(data: dict[str, Any], bundle: Bundle, cfg: ScoreConfig,
            threshold: float | None = None) -> dict[str, Any]:
    """Metrics of one score configuration from collected records (no model calls)."""
    qc_ref = data["qc_reference"]
    clean_axial: dict[str, dict[str, np.ndarray]] = {}
    clean_all: dict[str, list[np.ndarray]] = {}
    fpr_slices = []
    for rec in data["clean"]:
        arrs = _score_arrays(rec, bundle, cfg, qc_ref)
        fg = rec["foreground"]
        if rec["plane"] == "axial":
            clean_axial[rec["subject"]] = {**arrs, "foreground": fg}
        for k, v in arrs.items():
            clean_all.setdefault(k, []).append(v[fg])
        fpr_slices.append(arrs["final"][fg])
    all_final = np.concatenate(fpr_slices)
    thr = bundle.threshold if threshold is None else threshold
    out: dict[str, Any] = {
        "fpr_at_threshold": float((all_final < thr).mean()),
        "clean_slices": int(all_final.size),
        "threshold": thr,
        "target_fpr": bundle.target_fpr,
        "conditions": {},
    }
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in data["corrupted"]:
        groups.setdefault((rec["artifact"], rec["severity"]), []).append(rec)
    for (artifact, severity), recs in groups.items():
        abn: dict[str, list[np.ndarray]] = {}
        matched: dict[str, list[np.ndarray]] = {}
        plain_norm: dict[str, list[np.ndarray]] = {}
        flagged_block, flagged_other, n_block, n_other = 0, 0, 0, 0
        mcmc_abn, mcmc_norm = [], []
        for rec in recs:
            arrs = _score_arrays(rec, bundle, cfg, qc_ref)
            block, fg = rec["block"], rec["foreground"]
            ref = clean_axial[rec["subject"]]
            for k, v in arrs.items():
                abn.setdefault(k, []).append(v[block])
                matched.setdefault(k, []).append(ref[k][block])
                plain_norm.setdefault(k, []).append(ref[k][ref["foreground"]])
            flags = (arrs["final"] < thr) & fg
            flagged_block += int(flags[block].sum())
            n_block += int(block.sum())
            flagged_other += int(flags[fg & ~block].sum())
            n_other += int((fg & ~block).sum())
            if "mcmc" in rec:
                mcmc_abn.append(rec["mcmc"])
                clean_rec = next(r for r in data["clean"]
                                 if r["subject"] == rec["subject"] and r["plane"] == "axial")
                mcmc_norm.append(clean_rec["mcmc_pairs"][(artifact, severity)][1])
        cond: dict[str, Any] = {"block_slices": n_block,
                                "flagged_block": flagged_block / max(1, n_block),
                                "flagged_other": flagged_other / max(1, n_other), "scores": {}}
        for k in abn:
            a = np.concatenate(abn[k])
            m = np.concatenate(matched[k])
            p = np.concatenate(plain_norm[k])
            cond["scores"][k] = {
                "auroc_matched": auroc(m, a), "auroc_plain": auroc(p, a),
                "ap_matched": average_precision(m, a), "tpr_at_1pct_fpr_matched": tpr_at_fpr(m, a),
            }
        if mcmc_abn:
            a, m = np.concatenate(mcmc_abn), np.concatenate(mcmc_norm)
            cond["scores"]["mcmc"] = {"auroc_matched": auroc(m, a), "auroc_plain": float("nan"),
                                      "ap_matched": average_precision(m, a),
                                      "tpr_at_1pct_fpr_matched": tpr_at_fpr(m, a),
                                      "slices": int(a.size)}
        out["conditions"][f"{artifact}/{severity}"] = cond
    return out


# ----------------------------------------------------------------------------- report


def write_report(metrics: dict[str, Any], out_dir: Path, title: str) -> None:
    """``report.md`` (tables) and ``metrics.json`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    lines = [f"# {title}", ""]
    lines.append(f"- clean slices (evaluation subjects, 3 planes): {metrics['clean_slices']}; "
                 f"false-positive rate at the stored threshold {metrics['threshold']:.1f}: "
                 f"{100 * metrics['fpr_at_threshold']:.2f}% "
                 f"(target {100 * metrics['target_fpr']:.2f}%)")
    if "speed_slices_per_s" in metrics:
        lines.append(f"- scoring speed (default settings, this machine): "
                     f"{metrics['speed_slices_per_s']:.1f} slices/s")
    lines.append("")
    lines.append("Position-matched slice-level AUROC (plain AUROC in brackets):")
    lines.append("")
    names = [s for s in SCORES if any(s in c["scores"] for c in metrics["conditions"].values())]
    lines.append("| artifact | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for cname, cond in metrics["conditions"].items():
        cells = []
        for s in names:
            v = cond["scores"].get(s)
            if v is None:
                cells.append("")
            elif np.isnan(v["auroc_plain"]):
                cells.append(f"{v['auroc_matched']:.3f}")
            else:
                cells.append(f"{v['auroc_matched']:.3f} ({v['auroc_plain']:.3f})")
        lines.append(f"| {cname} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("The bundle's score at its stored threshold: average precision, TPR at 1% FPR "
                 "(position-matched), and the fractions of flagged slices inside and outside "
                 "the corrupted block of each series:")
    lines.append("")
    lines.append("| artifact | AP | TPR@1%FPR | flagged in block | flagged elsewhere |")
    lines.append("|---|---|---|---|---|")
    for cname, cond in metrics["conditions"].items():
        f = cond["scores"]["final"]
        lines.append(f"| {cname} | {f['ap_matched']:.3f} | {f['tpr_at_1pct_fpr_matched']:.3f} | "
                     f"{100 * cond['flagged_block']:.1f}% | {100 * cond['flagged_other']:.1f}% |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def plot_rocs(data: dict[str, Any], bundle: Bundle, cfg: ScoreConfig, out_dir: Path) -> None:
    """One ROC plot per artifact (position-matched; final, importance and qc scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qc_ref = data["qc_reference"]
    clean_axial = {r["subject"]: _score_arrays(r, bundle, cfg, qc_ref)
                   for r in data["clean"] if r["plane"] == "axial"}
    artifacts = sorted({r["artifact"] for r in data["corrupted"]})
    for artifact in artifacts:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for severity, style in (("moderate", "-"), ("mild", "--")):
            recs = [r for r in data["corrupted"]
                    if r["artifact"] == artifact and r["severity"] == severity]
            if not recs:
                continue
            for score, color in (("final", "C0"), ("importance", "C1"), ("qc", "C2")):
                a = np.concatenate([_score_arrays(r, bundle, cfg, qc_ref)[score][r["block"]]
                                    for r in recs])
                m = np.concatenate([clean_axial[r["subject"]][score][r["block"]] for r in recs])
                fpr, tpr = roc_curve(m, a)
                ax.plot(fpr, tpr, style, color=color,
                        label=f"{score} {severity} ({auroc(m, a):.2f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=artifact)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / f"roc_{artifact}.png", dpi=100)
        plt.close(fig)


def save_records(data: dict[str, Any], path: Path) -> None:
    """Per-slice components of every stack, for later :func:`rescore` runs."""
    import pickle

    with path.open("wb") as fh:
        pickle.dump(data, fh)


def run_evaluation(
    bundle: Bundle,
    volumes: Sequence[Volume],
    reference: Sequence[Volume],
    out_dir: Path,
    cfg: EvalConfig,
    report: Callable[[str], None] | None = None,
    records: Path | None = None,
) -> dict[str, Any]:
    """Collect, measure, and write ``report.md``, ``metrics.json``, ROC plots, records.

    With ``records`` (the ``records.pkl`` of an earlier run with the same weights), nothing is
    scored again: the per-slice components are reused and only the bundle's way of forming the
    score and its threshold are applied (the measured speed is the earlier run's).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if records is not None:
        import pickle

        with records.open("rb") as fh:
            data = pickle.load(fh)
        volumes = [v for v in volumes if v.subject in {r["subject"] for r in data["clean"]}]
    else:
        data = collect(bundle, volumes, reference, cfg, report)
        save_records(data, out_dir / "records.pkl")
    metrics = rescore(data, bundle, bundle.scoring)
    metrics["speed_slices_per_s"] = data["timing"]["slices"] / max(1e-9, data["timing"]["seconds"])
    metrics["subjects"] = [v.subject for v in volumes]
    metrics["bundle"] = {"name": bundle.name, "version": bundle.version, "path": str(bundle.path)}
    metrics["protocol"] = {"block_fraction": cfg.block_fraction, "seed": cfg.seed,
                           "samples": cfg.samples or bundle.scoring.samples,
                           "estimator": bundle.scoring.estimator}
    write_report(metrics, out_dir, f"Evaluation of {bundle.name} {bundle.version}")
    plot_rocs(data, bundle, bundle.scoring, out_dir)
    return metrics
