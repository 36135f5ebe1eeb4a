"""Exploration (background part): per-subject position-matched AUROC (unreferenced, as
select_score's judge) of the shipped triple and the background candidate, to see whether the
gain holds across the 8 calibration subjects or comes from a few.

    .venv/bin/python bench/explore_persubject.py --model /tmp/runs3/r9 \
        --extras /tmp/helper-model/extras2.pkl
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.explore_judge import custom_part, inputs  # noqa: E402
from bench.select_score import make_part  # noqa: E402
from node.model.evaluate import auroc  # noqa: E402
from node.model.scoring import match_scales  # noqa: E402


def main() -> None:
    bundle, data, variants, noise, triple = inputs()
    shipped = [make_part(bundle, data, variants, noise, w, t, q) for w, t, q in triple]
    bg = custom_part(bundle, data, variants, noise, "b",
                     lambda c: c["bg1_ll"] / np.maximum(c["bg1_n"], 1), 0.75)
    conds = ["motion/mild", "motion/moderate", "ghosting/mild", "ghosting/moderate",
             "blur/moderate", "bias/mild"]
    print("subject  " + " ".join(f"{c:>24}" for c in conds) + "   (shipped -> +bg1 q0.75)")
    per: dict[str, dict[str, list[str]]] = {}
    for _tag, parts in (("shipped", shipped), ("bg", [*shipped, bg])):
        main = parts[0]
        maps = [(1.0, 0.0)] + [match_scales(np.concatenate(main.clean),
                                            np.concatenate(pp.clean)) for pp in parts[1:]]

        def comb(arrs, maps=maps):
            return np.min([o + g * x for (g, o), x in zip(maps, arrs, strict=True)], axis=0)

        clean = {}
        for i, r in enumerate(data["clean"]):
            full = np.full(len(r["foreground"]), np.nan)
            full[r["foreground"]] = comb([pp.clean[i] for pp in parts])
            clean[r["subject"]] = full
        for i, r in enumerate(data["corrupted"]):
            c = f"{r['artifact']}/{r['severity']}"
            if c not in conds:
                continue
            s = comb([pp.corrupted[i] for pp in parts])
            ref = clean[r["subject"]]
            keep = r["block"] & ~np.isnan(ref)
            per.setdefault(r["subject"], {}).setdefault(c, []).append(
                f"{auroc(ref[keep], s[keep]):.2f}")
    for subj, d in per.items():
        print(f"{subj:8} " + " ".join(f"{' -> '.join(d[c]):>24}" for c in conds))


if __name__ == "__main__":
    main()
