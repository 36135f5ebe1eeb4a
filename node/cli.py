"""The ``vaenode`` command.

Each command group lives in ``node/commands/`` and is registered here; this is the one place
where exceptions become exit codes (2: configuration, 1: any other refusal of the node).
"""

from __future__ import annotations

import logging
import sys

import typer

from node.errors import ConfigError, NodeError

app = typer.Typer(
    name="vaenode",
    help="DICOM quality-gate node: receive series, score them with a VAE, report to PACS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

log = logging.getLogger(__name__)


def _register() -> None:
    # Imported here so that `vaenode --help` stays fast and a command's heavy imports (torch)
    # are paid only by the commands that need them: the modules import lazily inside commands.
    from node.commands import register_all

    register_all(app)


def main() -> None:
    """Console-script entry point."""
    _register()
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"vaenode: configuration error: {exc}", err=True)
        sys.exit(2)
    except NodeError as exc:
        typer.echo(f"vaenode: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
