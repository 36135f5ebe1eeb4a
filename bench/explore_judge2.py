"""Exploration, second round (background part): the two most promising components of
``bench/explore_judge.py`` in more forms, with the sanity figures per site variant and a
leave-one-subject-out clean false-positive rate (threshold: 1% quantile of the other 7
calibration subjects' clean slices).

Component forms (all from the decoder's Gaussian at z = posterior mean, ``explore_extras.py``):
- BG: mean per-pixel log-likelihood outside the decoder-mean head mask dilated r px
  (``bg{r}_ll / bg{r}_n``), as a fourth part of the minimum (own capped series shift);
- TAIL-k: the main part with its tail over the k largest 0.5 r^2 instead of 164 (a tail
  fraction other than 1%), or a fourth part ``corrected log-likelihood - t * sum of the k
  largest 0.5 r^2`` / the tail sum alone.

    .venv/bin/python bench/explore_judge2.py --model /tmp/runs3/r9 \
        --extras /tmp/helper-model/extras2.pkl
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.explore_judge import custom_part, inputs  # noqa: E402
from bench.select_score import judge, make_part  # noqa: E402
from node.model.scoring import match_scales  # noqa: E402


def loso_fpr(data, parts) -> float:
    """Clean slices flagged when each subject's threshold comes from the other subjects."""
    main = parts[0]
    maps = [(1.0, 0.0)] + [match_scales(np.concatenate(main.clean), np.concatenate(p.clean))
                           for p in parts[1:]]
    clean = [np.min([off + g * p.clean[i] for (g, off), p in zip(maps, parts, strict=True)],
                    axis=0) for i in range(len(main.clean))]
    subs = [r["subject"] for r in data["clean"]]
    flagged, n = 0, 0
    for i, s in enumerate(subs):
        others = np.concatenate([c for j, c in enumerate(clean) if subs[j] != s])
        thr = np.quantile(others, 0.01)
        flagged += int((clean[i] < thr).sum())
        n += clean[i].size
    return flagged / n


def main() -> None:
    bundle, data, variants, noise, triple = inputs()
    pixels, clip = bundle.modelled_values, bundle.preprocess.clip_max
    delta = clip / 255.0
    conds = [f"{r['artifact']}/{r['severity']}" for r in data["corrupted"][:12]]
    print("columns: " + " ".join(c for c in conds))
    shipped = [make_part(bundle, data, variants, noise, w, t, q) for w, t, q in triple]
    out = {}

    def show(tag, parts):
        res = judge(data, parts)
        ok, met, mean = res["key"]
        fpr = loso_fpr(data, parts)
        sites = " ".join(f"{k[:5]}{v:.3f}" for k, v in res["sites"].items())
        print(f"{tag:40} ok={ok!s:5} met={met:2d} mean={mean:.3f} noise={res['noise']:.2f} "
              f"loso_fpr={fpr:.4f} [{sites}] mot@thr={res['motion_flagged']:.2f} | "
              + " ".join(f"{res['aurocs'][c]:.3f}" for c in conds), flush=True)
        out[tag] = {**{k: res[k] for k in ("key", "aurocs", "noise", "sites",
                                           "motion_flagged")}, "loso_fpr": fpr}

    show("shipped triple", shipped)
    for r in ("", "1", "6", "10"):
        for q in (0.25, 0.5, 0.75):
            fn = (lambda r: lambda c: c[f"bg{r}_ll"] / np.maximum(c[f"bg{r}_n"], 1))(r)  # noqa: B023
            part = custom_part(bundle, data, variants, noise, "bg", fn, q)
            show(f"A +bg{r or 3}_ll/n q{q} cap{part.cap:.3f}", [*shipped, part])

    def corrected(c, w):
        return c["log_likelihood"] + w * (pixels * math.log(delta) + c["png_nats"])

    # tail fraction in the main part (replaces the 1% tail over q samples)
    for k in (328, 820, 1638):
        for t in (2.0, 4.0, 8.0, 16.0):
            def fn(c, k=k, t=t):
                return corrected(c, 0.5) - t * k * c[f"pm_tail{k}"]
            part = custom_part(bundle, data, variants, noise, "main", fn, 0.75)
            show(f"main tail k{k} t{t}", [part, *shipped[1:]])
    # a fourth part: corrected + tail-k, or the tail sum alone
    for k in (820, 1638, 3277):
        for w, t in ((0.5, 4.0), (0.5, 16.0), (None, 1.0)):
            def fn(c, k=k, t=t, w=w):
                base = 0.0 if w is None else corrected(c, w)
                return base - t * k * c[f"pm_tail{k}"]
            for q in (0.5, 0.75):
                part = custom_part(bundle, data, variants, noise, "t", fn, q)
                show(f"A +{'tail' if w is None else f'w{w} t{t}'} k{k} q{q}", [*shipped, part])
    with open("/tmp/helper-model/judge2.pkl", "wb") as fh:
        pickle.dump(out, fh)


if __name__ == "__main__":
    main()
