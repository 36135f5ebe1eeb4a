"""Fixtures shared by several test packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.postgres import Postgres, start_postgres


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A private PostgreSQL cluster for the tests of one module (``new_database`` per test)."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.stop()


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    """End the run when a test left a non-daemon thread behind.

    Python waits for such threads at exit, so one stuck thread turns a finished run into a CI
    timeout with no report (it happened once: a killer thread kept waiting for a count that a
    failed send never reached). After the summary, name the threads and exit non-zero instead.
    """
    import os
    import sys
    import threading
    import time
    import traceback

    deadline = time.monotonic() + 30
    left = [t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon]
    for thread in left:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    left = [t for t in left if t.is_alive()]
    if not left:
        return
    frames = sys._current_frames()
    for thread in left:
        print(f"\nthread {thread.name!r} left running by a test:", file=sys.stderr)
        if thread.ident in frames:
            traceback.print_stack(frames[thread.ident], file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(config.stash.get(_EXIT_STATUS, 0) or 3)
