"""Run the real DCMTK tools (echoscu, storescu, storescp) against a node on 127.0.0.1.

Debian's DCMTK leaves Nagle's algorithm on; ``TCP_NODELAY=1`` in the environment turns it off,
or every transfer stalls about 45 ms per instance.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


def env() -> dict[str, str]:
    """The environment DCMTK tools run with."""
    return dict(os.environ, TCP_NODELAY="1")


def tool(name: str) -> str:
    """Path of a DCMTK tool; the test fails (not skips) without it: ``make test`` installs it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's dcmtk (make test does)")
    return path


def echoscu(port: int, called_aet: str = "VAENODE", calling_aet: str = "ECHOSCU",
            timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """C-ECHO the node; returns the finished process (check ``returncode``)."""
    return subprocess.run(
        [tool("echoscu"), "-aet", calling_aet, "-aec", called_aet, "127.0.0.1", str(port)],
        env=env(), capture_output=True, text=True, timeout=timeout_s,
    )


def storescu_cmd(port: int, paths: Sequence[Path], *, called_aet: str = "VAENODE",
                 calling_aet: str = "STORESCU", extra: Sequence[str] = ()) -> list[str]:
    """The storescu command line for ``paths`` (files or folders, scanned recursively)."""
    return [tool("storescu"), "-aet", calling_aet, "-aec", called_aet, "+sd", "+r",
            *extra, "127.0.0.1", str(port), *[str(p) for p in paths]]


def storescu(port: int, paths: Sequence[Path], *, called_aet: str = "VAENODE",
             calling_aet: str = "STORESCU", extra: Sequence[str] = (),
             timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """Send ``paths`` with storescu; returns the finished process."""
    return subprocess.run(
        storescu_cmd(port, paths, called_aet=called_aet, calling_aet=calling_aet, extra=extra),
        env=env(), capture_output=True, text=True, timeout=timeout_s,
    )


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class StoreScp:
    """A running DCMTK storescp writing what it receives into ``folder``."""

    proc: subprocess.Popen[bytes]
    port: int
    folder: Path

    def stop(self) -> None:
        """Stop it by PID."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start_storescp(folder: Path, port: int, *, ae_title: str = "STORESCP",
                   bit_preserving: bool = True, ignore: bool = False,
                   extra: Sequence[str] = ()) -> StoreScp:
    """Start storescp on ``port``; ``bit_preserving`` (+B) writes datasets exactly as received,
    the reference for "stored as sent"; ``ignore`` (--ignore) receives and discards."""
    folder.mkdir(parents=True, exist_ok=True)
    args = [tool("storescp"), "-aet", ae_title, "-od", str(folder), "--accept-all"]
    if bit_preserving:
        args.append("+B")
    if ignore:
        args.append("--ignore")
    args += [*extra, str(port)]
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"storescp did not start on port {port}")
        time.sleep(0.05)
    return StoreScp(proc, port, folder)
