"""Free TCP ports for the peers a test starts, never the same one twice in a run.

A port is free when asked for, but a peer configured before it starts (an Orthanc that plays a
PACS coming back later) does not hold it yet; the kernel may then hand the same port to the
next peer asked for, and a request meant for the one reaches the other (a DICOM listener
answering Orthanc's HTTP check with an A-ABORT, 2026-12-06). So every port handed out is
remembered and not handed out again.
"""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A TCP port nobody listens on right now on any address (so also on 127.0.0.1), and
    that no earlier call of this test run returned."""
    with _lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                port = int(sock.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
