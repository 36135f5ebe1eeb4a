"""Fixtures of the hostile-peer tests: real ``vaenode serve`` nodes to attack, real series.

Each node is started once for the package and stopped by PID. The open node is the default
configuration's shape (two listener processes, the loopback dashboard without a token) with a
short ACSE timeout, so that connections that never complete their request go within seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.node import RunningNode, free_port, start_node

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"
#: Small real series: Siemens Trio MR (Explicit VR LE, 64 x 64) and studyforrest (Implicit).
TRIO = DATA / "siemens_trio_gre_field_mapping_2"
FORREST = DATA / "studyforrest_t1w"
#: The ACSE timeout of the attacked nodes, seconds.
ACSE_TIMEOUT_S = 5.0


def series_files(folder: Path, count: int | None = None) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        pytest.fail(f"no DICOM files under {folder}")
    return files[:count] if count else files


@pytest.fixture(scope="session")
def open_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node as shipped (two listener processes, open loopback dashboard), ACSE timeout 5 s."""
    node = start_node(tmp_path_factory.mktemp("open-node"), sections={
        "dicom": {"acse_timeout_s": ACSE_TIMEOUT_S},
        "admin": {"enabled": True, "bind_address": "127.0.0.1", "port": free_port()},
    })
    try:
        yield node
    finally:
        node.stop()


def admin_url(node: RunningNode) -> str:
    """The dashboard of a node started by these fixtures."""
    import tomllib

    admin = tomllib.loads(node.config_path.read_text())["admin"]
    return f"http://127.0.0.1:{admin['port']}"
