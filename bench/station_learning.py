"""What a station's learning does for a simulated site (run by hand, prints a table).

A site is simulated by one change applied to whole IXI volumes of subjects the bundle never
trained on (its evaluation and calibration subjects): noise added (a fraction of the 99.5th
percentile) or a contrast curve (gamma). Each subject's axial stack is scored once as the
worker scores it, clean and with the end-to-end test's block of moderate TorchIO motion
(slices 55-70, seed 0); a few subjects also as a whole series with moderate motion (a bad
series a station may send while it learns). Then, over random splits, 20 of the subjects are
a station's learning series (one of them replaced by a whole-motion series) and the others
are held out:

- slice FPR: flagged foreground slices of the held-out clean series (target: the bundle's
  target rate, 1%); series flagged: held-out clean series with at least 3 flagged slices
  (the shipped routing rule's ``min_abnormal_slices``);
- motion block: flagged slices of the motion block, for the held-out subjects that have one.

Rows: the bundle out of the box; the node's reference (``node.worker.learning``: the worst
20% by median and by 10th percentile left out); the same without leaving anything out; and
a candidate that leaves out only outliers (below the median by more than 3 robust standard
deviations, by median or by 10th percentile).

    .venv/bin/python bench/station_learning.py [--model node/models/brain-t1] \\
        [--site "noise 0.02"] [--site "gamma 0.75"] [--splits 300] [--cache /tmp/sl]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.artifacts import corrupt_volume, splice_block  # noqa: E402
from node.model.bundle import Bundle, default_bundle_path, load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402
from node.worker.learning import (  # noqa: E402
    LearningSeries,
    build_reference,
    map_scores,
    series_summary,
)

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"
LEARNING = 20
BLOCK = (55, 70)
#: Subjects also scored as a whole series with motion (bad learning series).
WHOLE_MOTION = 3
MIN_ABNORMAL_SLICES = 3

Scores = tuple[np.ndarray, np.ndarray]  # (score per slice, foreground per slice)


def site(kind: str, vol: Volume, seed: int) -> Volume:
    """``vol`` as the simulated site acquires it (``noise F`` or ``gamma G``)."""
    name, value = kind.split()
    d = vol.data.astype(np.float32)
    hi = float(np.percentile(d, 99.5)) or 1.0
    if name == "noise":
        d = np.clip(d + np.random.default_rng(seed).normal(0.0, float(value) * hi, d.shape),
                    0.0, None)
    elif name == "gamma":
        d = hi * np.clip(d / hi, 0.0, None) ** float(value)
    else:
        raise ValueError(f"unknown site change {kind!r}")
    return Volume(vol.subject, d.astype(np.float32), vol.spacing, vol.source)


def score(bundle: Bundle, vol: Volume) -> Scores:
    images, spacing = plane_slices(vol, "axial")
    s = bundle.score_slices(list(images), [spacing] * len(images), plane="axial",
                            slice_spacing_mm=float(vol.spacing[2]))
    return s.log_likelihood, s.foreground


def score_site(bundle: Bundle, kind: str, subjects: Sequence[str]) -> dict[str, Any]:
    """Clean, motion-block and (for the first few) whole-motion scores per subject."""
    out: dict[str, Any] = {"clean": {}, "block": {}, "whole": {}}
    for i, subject in enumerate(subjects):
        vol = site(kind, load_nifti(sorted(IXI.glob(f"{subject}*.nii.gz"))[0]), i)
        out["clean"][subject] = score(bundle, vol)
        moved = corrupt_volume(vol.data, vol.spacing, "motion", "moderate", 0)
        block = splice_block(vol.data, moved, *BLOCK, axis=2)
        out["block"][subject] = score(bundle, Volume(subject, block, vol.spacing, vol.source))
        if i < WHOLE_MOTION:
            out["whole"][subject] = score(bundle, Volume(subject, moved.astype(np.float32),
                                                         vol.spacing, vol.source))
        print(f"  scored {subject} ({i + 1}/{len(subjects)})", flush=True)
    return out


def outliers_only(series: list[LearningSeries], fpr: float) -> tuple[float, float]:
    """The candidate: leave out only series far below the others (3 robust SDs)."""
    summary = np.array([series_summary(s.scores) for s in series])
    keep = np.ones(len(series), dtype=bool)
    for column in range(2):
        median = np.median(summary[:, column])
        spread = 1.4826 * np.median(np.abs(summary[:, column] - median))
        keep &= summary[:, column] >= median - 3.0 * spread
    kept = [s.scores for s, k in zip(series, keep, strict=True) if k]
    return (float(np.median([np.median(v) for v in kept])),
            float(np.quantile(np.concatenate(kept), fpr)))


def untrimmed(series: list[LearningSeries], fpr: float) -> tuple[float, float]:
    scores = [s.scores for s in series]
    return (float(np.median([np.median(v) for v in scores])),
            float(np.quantile(np.concatenate(scores), fpr)))


def node_rule(series: list[LearningSeries], fpr: float) -> tuple[float, float]:
    built = build_reference(series, fpr)
    return built.centre, built.low


RULES: dict[str, Callable[[list[LearningSeries], float], tuple[float, float]] | None] = {
    "out of the box": None,
    "learned (node: worst 20% left out)": node_rule,
    "learned, nothing left out": untrimmed,
    "learned, outliers only (candidate)": outliers_only,
}


def evaluate(bundle: Bundle, scores: dict[str, Any], splits: int) -> dict[str, list[float]]:
    """Mean slice FPR, series flagged and motion-block flagged per rule over random splits."""
    threshold, median = bundle.threshold, float(bundle.quantiles[100])
    subjects = list(scores["clean"])
    fg = {s: v[0][v[1]] for s, v in scores["clean"].items()}
    rng = np.random.default_rng(0)
    sums: dict[str, list[list[float]]] = {rule: [[], [], []] for rule in RULES}
    for _ in range(splits):
        order = rng.permutation(len(subjects))
        learn = [subjects[i] for i in order[:LEARNING]]
        held = [subjects[i] for i in order[LEARNING:]]
        series = [LearningSeries(k, fg[s]) for k, s in enumerate(learn)]
        bad = [s for s in scores["whole"] if s not in held]
        if bad:
            sc, f = scores["whole"][bad[0]]
            series[0] = LearningSeries(0, sc[f])
        for rule, build in RULES.items():
            if build is None:
                def judge(x: np.ndarray) -> np.ndarray:
                    return x < threshold
            else:
                centre, low = build(series, bundle.target_fpr)

                def judge(x: np.ndarray, c: float = centre, lo: float = low) -> np.ndarray:
                    return map_scores(x, c, lo, median, threshold) < threshold
            flagged = [judge(fg[s]) for s in held]
            sums[rule][0].append(float(np.mean(np.concatenate(flagged))))
            sums[rule][1].append(float(np.mean([f.sum() >= MIN_ABNORMAL_SLICES
                                                for f in flagged])))
            for s in held:
                sc, f = scores["block"][s]
                inside = np.zeros(len(sc), dtype=bool)
                inside[BLOCK[0]:BLOCK[1]] = True
                sums[rule][2].append(float(np.mean(judge(sc[inside & f]))))
    return {rule: [float(np.mean(v)) for v in values] for rule, values in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_bundle_path())
    parser.add_argument("--site", action="append", dest="sites",
                        help='"noise F" or "gamma G" (repeatable; default noise 0.02, gamma '
                             '0.75)')
    parser.add_argument("--splits", type=int, default=300)
    parser.add_argument("--cache", type=Path, help="keep each site's scores here")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    meta = bundle.meta["training"]["subjects"]
    subjects = [s for s in meta["evaluation"] + meta["calibration"]
                if sorted(IXI.glob(f"{s}*.nii.gz"))]
    if len(subjects) <= LEARNING:
        raise SystemExit(f"{len(subjects)} held-out subjects; more than {LEARNING} needed")
    rows = []
    for kind in args.sites or ["noise 0.02", "gamma 0.75"]:
        path = args.cache / f"{bundle.name}-{bundle.version}-{kind.replace(' ', '_')}.pkl" \
            if args.cache else None
        if path is not None and path.is_file():
            scores = pickle.loads(path.read_bytes())
        else:
            print(f"{kind}: scoring {len(subjects)} subjects ...", flush=True)
            scores = score_site(bundle, kind, subjects)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(pickle.dumps(scores))
        for rule, (fpr, flagged, block) in evaluate(bundle, scores, args.splits).items():
            rows.append((kind, rule, fpr, flagged, block))
    print(f"\n{bundle.name} {bundle.version}: {LEARNING} learning series (one of them a whole "
          f"series with moderate motion), {len(subjects) - LEARNING} held out, "
          f"{args.splits} splits\n")
    print("| simulated site | reference | held-out normal slices flagged | held-out normal "
          "series flagged | motion block flagged |")
    print("|---|---|---|---|---|")
    for kind, rule, fpr, flagged, block in rows:
        print(f"| {kind} | {rule} | {100 * fpr:.2f}% | {100 * flagged:.1f}% | "
              f"{100 * block:.1f}% |")


if __name__ == "__main__":
    main()
