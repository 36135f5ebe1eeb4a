"""Exploration (background part): does one extra likelihood component help the shipped triple?

Reads select_score's cached records of the calibration subjects and the extras of
``bench/explore_extras.py`` and judges, exactly as ``bench/select_score.py`` does (series shift
capped at 1.25 x the site variants' largest need, mapped parts, minimum, 1% threshold of the
clean calibration slices, pure noise flagged on every slice, site variants <= 3%), position-
matched AUROC per artifact/severity:
- the shipped triple (w0.5 t16 q0.75 | w0.75 t4 q0.5 | w1.0 t0 q0.9);
- A: the triple plus a fourth part, the extra component alone (with its own shift);
- B: the triple with the main part's absolute score plus beta * component.

    .venv/bin/python bench/explore_judge.py --model /tmp/runs3/r9 \
        --extras /tmp/helper-model/extras.pkl
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.select_score import Part, judge, make_part  # noqa: E402
from node.model.bundle import load_bundle  # noqa: E402
from node.model.evaluate import auroc  # noqa: E402
from node.model.scoring import ScoreConfig, absolute_score  # noqa: E402

SHIPPED = ((0.5, 16.0, 0.75), (0.75, 4.0, 0.5), (1.0, 0.0, 0.9))


def merge(records_path: Path, *extras_paths: Path):
    """select_score's cached records with the components of each extras file merged in
    (checked to be the same stacks, in the same order)."""
    with records_path.open("rb") as fh:
        data, variant_comps = pickle.load(fh)
    noise = None
    for extras_path in extras_paths:
        with extras_path.open("rb") as fh:
            ex = pickle.load(fh)
        for kind in ("clean", "corrupted"):
            assert len(data[kind]) == len(ex["data"][kind])
            for r, e in zip(data[kind], ex["data"][kind], strict=True):
                assert r["subject"] == e["subject"] and r.get("artifact") == e.get("artifact")
                assert r.get("severity") == e.get("severity")
                assert np.array_equal(r["foreground"], e["foreground"])
                if "block" in r:
                    assert np.array_equal(r["block"], e["block"])
                r["components"].update({k: v for k, v in e["components"].items()
                                        if not k.startswith("qc_")})
        assert len(variant_comps) == len(ex["variants"])
        for (s, n, comp, fg), (s2, n2, e, fg2) in zip(variant_comps, ex["variants"],
                                                       strict=True):
            assert (s, n) == (s2, n2) and np.array_equal(fg, fg2)
            comp.update(e)
        if noise is None:
            noise = ex["noise"]
        else:
            for (comp, fg), (e, fg2) in zip(noise, ex["noise"], strict=True):
                assert np.array_equal(fg, fg2)
                comp.update(e)
    return data, variant_comps, noise


def triple_of(calibrated: Path | None) -> tuple[tuple[float, float, float], ...]:
    """(complexity weight, tail weight, shift quantile) of each likelihood part of a calibrated
    bundle (main part first); ``SHIPPED`` without one. The caps are not taken: each judge sets
    them from its own site variants, as select_score does."""
    if calibrated is None:
        return SHIPPED
    s = load_bundle(calibrated).scoring
    return ((s.complexity_weight, s.tail_weight, s.shift_quantile),
            *((a.complexity_weight, a.tail_weight, a.shift_quantile) for a in s.alternatives))


def inputs():
    """``--model BUNDLE --extras PKL [PKL...] [--records NAME] [--reference CALIBRATED]`` of
    every exploration judge: the bundle, the merged records (calibration data, site variants,
    noise series; ``--records``: another cache file of ``select_score.load_records`` in the
    model folder) and the likelihood parts of the reference score (those of ``--reference``, a
    bundle calibrated from the same weights; the session-2 triple without it)."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--extras", type=Path, nargs="+", required=True)
    p.add_argument("--records", default="selection-records.pkl")
    p.add_argument("--reference", type=Path, default=None)
    a = p.parse_args()
    bundle = load_bundle(a.model)
    return (bundle, *merge(a.model / a.records, *a.extras), triple_of(a.reference))


def custom_part(bundle, data, variant_comps, noise_comps, label: str,
                absfn: Callable[[dict], np.ndarray], quantile: float) -> Part:
    """make_part with an arbitrary absolute score (higher = more normal)."""
    from node.model.scoring import series_shift

    meds: dict[str, list[float]] = {}
    for _s, name, comp, fg in variant_comps:
        meds.setdefault(name, []).append(float(np.quantile(absfn(comp)[fg], quantile)))
    ref = float(np.median(meds["original"]))
    cap = 1.25 * max(abs(m - ref) for v in meds.values() for m in v)
    cfg = ScoreConfig.from_dict({**bundle.scoring.to_dict(), "alternatives": (),
                                 "series_relative": True, "max_series_shift": cap,
                                 "shift_quantile": quantile, "reference_median": ref})

    def final(comp, fg):
        a = absfn(comp)
        return a - series_shift(a, fg, cfg)

    sites: dict[str, list[np.ndarray]] = {}
    for _s, name, comp, fg in variant_comps:
        sites.setdefault(name, []).append(final(comp, fg)[fg])
    p = Part(0.0, 0.0, quantile, cap, cfg,
             clean=[final(r["components"], r["foreground"])[r["foreground"]]
                    for r in data["clean"]],
             corrupted=[final(r["components"], r["foreground"]) for r in data["corrupted"]],
             noise=[final(c, fg)[fg] for c, fg in noise_comps], sites=sites)
    p.label = label  # type: ignore[attr-defined]
    return p


def raw_auroc(data, fn) -> dict[str, float]:
    """Position-matched AUROC of a raw per-slice statistic (higher = normal), no shift."""
    clean = {r["subject"]: fn(r["components"]) for r in data["clean"]}
    out: dict[str, tuple[list, list]] = {}
    for r in data["corrupted"]:
        s = fn(r["components"])
        keep = r["block"] & r["foreground"]
        a, n = out.setdefault(f"{r['artifact']}/{r['severity']}", ([], []))
        a.append(s[keep])
        n.append(clean[r["subject"]][keep])
    return {c: auroc(np.concatenate(n), np.concatenate(a)) for c, (a, n) in out.items()}


def main() -> None:
    bundle, data, variants, noise, triple = inputs()
    pixels, clip = bundle.modelled_values, bundle.preprocess.clip_max

    stats: dict[str, Callable[[dict], np.ndarray]] = {
        "importance": lambda c: c["log_likelihood"],
        "tail164(q)": lambda c: -c["tail"],
        "pm_ll": lambda c: c["pm_ll"],
        "bg_ll": lambda c: c["bg_ll"],
        "bg_ll/n": lambda c: c["bg_ll"] / np.maximum(c["bg_n"], 1),
        "bg_rr": lambda c: -c["bg_rr"],
        "bg_tail": lambda c: -c["bg_tail"],
        "band_ll": lambda c: c["band_ll"],
        "band_ll/n": lambda c: c["band_ll"] / np.maximum(c["band_n"], 1),
        "band_rr": lambda c: -c["band_rr"],
        "pool8": lambda c: -c["pool8"],
        "pool16": lambda c: -c["pool16"],
        **{f"pm_tail{k}": (lambda k: lambda c: -c[f"pm_tail{k}"])(k)  # noqa: B023 (bound)
           for k in (41, 82, 164, 328, 820)},
    }
    conds = None
    print("raw position-matched AUROC (no shift, no combination):")
    for name, fn in stats.items():
        r = raw_auroc(data, fn)
        if conds is None:
            conds = list(r)
            print(f"{'stat':12} " + " ".join(f"{c[:13]:>13}" for c in conds))
        print(f"{name:12} " + " ".join(f"{r[c]:13.3f}" for c in conds))

    shipped = [make_part(bundle, data, variants, noise, w, t, q) for w, t, q in triple]

    def show(tag: str, res) -> None:
        ok, met, mean = res["key"]
        print(f"{tag:34} ok={ok!s:5} met={met:2d} mean={mean:.3f} "
              f"site={max(res['sites'].values()):.3f} noise={res['noise']:.2f} "
              f"motion@thr={res['motion_flagged']:.2f} | "
              + " ".join(f"{res['aurocs'][c]:.3f}" for c in conds))

    print("\njudged as select_score (AUROC columns in the order above):")
    base = judge(data, shipped)
    show("shipped triple", base)
    results = {"shipped": base}
    # A: a fourth part
    for name in ("bg_ll", "bg_ll/n", "bg_rr", "bg_tail", "band_ll", "band_rr", "pool8",
                 "pool16", "pm_tail41", "pm_tail820"):
        for q in (0.5, 0.75, 0.9):
            part = custom_part(bundle, data, variants, noise, name, stats[name], q)
            res = judge(data, [*shipped, part])
            results[f"A {name} q{q}"] = res
            show(f"A +{name} q{q} cap{part.cap:.0f}", res)
    # B: the main part plus beta * component (background / band counted 1 + beta times)
    main_cfg = shipped[0].cfg
    for name, key in (("bg_ll", "bg_ll"), ("band_ll", "band_ll")):
        for beta in (1.0, 2.0, 4.0, 8.0, 16.0):
            def absfn(c, key=key, beta=beta):
                return absolute_score(c, main_cfg, pixels, clip) + beta * c[key]
            part = custom_part(bundle, data, variants, noise, name, absfn, 0.75)
            res = judge(data, [part, *shipped[1:]])
            results[f"B {name} b{beta}"] = res
            show(f"B main+{beta}*{name} cap{part.cap:.0f}", res)
    with open("/tmp/helper-model/judge.pkl", "wb") as fh:
        pickle.dump({k: {kk: v[kk] for kk in ("key", "aurocs", "noise", "sites",
                                                "motion_flagged")}
                     for k, v in results.items()}, fh)


if __name__ == "__main__":
    main()
