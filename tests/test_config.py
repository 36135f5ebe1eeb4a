"""Configuration: one TOML file, env overrides, and refusals that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.config import DEFAULT_CONFIG, Settings, load_settings
from node.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
VAENODE = Path(sys.executable).with_name("vaenode")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_is_valid_and_equals_the_defaults() -> None:
    assert load_settings(REPO / DEFAULT_CONFIG, environ={}) == Settings()


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.prot: unknown key"):
        load_settings(_write(tmp_path, "[dicom]\nprot = 104\n"), environ={})


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dicmo: unknown key"):
        load_settings(_write(tmp_path, "[dicmo]\nport = 104\n"), environ={})


@pytest.mark.parametrize(("toml", "key"), [
    ("[dicom]\nport = 70000\n", "dicom.port"),
    ("[dicom]\nlistener_processes = 0\n", "dicom.listener_processes"),
    ("[dicom]\nmax_associations = 2\nlistener_processes = 3\n", "dicom"),
    ("[dicom]\nae_title = \"A_TITLE_THAT_IS_TOO_LONG\"\n", "dicom.ae_title"),
    ("[dicom]\nallowed_calling_aets = [\"BAD\\\\AE\"]\n", "dicom.allowed_calling_aets"),
    ("[queue]\nseries_idle_s = -1\n", "queue.series_idle_s"),
    ("[log]\nformat = \"xml\"\n", "log.format"),
    ("[storage]\nmin_free_mb = \"lots\"\n", "storage.min_free_mb"),
])
def test_bad_value_is_named(tmp_path: Path, toml: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, toml), environ={})
    assert f"{key}:" in str(info.value)


@pytest.mark.parametrize(("toml", "processes"), [
    ("", 2),  # the default
    ("[dicom]\nmax_associations = 1\n", 1),  # one association at a time: one process
    ("[dicom]\nlistener_processes = 1\n", 1),
    ("[dicom]\nmax_associations = 4\nlistener_processes = 4\n", 4),
])
def test_listener_processes(tmp_path: Path, toml: str, processes: int) -> None:
    assert load_settings(_write(tmp_path, toml), environ={}).dicom.listener_processes == processes


def test_env_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[dicom]\nport = 104\nae_title = \"FROMFILE\"\n")
    settings = load_settings(path, environ={
        "VAENODE_DICOM__PORT": "11113",
        "VAENODE_DICOM__TLS__ENABLED": "true",
        "VAENODE_DICOM__ALLOWED_CALLING_AETS": '["CT1", "MR1@10.0.0.5"]',
        "VAENODE_QUEUE__SERIES_IDLE_S": "2.5",
        "UNRELATED": "x",
    })
    assert settings.dicom.port == 11113
    assert settings.dicom.ae_title == "FROMFILE"
    assert settings.dicom.tls.enabled is True
    assert settings.dicom.allowed_calling_aets == ["CT1", "MR1@10.0.0.5"]
    assert settings.queue.series_idle_s == 2.5


def test_bad_env_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dicom\.port:"):
        load_settings(None, environ={"VAENODE_DICOM__PORT": "not-a-port"})
    with pytest.raises(ConfigError, match=r"dicom\.bogus: unknown key"):
        load_settings(None, environ={"VAENODE_DICOM__BOGUS": "1"})


def test_serve_refuses_to_start_and_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "[dicom]\nport = 0\n[storage]\ndir = \"x\"\nsize = 3\n")
    done = subprocess.run([str(VAENODE), "serve", "--config", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "dicom.port" in done.stderr and "storage.size: unknown key" in done.stderr
    assert not (tmp_path / "x").exists()
