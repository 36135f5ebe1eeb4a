"""Alembic environment: runs revisions on the engine the node itself uses (same SQLite set-up)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

from node.config import DatabaseSettings
from node.queue.db import make_engine
from node.queue.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
#: PostgreSQL advisory lock key that serializes migrations of one database ("vaenode" in ASCII).
MIGRATION_LOCK = 0x7661656E6F6465


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade --sql``) without a database."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Apply revisions in one transaction on the node's engine."""
    url = config.get_main_option("sqlalchemy.url") or ""
    busy_ms = int(config.attributes.get("busy_timeout_ms", 30000))
    engine = make_engine(DatabaseSettings(url=url, busy_timeout_ms=busy_ms))
    try:
        with engine.connect() as connection:
            # Batch mode: SQLite cannot ALTER most things in place; later revisions that add
            # columns or constraints then work on SQLite and PostgreSQL alike.
            context.configure(
                connection=connection, target_metadata=target_metadata, render_as_batch=True
            )
            with context.begin_transaction():
                if connection.dialect.name == "postgresql":
                    # Several nodes of one deployment start (and `vaenode db upgrade`) at
                    # once: one applies the revisions, the others wait here for its commit
                    # and then find the database at head (the lock ends with the transaction).
                    connection.execute(text("SELECT pg_advisory_xact_lock(:k)"),
                                       {"k": MIGRATION_LOCK})
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
