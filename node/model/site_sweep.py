"""The site sweep of ``vaenode evaluate --sites``: specificity and sensitivity per simulated site.

A department judges the node on its own scanners' normal series, not on the training
scanner's. For each held-out subject and each simulated site (:mod:`node.model.sites`: the
variations between scanners that are not artifacts, each at two strengths), the subject's
volume is rendered as that site makes it and its axial stack scored as the worker scores a
series:

- clean: the fraction of its foreground slices flagged at the bundle's threshold (the false
  positive rate a department with that scanner would see out of the box);
- with an artifact: the volume is corrupted in 3D (:mod:`node.model.artifacts`) in the order
  a scanner gives (:func:`with_artifact`: first, then rendered by the site, for a change in
  the acquisition or after it, such as the receiver's noise, which a motion must not average
  away; after the site's rendering for a change of the tissue's signal, such as another
  sequence's contrast, which moves with the head), and a block of ``block_fraction`` of the
  foreground slices is spliced into the clean rendering; position-matched AUROC of the
  block's slices against the same positions of the clean rendering, and the fraction of the
  block flagged at the threshold.

The unchanged volume is the first row (``training scanner``), so each site reads against it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from node.model.artifacts import corrupt_volume, splice_block
from node.model.bundle import Bundle
from node.model.data import Volume, plane_slices, slice_spacing
from node.model.evaluate import auroc
from node.model.sites import SITES, STRENGTHS, render, site_by_name

#: The label of the unchanged volumes in the sweep's tables.
UNCHANGED = "training scanner"


@dataclass(frozen=True)
class SweepConfig:
    """What the sweep renders and scores."""

    artifacts: Sequence[str] = ("motion", "ghosting", "spike", "noise", "blur", "bias")
    severity: str = "moderate"
    block_fraction: float = 0.3
    seed: int = 0
    sites: Sequence[str] = tuple(s.name for s in SITES)


def _axial(bundle: Bundle, vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """(final scores, foreground) of a volume's axial stack, scored as the worker scores it."""
    images, spacing = plane_slices(vol, "axial")
    s = bundle.score_slices(list(images), [spacing] * len(images), plane="axial",
                            slice_spacing_mm=slice_spacing(vol, "axial"))
    return s.log_likelihood, s.foreground


def with_artifact(vol: Volume, clean: Volume, signal: bool, make: Callable[[Volume], Volume],
                  artifact: str, severity: str, seed: int,
                  corrupted: np.ndarray | None = None) -> Volume:
    """``vol`` at a site (``clean`` is its rendering by ``make``) with ``artifact``, in the
    order a scanner gives (also the learning bench's, ``bench/station_learning.py``).

    A site that changes the tissue's signal (``signal``: :attr:`node.model.sites.Site.signal`)
    is corrupted after its rendering; any other is rendered from the corrupted volume
    (``corrupted``, the volume with the artifact at ``seed``, when the caller already has it).
    """
    if signal:
        bad = corrupt_volume(clean.data, clean.spacing, artifact, severity, seed)
        return Volume(vol.subject, bad.astype(np.float32), clean.spacing, clean.source)
    if corrupted is None:
        corrupted = corrupt_volume(vol.data, vol.spacing, artifact, severity, seed)
    return make(Volume(vol.subject, corrupted, vol.spacing, vol.source))


def _variants(vol: Volume, cfg: SweepConfig, seed: int) -> list[tuple[str, str, Callable]]:
    """(site, strength, render function) for the unchanged volume and every site variant."""
    out: list[tuple[str, str, Callable]] = [(UNCHANGED, "", lambda v: v)]
    for name in cfg.sites:
        for strength in STRENGTHS:
            out.append((name, strength,
                        lambda v, n=name, s=strength: render(v, n, s, seed=seed)))
    return out


def sweep(bundle: Bundle, volumes: Sequence[Volume], cfg: SweepConfig,
          report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score every subject under every site variant, clean and with each artifact block.

    Returns ``rows``: per (site, strength): clean slices and the fraction flagged, and per
    artifact the position-matched AUROC and the fraction of the block flagged.
    """
    say = report or (lambda _msg: None)
    thr = bundle.threshold
    rng = np.random.default_rng(cfg.seed)
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    for si, vol in enumerate(volumes):
        say(f"site sweep: subject {vol.subject} ({si + 1}/{len(volumes)})")
        seeds = {a: int(rng.integers(0, 2**31 - 1)) for a in cfg.artifacts}
        corrupted = {a: corrupt_volume(vol.data, vol.spacing, a, cfg.severity, seeds[a])
                     for a in cfg.artifacts}
        for site, strength, make in _variants(vol, cfg, cfg.seed + si):
            signal = site != UNCHANGED and site_by_name(site).signal
            clean = make(vol)
            score, fg = _axial(bundle, clean)
            row = acc.setdefault((site, strength), {"clean": [], "art": {}})
            row["clean"].append(score[fg] < thr)
            fg_idx = np.flatnonzero(fg)
            if fg_idx.size < 4:
                continue
            length = max(1, round(cfg.block_fraction * fg_idx.size))
            start = int(fg_idx[0] + rng.integers(0, fg_idx.size - length + 1))
            for artifact, bad in corrupted.items():
                rendered = with_artifact(vol, clean, signal, make, artifact, cfg.severity,
                                         seeds[artifact], corrupted=bad)
                spliced = splice_block(clean.data, rendered.data, start, start + length)
                s_bad, _ = _axial(bundle, Volume(vol.subject, spliced, clean.spacing, ""))
                where = slice(start, start + length)
                entry = row["art"].setdefault(artifact, {"block": [], "matched": []})
                entry["block"].append(s_bad[where])
                entry["matched"].append(score[where])
    rows = []
    for (site, strength), row in acc.items():
        flags = np.concatenate(row["clean"]) if row["clean"] else np.zeros(0, bool)
        out: dict[str, Any] = {"site": site, "strength": strength, "clean_slices": int(flags.size),
                               "flagged": float(flags.mean()) if flags.size else float("nan"),
                               "artifacts": {}}
        for artifact, entry in row["art"].items():
            block = np.concatenate(entry["block"])
            matched = np.concatenate(entry["matched"])
            out["artifacts"][artifact] = {"auroc_matched": auroc(matched, block),
                                          "flagged_block": float((block < thr).mean())}
        rows.append(out)
    return {"threshold": thr, "severity": cfg.severity, "subjects": [v.subject for v in volumes],
            "block_fraction": cfg.block_fraction, "rows": rows}


def write_sweep(result: dict[str, Any], out_dir: Path) -> str:
    """``sites.md`` and ``sites.json`` in ``out_dir``; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sites.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    artifacts = sorted({a for r in result["rows"] for a in r["artifacts"]})
    lines = [
        f"Site sweep: {len(result['subjects'])} subjects, axial stacks; clean: foreground slices "
        f"flagged at the threshold {result['threshold']:.1f}; per {result['severity']} artifact "
        f"(a block of {100 * result['block_fraction']:.0f}% of the stack): position-matched "
        "AUROC / fraction of the block flagged.",
        "",
        "| site | strength | clean flagged | " + " | ".join(artifacts) + " |",
        "|---|---|---" + "|---" * len(artifacts) + "|",
    ]
    for r in result["rows"]:
        cells = []
        for a in artifacts:
            v = r["artifacts"].get(a)
            cells.append("" if v is None else
                         f"{v['auroc_matched']:.3f} / {100 * v['flagged_block']:.0f}%")
        lines.append(f"| {r['site']} | {r['strength']} | {100 * r['flagged']:.1f}% | "
                     + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out_dir / "sites.md").write_text(text)
    return text
