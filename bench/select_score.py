"""Choose how the slice score is formed, on validation (calibration) subjects only.

Run by hand after training; prints the tables the choice was made from. Never looks at the
evaluation subjects, the studyforrest or prostate series, or any test data.

1. Site allowance (``max_series_shift``, per candidate weighting and ``shift_quantile``): the
   calibration volumes are altered the way another scanner or protocol alters a normal scan
   (contrast curve, a coarser resolution, a different noise floor) and scored as series; the
   cap on the series shift is 1.25 times the largest shift these normal variants need.
2. Artifacts: the same subjects corrupted as in ``vaenode evaluate``; for each candidate the
   position-matched AUROC per artifact. A candidate is one weighting (complexity weight 0 to
   1, tail weight, shift quantile), a pair of them, or three of different complexity weights:
   the main score and alternatives mapped onto its scale, the final score being their minimum
   (``node.model.scoring``, item 4; the minimum ranks slices the same whichever part is the
   main one, so the first in grid order is).
3. Sanity: a series of pure noise (uniform, and Rician like a receive chain with no signal)
   must be flagged on every slice at the calibration threshold (1% of the normal calibration
   slices). A full-weight complexity correction alone fails this: noise is incompressible, the
   codec's code length grows more than the VAE's likelihood falls, and the series shift does
   the rest. The site variants of step 1 must stay near the 1% rate (at most 3% flagged).
The ``motion`` column is the fraction of the moderate-motion blocks' slices flagged at that
threshold (shown, not used in the choice).
Among the candidates that pass 3, the one meeting the most AUROC targets (0.95 moderate, 0.80
mild) wins, ties broken by the mean AUROC. The position reference (``vaenode calibrate
--position-bins``, ``node.model.scoring`` item 5) comes on top of the chosen score and is not
part of this comparison (its bin count was chosen by cross-validation over the calibration
subjects, as ``node/models/README.md`` says). The scored records are cached beside the bundle
(``selection-records.pkl``). The last lines print the ``vaenode calibrate`` arguments.

    .venv/bin/python bench/select_score.py --model BUNDLE [--subjects 8] [--top 25] [--parts 3] \
        [--sharper] [--no-full-complexity-tail]
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import Bundle, load_bundle  # noqa: E402
from node.model.data import Volume, load_nifti, plane_slices  # noqa: E402
from node.model.evaluate import EvalConfig, auroc, collect  # noqa: E402
from node.model.scoring import (  # noqa: E402
    ScoreConfig,
    absolute_score,
    alternative_final,
    match_scales,
)
from node.model.train import site_variant_stacks  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi_t1"
WEIGHTS = (0.0, 0.5, 0.75, 1.0)
TAILS = (0.0, 4.0, 8.0, 16.0)
QUANTILES = (0.5, 0.75, 0.9)
MAX_SITE_FLAGGED = 0.03


def noise_images(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """The 12 slices of a pure-noise series (step 3): ``uniform``, or ``rician`` like a receive
    chain with no signal."""
    if kind == "uniform":
        return [rng.random((120, 120)).astype(np.float32) * 1000 for _ in range(12)]
    return [np.abs(rng.normal(0, 1, (120, 120)) + 1j * rng.normal(0, 1, (120, 120)))
            .astype(np.float32) for _ in range(12)]


@dataclass
class Part:
    """One weighting with its site cap, and its shifted scores on every scored stack."""

    weight: float
    tail: float
    quantile: float
    cap: float
    cfg: ScoreConfig
    clean: list[np.ndarray]  # per clean stack, foreground slices only
    corrupted: list[np.ndarray]  # per corrupted stack, all slices
    noise: list[np.ndarray]  # per pure-noise stack, foreground slices
    sites: dict[str, list[np.ndarray]]  # per site variant name, foreground slices per stack


def records_name(subjects: int, skip: int) -> str:
    """The cache file of :func:`load_records` in the model folder."""
    if skip == 0:
        return "selection-records.pkl"
    return f"selection-records-{skip}-{skip + subjects}.pkl"


def sharper(data: np.ndarray) -> np.ndarray:
    """The "sharper" normal site variant of ``--sharper``: ``2 d - G_0.5(d)`` clipped at 0, the
    mirror image of the "smoother" variant of ``node.model.artifacts.site_variants`` (an
    edge-enhancing reconstruction)."""
    from scipy.ndimage import gaussian_filter

    d = data.astype(np.float32)
    return np.clip(2.0 * d - gaussian_filter(d, 0.5), 0.0, None)


def sharper_records(bundle: Bundle, model: Path, subjects: int, skip: int = 0) -> list:
    """The calibration subjects' "sharper" variants, scored like the other site variants
    (``variant_comps`` entries; cached beside the bundle)."""
    cache = model / records_name(subjects, skip).replace("records", "sharper")
    if cache.exists():
        with cache.open("rb") as fh:
            return pickle.load(fh)
    ids = bundle.meta["training"]["subjects"]["calibration"][skip : skip + subjects]
    out = []
    for path in sorted(IXI.glob("*.nii.gz")):
        if path.name.split("-")[0] not in ids:
            continue
        vol = load_nifti(path)
        images, spacing = plane_slices(Volume(vol.subject, sharper(vol.data), vol.spacing, ""),
                                       "axial")
        x, fg = bundle.preprocess_stack(list(images), [spacing] * len(images))
        out.append((vol.subject, "sharper", bundle.components(x), fg))
        print(f"sharper variant of {vol.subject} scored", flush=True)
    with cache.open("wb") as fh:
        pickle.dump(out, fh)
    return out


def load_records(bundle: Bundle, model: Path, subjects: int, skip: int = 0,
                 ) -> tuple[Any, list, list]:
    """Scored calibration stacks: clean, corrupted, site variants (cached) and pure noise;
    ``skip``: leave out the first calibration subjects (another cache file: a second set of
    calibration subjects for checking a choice made on the first)."""
    ids = bundle.meta["training"]["subjects"]["calibration"][skip : skip + subjects]
    vols = [load_nifti(p) for p in sorted(IXI.glob("*.nii.gz")) if p.name.split("-")[0] in ids]
    rng = np.random.default_rng(0)
    cache = model / records_name(subjects, skip)
    if cache.exists():
        with cache.open("rb") as fh:
            data, variant_comps = pickle.load(fh)
    else:
        variant_comps = [(subject, name, bundle.components(x), fg)
                         for subject, name, x, fg in site_variant_stacks(bundle, vols, rng)]
        data = collect(bundle, vols, vols, EvalConfig(planes=("axial",), mcmc_subjects=0,
                                                      time_scoring=False), report=print)
        with cache.open("wb") as fh:
            pickle.dump((data, variant_comps), fh)
    noise_comps = []
    for kind in ("uniform", "rician"):
        imgs = noise_images(kind, rng)
        x, fg = bundle.preprocess_stack(imgs, [(2.0, 2.0)] * len(imgs))
        noise_comps.append((bundle.components(x), fg))
    return data, variant_comps, noise_comps


def make_part(bundle: Bundle, data: Any, variant_comps: list, noise_comps: list,
              weight: float, tail: float, quantile: float) -> Part:
    """Step 1 for one weighting, then its shifted scores everywhere."""
    pixels, clip = bundle.modelled_values, bundle.preprocess.clip_max
    base = ScoreConfig.from_dict({
        **bundle.scoring.to_dict(), "alternatives": (), "complexity": weight > 0,
        "complexity_weight": weight or 1.0, "tail_weight": tail, "series_relative": False,
        "shift_quantile": quantile,
    })
    meds: dict[str, list[float]] = {}
    for _subject, name, comp, fg in variant_comps:
        a = absolute_score(comp, base, pixels, clip)
        meds.setdefault(name, []).append(float(np.quantile(a[fg], quantile)))
    ref = float(np.median(meds["original"]))
    cap = 1.25 * max(abs(m - ref) for v in meds.values() for m in v)
    cfg = ScoreConfig.from_dict({**base.to_dict(), "series_relative": True,
                                 "max_series_shift": cap, "reference_median": ref})

    def final(comp: dict[str, np.ndarray], fg: np.ndarray) -> np.ndarray:
        return alternative_final(comp, fg, cfg, pixels, clip)

    sites: dict[str, list[np.ndarray]] = {}
    for _subject, name, comp, fg in variant_comps:
        sites.setdefault(name, []).append(final(comp, fg)[fg])
    return Part(
        weight, tail, quantile, cap, cfg,
        clean=[final(r["components"], r["foreground"])[r["foreground"]] for r in data["clean"]],
        corrupted=[final(r["components"], r["foreground"]) for r in data["corrupted"]],
        noise=[final(c, fg)[fg] for c, fg in noise_comps],
        sites=sites,
    )


def judge(data: Any, parts: list[Part]) -> dict[str, Any]:
    """Steps 2 and 3 for the minimum of ``parts`` (the first is the main score)."""
    main = parts[0]
    maps = [(1.0, 0.0)] + [match_scales(np.concatenate(main.clean), np.concatenate(p.clean))
                           for p in parts[1:]]

    def combine(arrays: list[np.ndarray]) -> np.ndarray:
        return np.min([off + g * a for (g, off), a in zip(maps, arrays, strict=True)], axis=0)

    clean = [combine([p.clean[i] for p in parts]) for i in range(len(main.clean))]
    thr = float(np.quantile(np.concatenate(clean), 0.01))
    clean_full: dict[str, np.ndarray] = {}
    for i, r in enumerate(data["clean"]):
        full = np.full(len(r["foreground"]), np.nan)
        full[r["foreground"]] = clean[i]
        clean_full[r["subject"]] = full
    by_cond: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    motion_block: list[np.ndarray] = []
    for i, r in enumerate(data["corrupted"]):
        s = combine([p.corrupted[i] for p in parts])
        ref = clean_full[r["subject"]]
        keep = r["block"] & ~np.isnan(ref)
        abn, norm = by_cond.setdefault(f"{r['artifact']}/{r['severity']}", ([], []))
        abn.append(s[keep])
        norm.append(ref[keep])
        if (r["artifact"], r["severity"]) == ("motion", "moderate"):
            motion_block.append(s[keep] < thr)
    aurocs = {c: auroc(np.concatenate(n), np.concatenate(a)) for c, (a, n) in by_cond.items()}
    noise = min(float(np.mean(combine([p.noise[i] for p in parts]) < thr))
                for i in range(len(main.noise)))
    sites = {name: float(np.mean(np.concatenate(
        [combine([p.sites[name][i] for p in parts]) for i in range(len(main.sites[name]))]
    ) < thr)) for name in main.sites}
    met = sum(v >= (0.95 if c.endswith("moderate") else 0.80) for c, v in aurocs.items())
    ok = noise == 1.0 and max(sites.values()) <= MAX_SITE_FLAGGED
    return {"key": (ok, met, float(np.mean(list(aurocs.values())))), "aurocs": aurocs,
            "noise": noise, "sites": sites, "parts": parts,
            "motion_flagged": float(np.mean(np.concatenate(motion_block)))}


def label(parts: list[Part]) -> str:
    return " | ".join(f"w{p.weight:.2f} t{p.tail:.0f} q{p.quantile:.2f}" for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=25, help="rows of the combination table")
    parser.add_argument("--parts", type=int, default=3, choices=(1, 2, 3),
                        help="most parts in a combination (main + alternatives)")
    parser.add_argument("--sharper", action="store_true",
                        help="one more normal site variant: 2 d - G_0.5(d) (see sharper())")
    parser.add_argument("--no-full-complexity-tail", action="store_true",
                        help="leave out the weightings with complexity weight 1 and a tail "
                        "(bench/explore-logs/fulltail-preregistration.md)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    data, variant_comps, noise_comps = load_records(bundle, args.model, args.subjects)
    if args.sharper:
        variant_comps = variant_comps + sharper_records(bundle, args.model, args.subjects)
    grid = [(w, t, q) for w, t, q in itertools.product(WEIGHTS, TAILS, QUANTILES)
            if not (args.no_full_complexity_tail and w == 1.0 and t > 0)]
    singles = [make_part(bundle, data, variant_comps, noise_comps, w, t, q) for w, t, q in grid]
    results = [judge(data, [p]) for p in singles]
    if args.parts >= 2:
        results += [judge(data, [a, b]) for a, b in itertools.combinations(singles, 2)
                    if (a.weight, a.tail) != (b.weight, b.tail)]
    if args.parts >= 3:
        # Triples of three different complexity weights (one part per kind of artifact).
        results += [judge(data, list(c)) for c in itertools.combinations(singles, 3)
                    if len({p.weight for p in c}) == 3]
    names = list(results[0]["aurocs"])
    head = f"{'main | alternatives':56} {'ok':5} met  mean  site  motion | "
    print(head + " ".join(f"{n[:14]:>14}" for n in names))

    def row(r: dict[str, Any]) -> str:
        ok, met, mean = r["key"]
        site = max(r["sites"].values())
        return (f"{label(r['parts']):56} {ok!s:5} {met:3d} {mean:.3f} {site:.3f} "
                f"{r['motion_flagged']:6.2f}"
                " | " + " ".join(f"{r['aurocs'][n]:14.3f}" for n in names))

    print("single weightings:")
    for r in results[: len(singles)]:
        print(row(r))
    print(f"best {args.top} combinations:")
    combos = sorted(results[len(singles):], key=lambda r: r["key"], reverse=True)
    for r in combos[: args.top]:
        print(row(r))
    best = max(results, key=lambda r: r["key"])
    main_part, *alts = best["parts"]
    print(f"\nchosen (flags pure noise, site variants near 1%, most targets met, then mean AUROC):"
          f" {label(best['parts'])}")
    print("site variants flagged at the calibration threshold: "
          + ", ".join(f"{k} {v:.1%}" for k, v in best["sites"].items()))
    cmd = (f"--complexity-weight {main_part.weight or 1.0} "
           f"--{'' if main_part.weight else 'no-'}complexity --tail-weight {main_part.tail} "
           f"--shift-quantile {main_part.quantile} --max-series-shift {main_part.cap:.0f} "
           "--series-relative")
    for p in alts:
        cmd += (f" --alternative complexity_weight={p.weight},tail_weight={p.tail},"
                f"max_series_shift={p.cap:.0f},shift_quantile={p.quantile}")
    if not alts:
        cmd += " --alternative none"
    print(f"vaenode calibrate --model {args.model} --data {IXI} --out OUT {cmd}")


if __name__ == "__main__":
    main()
