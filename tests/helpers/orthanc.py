"""A real Orthanc, started by a test, to play the PACS that receives the node's reports.

Orthanc runs in the foreground with a private JSON configuration in a temp folder (its own
storage and index folders, no plugins), on free ports of 127.0.0.1, with ``TCP_NODELAY=1`` so
that Debian's DCMTK-based network stack does not stall on Nagle's algorithm. It is stopped by
its PID. Instances are read back through its REST API with ``urllib`` only (no HTTP client
dependency for the tests).

The same object can be stopped and started again on the same ports and folders: that is how
tests play "the PACS is down, then comes back".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from tests.helpers.ports import free_port

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Orthanc:
    """One Orthanc server in ``workdir``; ``start()``/``stop()`` may be called repeatedly."""

    workdir: Path
    ae_title: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> None:
        """Write the private configuration (storage and index inside ``workdir``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "vaenode-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageCompression": False,
            "SaveJobs": False,
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
        }
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        """Start Orthanc and wait until its HTTP API answers and its DICOM port accepts."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.write_config()
        env = dict(os.environ, TCP_NODELAY="1")
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [ORTHANC_BIN, str(self.config_path)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_tail()}")
            if _port_open(self.dicom_port):
                with contextlib.suppress(OSError):
                    self.get_json("/system")
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not come up within {timeout_s} s: {self.log_tail()}")

    def stop(self, timeout_s: float = 15.0, graceful: bool = True) -> None:
        """Stop Orthanc by its PID: SIGTERM (SIGKILL when not ``graceful``, or if it hangs).

        A graceful stop takes Orthanc about 3.5 s (fixed waits of its servers); tests that
        throw the folder away afterwards kill it instead.
        """
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if not graceful:
            proc.kill()
            proc.wait(timeout=timeout_s)
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- REST API ------------------------------------------------------------------------

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def post_json(self, path: str, body: Any) -> Any:
        return json.loads(self._request(path, json.dumps(body).encode()))

    def instance_ids(self) -> list[str]:
        """Orthanc identifiers of every stored instance."""
        return list(self.get_json("/instances"))

    def find_instances(self, **query: str) -> list[str]:
        """Orthanc identifiers of the instances matching a DICOM query (keyword=value)."""
        return list(self.post_json("/tools/find", {"Level": "Instance", "Query": query}))

    def instance_bytes(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance, byte for byte."""
        return self._request(f"/instances/{orthanc_id}/file")

    def dataset(self, orthanc_id: str) -> Dataset:
        return pydicom.dcmread(BytesIO(self.instance_bytes(orthanc_id)))

    def datasets(self, **query: str) -> list[Dataset]:
        """Datasets of the instances matching ``query`` (all instances when empty)."""
        ids = self.find_instances(**query) if query else self.instance_ids()
        return [self.dataset(i) for i in ids]

    def reports(self, modality: str, study_instance_uid: str | None = None) -> list[Dataset]:
        """SR ("SR") or KOS ("KO") instances, optionally of one study."""
        query = {"Modality": modality}
        if study_instance_uid:
            query["StudyInstanceUID"] = study_instance_uid
        series = self.post_json("/tools/find", {"Level": "Series", "Query": query})
        out: list[Dataset] = []
        for sid in series:
            for inst in self.get_json(f"/series/{sid}/instances"):
                out.append(self.dataset(inst["ID"]))
        return out

    def wait_for(
        self, modality: str, count: int, timeout_s: float, study_instance_uid: str | None = None
    ) -> list[Dataset]:
        """Wait until at least ``count`` reports of ``modality`` are stored; return them."""
        deadline = time.monotonic() + timeout_s
        found: list[Dataset] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                found = self.reports(modality, study_instance_uid)
                if len(found) >= count:
                    return found
            time.sleep(0.5)
        return found


@contextlib.contextmanager
def running_orthanc(workdir: Path, ae_title: str = "ORTHANC") -> Iterator[Orthanc]:
    """An Orthanc that runs for the ``with`` block and is stopped by PID afterwards."""
    server = Orthanc(workdir=workdir, ae_title=ae_title)
    server.start()
    try:
        yield server
    finally:
        server.stop(graceful=False)
