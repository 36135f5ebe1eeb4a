"""The real DICOM series in ``../shared/data/dicom/`` as the node's worker judges them (by hand).

For each series folder: its headers are routed by the configuration's rules (default:
``config/node.toml``), it is assembled by the worker's code, scored by the routed bundle
(``node.worker.score.score_series``) and aggregated into the series verdict the SR would carry
(``SeriesVerdict.from_slices``, the rule's ``min_abnormal_slices``). Printed per series: what
it is, the rule (or why it is skipped), slices flagged of the series', the
fraction and the verdict, against the target:

- real normal brain T1 from scanners other than IXI's (Siemens Prisma, as the scanner sent
  them): normal, at most 2% of the slices flagged;
- studyforrest (a normal T1 of another site, converted from NIfTI, DERIVED): the default rule
  skips derived images, so it is also judged with that rule accepting them (``score_derived``);
  target as above;
- the prostate series (another body part): skipped by the rule, or most slices flagged;
- the Siemens field maps: judged or skipped without error.

    .venv/bin/python bench/acceptance.py [--config FILE] [--model BUNDLE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.config import load_settings  # noqa: E402
from node.report.content import SeriesVerdict  # noqa: E402
from node.worker.assemble import assemble_series, read_headers, series_attributes  # noqa: E402
from node.worker.routing import route  # noqa: E402
from node.worker.score import BundleCache, ScoringOptions, score_series  # noqa: E402

DICOM = ROOT.parent / "shared" / "data" / "dicom"
NORMAL = "normal, <= 2% flagged"
TARGETS = {
    "siemens_prisma_t1_fl2d_sag_hfs": ("Prisma 2D T1 FLASH sag, supine", NORMAL),
    "siemens_prisma_t1_fl2d_sag_hfp": ("Prisma 2D T1 FLASH sag, prone", NORMAL),
    "siemens_prisma_t1_fl2d_sag_hfdl": ("Prisma 2D T1 FLASH sag, decubitus L", NORMAL),
    "siemens_prisma_t1_fl2d_sag_hfdr": ("Prisma 2D T1 FLASH sag, decubitus R", NORMAL),
    "siemens_prisma_xa30_t1_tfl_5": ("Prisma XA30 3D T1 TFL, enhanced", NORMAL),
    "siemens_prisma_xa30_t1_tfl_6": ("Prisma XA30 3D T1 TFL, enhanced", NORMAL),
    "studyforrest_t1w": ("studyforrest T1 (converted, derived)", NORMAL),
    "tcia_prostate_t2_0002": ("prostate T2 (other body part)", "skipped or mostly flagged"),
    "siemens_trio_gre_field_mapping_2": ("Trio field map magnitude", "judged or skipped"),
    "siemens_trio_gre_field_mapping_3": ("Trio field map phase", "judged or skipped"),
}


def judge(folder: Path, settings, bundles: BundleCache, score_derived: bool = False) -> str:
    """One line: the rule or the skip reason, flagged/slices slices and the verdict."""
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    attrs = series_attributes(read_headers(paths))
    rules = list(settings.routing.rules)
    if score_derived:
        rules = [r.model_copy(update={"score_derived": True}) for r in rules]
    decision = route(attrs, rules, settings.model)
    if decision.rule is None:
        return f"skipped: {decision.reason}"
    bundle = bundles.get(decision.bundle)
    assembled = assemble_series(paths)
    t0 = time.perf_counter()
    scored = score_series(assembled, bundle, ScoringOptions(
        estimator=settings.model.estimator, samples=settings.model.samples,
        threshold=settings.model.threshold, device=settings.model.device))
    seconds = time.perf_counter() - t0
    verdict = SeriesVerdict.from_slices(
        study_instance_uid=attrs.study_instance_uid or "", series_instance_uid="",
        slices=scored.slices, min_abnormal_slices=decision.rule.min_abnormal_slices,
        threshold=scored.threshold, estimator=scored.estimator, model_name=bundle.name,
        model_version=bundle.version, samples=scored.samples, rule=decision.rule.name)
    total = len(scored.slices)
    share = verdict.abnormal_slices / max(1, total)
    return (f"{verdict.abnormal_slices:3d}/{total:<3d} {100 * share:5.1f}%  "
            f"{'ABNORMAL' if verdict.abnormal else 'normal':8s}  rule {decision.rule.name} "
            f"({bundle.name} {bundle.version}, {len(scored.slices) / seconds:.0f} slices/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "node.toml")
    parser.add_argument("--model", type=Path, default=None,
                        help="score with this bundle instead of the configured one")
    args = parser.parse_args()
    settings = load_settings(args.config)
    if args.model is not None:
        settings = settings.model_copy(update={"model": settings.model.model_copy(
            update={"bundle": args.model})})
    bundles = BundleCache()
    print(f"{'series':38} {'what':38} flagged/slices        target")
    for name, (what, target) in TARGETS.items():
        folder = DICOM / name
        if not folder.is_dir():
            print(f"{name:38} missing")
            continue
        line = judge(folder, settings, bundles)
        print(f"{name:38} {what:38} {line}    [{target}]")
        if name == "studyforrest_t1w" and line.startswith("skipped"):
            line = judge(folder, settings, bundles, score_derived=True)
            print(f"{'  ... with score_derived = true':38} {'':38} {line}    [{target}]")


if __name__ == "__main__":
    main()
