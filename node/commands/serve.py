"""``vaenode serve``: the node as a service (listener, queue jobs, worker, outbox)."""

from __future__ import annotations

import typer

from node.commands.common import ConfigOption, setup

# The list of job modules is node.service.JOB_MODULES; node.service is imported only when the
# command runs, so that `vaenode --help` does not pay for pynetdicom, APScheduler and the web app.


def serve(config: ConfigOption = None) -> None:
    """Migrate the database, listen for DICOM, run the scheduled jobs until SIGTERM/SIGINT."""
    settings = setup(config)
    from node.service import Service  # pynetdicom and APScheduler only for this command

    Service(settings).run_until_signal()


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``vaenode`` command."""
    app.command("serve")(serve)
