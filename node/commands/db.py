"""``vaenode db``: database schema commands."""

from __future__ import annotations

import typer

from node.commands.common import ConfigOption, setup

db_app = typer.Typer(help="Queue database schema.", no_args_is_help=True)


@db_app.command("upgrade")
def upgrade_cmd(config: ConfigOption = None) -> None:
    """Apply every migration the database lacks (creates it when missing)."""
    settings = setup(config)
    from node.queue.migrate import current_revision, upgrade

    upgrade(settings.database.url, busy_timeout_ms=settings.database.busy_timeout_ms)
    typer.echo(f"database at revision {current_revision(settings.database.url)}")


@db_app.command("current")
def current_cmd(config: ConfigOption = None) -> None:
    """Print the database's revision and the newest one available."""
    settings = setup(config)
    from node.queue.migrate import current_revision, head_revision

    typer.echo(f"current: {current_revision(settings.database.url) or '(empty)'}")
    typer.echo(f"head:    {head_revision()}")


def register(app: typer.Typer) -> None:
    """Add the ``db`` group to the ``vaenode`` command."""
    app.add_typer(db_app, name="db")
