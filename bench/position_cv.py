"""Choose the position reference's bins by cross-validation over calibration subjects only.

Run by hand (prints a table); never looks at the evaluation subjects or the DICOM acceptance
series. For each setting, the calibration subjects (all three planes, the bundle's score without
a position reference) are split into 5 folds by subject; the profiles are fitted on 4 folds and
the threshold set as ``vaenode calibrate`` does (leave-one-subject-out referenced scores of the
fitting subjects, 1% quantile); then, on the held-out fold, the fraction of clean slices flagged
per plane, of the site variants of ``bench/select_score.py`` flagged, and of the moderate
artifact blocks of its records flagged (axial, the subjects it scored). The same for the score
without position reference (first row), with the same folds.

    .venv/bin/python bench/position_cv.py --model BUNDLE --records SELECTION_RECORDS \
        [--extras EXTRAS]

A bundle with the background part (``node.model.scoring`` item 6) needs the ``background``
component of the cached records, which were scored before it existed: ``--extras`` takes the
output of ``bench/explore_extras.py`` on the same records, whose ``bg1_ll / bg1_n`` is that
component (head level 0.1, dilation 1; checked against the freshly scored clean axial stacks).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import Bundle, load_bundle  # noqa: E402
from node.model.data import load_nifti  # noqa: E402
from node.model.scoring import (  # noqa: E402
    ScoreConfig,
    fit_position_profiles,
    position_normalized,
    robust_level,
    stack_scores,
)
from node.model.train import stack_components  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"
FOLDS = 5
SETTINGS = (0, 5, 10, 20)
ARTIFACTS = ("motion", "ghosting", "spike", "noise", "blur", "bias")


def final(bundle: Bundle, cfg: ScoreConfig, comp: dict[str, np.ndarray],
          fg: np.ndarray) -> np.ndarray:
    return stack_scores(comp, fg, cfg, bundle.modelled_values, bundle.preprocess.clip_max)[0]


def unreferenced(bundle: Bundle) -> ScoreConfig:
    """The bundle's score without any of its position reference (profiles, coverage, map):
    whole calibration stacks only, so the coverage check has nothing to decide here."""
    return replace(bundle.scoring, position_bins=0, position_profiles={},
                   position_min_extent_mm={}, fallback_gain=1.0, fallback_offset=0.0)


def referenced(cfg: ScoreConfig, fit: list[dict[str, Any]], bins: int) -> ScoreConfig:
    """``cfg`` with profiles fitted on ``fit`` (stacks in their planes' direction)."""
    level, spread = robust_level(np.concatenate([s["final"][s["foreground"]] for s in fit]))
    profiles = fit_position_profiles([(s["plane"], s["final"], s["foreground"]) for s in fit],
                                     bins, cfg.min_series_slices)
    return replace(cfg, position_bins=bins, position_median=level, position_spread=spread,
                   position_profiles=profiles)


def cross_validate(bundle: Bundle, stacks: list[dict[str, Any]], records: Any,
                   bins: int) -> dict[str, float]:
    cfg = unreferenced(bundle)
    data, variants = records
    subjects = sorted({s["subject"] for s in stacks})
    counts: dict[str, list[int]] = {}

    def add(key: str, flags: np.ndarray) -> None:
        c = counts.setdefault(key, [0, 0])
        c[0] += int(flags.sum())
        c[1] += int(flags.size)

    def score(c: ScoreConfig, s: np.ndarray, fg: np.ndarray, plane: str) -> np.ndarray:
        return position_normalized(s, fg, c, plane) if bins else s

    for f in range(FOLDS):
        held = set(subjects[f::FOLDS])
        fit = [s for s in stacks if s["subject"] not in held]
        if bins:
            loso = []
            for subject in sorted({s["subject"] for s in fit}):
                inner = referenced(cfg, [s for s in fit if s["subject"] != subject], bins)
                loso += [position_normalized(s["final"], s["foreground"], inner, s["plane"])
                         [s["foreground"]] for s in fit if s["subject"] == subject]
            ref = referenced(cfg, fit, bins)
        else:
            loso = [s["final"][s["foreground"]] for s in fit]
            ref = cfg
        thr = float(np.quantile(np.concatenate(loso), 0.01))
        for s in stacks:
            if s["subject"] in held:
                fg = s["foreground"]
                add(f"clean {s['plane']}", (score(ref, s["final"], fg, s["plane"]) < thr)[fg])
        for subject, name, comp, fg in variants:
            if subject in held and name != "original":
                add("site variants", (score(ref, final(bundle, cfg, comp, fg), fg, "axial")
                                      < thr)[fg])
        for r in data["corrupted"]:
            if r["subject"] in held and r["severity"] == "moderate":
                fg = r["foreground"]
                s = score(ref, final(bundle, cfg, r["components"], fg), fg, "axial")
                add(r["artifact"], (s < thr)[r["block"] & fg])
    return {k: a / max(1, n) for k, (a, n) in counts.items()}


def with_background(bundle: Bundle, records: Path, extras: Path,
                    stacks: list[dict[str, Any]]) -> Any:
    """The cached records with ``background`` = ``bg1_ll / bg1_n`` of the extras, checked on
    the unaltered site-variant stacks against the fresh clean axial stacks' component."""
    from bench.explore_judge import merge

    part = bundle.scoring.background
    if part is not None and (part.head_level, part.dilation) != (0.1, 1):
        raise SystemExit("the extras hold the background at head level 0.1, dilation 1 only")
    data, variants, _noise = merge(records, extras)
    comps = [r["components"] for r in data["clean"] + data["corrupted"]]
    for comp in comps + [c for _s, _n, c, _fg in variants]:
        comp["background"] = comp["bg1_ll"] / np.maximum(comp["bg1_n"], 1)
    fresh = {s["subject"]: s["components"]["background"] for s in stacks
             if s["plane"] == "axial"}
    diffs = [float(np.max(np.abs(c["background"] - fresh[subject])))
             for subject, name, c, _fg in variants if name == "original" and subject in fresh]
    print(f"extras' background vs fresh scoring, unaltered axial stacks: largest difference "
          f"{max(diffs):.2e} nats/pixel over {len(diffs)} stacks")
    return data, variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="bundle (its score settings)")
    parser.add_argument("--records", type=Path, required=True,
                        help="selection-records.pkl written by bench/select_score.py")
    parser.add_argument("--extras", type=Path, default=None,
                        help="bench/explore_extras.py output for the same records: their "
                             "background component (bundles with the background part)")
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    ids = set(bundle.meta["training"]["subjects"]["calibration"])
    vols = [load_nifti(p) for p in sorted(IXI.glob("*.nii.gz")) if p.name.split("-")[0] in ids]
    stacks = stack_components(bundle, vols, ("axial", "coronal", "sagittal"))
    cfg = unreferenced(bundle)
    for s in stacks:
        s["final"] = final(bundle, cfg, s["components"], s["foreground"])
    if args.extras is not None:
        records = with_background(bundle, args.records, args.extras, stacks)
    else:
        with args.records.open("rb") as fh:
            records = pickle.load(fh)
    cols = ["clean axial", "clean coronal", "clean sagittal", "site variants", *ARTIFACTS]
    print(f"{len(vols)} calibration subjects, {FOLDS} folds; fraction flagged on held-out folds")
    print("| bins | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for bins in SETTINGS:
        got = cross_validate(bundle, stacks, records, bins)
        print(f"| {bins or 'off'} | " + " | ".join(f"{got.get(c, float('nan')):.3f}"
                                                   for c in cols) + " |")


if __name__ == "__main__":
    main()
