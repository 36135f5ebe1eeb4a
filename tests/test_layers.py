"""The layers stay apart: the DICOM side never loads torch, the model never loads pydicom.

The listener processes import the DICOM side only; loading torch there would cost each of
them hundreds of MB and seconds at start-up. The model sees arrays only, so that it can be
trained, evaluated and tested without DICOM. Both are checked in a fresh interpreter by
importing every module file of each side (``node/model`` and ``node/admin`` are namespace
packages, which ``pkgutil`` does not walk) and looking at what got loaded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_IMPORT_ALL = """
import importlib, pathlib, sys
inside_model = {inside}
for path in sorted(pathlib.Path("node").rglob("*.py")):
    name = ".".join(path.with_suffix("").parts).removesuffix(".__init__")
    if (name == "node.model" or name.startswith("node.model.")) == inside_model:
        importlib.import_module(name)
print(" ".join(sorted(m for m in {banned} if m in sys.modules)))
"""


def _loaded(inside_model: bool, banned: tuple[str, ...]) -> tuple[str, str]:
    code = _IMPORT_ALL.format(inside=inside_model, banned=banned)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr


def test_nothing_outside_the_model_loads_torch() -> None:
    loaded, _ = _loaded(False, ("torch", "torchio"))
    assert loaded == ""


def test_the_model_loads_no_dicom_library() -> None:
    loaded, _ = _loaded(True, ("pydicom", "highdicom", "pynetdicom"))
    assert loaded == ""
