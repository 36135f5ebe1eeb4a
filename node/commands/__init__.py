"""Command groups of ``vaenode``; each module exposes ``register(app)``."""

from __future__ import annotations

import importlib

import typer

# One module per group; each adds its commands to the app. Order is the order in --help.
_MODULES = (
    "node.commands.serve",
    "node.commands.worker",
    "node.commands.db",
    "node.commands.queue",
    "node.commands.echo",
    "node.commands.alert",
    "node.commands.route",
    "node.commands.model",
    "node.commands.score",
)


def register_all(app: typer.Typer) -> None:
    """Register every command group (each imports its heavy dependencies inside its commands)."""
    for name in _MODULES:
        importlib.import_module(name).register(app)
