"""``vaenode worker``: score only, on the deployment's shared queue (no DICOM port, no dashboard).

Scoring capacity then grows apart from the receivers: a GPU machine, or several workers beside
two receivers (docs/cluster.md). Needs PostgreSQL and the shared storage folder; refuses SQLite.
"""

from __future__ import annotations

import typer

from node.commands.common import ConfigOption, setup


def worker(config: ConfigOption = None) -> None:
    """Claim queued series from the shared queue and score them until SIGTERM/SIGINT."""
    settings = setup(config)
    from node.service import Service  # APScheduler and the worker only for this command

    Service(settings, worker=True).run_until_signal()


def register(app: typer.Typer) -> None:
    """Add ``worker`` to the ``vaenode`` command."""
    app.command("worker")(worker)
