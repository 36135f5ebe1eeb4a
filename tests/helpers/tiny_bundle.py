"""A tiny but real model bundle for tests: trained by the project's own code in seconds.

Other test packages import :func:`make_tiny_bundle` (``from tests.helpers.tiny_bundle import
make_tiny_bundle``) to get a bundle that loads and scores exactly like the shipped one, only
smaller (64 x 64 grid at 4 mm, few channels, a handful of IXI slices, one epoch). Its verdicts
mean little; its interfaces are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
IXI = DATA / "ixi_t1"
SUBJECTS = ("IXI012-HH-1211_T1.nii.gz", "IXI013-HH-1212_T1.nii.gz", "IXI014-HH-1236_T1.nii.gz")


def make_tiny_bundle(out_dir: Path, seed: int = 0, epochs: int = 1) -> Path:
    """Train a tiny VAE on a few IXI slices and write a calibrated bundle to ``out_dir``.

    Takes a few seconds on one CPU core. Axial slices only (calibration then scores fewer
    slices); ``seed`` makes the result reproducible.
    """
    from node.model.data import load_nifti
    from node.model.train import TrainConfig, run_training

    vols = [load_nifti(IXI / name) for name in SUBJECTS]
    cfg = TrainConfig(
        epochs=epochs, latent_dim=8, image_size=64, spacing_mm=4.0, channels=(4, 8, 16, 16),
        seed=seed, val_fraction=0.34, batch_size=16, max_train_slices=64, planes=("axial",),
        samples=4, name="tiny-test", version="0.0.1", device="cpu", max_series_shift=1000.0,
    )
    return run_training(vols, cfg, Path(out_dir), command="tests.helpers.tiny_bundle",
                        data_sources=[str(IXI / n) for n in SUBJECTS])


def calibration_axial_scores(bundle: Any) -> Iterator[Any]:
    """The bundle's scores (``SliceScores``) of each of its calibration subjects' axial stacks,
    as a calibration check reads them."""
    from node.model.data import load_nifti, plane_slices

    ids = bundle.meta["training"]["subjects"]["calibration"]
    for path in sorted(IXI.glob("*.nii.gz")):
        if path.name.split("-")[0] not in ids:
            continue
        images, spacing = plane_slices(load_nifti(path), "axial")
        yield bundle.score_slices(list(images), [spacing] * len(images), device="cpu")


def calibrate_cli(src: Path, out: Path, *extra: str,
                  data: Sequence[Path] = tuple(IXI / name for name in SUBJECTS),
                  ) -> subprocess.CompletedProcess[str]:
    """``vaenode calibrate --model src --out out`` on ``data`` (default: the tiny bundle's
    subjects) with ``extra`` options, in a subprocess run from ``out``'s folder with no
    ``VAENODE_`` settings of the caller's environment."""
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAENODE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    args = [sys.executable, "-m", "node.cli", "calibrate", "--model", str(src), "--out", str(out)]
    for path in data:
        args += ["--data", str(path)]
    return subprocess.run([*args, *extra], cwd=out.parent, env=env, capture_output=True,
                          text=True, timeout=900)
