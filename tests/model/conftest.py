"""Fixtures of the model tests: one tiny bundle per session, trained by the real code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.tiny_bundle import IXI, make_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not IXI.is_dir():
        pytest.skip(f"IXI data not found at {IXI}")
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")
