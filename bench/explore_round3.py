"""Exploration, third round (background part): background components meant to be less sensitive to
the noise floor, and the best background part together with a wider tail, each judged three
ways: as select_score (unreferenced), with the LOSO position reference (explore_position), and
on the extra site variants of explore_stress (its cached scores).
- ``bg_tail820``: the 820 largest 0.5 r^2 outside the head (dilated 3 px), as a fourth part;
- ``bg_contrast``: that minus the mean 0.5 r^2 outside the head (a uniform change of the noise
  floor moves both), as a fourth part;
- ``bg1 + tail1638``: background part (bg1_ll/n, q0.75) and the top-10% tail sum (q0.75),
  fifth and fourth parts (two changes at once, shown for reference).

    .venv/bin/python bench/explore_round3.py --model /tmp/runs3/r9 \
        --extras /tmp/helper-model/extras2.pkl
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.explore_judge import SHIPPED, custom_part, merge  # noqa: E402
from bench.explore_judge2 import loso_fpr  # noqa: E402
from bench.explore_position import evaluate  # noqa: E402
from bench.explore_stress import stress_flags  # noqa: E402
from bench.select_score import judge, make_part  # noqa: E402
from node.model.bundle import load_bundle  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--extras", type=Path, required=True)
    p.add_argument("--stress", type=Path, default=Path("/tmp/helper-model/stress.pkl"))
    a = p.parse_args()
    bundle = load_bundle(a.model)
    data, variants, noise = merge(a.model / "selection-records.pkl", a.extras)
    stress = pickle.loads(a.stress.read_bytes())
    shipped = [make_part(bundle, data, variants, noise, w, t, q) for w, t, q in SHIPPED]

    def part(fn, q):
        return custom_part(bundle, data, variants, noise, "x", fn, q)

    def bg1(c):
        return c["bg1_ll"] / np.maximum(c["bg1_n"], 1)

    def bgt(c):
        return -c["bg_tail820"]

    def bgc(c):
        return -(c["bg_tail820"] - c["bg_rr"] / np.maximum(c["bg_n"], 1))

    def t1638(c):
        return -1638 * c["pm_tail1638"]

    n3 = [None, None, None]
    cands = {"shipped triple": (shipped, n3)}
    for q in (0.5, 0.75):
        cands[f"+bg_tail820 q{q}"] = ([*shipped, part(bgt, q)], [*n3, bgt])
        cands[f"+bg_contrast q{q}"] = ([*shipped, part(bgc, q)], [*n3, bgc])
    cands["+bg1 q0.75 +tail1638 q0.75"] = ([*shipped, part(bg1, 0.75), part(t1638, 0.75)],
                                          [*n3, bg1, t1638])
    conds = [f"{r['artifact']}/{r['severity']}" for r in data["corrupted"][:12]]
    print("columns: " + " ".join(conds))
    for name, (parts, fns) in cands.items():
        res = judge(data, parts)
        ok, met, mean = res["key"]
        print(f"{name:28} UNREF ok={ok!s:5} met={met:2d} mean={mean:.3f} noise={res['noise']:.2f}"
              f" loso_fpr={loso_fpr(data, parts):.4f} site_max={max(res['sites'].values()):.3f}"
              " | " + " ".join(f"{res['aurocs'][c]:.3f}" for c in conds))
        pr = evaluate(bundle, data, variants, parts)
        print(f"{'':28} POSREF met={pr['met']:2d} mean={pr['mean']:.3f} noise={pr['noise']:.2f}"
              f" site_max={max(pr['sites'].values()):.3f} | "
              + " ".join(f"{pr['aurocs'][c]:.3f}" for c in conds))
        print(f"{'':28} blocks flagged (posref): " + " ".join(
            f"{c.split('/')[0][:5]}/{c.split('/')[1][:3]} {pr['flagged'][c]:.2f}" for c in conds))
        sf = stress_flags(bundle, parts, fns, stress)
        print(f"{'':28} STRESS " + " ".join(f"{k} {v:.3f}" for k, v in sf.items()), flush=True)


if __name__ == "__main__":
    main()
