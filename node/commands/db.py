"""``vaenode db``: the queue database's schema (migrations) and consistent backups."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.common import ConfigOption, setup

db_app = typer.Typer(help="Queue database: schema and backup.", no_args_is_help=True)


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


@db_app.command("backup")
def backup_cmd(
    dest: Annotated[Path, typer.Argument(help="File to write (must not exist).")],
    config: ConfigOption = None,
) -> None:
    """Copy the SQLite queue database consistently while the node runs (PostgreSQL: pg_dump)."""
    settings = setup(config)
    from node.queue.backup import backup_sqlite

    done = backup_sqlite(settings.database.url, dest,
                         busy_timeout_ms=settings.database.busy_timeout_ms)
    typer.echo(f"backup written to {done.path} ({done.size_bytes} bytes, revision "
               f"{done.revision or '(none)'}, {done.series} series)")


def register(app: typer.Typer) -> None:
    """Add the ``db`` group to the ``vaenode`` command."""
    app.add_typer(db_app, name="db")
