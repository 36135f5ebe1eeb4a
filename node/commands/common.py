"""What every command shares: the ``--config`` option and settings + logging set-up."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from node.config import DEFAULT_CONFIG, Settings, load_settings
from node.log import configure

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML configuration file (default: $VAENODE_CONFIG, else config/node.toml if "
        "present, else built-in defaults).",
    ),
]


def iso(value: datetime | None) -> str | None:
    """A time as the commands' JSON gives it (ISO 8601), or None."""
    return value.isoformat() if value is not None else None


def resolve_config_path(config: Path | None) -> Path | None:
    """The file a command reads: the option, then $VAENODE_CONFIG, then config/node.toml."""
    if config is not None:
        return config
    if env := os.environ.get("VAENODE_CONFIG"):
        return Path(env)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


def setup(config: Path | None) -> Settings:
    """Load and validate settings, then configure logging from them."""
    settings = load_settings(resolve_config_path(config))
    configure(settings.log.level, settings.log.format)
    return settings
