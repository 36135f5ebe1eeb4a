"""Ingest throughput: storescu -> DCMTK storescp, Orthanc and vaenode, on this machine.

A 300-instance 512x512 16-bit CT series (about 512 KiB per instance) is sent by DCMTK's
storescu over one association, and four such series by four storescu processes at once. Each
target starts fresh for each run (empty storage and index) and the runs alternate between
targets, so that a slow moment of the machine does not land on one target only. Reported:
median instances/s and MB/s over the runs, and each target's ratio to Orthanc.

- storescp: DCMTK's reference SCP, writing files (no fsync, no index); ``--fork`` with four
  associations so they are served at once.
- Orthanc: private JSON configuration in a temp folder, no plugins; indexes every instance in
  SQLite and fsyncs its index.
- vaenode: ``vaenode serve`` with fsync durability (file fsync, rename, folder fsync, SQLite
  synchronous=FULL commit before Success); worker and dashboard off.

Every tool runs with ``TCP_NODELAY=1`` (Debian's DCMTK leaves Nagle's algorithm on).

Usage: ``.venv/bin/python bench/ingest.py [--runs 3] [--out bench/RESULTS-ingest.md]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.config import DEFAULT_LISTENER_PROCESSES  # noqa: E402
from tests.helpers.node import free_port, start_node  # noqa: E402
from tests.helpers.synthetic import write_ct_series  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")
INSTANCES = 300
PARALLEL = 4


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Target:
    """A fresh server for one run: ``start`` returns (port, called AE, stop, count stored)."""

    name: str
    start: Callable[[Path, bool], tuple[int, str, Callable[[], None], Callable[[], int]]]


def start_storescp(workdir: Path, parallel: bool):
    port = free_port()
    out = workdir / "out"
    out.mkdir(parents=True)
    args = ["storescp", "-aet", "STORESCP", "-od", str(out), "--accept-all"]
    if parallel:
        args.append("--fork")
    proc = subprocess.Popen([*args, str(port)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_port(port, proc, "storescp")

    def stop() -> None:
        # --fork children are in the same session; end them with the parent.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    return port, "STORESCP", stop, lambda: sum(1 for p in out.iterdir() if p.is_file())


def start_orthanc(workdir: Path, parallel: bool):
    port, http = free_port(), free_port()
    config = {
        "Name": "bench", "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"), "Plugins": [], "DicomAet": "ORTHANC",
        "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True, "StorageCompression": False, "SaveJobs": False,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    proc = subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")], cwd=workdir, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc, "Orthanc")

    def count() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=30) as rsp:
            return int(json.load(rsp)["CountInstances"])

    return port, "ORTHANC", lambda: _stop(proc), count


#: ``[dicom].listener_processes`` of the benchmarked node (``--listener-processes``; the
#: shipped default unless given).
LISTENER_PROCESSES = DEFAULT_LISTENER_PROCESSES


def start_vaenode(workdir: Path, parallel: bool):
    node = start_node(workdir, sections={"log": {"level": "WARNING"},
                                         "dicom": {"listener_processes": LISTENER_PROCESSES}})

    def count() -> int:
        from sqlalchemy import func, select

        from node.queue.models import Instance

        with node.session() as session:
            return int(session.execute(select(func.count()).select_from(Instance)).scalar_one())

    def stop() -> None:
        if node.stop() != 0:
            raise RuntimeError("vaenode did not exit 0")

    return node.port, node.ae_title, stop, count


TARGETS = [Target("storescp", start_storescp), Target("Orthanc", start_orthanc),
           Target("vaenode", start_vaenode)]


def send(port: int, aec: str, folders: list[Path]) -> float:
    """Run one storescu per folder at once; seconds until the last one finished."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"BENCH{i}", "-aec", aec, "+sd", "127.0.0.1",
                               str(port), str(folder)], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
             for i, folder in enumerate(folders)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--only", nargs="*", default=None, help="target names to run")
    parser.add_argument("--listener-processes", type=int, default=DEFAULT_LISTENER_PROCESSES,
                        help="the node's [dicom].listener_processes (default: "
                             f"{DEFAULT_LISTENER_PROCESSES}, as shipped)")
    args = parser.parse_args()
    global LISTENER_PROCESSES
    LISTENER_PROCESSES = args.listener_processes
    targets = [t for t in TARGETS if args.only is None or t.name in args.only]

    root = Path(tempfile.mkdtemp(prefix="vaenode-bench-"))
    try:
        folders = [root / f"series{i}" for i in range(PARALLEL)]
        for i, folder in enumerate(folders):
            write_ct_series(folder, INSTANCES, rows=512, columns=512, seed=i)
        size_mb = sum(p.stat().st_size for p in folders[0].iterdir()) / 1e6
        results: dict[tuple[str, int], list[float]] = {}
        for run in range(args.runs):
            for mode in (1, PARALLEL):
                for target in targets:
                    workdir = root / f"{target.name}-{mode}-{run}"
                    workdir.mkdir()
                    port, aec, stop, count = target.start(workdir, mode > 1)
                    try:
                        seconds = send(port, aec, folders[:mode])
                        stored = count()
                    finally:
                        stop()
                    if stored != INSTANCES * mode:
                        raise RuntimeError(f"{target.name}: {stored} of {INSTANCES * mode} stored")
                    results.setdefault((target.name, mode), []).append(seconds)
                    rate = INSTANCES * mode / seconds
                    print(f"run {run + 1} {target.name:<9} x{mode}: {rate:7.1f} instances/s",
                          file=sys.stderr, flush=True)
                    shutil.rmtree(workdir, ignore_errors=True)
        lines = [
            f"Ingest benchmark: {INSTANCES} CT instances 512x512 16-bit ({size_mb:.0f} MB) per "
            f"series, storescu (TCP_NODELAY=1), {args.runs} alternating runs per cell, medians.",
            f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; vaenode with "
            f"[dicom].listener_processes = {LISTENER_PROCESSES}.",
            "",
            "| target | associations | instances/s | MB/s | vs Orthanc | runs (s) |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for mode in (1, PARALLEL):
            base = results.get(("Orthanc", mode))
            for target in targets:
                times = results[(target.name, mode)]
                median = statistics.median(times)
                rate = INSTANCES * mode / median
                ratio = (statistics.median(base) / median) if base else float("nan")
                lines.append(
                    f"| {target.name} | {mode} | {rate:.0f} | {size_mb * mode / median:.0f} | "
                    f"{ratio:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
        table = "\n".join(lines)
        print(table)
        if args.out:
            args.out.write_text(table + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
