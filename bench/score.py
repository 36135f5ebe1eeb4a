"""Scoring speed of a model bundle on this machine (run by hand; prints a table).

Scores a 120-slice axial IXI stack at the bundle's default settings (estimator, samples) the
way the worker does (one ``score_slices`` call per series), and reports:
- slices per second (median of several runs, after a warm-up run);
- FLOPs per slice, counted by ``torch.utils.flop_counter`` over one encoder pass and the
  decoder passes of the estimator (convolutions and matrix multiplies);
- the achieved fraction of the machine's measured float32 matrix-multiply rate
  (FLOPs/slice x slices/s / matmul FLOP/s), i.e. how much of the arithmetic the CPU can do the
  scoring actually uses.

    .venv/bin/python bench/score.py [--model BUNDLE] [--threads N] [--samples N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.model.bundle import load_bundle  # noqa: E402
from node.model.data import load_nifti, plane_slices, slice_spacing  # noqa: E402
from node.model.likelihood import estimate  # noqa: E402

IXI = ROOT.parent / "shared" / "data" / "ixi_t1" / "IXI015-HH-1258_T1.nii.gz"


def matmul_rate(n: int = 1024, repeat: int = 20) -> float:
    """Measured float32 matrix-multiply FLOP/s (best of three timings)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * n**3 * repeat / (time.perf_counter() - t0))
    return best


def flops_per_slice(bundle, samples: int, estimator: str) -> float:
    """FLOPs of scoring one slice, counted by torch's FLOP counter on a batch of 8."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(8, 1, bundle.preprocess.image_size, bundle.preprocess.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        estimate(bundle.model, x, estimator, samples, generator=torch.Generator().manual_seed(0))
    return counter.get_total_flops() / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model)
    samples = args.samples or bundle.scoring.samples
    vol = load_nifti(IXI)
    stack, spacing = plane_slices(vol, "axial")
    images = list(stack)
    # As the worker calls it: plane and slice spacing known (the position reference applies).
    placed = {"plane": "axial", "slice_spacing_mm": slice_spacing(vol, "axial")}
    bundle.score_slices(images, [spacing] * len(images), samples=samples, **placed)  # warm-up
    rates = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        bundle.score_slices(images, [spacing] * len(images), samples=samples, **placed)
        rates.append(len(images) / (time.perf_counter() - t0))
    rate = statistics.median(rates)
    flops = flops_per_slice(bundle, samples, bundle.scoring.estimator)
    mm = matmul_rate()
    runs = ", ".join(f"{r:.1f}" for r in rates)
    rows = [
        ("bundle", f"{bundle.name} {bundle.version}"),
        ("threads", str(torch.get_num_threads())),
        ("estimator / samples", f"{bundle.scoring.estimator} / {samples}"),
        ("slices per series", str(len(images))),
        ("slices/s (median of runs)", f"{rate:.1f}  (runs: {runs})"),
        ("GFLOPs per slice", f"{flops / 1e9:.3f}"),
        ("achieved GFLOP/s", f"{flops * rate / 1e9:.1f}"),
        ("matmul GFLOP/s (1024^2, fp32)", f"{mm / 1e9:.1f}"),
        ("achieved fraction of matmul rate", f"{flops * rate / mm:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
