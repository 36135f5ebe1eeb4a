"""Exploration (background part): the candidates of ``explore_judge2.py`` with the position
reference on top (10 bins, axial), leave-one-subject-out on the 8 calibration subjects of
``select_score.py``: each subject's clean, corrupted and site-variant axial stacks are
referenced with profiles fitted on the other 7 subjects' clean stacks; the threshold is the 1%
quantile of all LOSO-referenced clean slices (as ``vaenode calibrate`` sets it); the pure-noise
series (12 slices, 24 mm: below the coverage span) get the unreferenced score through the
fallback map (1% quantile and median of the calibration slices). Reports position-matched
AUROC per artifact/severity, the site variants and noise flagged, and the fraction of each
moderate block flagged at the threshold.

    .venv/bin/python bench/explore_position.py --model /tmp/runs3/r9 \
        --extras /tmp/helper-model/extras2.pkl
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.explore_judge import custom_part, inputs  # noqa: E402
from bench.select_score import make_part  # noqa: E402
from node.model.evaluate import auroc  # noqa: E402
from node.model.scoring import (  # noqa: E402
    fit_position_profiles,
    match_scales,
    position_normalized,
    robust_level,
)

BINS = 10


def evaluate(bundle, data, variants, parts) -> dict:
    """The judged figures of the minimum of ``parts`` (and, under ``scores`` and
    ``unreferenced``, its values with and without the position reference, which
    ``bench/explore_spectral_judge.py``'s guarded rounds fit on)."""
    main = parts[0]
    maps = [(1.0, 0.0)] + [match_scales(np.concatenate(main.clean), np.concatenate(p.clean),
                                        getattr(p, "match_low", 0.01))
                           for p in parts[1:]]  # match_low: spectral_judge's tighter maps

    def comb(arrs):
        return np.min([off + g * a for (g, off), a in zip(maps, arrs, strict=True)], axis=0)

    clean = [comb([p.clean[i] for p in parts]) for i in range(len(main.clean))]  # fg only
    corr = [comb([p.corrupted[i] for p in parts]) for i in range(len(main.corrupted))]
    site_names = list(main.sites)
    site_subj: dict[str, list[str]] = {}
    for s, name, _c, _fg in variants:
        site_subj.setdefault(name, []).append(s)
    sites = {n: [comb([p.sites[n][i] for p in parts]) for i in range(len(main.sites[n]))]
             for n in site_names}
    noise = [comb([p.noise[i] for p in parts]) for i in range(len(main.noise))]
    subs = [r["subject"] for r in data["clean"]]
    base = replace(bundle.scoring, position_bins=BINS, position_min_extent_mm={},
                   alternatives=())
    ref_clean, ref_corr, ref_sites = {}, {}, {n: [] for n in site_names}
    site_keys: dict[tuple[str, int], np.ndarray] = {}
    for i, s in enumerate(subs):
        fit = [("axial", c, np.ones(c.size, bool)) for j, c in enumerate(clean) if subs[j] != s]
        level, spread = robust_level(np.concatenate([c for _, c, _ in fit]))
        cfg = replace(base, position_median=level, position_spread=spread,
                      position_profiles=fit_position_profiles(fit, BINS,
                                                              base.min_series_slices))
        ref_clean[s] = position_normalized(clean[i], np.ones(clean[i].size, bool), cfg, "axial")
        for k, r in enumerate(data["corrupted"]):
            if r["subject"] == s:
                ref_corr[k] = position_normalized(corr[k], r["foreground"], cfg, "axial")
        for n in site_names:
            for k, sj in enumerate(site_subj[n]):
                if sj == s:
                    v = sites[n][k]
                    ref_sites[n].append(position_normalized(v, np.ones(v.size, bool), cfg,
                                                            "axial"))
                    site_keys[(n, k)] = ref_sites[n][-1]
    allref = np.concatenate([ref_clean[s] for s in subs])
    thr = float(np.quantile(allref, 0.01))
    gain, off = match_scales(allref, np.concatenate(clean))
    noise_flag = min(float(np.mean(off + gain * v < thr)) for v in noise)
    site_flag = {n: float(np.mean(np.concatenate(v) < thr)) for n, v in ref_sites.items()}
    clean_fg = {r["subject"]: r["foreground"] for r in data["clean"]}
    by: dict[str, tuple[list, list, list]] = {}
    for k, r in enumerate(data["corrupted"]):
        full = np.full(len(r["foreground"]), np.nan)
        full[clean_fg[r["subject"]]] = ref_clean[r["subject"]]
        keep = r["block"] & ~np.isnan(full)
        a, n, f = by.setdefault(f"{r['artifact']}/{r['severity']}", ([], [], []))
        a.append(ref_corr[k][keep])
        n.append(full[keep])
        f.append(ref_corr[k][keep] < thr)
    other: dict[str, list] = {}
    for k, r in enumerate(data["corrupted"]):
        out = r["foreground"] & ~r["block"]
        other.setdefault(f"{r['artifact']}/{r['severity']}", []).append(ref_corr[k][out] < thr)
    aur = {c: auroc(np.concatenate(n), np.concatenate(a)) for c, (a, n, _f) in by.items()}
    flagged = {c: float(np.mean(np.concatenate(f))) for c, (_a, _n, f) in by.items()}
    met = sum(v >= (0.95 if c.endswith("moderate") else 0.80) for c, v in aur.items())
    elsewhere = {c: float(np.mean(np.concatenate(v))) for c, v in other.items()}
    return {"aurocs": aur, "flagged": flagged, "elsewhere": elsewhere, "threshold": thr,
            "sites": site_flag, "noise": noise_flag, "met": met,
            "mean": float(np.mean(list(aur.values()))),
            # the referenced scores themselves (clean: by subject, foreground slices;
            # corrupted: by index, all slices; sites: by (name, index); noise: mapped)
            "scores": {"clean": ref_clean, "corrupted": ref_corr, "sites": site_keys,
                       "noise": [off + gain * v for v in noise], "all_clean": allref},
            # the same before the position reference (the minimum of the parts)
            "unreferenced": {"clean": dict(zip(subs, clean, strict=True)),
                             "corrupted": dict(enumerate(corr)),
                             "sites": {(n, k): v for n in site_names
                                       for k, v in enumerate(sites[n])},
                             "noise": noise, "all_clean": np.concatenate(clean)}}


def main() -> None:
    bundle, data, variants, noise, triple = inputs()
    pixels, clip = bundle.modelled_values, bundle.preprocess.clip_max
    delta = clip / 255.0
    shipped = [make_part(bundle, data, variants, noise, w, t, q) for w, t, q in triple]

    def bg(r):
        return lambda c: c[f"bg{r}_ll"] / np.maximum(c[f"bg{r}_n"], 1)

    def tail(k):
        return lambda c: -k * c[f"pm_tail{k}"]

    def main_tail(k, t):
        return lambda c: (c["log_likelihood"] + 0.5 * (pixels * math.log(delta) + c["png_nats"])
                          - t * k * c[f"pm_tail{k}"])

    cands = {
        "shipped triple": shipped,
        "+bg1_ll/n q0.75": (
            [*shipped, custom_part(bundle, data, variants, noise, "b", bg("1"), 0.75)]),
        "+bg1_ll/n q0.5": [*shipped, custom_part(bundle, data, variants, noise, "b", bg("1"), 0.5)],
        "+bg3_ll/n q0.5": [*shipped, custom_part(bundle, data, variants, noise, "b", bg(""), 0.5)],
        "+tail k1638 q0.75": (
            [*shipped, custom_part(bundle, data, variants, noise, "t", tail(1638), 0.75)]),
        "+tail k820 q0.75": (
            [*shipped, custom_part(bundle, data, variants, noise, "t", tail(820), 0.75)]),
        "main tail k820 t16": (
            [custom_part(bundle, data, variants, noise, "m", main_tail(820, 16.0), 0.75),
             *shipped[1:]]),
    }
    conds = None
    for name, parts in cands.items():
        res = evaluate(bundle, data, variants, parts)
        if conds is None:
            conds = list(res["aurocs"])
            print("columns: " + " ".join(conds))
        sites = " ".join(f"{k[:5]}{v:.3f}" for k, v in res["sites"].items())
        print(f"{name:22} met={res['met']:2d} mean={res['mean']:.3f} noise={res['noise']:.2f} "
              f"[{sites}] | " + " ".join(f"{res['aurocs'][c]:.3f}" for c in conds))
        print(f"{'':22} flagged in block at thr: "
              + " ".join(f"{c.split('/')[0][:5]}/{c.split('/')[1][:3]} {res['flagged'][c]:.2f}"
                         for c in conds), flush=True)
        print(f"{'':22} flagged elsewhere in those series: "
              + " ".join(f"{c.split('/')[0][:5]}/{c.split('/')[1][:3]} {res['elsewhere'][c]:.3f}"
                         for c in conds), flush=True)


if __name__ == "__main__":
    main()
