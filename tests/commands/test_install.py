"""A regular (non-editable) install works away from the repository: the wheel carries the
Alembic revisions, the default model and the dashboard's templates, and ``vaenode db upgrade``
finds them."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from node.queue.migrate import head_revision

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.slow
def test_wheel_install_migrates_and_loads_the_default_model(tmp_path: Path) -> None:
    # Build from a copy, so that the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("node", "migrations"):
        shutil.copytree(REPO / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                  "-w", str(tmp_path / "dist"), str(src)])
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("vaenode-*.whl")

    # The new venv's own pip: this environment's pip (even with --prefix) would uninstall the
    # checkout's editable install first.
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                   ).stdout.strip()
    installed = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                      str(wheel)])
    assert installed.returncode == 0, installed.stderr
    here = _run([sys.executable, "-c", "import node; print(node.__file__)"])
    assert here.stdout.strip() == str(REPO / "node" / "__init__.py"), here.stdout + here.stderr

    # The dependencies come from this environment; the package only from the new install.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAENODE_")}
    env["PYTHONPATH"] = os.pathsep.join([purelib, sysconfig.get_paths()["purelib"]])
    env["VAENODE_DATABASE__URL"] = f"sqlite:///{tmp_path / 'queue.db'}"
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-c", "import node; print(node.__file__)"], env=env, cwd=work)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr

    upgraded = _run([str(python), "-m", "node.cli", "db", "upgrade"], env=env, cwd=work)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    with sqlite3.connect(tmp_path / "queue.db") as db:
        [(revision,)] = db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert revision == head_revision()
    assert (venv / "share" / "vaenode" / "migrations" / "env.py").is_file()

    # Every file the package reads at run time (not Python) made it into the install.
    package = REPO / "node"
    data = sorted(str(f.relative_to(package)) for f in package.rglob("*")
                  if f.is_file() and f.suffix not in (".py", ".pyc"))
    assert data
    missing = [f for f in data if not (Path(purelib) / "node" / f).is_file()]
    assert not missing, missing

    loaded = _run([str(python), "-c",
                   "from node.model.bundle import load_bundle, default_bundle_path; "
                   "print(load_bundle(default_bundle_path()).name)"], env=env, cwd=work)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "brain-t1-multiscanner"
