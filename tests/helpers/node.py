"""Start the real node (``vaenode serve``) as a subprocess, for tests that talk DICOM to it.

Each node gets a temp folder with its own configuration file, storage folder and SQLite
database, listens on a free port of 127.0.0.1, and is stopped by its PID (SIGTERM, or SIGKILL to
play a crash). The worker and the dashboard are off by default so that ingest tests stay fast;
pass ``sections`` to turn them on or to change anything else::

    node = start_node(tmp_path, sections={"queue": {"series_idle_s": 1.0}})
    ...
    assert node.stop() == 0
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from tests.helpers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
VAENODE = Path(sys.executable).with_name("vaenode")
#: What ``vaenode worker`` logs once its job is scheduled (node/service.py).
WORKER_READY = "vaenode worker running"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document from ``{section: {key: value}}`` (values: scalars, lists, inline tables)."""
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
        lines.append("")
    return "\n".join(lines)


def node_sections(workdir: Path, port: int, sections: Mapping[str, Mapping[str, Any]] | None
                  ) -> dict[str, dict[str, Any]]:
    """The test configuration: defaults for a private node in ``workdir``, then ``sections``."""
    out: dict[str, dict[str, Any]] = {
        "dicom": {"ae_title": "VAENODE", "bind_address": "127.0.0.1", "port": port},
        "storage": {"dir": str(workdir / "storage"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{workdir / 'queue.db'}"},
        "queue": {"series_idle_s": 30.0, "check_interval_s": 0.5},
        "worker": {"enabled": False},
        "admin": {"enabled": False},
        "log": {"level": "INFO", "format": "text"},
    }
    for name, keys in (sections or {}).items():
        out.setdefault(name, {}).update(keys)
    return out


def scoring_sections(bundle: Path, pacs_port: int, rule: str = "mr"
                     ) -> dict[str, dict[str, Any]]:
    """Sections of a node that scores MR series soon after they arrive (with ``bundle``, on
    the CPU) and delivers its reports to the PACS of AE title PACS on ``pacs_port``."""
    return {
        "queue": {"series_idle_s": 1.0, "check_interval_s": 0.3},
        "worker": {"enabled": True, "poll_interval_s": 0.3},
        "model": {"bundle": str(bundle), "device": "cpu"},
        "routing": {"rules": [{"name": rule, "modality": "MR", "min_abnormal_slices": 3}]},
        "delivery": {"retry_base_s": 0.5, "poll_interval_s": 0.3, "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}]},
    }


@dataclass
class RunningNode:
    """A ``vaenode serve`` subprocess and where its files are."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    port: int
    config_path: Path
    log_path: Path
    ae_title: str = "VAENODE"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.workdir / 'queue.db'}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: a crash, nothing runs on the way out."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        """Poll ``check`` until it returns something truthy and return that; AssertionError
        with the end of the node's log when the node exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vaenode serve exited ({self.proc.returncode}) while "
                                     f"waiting for {what}:\n{self.log_text()[-4000:]}")
            if found := check():
                return found
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_text()[-4000:]}")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session on the node's database (for assertions)."""
        from node.config import DatabaseSettings
        from node.queue.db import make_engine, make_session_factory

        engine = make_engine(DatabaseSettings(url=self.db_url))
        factory: sessionmaker[Session] = make_session_factory(engine)
        try:
            with factory() as session:
                yield session
        finally:
            engine.dispose()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_node(
    workdir: Path,
    *,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
    command: str = "serve",
) -> RunningNode:
    """Write the configuration, start ``vaenode serve`` and wait until it listens.

    Starting again with the same ``workdir`` and ``port`` reuses storage and database (that is
    how tests restart a node after a crash). ``command="worker"`` starts ``vaenode worker``
    instead (no port: it is waited for until it logs that it runs).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = node_sections(workdir, port, sections)
    config_path = workdir / "node.toml"
    config_path.write_text(to_toml(config), encoding="utf-8")
    log_path = workdir / "node.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("VAENODE_")}
    run_env.update(env or {})
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(VAENODE), command, "--config", str(config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=run_env,
        )
    node = RunningNode(proc, workdir, port, config_path, log_path,
                       ae_title=config["dicom"]["ae_title"])
    deadline = time.monotonic() + timeout_s

    def ready() -> bool:
        if command == "worker":  # this run's lines only: a restart appends to the same log
            return WORKER_READY.encode() in log_path.read_bytes()[log_start:]
        return _listening(port)

    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"vaenode {command} exited with {proc.returncode}:\n"
                               f"{node.log_text()}")
        if time.monotonic() > deadline:
            node.kill()
            raise RuntimeError(f"vaenode {command} was not ready within {timeout_s}s:\n"
                               f"{node.log_text()}")
        time.sleep(0.05)
    return node


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, node: RunningNode) -> Any:
    """Poll ``check`` until it returns something truthy and return that; fail the test with
    the node's log when the node exits or the time runs out."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            pytest.fail(f"vaenode serve exited ({node.proc.returncode}) while waiting for "
                        f"{what}\n{node.log_text()[-4000:]}")
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{node.log_text()[-4000:]}")
