"""``vaenode db``: the queue database's schema (migrations) and consistent backups."""

from __future__ import annotations

import sys
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


@db_app.command("fill-scanners")
def fill_scanners_cmd(
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Read and count, change nothing.")] = False,
    config: ConfigOption = None,
) -> None:
    """Fill Station Name, Manufacturer and Model Name of series stored before the queue
    recorded them (revision 0011_series_scanner), from each series' first stored instance.

    Safe while the node runs: it only sets columns that are empty.
    """
    settings = setup(config)
    from node.ingest.backfill import fill_scanner_columns, series_lacking_scanner
    from node.queue.db import make_engine, make_session_factory

    engine = make_engine(settings.database)
    try:
        factory = make_session_factory(engine)
        with factory() as session:
            lacking = series_lacking_scanner(session)
        with typer.progressbar(lacking, label="series", file=sys.stderr) as rows:
            found = fill_scanner_columns(factory, settings.storage.dir, rows, dry_run=dry_run)
    finally:
        engine.dispose()
    verb = "would fill" if dry_run else "filled"
    typer.echo(f"{found.lacking} series lacked the scanner: {verb} {found.filled}, "
               f"{found.named_none} name none in their headers, {found.no_file} have no "
               "stored image left to read (deleted by retention, or missing)")


def register(app: typer.Typer) -> None:
    """Add the ``db`` group to the ``vaenode`` command."""
    app.add_typer(db_app, name="db")
