"""Exploration (spectral part): the shipped four parts (``bench/explore_judge.py``'s triple and
the background part) with a fifth part from ``bench/explore_spectral.py``'s features, judged as
``bench/explore_position.py`` judges (position reference leave-one-subject-out over the 8
calibration subjects, 1% threshold, site variants, pure noise); each candidate part has its
own capped series shift (1.25 x the site variants' largest need) and the map onto the main
score's scale, like every part.

    .venv/bin/python bench/explore_spectral_judge.py --round select --model /tmp/runs3/r9 \
        --extras /tmp/helper-model/extras2.pkl /tmp/s5/spectral.pkl
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.explore_judge import custom_part, inputs  # noqa: E402
from bench.explore_position import evaluate  # noqa: E402
from bench.select_score import Part, make_part  # noqa: E402
from node.model.scoring import (  # noqa: E402
    position_bin,
    relative_positions,
    robust_level,
    series_trend_residuals,
)

BINS = 10

ROUNDS = ("fifth", "quantiles", "every", "first", "lifted", "tight", "ratio", "onto", "add",
          "more", "select", "trend", "trend-select", "asym-select", "guarded",
          "guarded-check", "joint", "joint-select", "joint-check")


def column(key: str, minus: str | None = None, times: float = 1.0):
    """A per-slice feature of the merged components, optionally ``- times * minus``."""
    if minus is None:
        return lambda c: c[key]
    return lambda c: c[key] - times * c[minus]


def positioned(part: Part, data, variants, onto: Part | None = None) -> Part:
    """The part's values compared with the other calibration subjects' clean values at the
    same relative position, (v - median_bin) / spread_bin (leave-one-subject-out, as the final
    score's reference); the noise series (too short) against all clean slices. ``onto``: put
    the result on that part's position profile instead (median_bin + spread_bin * z of the
    other part), so that the minimum compares like with like at every position."""
    subs = [r["subject"] for r in data["clean"]]

    def profile(p, s):
        v = np.concatenate([c for j, c in enumerate(p.clean) if subs[j] != s])
        k = np.concatenate([position_bin(relative_positions(np.ones(c.size, bool)), BINS)
                            for j, c in enumerate(p.clean) if subs[j] != s])
        return [robust_level(v[k == b]) for b in range(BINS)]

    profs = {s: profile(part, s) for s in subs}
    targets = {s: profile(onto, s) for s in subs} if onto is not None else None

    def ref(v, fg, s):
        out = np.array(v, float)
        k = position_bin(relative_positions(fg)[fg], BINS)
        lv = profs[s]
        out[fg] = (out[fg] - np.array([lv[b][0] for b in k])) / np.array([lv[b][1] for b in k])
        if targets is not None:
            tv = targets[s]
            out[fg] = (np.array([tv[b][0] for b in k])
                       + np.array([tv[b][1] for b in k]) * out[fg])
        return out

    overall = robust_level(np.concatenate(part.clean))
    site_subj: dict[str, list[str]] = {}
    for s, name, _c, _fg in variants:
        site_subj.setdefault(name, []).append(s)
    return Part(part.weight, part.tail, part.quantile, part.cap, part.cfg,
                clean=[ref(c, np.ones(c.size, bool), subs[j]) for j, c in enumerate(part.clean)],
                corrupted=[ref(c, r["foreground"], r["subject"])
                           for c, r in zip(part.corrupted, data["corrupted"], strict=True)],
                noise=[(c - overall[0]) / overall[1] for c in part.noise],
                sites={n: [ref(c, np.ones(c.size, bool), site_subj[n][i])
                           for i, c in enumerate(v)] for n, v in part.sites.items()})


def positioned_first(bundle, data, variants, noise, absfn, quantile: float) -> Part:
    """The feature compared with the other calibration subjects' clean slices at the same
    relative position FIRST, (a - median_bin) / spread_bin, and only then shifted by its
    series' capped ``quantile`` (cap: 1.25 x the site variants' largest need): the series
    level is then taken from position-flat values."""
    subs = [r["subject"] for r in data["clean"]]
    raw = {r["subject"]: absfn(r["components"])[r["foreground"]] for r in data["clean"]}

    def profile(s):
        v = np.concatenate([raw[o] for o in subs if o != s])
        k = np.concatenate([position_bin(relative_positions(np.ones(raw[o].size, bool)), BINS)
                            for o in subs if o != s])
        return [robust_level(v[k == b]) for b in range(BINS)]

    profs = {s: profile(s) for s in subs}
    overall = robust_level(np.concatenate(list(raw.values())))

    def z(a, fg, s):
        out = (np.array(a, float) - overall[0]) / overall[1]
        if s is not None:
            k = position_bin(relative_positions(fg)[fg], BINS)
            lv = profs[s]
            out[fg] = ((a[fg] - np.array([lv[b][0] for b in k]))
                       / np.array([lv[b][1] for b in k]))
        return out

    clean_z = [z(raw[s], np.ones(raw[s].size, bool), s) for s in subs]
    ref = float(np.median([np.quantile(c, quantile) for c in clean_z]))
    var_z = [(name, z(absfn(c)[fg], np.ones(int(fg.sum()), bool), s))
             for s, name, c, fg in variants]
    cap = 1.25 * max(abs(float(np.quantile(v, quantile)) - ref) for _n, v in var_z)

    def shifted(v, fg):
        if int(fg.sum()) < bundle.scoring.min_series_slices:
            return v
        return v - float(np.clip(np.quantile(v[fg], quantile) - ref, -cap, cap))

    sites: dict[str, list[np.ndarray]] = {}
    for name, v in var_z:
        sites.setdefault(name, []).append(shifted(v, np.ones(v.size, bool)))
    corrupted = [shifted(z(absfn(r["components"]), r["foreground"], r["subject"]),
                         r["foreground"]) for r in data["corrupted"]]
    noise_v = [shifted(z(absfn(c)[fg], np.ones(int(fg.sum()), bool), None),
                       np.ones(int(fg.sum()), bool)) for c, fg in noise]
    return Part(0.0, 0.0, quantile, cap, bundle.scoring,
                clean=[shifted(c, np.ones(c.size, bool)) for c in clean_z],
                corrupted=corrupted, noise=noise_v, sites=sites)


def lifted_part(bundle, data, variants, noise, absfn, quantile: float) -> Part:
    """custom_part with a one-sided series shift: a series whose level is below the normal
    reference is lifted (at most by the cap), one above it is left as it is (the part flags
    only too little detail; a block that raises the feature, spikes or a bias field, must not
    push the rest of its series down)."""
    part = custom_part(bundle, data, variants, noise, "s", absfn, quantile)
    cfg = part.cfg

    def final(comp, fg):
        a = absfn(comp)
        if int(fg.sum()) < cfg.min_series_slices:
            return a
        return a - float(np.clip(np.quantile(a[fg], quantile) - cfg.reference_median,
                                 -cfg.max_series_shift, 0.0))

    sites: dict[str, list[np.ndarray]] = {}
    for _s, name, comp, fg in variants:
        sites.setdefault(name, []).append(final(comp, fg)[fg])
    return Part(0.0, 0.0, quantile, part.cap, cfg,
                clean=[final(r["components"], r["foreground"])[r["foreground"]]
                       for r in data["clean"]],
                corrupted=[final(r["components"], r["foreground"]) for r in data["corrupted"]],
                noise=[final(c, fg)[fg] for c, fg in noise], sites=sites)


def trend_residuals(v: np.ndarray, fg: np.ndarray, degree: int, tukey_c: float = 4.685
                    ) -> np.ndarray:
    """The foreground values minus their series' own robust polynomial trend along the relative
    position (from Siegel's repeated-median line, 10 Tukey-biweight reweightings with tuning
    constant ``tukey_c``; 0: the line alone); NaN elsewhere."""
    out = np.full(v.size, np.nan)
    if int(fg.sum()) <= degree + 2:
        out[fg] = 0.0
        return out
    p = relative_positions(fg)[fg]
    y = np.asarray(v, float)[fg]
    basis = np.vander(p, degree + 1)
    # start: Siegel's repeated-median line (robust to half the slices departing)
    dp = p[None, :] - p[:, None]
    dy = y[None, :] - y[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.where(dp != 0, dy / dp, np.nan)
    slope = float(np.median(np.nanmedian(slopes, axis=1)))
    r = y - slope * p
    r = r - np.median(r)
    for _ in range(10 if tukey_c > 0 else 0):
        s = 1.4826 * float(np.median(np.abs(r - np.median(r)))) + 1e-9
        u = r / (tukey_c * s)
        w = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
        beta = np.linalg.lstsq(basis * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
        r = y - basis @ beta
    out[fg] = r
    return out


def trend_part(bundle, data, variants, noise, absfn, degree: int, top: float | None = 0.0,
               profile: str = "none", smooth: int = 1, tukey_c: float = 4.685,
               tukey_c_high: float | None = None,
               guard: tuple[dict, float] | None = None) -> Part:
    """The feature's residual from its series' own robust trend, in units of the clean
    calibration residuals' spread (median minus 5th percentile), capped above at ``top``
    (0: only less detail than the series' trend counts; None: both ways). A smooth trend along
    the series (another scanner's detail profile) is the series' own; a block that departs
    from it is not. ``profile``: "none" (one spread) or "spread" (the spread of the residuals
    of the other calibration subjects at the same relative position, 10 bins). ``smooth``: the
    residual averaged over that many neighbouring foreground slices. A straight line
    (``degree`` 1) is the node's :func:`node.model.scoring.series_trend_residuals`
    (``tukey_c``, ``tukey_c_high``); ``guard`` (scores, cut): it is fitted only to the slices
    whose score without the part (``scores``: ``scores`` or ``unreferenced`` of
    :func:`bench.explore_position.evaluate` for the shipped parts) is at least ``cut``."""
    subs = [r["subject"] for r in data["clean"]]

    def res(comp, fg, kind, key):
        if degree == 1:
            fit = None
            if guard is not None:
                scores, cut = guard
                ref = scores[kind][key]
                fit = np.zeros(fg.size, dtype=bool)
                fit[np.flatnonzero(fg)[(ref[fg] if ref.size == fg.size else ref) >= cut]] = True
            e = series_trend_residuals(absfn(comp), fg, tukey_c, tukey_c_high, fit)
            e[~fg] = np.nan
        else:
            e = trend_residuals(absfn(comp), fg, degree, tukey_c)
        if smooth > 1:
            v = e[fg]
            k = np.ones(smooth)
            e[fg] = np.convolve(v, k, "same") / np.convolve(np.ones(v.size), k, "same")
        return e

    clean_e = {r["subject"]: res(r["components"], r["foreground"], "clean",
                                 r["subject"])[r["foreground"]] for r in data["clean"]}
    overall = robust_level(np.concatenate(list(clean_e.values())))

    def prof(s):
        v = np.concatenate([clean_e[o] for o in subs if o != s])
        k = np.concatenate([position_bin(relative_positions(np.ones(clean_e[o].size, bool)),
                                         BINS) for o in subs if o != s])
        return [robust_level(v[k == b]) for b in range(BINS)]

    profs = {s: prof(s) for s in subs}

    def z(e, fg, s):
        out = np.zeros(e.size)
        if profile == "none" or s is None:
            out[fg] = (e[fg] - overall[0]) / overall[1]
        else:
            k = position_bin(relative_positions(fg)[fg], BINS)
            out[fg] = (e[fg] - overall[0]) / np.array([profs[s][b][1] for b in k])
        return out if top is None else np.minimum(out, top)

    sites: dict[str, list[np.ndarray]] = {}
    for s, name, comp, fg in variants:
        i = len(sites.setdefault(name, []))
        sites[name].append(z(res(comp, fg, "sites", (name, i)), fg, s)[fg])
    return Part(0.0, 0.0, 0.0, 0.0, bundle.scoring,
                clean=[z(res(r["components"], r["foreground"], "clean", r["subject"]),
                         r["foreground"], r["subject"])[r["foreground"]] for r in data["clean"]],
                corrupted=[z(res(r["components"], r["foreground"], "corrupted", k),
                             r["foreground"], r["subject"])
                           for k, r in enumerate(data["corrupted"])],
                noise=[z(res(c, fg, "noise", i), fg, None)[fg]
                       for i, (c, fg) in enumerate(noise)],
                sites=sites)


def guarded_part(bundle, data, variants, noise, absfn, scores: dict, cut: float,
                 tukey_c_high: float | None, positioned: bool) -> Part:
    """The node's detail step part (straight line, ``tukey_c`` 4.685, below 0 only) with the
    line fitted only to the slices the shipped parts' ``scores`` put at least at ``cut``:
    slices the other parts already find unusual do not tilt it."""
    return trend_part(bundle, data, variants, noise, absfn, 1, 0.0,
                      "spread" if positioned else "none", 1, 4.685, tukey_c_high,
                      (scores, cut))


def added(main: Part, part: Part, k: float) -> Part:
    """The main part plus k x (the main part's clean spread) x the other part's values."""
    beta = k * robust_level(np.concatenate(main.clean))[1]

    def plus(a, b):
        return [x + beta * y for x, y in zip(a, b, strict=True)]

    return Part(main.weight, main.tail, main.quantile, main.cap, main.cfg,
                clean=plus(main.clean, part.clean), corrupted=plus(main.corrupted, part.corrupted),
                noise=plus(main.noise, part.noise),
                sites={n: plus(v, part.sites[n]) for n, v in main.sites.items()})


def joint(detail: Part, step: Part, margin: float = 0.0) -> Part:
    """Both references at once: min(0, max(z_detail, z_step) + margin). A slice counts as
    having too little detail only when it has less than normal slices at its position
    (``detail``, session 5's part) AND less than its own series' trend (``step``, session 6's
    part; ``bench/explore-logs/joint-preregistration.md``). Each
    reference's failure (another scanner's detail profile; a raised block tilting the line)
    is then vetoed by the other. ``margin``: both must be below -margin to count at all, so
    that normal slices add less noise to the score."""

    def both(a, b):
        return [np.minimum(0.0, np.maximum(x, y) + margin) for x, y in zip(a, b, strict=True)]

    return Part(0.0, 0.0, 0.0, 0.0, step.cfg, clean=both(detail.clean, step.clean),
                corrupted=both(detail.corrupted, step.corrupted),
                noise=both(detail.noise, step.noise),
                sites={n: both(v, step.sites[n]) for n, v in detail.sites.items()})


def select(cands: dict[str, list[Part]], bundle, data, variants,
           base: dict[str, float] | None = None,
           base_elsewhere: dict[str, float] | None = None, tolerance: float = 0.05) -> str:
    """The selection rule, fixed before this grid was run: (1) pure noise flagged on every
    slice, every site variant at most 3% flagged, and at most 5% flagged outside the block in
    every corrupted series (``base``, the trend rounds: and no AUROC more than 0.05 below
    ``base``'s; ``base_elsewhere``, the asym round: and no condition's fraction flagged
    outside the block more than 2 percentage points above it); (2) the most AUROC targets met
    (0.95 moderate, 0.80 mild); (3) ties: the highest mean AUROC. ``tolerance``: the AUROC
    drop allowed against ``base`` (0.05; the joint round: 0.03). Returns the chosen name."""
    rows = []
    for name, parts in cands.items():
        res = evaluate(bundle, data, variants, parts)
        ok = (res["noise"] == 1.0 and max(res["sites"].values()) <= 0.03
              and max(res["elsewhere"].values()) <= 0.05
              and (base is None
                   or all(res["aurocs"][c] >= v - tolerance for c, v in base.items()))
              and (base_elsewhere is None
                   or all(res["elsewhere"][c] <= v + 0.02 for c, v in base_elsewhere.items())))
        rows.append((ok, res["met"], res["mean"], name, res))
        print(f"{name:34} ok={ok!s:5} met={res['met']:2d} mean={res['mean']:.3f} "
              f"sites<={max(res['sites'].values()):.3f} "
              f"elsewhere<={max(res['elsewhere'].values()):.3f} | "
              + " ".join(f"{v:.3f}" for v in res["aurocs"].values()), flush=True)
    best = max(rows, key=lambda r: r[:3])
    print(f"chosen: {best[3]} (ok={best[0]}, met={best[1]}, mean={best[2]:.3f})")
    return best[3]


def check(ref: dict, res: dict, name: str) -> None:
    """The check of a choice on calibration subjects no choice used, against the shipped
    score on the same subjects (``trend-preregistration.md``, ``joint-preregistration.md``):
    (a) pure noise flagged on every slice, every site variant at most 3%; (b) no condition's
    fraction flagged outside the block more than 2 pp above the shipped score's; (c) no AUROC
    more than 0.05 below it; (d) more targets met."""
    print("columns: " + " ".join(ref["aurocs"]))
    for label, r in (("shipped", ref), (name, res)):
        print(f"{label:34} met={r['met']:2d} mean={r['mean']:.3f} noise={r['noise']:.2f} "
              f"sites<={max(r['sites'].values()):.3f} | "
              + " ".join(f"{v:.3f}" for v in r["aurocs"].values()))
        print(f"{'':34} flagged in block: "
              + " ".join(f"{v:.2f}" for v in r["flagged"].values())
              + " | elsewhere: " + " ".join(f"{v:.3f}" for v in r["elsewhere"].values()))
    checks = {
        "(a) noise flagged on every slice, site variants <= 3%":
            res["noise"] == 1.0 and max(res["sites"].values()) <= 0.03,
        "(b) no 'elsewhere' more than 2 pp above the shipped score's":
            all(res["elsewhere"][c] <= v + 0.02 for c, v in ref["elsewhere"].items()),
        "(c) no AUROC more than 0.05 below the shipped score's":
            all(res["aurocs"][c] >= v - 0.05 for c, v in ref["aurocs"].items()),
        "(d) more targets met than the shipped score": res["met"] > ref["met"],
    }
    for text, ok in checks.items():
        print(f"{text}: {'yes' if ok else 'NO'}")
    print("check passed" if all(checks.values()) else "check FAILED")


def main() -> None:
    """``--round NAME`` (logs in ``bench/explore-logs/spectral-rounds.log`` in this order):
    fifth (a fifth part, plain and positioned), quantiles (lower shift quantiles), every (every
    part positioned), first (positioned before the series shift), lifted (one-sided shift),
    tight (maps at lower quantiles), ratio (scale-free features), onto (on the main part's
    profile), add / more (added to the main part), select (the grid and the rule)."""
    round_ = "fifth"
    if "--round" in sys.argv:
        i = sys.argv.index("--round")
        round_ = sys.argv[i + 1]
        del sys.argv[i : i + 2]
    if round_ not in ROUNDS:
        raise SystemExit(f"--round: one of {ROUNDS}")
    bundle, data, variants, noise, triple = inputs()
    triple = [make_part(bundle, data, variants, noise, w, t, q) for w, t, q in triple]
    shipped = [*triple, custom_part(bundle, data, variants, noise, "b",
                                    lambda c: c["bg1_ll"] / np.maximum(c["bg1_n"], 1), 0.75)]
    cands = {"shipped (triple + bg1 q0.75)": shipped}

    def lp(fn, q):  # one-sided shift, then positioned
        return positioned(lifted_part(bundle, data, variants, noise, fn, q), data, variants)

    plain = {k: column(k) for k in ("r_hf0.375", "r_hf0.4375", "r_hf0.5", "d_hf0.4375",
                                    "d_hf0.5", "x_hf0.4375", "x_hf0.5")}
    mids = {"r_hf0.4375-r_mid": column("r_hf0.4375", "r_mid"),
            "x_hf0.4375-x_mid": column("x_hf0.4375", "x_mid")}
    levels = {**{f"{k}-2x_level": column(k, "x_level", 2.0)
                 for k in ("d_hf0.5", "d_hf0.4375", "x_hf0.5")},
              **{f"{k}-x_level": column(k, "x_level") for k in ("d_hf0.5", "r_hf0.5")}}
    four = {k: plain[k] for k in ("r_hf0.4375", "r_hf0.5", "d_hf0.5", "x_hf0.5")}
    if round_ == "fifth":
        for name, fn in {**plain, **mids}.items():
            for q in (0.5, 0.75):
                part = custom_part(bundle, data, variants, noise, "s", fn, q)
                cands[f"+{name} q{q} cap{part.cap:.3f}"] = [*shipped, part]
                cands[f"+{name} q{q} positioned"] = [*shipped, positioned(part, data, variants)]
    elif round_ == "quantiles":
        for name, fn in {**{k: plain[k] for k in ("r_hf0.4375", "r_hf0.5", "x_hf0.5")},
                         **mids}.items():
            for q in (0.25, 0.375, 0.5):
                part = custom_part(bundle, data, variants, noise, "s", fn, q)
                cands[f"+{name} q{q} positioned"] = [*shipped, positioned(part, data, variants)]
    elif round_ == "every":
        shipped = [positioned(p, data, variants) for p in shipped]
        cands["shipped, every part positioned"] = shipped
        for name, fn in {**four, **mids}.items():
            for q in (0.5, 0.75):
                part = custom_part(bundle, data, variants, noise, "s", fn, q)
                cands[f"+{name} q{q} positioned"] = [*shipped, positioned(part, data, variants)]
    elif round_ == "first":
        for name, fn in {**four, **mids}.items():
            for q in (0.25, 0.5, 0.75):
                part = positioned_first(bundle, data, variants, noise, fn, q)
                cands[f"+{name} q{q} first cap{part.cap:.2f}"] = [*shipped, part]
    elif round_ in ("lifted", "ratio"):
        for name, fn in ({**four, **mids} if round_ == "lifted" else levels).items():
            for q in (0.5, 0.75):
                cands[f"+{name} q{q} lifted positioned"] = [*shipped, lp(fn, q)]
    elif round_ == "tight":
        for name, fn in {**{k: plain[k] for k in ("r_hf0.4375", "r_hf0.5", "d_hf0.5")},
                         **mids}.items():
            for q in (0.5, 0.75):
                part = lp(fn, q)
                for low in (0.01, 0.005, 0.002):
                    p2 = Part(**{k: getattr(part, k) for k in part.__dataclass_fields__})
                    p2.match_low = low  # type: ignore[attr-defined]
                    cands[f"+{name} q{q} lifted pos. map@{low}"] = [*shipped, p2]
    elif round_ == "onto":
        for name, fn in {"r_hf0.5": plain["r_hf0.5"], "d_hf0.5": plain["d_hf0.5"],
                         **levels}.items():
            for q in (0.5, 0.75):
                part = lifted_part(bundle, data, variants, noise, fn, q)
                cands[f"+{name} q{q} lifted onto main"] = [
                    *shipped, positioned(part, data, variants, onto=shipped[0])]
    elif round_ in ("add", "more"):
        feats = {"r_hf0.5": plain["r_hf0.5"], **levels}
        ks = (0.25, 0.5, 1.0)
        if round_ == "more":
            feats = {k: feats[k] for k in ("r_hf0.5", "d_hf0.5-2x_level", "r_hf0.5-x_level")}
            ks = (1.0, 1.5, 2.0, 3.0)
        for name, fn in feats.items():
            for q in (0.5, 0.75):
                part = lp(fn, q)
                for k in ks:
                    cands[f"main + {k} {name} q{q} l.p."] = [
                        added(shipped[0], part, k), *shipped[1:]]
    elif round_ == "trend":
        for deg in (1, 2):
            for top in (0.0, None):
                part = trend_part(bundle, data, variants, noise, plain["r_hf0.5"], deg, top)
                cands[f"+trend{deg} top{top} fifth"] = [*shipped, part]
                for k in (1.0, 2.0, 3.0):
                    cands[f"main + {k} trend{deg} top{top}"] = [added(shipped[0], part, k),
                                                               *shipped[1:]]
    elif round_ == "trend-select":
        base = evaluate(bundle, data, variants, shipped)["aurocs"]
        for band in ("r_hf0.4375", "r_hf0.5"):
            for profile in ("none", "spread"):
                for smooth in (1, 3, 5):
                    for c in (4.685, 0.0):
                        part = trend_part(bundle, data, variants, noise, column(band), 1, 0.0,
                                          profile, smooth, c)
                        cands[f"+{band} {profile} sm{smooth} c{c}"] = [*shipped, part]
        select(cands, bundle, data, variants, base)
        return
    elif round_ == "guarded":
        ref = evaluate(bundle, data, variants, shipped)
        print(f"{'shipped':34} met={ref['met']:2d} mean={ref['mean']:.3f} | "
              + " ".join(f"{v:.3f}" for v in ref["aurocs"].values()))
        print(f"{'':34} elsewhere: " + " ".join(f"{v:.3f}" for v in ref["elsewhere"].values()))
        for key in ("scores", "unreferenced"):  # the guard referenced or not
            for q in (0.01, 0.02, 0.05, 0.1, 0.2):
                cut = float(np.quantile(ref[key]["all_clean"], q))
                for c_high in (None, 2.5):
                    for by_position in (False, True):
                        part = guarded_part(bundle, data, variants, noise, plain["r_hf0.5"],
                                            ref[key], cut, c_high, by_position)
                        res = evaluate(bundle, data, variants, [*shipped, part])
                        d = max(res["elsewhere"][c] - v for c, v in ref["elsewhere"].items())
                        print(f"{key[:5]} cut q{q} high{c_high} pos{by_position!s:5} "
                              f"met={res['met']:2d} mean={res['mean']:.3f} "
                              f"sites<={max(res['sites'].values()):.3f} "
                              f"noise={res['noise']:.2f} d_else<={d:+.3f} | "
                              + " ".join(f"{v:.3f}" for v in res["aurocs"].values()))
                        print(f"{'':34} elsewhere: "
                              + " ".join(f"{v:.3f}" for v in res["elsewhere"].values()),
                              flush=True)
        return
    elif round_ == "guarded-check":
        # The settings chosen on the 8 selection subjects (guarded.log, the rule of
        # trend-preregistration.md), re-fitted and judged on another set of calibration
        # subjects (--records / --extras of those), against the shipped score there.
        ref = evaluate(bundle, data, variants, shipped)
        cut = float(np.quantile(ref["unreferenced"]["all_clean"], 0.02))
        part = guarded_part(bundle, data, variants, noise, plain["r_hf0.5"],
                            ref["unreferenced"], cut, None, True)
        res = evaluate(bundle, data, variants, [*shipped, part])
        check(ref, res, "guarded q0.02 symmetric positioned")
        return
    elif round_ == "asym-select":
        ref = evaluate(bundle, data, variants, shipped)
        for c_high in (1.0, 1.5, 2.5):
            for c in (4.685, 3.0):
                for profile in ("none", "spread"):
                    part = trend_part(bundle, data, variants, noise, plain["r_hf0.5"], 1, 0.0,
                                      profile, 1, c, c_high)
                    cands[f"+r_hf0.5 {profile} c{c} high{c_high}"] = [*shipped, part]
        select(cands, bundle, data, variants, ref["aurocs"], ref["elsewhere"])
        return
    elif round_ in ("joint", "joint-select", "joint-check"):
        # joint: the exploration (JOINT_* grids); joint-select: the grid and rule of
        # bench/explore-logs/joint-preregistration.md; joint-check: its choice (JOINT_CHOICE,
        # the printed name) on other calibration subjects (--records/--extras of those).
        ref = evaluate(bundle, data, variants, shipped)
        cut = float(np.quantile(ref["unreferenced"]["all_clean"], 0.02))
        fn = plain["r_hf0.5"]
        steps = {"step": trend_part(bundle, data, variants, noise, fn, 1, 0.0, "spread"),
                 "guarded step": guarded_part(bundle, data, variants, noise, fn,
                                              ref["unreferenced"], cut, None, True)}
        grid = {"margins": "0", "ks": "0.5,1,1.5,2,3", "qs": "0.5,0.75"}
        if round_ != "joint":
            grid = {"margins": "0,0.5,1", "ks": "1,1.5,2,3,4,6", "qs": "0.5,0.75"}
        margins, ks, qs = ([float(v) for v in os.environ.get(f"JOINT_{k.upper()}", d).split(",")]
                           for k, d in grid.items())
        for q in qs:
            d = lp(fn, q)
            for sname, st in steps.items():
                for m in margins:
                    j = joint(d, st, m)
                    cands[f"joint q{q} {sname} m{m} fifth"] = [*shipped, j]
                    for k in ks:
                        cands[f"main + {k} joint q{q} {sname} m{m}"] = [
                            added(shipped[0], j, k), *shipped[1:]]
        if round_ == "joint":
            select(cands, bundle, data, variants, ref["aurocs"], ref["elsewhere"])
        elif round_ == "joint-select":
            select(cands, bundle, data, variants, ref["aurocs"], ref["elsewhere"], 0.03)
        else:
            name = os.environ["JOINT_CHOICE"]
            check(ref, evaluate(bundle, data, variants, cands[name]), name)
        return
    else:  # select
        for band in ("r_hf0.4375", "r_hf0.5"):
            for q in (0.5, 0.75):
                part = lp(plain[band], q)
                for k in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
                    cands[f"main + {k} {band} q{q}"] = [added(shipped[0], part, k), *shipped[1:]]
        select(cands, bundle, data, variants)
        return
    conds = None
    for name, parts in cands.items():
        res = evaluate(bundle, data, variants, parts)
        if conds is None:
            conds = list(res["aurocs"])
            print("columns: " + " ".join(conds))
        sites = " ".join(f"{k[:5]}{v:.3f}" for k, v in res["sites"].items())
        print(f"{name:34} met={res['met']:2d} mean={res['mean']:.3f} noise={res['noise']:.2f} "
              f"[{sites}] | " + " ".join(f"{res['aurocs'][c]:.3f}" for c in conds))
        print(f"{'':34} flagged in block: "
              + " ".join(f"{res['flagged'][c]:.2f}" for c in conds)
              + " | elsewhere: " + " ".join(f"{res['elsewhere'][c]:.3f}" for c in conds),
              flush=True)


if __name__ == "__main__":
    main()
