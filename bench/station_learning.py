"""What a station's learning does for a simulated site (run by hand, prints a table).

A site is simulated by one change applied to whole IXI volumes of subjects the bundle never
trained on (its evaluation and calibration subjects): noise added (a fraction of the 99.5th
percentile) or a contrast curve (gamma, faded in above the noise floor:
:func:`node.model.sites.contrast_curve`). Each subject's axial stack is scored once as the
worker scores it, clean and with the end-to-end test's block of moderate TorchIO motion
(slices 55-70, seed 0); a few subjects also as a whole series with moderate motion (a bad
series a station may send while it learns). The order is a scanner's
(:func:`acquire_moving`): the noise site's noise is added after the motion, as a receiver adds
it to what the moving head gave (moving the noisy volume instead averaged the site's noise
away in the block and hid part of it; node/models/README.md), while the contrast curve is
the tissue's signal and moves with the head. Then, over random splits, 20 of the subjects
are a station's learning series (one of them replaced by a whole-motion series) and the
others are held out:

- slice FPR: flagged foreground slices of the held-out clean series (target: the bundle's
  target rate, 1%); series flagged: held-out clean series the rule calls abnormal (the node:
  a 10th-percentile referred score below the series edge; out of the box: at least the
  routing rule's ``min_abnormal_slices``, 3, flagged slices); normal series with a flagged
  image: held-out clean series that would go to PACS with a "Quality Issue" KOS;
- motion block: flagged slices of the motion block, for the held-out subjects that have one;
  motion series flagged: held-out series with the motion block that the rule calls abnormal
  (what the technologist sees: the series' verdict);
- left out: learning series the rule left out (mean over splits).

``--bad`` sets how many of the 20 learning series are bad: 0, 1 (a whole series with moderate
motion) or 3 (that, and two with the motion block). ``--seed`` sets the random splits. Rows:
the bundle out of the box; the node's reference (``node.worker.learning``: outliers below the
other series, by median or by 10th percentile, left out; each slice's score referred to its
position in the stack; a series judged by the 10th percentile of its referred scores against
the series edge; an image flagged below the low in a series judged abnormal, below the image
edge in one judged normal); the node before session 35 (every image below the low flagged);
the node's arithmetic with nothing left out; after a reviewer reported the bad series on the
dashboard and recalibrated (``vaenode queue recalibrate``: the bad ones left out, the others
unreviewed and trimmed as the node trims); and with only the bad series left out, the others
reviewed normal (an oracle no station has: what the outlier rule aims at). A bundle with a
station score (``station_scoring`` in ``model.json``) is judged out of the box by its own
score and, learned, by the station score, as the node does.

    .venv/bin/python bench/station_learning.py [--model node/models/brain-t1] \\
        [--site "noise 0.02"] [--site "gamma 0.75"] [--bad 0 --bad 1 --bad 3] \\
        [--splits 300] [--seed 0] [--cache /tmp/sl]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.artifacts import splice_block  # noqa: E402
from node.model.bundle import Bundle, default_bundle_path, load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402
from node.model.site_sweep import with_artifact  # noqa: E402
from node.model.sites import contrast_curve  # noqa: E402
from node.worker.learning import (  # noqa: E402
    LearningSeries,
    Reference,
    Review,
    build_reference,
    series_statistic,
    stack_positions,
)

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"
LEARNING = 20
BLOCK = (55, 70)
#: Subjects also scored as a whole series with motion (bad learning series).
WHOLE_MOTION = 3
MIN_ABNORMAL_SLICES = 3

#: (the bundle's own score per slice, the score a station learns per slice, foreground)
Scores = tuple[np.ndarray, np.ndarray, np.ndarray]


def site(kind: str, vol: Volume, seed: int, scale_of: Volume | None = None) -> Volume:
    """``vol`` as the simulated site acquires it (``noise F`` or ``gamma G``), its noise level
    and contrast curve set by the 99.5th percentile of ``scale_of`` (default ``vol``): a
    corrupted volume gets the same as its clean one."""
    name, value = kind.split()
    d: np.ndarray = vol.data.astype(np.float32)
    hi = float(np.percentile((vol if scale_of is None else scale_of).data, 99.5)) or 1.0
    if name == "noise":
        d = np.clip(d + np.random.default_rng(seed).normal(0.0, float(value) * hi, d.shape),
                    0.0, None)
    elif name == "gamma":
        d = hi * contrast_curve(np.clip(d / hi, 0.0, None), float(value))
    else:
        raise ValueError(f"unknown site change {kind!r}")
    return Volume(vol.subject, d.astype(np.float32), vol.spacing, vol.source)


def acquire_moving(kind: str, raw: Volume, clean: Volume, seed: int) -> Volume:
    """The subject at site ``kind``, moving (moderate motion, seed 0), in the order a scanner
    gives (:func:`node.model.site_sweep.with_artifact`): a contrast curve is the tissue's
    signal, so it moves with the head (``clean``, the site's rendering, is moved); noise is
    the receiver's, added to what the moving head gave (``raw`` is moved, then the site's
    noise added with the same draw and scale as ``clean``'s)."""
    return with_artifact(raw, clean, kind.split()[0] == "gamma",
                         lambda v: site(kind, v, seed, scale_of=raw), "motion", "moderate", 0)


def score(bundle: Bundle, vol: Volume) -> Scores:
    images, spacing = plane_slices(vol, "axial")
    s = bundle.score_slices(list(images), [spacing] * len(images), plane="axial",
                            slice_spacing_mm=float(vol.spacing[2]))
    learned = s.log_likelihood if s.station_score is None else s.station_score
    return s.log_likelihood, learned, s.foreground


def score_site(bundle: Bundle, kind: str, subjects: Sequence[str]) -> dict[str, Any]:
    """Clean, motion-block and (for the first few) whole-motion scores per subject."""
    out: dict[str, Any] = {"clean": {}, "block": {}, "whole": {}}
    for i, subject in enumerate(subjects):
        raw = load_nifti(sorted(IXI.glob(f"{subject}*.nii.gz"))[0])
        vol = site(kind, raw, i)
        out["clean"][subject] = score(bundle, vol)
        moved = acquire_moving(kind, raw, vol, i)
        block = splice_block(vol.data, moved.data, *BLOCK, axis=2)
        out["block"][subject] = score(bundle, Volume(subject, block, vol.spacing, vol.source))
        if i < WHOLE_MOTION:
            out["whole"][subject] = score(bundle, moved)
        print(f"  scored {subject} ({i + 1}/{len(subjects)})", flush=True)
    return out


class Learned(NamedTuple):
    """What a rule learns from a station's learning series: its low, the learning series it
    left out, and what it compares with the low (``refer``: a series' foreground scores in
    stack order to the values judged; None: the scores themselves)."""

    low: float
    left_out: int
    refer: Callable[[np.ndarray], np.ndarray] | None = None
    #: A series verdict of its own (a series' foreground scores in stack order -> abnormal),
    #: instead of the slices below the low against the routing rule's count; None: the
    #: count.
    series: Callable[[np.ndarray], bool] | None = None
    #: Below what an image of a series judged normal is flagged (the image edge); None: the
    #: low, as in a series judged abnormal.
    image_low: float | None = None


Rule = Callable[[list[np.ndarray], set[int], float], Learned]


def _learned(built: Reference) -> Learned:
    """What the node judges with: each score referred to its position, a series by its
    :func:`series_statistic` against the series edge (the routing rule's slices where it has
    none), an image flagged below the low in a series judged abnormal and below the image
    edge in one judged normal."""
    def refer(v: np.ndarray) -> np.ndarray:
        return built.position.refer(v, stack_positions(np.zeros(v.size, dtype=np.int64),
                                                       np.ones(v.size, dtype=bool)))

    edge = built.series_edge
    series = None if edge is None else (lambda v: series_statistic(refer(v)) < edge)
    return Learned(built.low, len(built.selection.trimmed), refer, series, built.image_edge)


def node_rule(series: list[np.ndarray], bad: set[int], fpr: float) -> Learned:
    return _learned(build_reference([LearningSeries(i, v) for i, v in enumerate(series)], fpr,
                                    estimate=False))


def every_image_below_low(series: list[np.ndarray], bad: set[int], fpr: float) -> Learned:
    """The node before 2026-12-06, session 35: the same reference and series verdict, every
    image below the low flagged whatever the series verdict (no image edge)."""
    return node_rule(series, bad, fpr)._replace(image_low=None)


def untrimmed(series: list[np.ndarray], bad: set[int], fpr: float) -> Learned:
    """The node's arithmetic with every series used (each reviewed normal)."""
    return _learned(build_reference([LearningSeries(i, v, Review.NORMAL)
                                     for i, v in enumerate(series)], fpr, estimate=False))


def oracle(series: list[np.ndarray], bad: set[int], fpr: float) -> Learned:
    """The node's arithmetic with exactly the bad series left out (confirmed flags, the
    others reviewed normal)."""
    built = build_reference([LearningSeries(i, v, Review.FLAGGED if i in bad else Review.NORMAL)
                             for i, v in enumerate(series)], fpr, estimate=False)
    return _learned(built)._replace(left_out=len(bad))


def reported(series: list[np.ndarray], bad: set[int], fpr: float) -> Learned:
    """The node's arithmetic after a reviewer reported the bad series (a missed artifact, or
    a confirmed flag) and recalibrated: those left out, the others unreviewed (trimmed as the
    node trims)."""
    built = build_reference([LearningSeries(i, v, Review.FLAGGED if i in bad else Review.NONE)
                             for i, v in enumerate(series)], fpr, estimate=False)
    return _learned(built)._replace(left_out=len(bad) + len(built.selection.trimmed))


RULES: dict[str, Rule | None] = {
    "out of the box": None,
    "learned (the node: outliers left out, a low per slice position, a series judged by its "
    "10th percentile, the images of a normal series by the image edge)": node_rule,
    "learned as the node, every image below the low flagged (the node before 2026-12-06, "
    "session 35)": every_image_below_low,
    "learned as the node, nothing left out": untrimmed,
    "learned as the node, the bad series reported on the dashboard and recalibrated "
    "(vaenode queue recalibrate)": reported,
    "learned as the node, only the bad series left out (oracle)": oracle,
}


def judged(got: Learned, values: np.ndarray) -> tuple[bool, np.ndarray]:
    """A series' verdict and its flagged images (``values``: its foreground scores in stack
    order): the rule's own series verdict (``Learned.series``), its images below the low, or
    below the image edge where the series is normal; without a series verdict of its own,
    its images below the low against the routing rule's count."""
    refer = got.refer or (lambda v: v)
    referred = refer(values)
    if got.series is None:
        below = referred < got.low
        return bool(below.sum() >= MIN_ABNORMAL_SLICES), below
    abnormal = got.series(values)
    low = got.low if abnormal or got.image_low is None else got.image_low
    return abnormal, referred < low


#: What ``evaluate`` averages per rule, in the table's order.
COLUMNS = ("slices", "series", "kos", "block", "caught", "left")


def evaluate(bundle: Bundle, scores: dict[str, Any], splits: int, bad: int,
             seed: int = 0) -> dict[str, dict[str, float]]:
    """Per rule over random splits (``seed``), with ``bad`` bad learning series, the mean of
    each of ``COLUMNS``: held-out normal slices flagged, normal series flagged, normal series
    with a flagged image (sent with a "Quality Issue" KOS), motion-block slices flagged,
    motion-block series flagged, learning series left out."""
    threshold = bundle.threshold
    subjects = list(scores["clean"])
    own = {s: v[0][v[2]] for s, v in scores["clean"].items()}
    learned = {s: v[1][v[2]] for s, v in scores["clean"].items()}
    rng = np.random.default_rng(seed)
    sums: dict[str, dict[str, list[float]]] = {rule: {c: [] for c in COLUMNS}
                                               for rule in RULES}
    for _ in range(splits):
        order = rng.permutation(len(subjects))
        learn = [subjects[i] for i in order[:LEARNING]]
        held = [subjects[i] for i in order[LEARNING:]]
        series = [learned[s] for s in learn]
        spoiled: set[int] = set()
        whole = [s for s in scores["whole"] if s not in held]
        if bad >= 1 and whole:
            _, sc, f = scores["whole"][whole[0]]
            series[0] = sc[f]
            spoiled.add(0)
        for i in range(1, bad):
            _, sc, f = scores["block"][learn[i]]
            series[i] = sc[f]
            spoiled.add(i)
        for rule, build in RULES.items():
            # Out of the box: the bundle's own score against its threshold. Learned: the
            # mapping sends the station's low onto the threshold, so a slice is flagged
            # exactly when its station score (the bundle's own where it declares none) is
            # below the low, or below the image edge in a series judged normal
            # (node.worker.learning).
            if build is None:
                got, values, k = Learned(threshold, 0), own, 0
            else:
                got, values, k = build(series, spoiled, bundle.target_fpr), learned, 1
            verdicts = [judged(got, values[s]) for s in held]
            sums[rule]["slices"].append(float(np.mean(np.concatenate([f for _, f in verdicts]))))
            sums[rule]["series"].append(float(np.mean([a for a, _ in verdicts])))
            sums[rule]["kos"].append(float(np.mean([bool(f.any()) for _, f in verdicts])))
            sums[rule]["left"].append(float(got.left_out))
            for s in held:
                sc, f = scores["block"][s][k], scores["block"][s][2]
                inside = np.zeros(len(sc), dtype=bool)
                inside[BLOCK[0]:BLOCK[1]] = True
                abnormal, below = judged(got, sc[f])  # foreground, in stack order
                sums[rule]["block"].append(float(np.mean(below[inside[f]])))
                sums[rule]["caught"].append(float(abnormal))
    return {rule: {c: float(np.mean(v)) for c, v in values.items()}
            for rule, values in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_bundle_path())
    parser.add_argument("--site", action="append", dest="sites",
                        help='"noise F" or "gamma G" (repeatable; default noise 0.02, gamma '
                             '0.75)')
    parser.add_argument("--bad", type=int, action="append", choices=(0, 1, 3),
                        help="bad learning series: 0, 1 or 3 (repeatable; default 1)")
    parser.add_argument("--splits", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random splits")
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
        for bad in args.bad or [1]:
            for rule, means in evaluate(bundle, scores, args.splits, bad, args.seed).items():
                rows.append((kind, bad, rule, *(means[c] for c in COLUMNS)))
    print(f"\n{bundle.name} {bundle.version}: {LEARNING} learning series (bad ones: a whole "
          f"series with moderate motion, then series with the motion block), "
          f"{len(subjects) - LEARNING} held out, {args.splits} splits (seed {args.seed})\n")
    print("| simulated site | bad learning series | reference | held-out normal slices flagged "
          "| held-out normal series flagged | normal series with a flagged image (a KOS) "
          "| motion block flagged | motion series flagged | series left out |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, bad, rule, fpr, flagged, kos, block, caught, left in rows:
        print(f"| {kind} | {bad} | {rule} | {100 * fpr:.2f}% | {100 * flagged:.1f}% | "
              f"{100 * kos:.1f}% | {100 * block:.1f}% | {100 * caught:.1f}% | {left:.1f} |")


if __name__ == "__main__":
    main()
