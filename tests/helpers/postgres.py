"""A real PostgreSQL server for tests: a private cluster in a temp folder, on 127.0.0.1.

Uses Debian's ``postgresql`` binaries (``make test`` installs the package). ``initdb`` and the
server refuse to run as root, so as root they run as the ``postgres`` user the package creates
(``Popen(user=...)``: the process is the server itself), in a folder handed to it. Stopped by
PID (SIGINT: PostgreSQL's fast shutdown).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.orthanc import free_port


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's binary folder, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def _server_user() -> dict[str, Any]:
    """Popen arguments that run a program as ``postgres`` when we are root (no wrapper process
    in between, so the PID is the server's own)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@dataclass
class Postgres:
    """A running private cluster; ``url``: SQLAlchemy URL (psycopg 3) of database ``vaenode``."""

    proc: subprocess.Popen[bytes]
    port: int
    datadir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://vaenode@127.0.0.1:{self.port}/vaenode"

    def new_database(self, name: str) -> str:
        """Create an empty database ``name``; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="vaenode", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://vaenode@127.0.0.1:{self.port}/{name}"

    def start_again(self, timeout_s: float = 60.0) -> None:
        """Start the stopped server again on the same folder and port (the database back
        after an outage)."""
        binary = pg_bin()
        assert binary is not None and self.proc.poll() is not None
        self.proc = _launch(binary, self.datadir.parent, self.port)
        _wait_ready(self, binary, timeout_s)

    def stop(self) -> None:
        """Fast shutdown by PID, then wait for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _launch(binary: Path, workdir: Path, port: int) -> subprocess.Popen[bytes]:
    """Start the server of the cluster in ``workdir`` (``data``, ``sockets``) on ``port``."""
    log = (workdir / "postgres.log").open("ab")
    try:
        return subprocess.Popen(
            [str(binary / "postgres"), "-D", str(workdir / "data"), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1",
             "-c", f"unix_socket_directories={workdir / 'sockets'}",
             "-c", "fsync=off", "-c", "max_connections=100"],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir, **_server_user(),
        )
    finally:
        log.close()


def _wait_ready(server: Postgres, binary: Path, timeout_s: float) -> None:
    """Wait until the server accepts connections; stop it and raise if it does not."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = subprocess.run(
            [str(binary / "pg_isready"), "-h", "127.0.0.1", "-p", str(server.port)],
            capture_output=True, timeout=10)
        if ready.returncode == 0:
            return
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            log = server.datadir.parent / "postgres.log"
            raise RuntimeError("PostgreSQL did not start: "
                               + log.read_text(errors="replace")[-2000:])
        time.sleep(0.2)


def start_postgres(workdir: Path, timeout_s: float = 60.0) -> Postgres:
    """initdb a cluster in ``workdir`` (trust auth, user ``vaenode``), start it on a free
    loopback port and create database ``vaenode``."""
    binary = pg_bin()
    if binary is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    workdir.mkdir(parents=True, exist_ok=True)
    datadir, sockets = workdir / "data", workdir / "sockets"
    sockets.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (workdir, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
        # The server user must be able to reach its folder through the test's temp folders.
        with contextlib.suppress(OSError):
            for parent in workdir.parents:
                if parent == Path("/"):
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o011)
    init = subprocess.run(
        [str(binary / "initdb"), "-D", str(datadir), "-U", "vaenode", "-A", "trust", "-E",
         "UTF8", "--no-sync"],
        capture_output=True, text=True, timeout=120, cwd=workdir, **_server_user(),
    )
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr or init.stdout}")
    port = free_port()
    server = Postgres(_launch(binary, workdir, port), port, datadir)
    _wait_ready(server, binary, timeout_s)
    made = subprocess.run([str(binary / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                           "-U", "vaenode", "vaenode"], capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        server.stop()
        raise RuntimeError(f"createdb failed: {made.stderr}")
    return server
