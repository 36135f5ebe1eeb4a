"""Hand each DICOM connection to the listener process that has the fewest open.

With ``[dicom].listener_processes`` > 1 the main process owns the DICOM port: it accepts each
connection and passes the connected socket (``SCM_RIGHTS``, :func:`socket.send_fds`) over a
Unix socket pair to one listener process, which runs the association
(:meth:`node.ingest.scp.Scp.adopt`). Each listener writes one byte back when a connection it
was given has ended, so the main process knows how many each has open and gives the next
connection to the least loaded one (ties: the one that got a connection longest ago).

Why not ``SO_REUSEPORT`` (several processes binding the port): the kernel then picks the
process by a hash of the peer's address and port, not by load. Four associations over two
processes were split 2-2 in only 3 of 8 bursts here, 3-1 or 4-0 in the others, and those
runs were the slow ones (``bench/RESULTS-ingest.md``).

The main process's part is one thread that waits in ``select`` on the port and the listeners'
sockets: about 50 us of CPU per connection, nothing per instance.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import threading

log = logging.getLogger(__name__)

#: Pending connections the kernel queues before the main process accepts them.
BACKLOG = 128
#: The byte a listener writes for each connection it was given that has ended.
ENDED = b"e"
#: The byte that goes with each passed socket.
CONNECTION = b"c"


def bind_port(host: str, port: int) -> socket.socket:
    """The node's listening socket, bound but not yet listening (OSError when taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom binds
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Listener:
    """The main process's view of one listener process."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.open = 0  # connections given and not yet reported ended
        self.last_given = 0  # dispatch sequence number of the latest connection given


class Dispatcher:
    """Accepts on ``sock`` and hands each connection to an attached listener.

    Args:
        sock: the bound listening socket (:func:`bind_port`); the dispatcher owns it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._listeners: dict[int, _Listener] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sequence = itertools.count(1)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def attach(self, index: int, channel: socket.socket) -> None:
        """Give listener ``index`` connections from now on, over ``channel`` (our end)."""
        channel.setblocking(False)
        with self._lock:
            old = self._listeners.pop(index, None)
            self._listeners[index] = _Listener(channel)
        if old is not None:
            old.channel.close()
        self._wake()

    def open_counts(self) -> dict[int, int]:
        """Connections each attached listener has open, as far as the main process knows."""
        with self._lock:
            return {index: listener.open for index, listener in self._listeners.items()}

    def start(self) -> None:
        """Listen and start handing out connections."""
        self._sock.listen(BACKLOG)
        self._sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="dicom-dispatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the port (new connections are refused) and stop; attached channels close."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
        with self._lock:
            listeners, self._listeners = list(self._listeners.values()), {}
        for listener in listeners:
            listener.channel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"w")

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                channels = {listener.channel: index
                            for index, listener in self._listeners.items()}
            try:
                readable, _, _ = select.select([self._sock, self._wake_r, *channels], [], [])
            except (OSError, ValueError):  # a channel closed under us by attach(): look again
                continue
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            for channel, index in channels.items():
                if channel in readable:
                    self._read_reports(index, channel)
            if self._sock in readable and not self._stopping:
                self._accept_all()

    def _read_reports(self, index: int, channel: socket.socket) -> None:
        try:
            data = channel.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        with self._lock:
            listener = self._listeners.get(index)
            if listener is None or listener.channel is not channel:
                return  # replaced by attach() meanwhile
            if data:
                listener.open = max(0, listener.open - data.count(ENDED))
                return
            # The listener process exited (or closed its end): ListenerPool.check restarts it.
            del self._listeners[index]
        channel.close()
        log.debug("listener channel closed", extra={"listener": index})

    def _accept_all(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave it queued, try at the next wake-up
                log.warning("cannot accept a DICOM connection: %s", exc)
                return
            with conn:
                self._hand_over(conn, peer)

    def _hand_over(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """Pass ``conn`` to the least loaded listener (our copy is closed by the caller)."""
        with self._lock:
            order = sorted(self._listeners.items(),
                           key=lambda item: (item[1].open, item[1].last_given))
        for index, listener in order:
            try:
                socket.send_fds(listener.channel, [CONNECTION], [conn.fileno()])
            except OSError as exc:  # full or gone: the next one
                log.warning("cannot hand a connection to listener %d: %s", index, exc)
                continue
            with self._lock:
                listener.open += 1
                listener.last_given = next(self._sequence)
            log.debug("connection handed over",
                      extra={"peer": f"{peer[0]}:{peer[1]}", "listener": index})
            return
        log.error("no listener process to take a DICOM connection; closing it",
                  extra={"peer": f"{peer[0]}:{peer[1]}"})
