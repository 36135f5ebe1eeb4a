"""The dispatcher in front of the listener processes (node/ingest/dispatch.py), on real sockets:
this test plays the listener processes' side of each channel."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from node.ingest.dispatch import CONNECTION, ENDED, Dispatcher, bind_port


class FakeListener:
    """The listener side of a channel: receives the passed connections, reports ends."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.settimeout(5)
        self.connections: list[socket.socket] = []

    def take(self) -> socket.socket:
        data, fds, _flags, _addr = socket.recv_fds(self.ours, 1, 1)
        assert data == CONNECTION and len(fds) == 1
        conn = socket.socket(fileno=fds[0])
        self.connections.append(conn)
        return conn

    def has_pending(self) -> bool:
        self.ours.settimeout(0.2)
        try:
            return bool(self.ours.recv(1, socket.MSG_PEEK))
        except TimeoutError:
            return False
        finally:
            self.ours.settimeout(5)

    def end_one(self) -> None:
        self.connections.pop().close()
        self.ours.sendall(ENDED)


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    d = Dispatcher(bind_port("127.0.0.1", 0))
    yield d
    d.stop()


def _connect(d: Dispatcher) -> socket.socket:
    return socket.create_connection(d.address, timeout=5)


def _wait_counts(d: Dispatcher, expected: dict[int, int]) -> None:
    deadline = time.monotonic() + 5
    while d.open_counts() != expected:
        assert time.monotonic() < deadline, d.open_counts()
        time.sleep(0.01)


def test_connections_go_to_the_listener_with_fewest_open(dispatcher: Dispatcher) -> None:
    listeners = [FakeListener(), FakeListener()]
    for index, listener in enumerate(listeners):
        dispatcher.attach(index, listener.theirs)
    dispatcher.start()
    clients = [_connect(dispatcher) for _ in range(4)]
    for listener in listeners:  # 2-2, whatever the order they came in
        listener.take()
        listener.take()
    assert not any(listener.has_pending() for listener in listeners)
    _wait_counts(dispatcher, {0: 2, 1: 2})

    # The passed socket is the client's connection itself.
    clients[0].sendall(b"hello")
    passed = [c for listener in listeners for c in listener.connections]
    readable, _, _ = select.select(passed, [], [], 5)
    assert len(readable) == 1 and readable[0].recv(5) == b"hello"

    listeners[1].end_one()
    _wait_counts(dispatcher, {0: 2, 1: 1})
    clients.append(_connect(dispatcher))
    listeners[1].take()  # the one with fewer open
    assert not listeners[0].has_pending()
    _wait_counts(dispatcher, {0: 2, 1: 2})
    for c in clients:
        c.close()


def test_a_listener_that_exits_gets_no_more_connections(dispatcher: Dispatcher) -> None:
    gone, alive = FakeListener(), FakeListener()
    dispatcher.attach(0, gone.theirs)
    dispatcher.attach(1, alive.theirs)
    dispatcher.start()
    gone.ours.close()  # as a listener process that died
    _wait_counts(dispatcher, {1: 0})
    clients = [_connect(dispatcher) for _ in range(3)]
    for _ in clients:
        alive.take()
    # A replacement attached under the same index takes the next one (it has none open).
    replacement = FakeListener()
    dispatcher.attach(0, replacement.theirs)
    clients.append(_connect(dispatcher))
    replacement.take()
    for c in clients:
        c.close()


def test_stop_closes_the_port(dispatcher: Dispatcher) -> None:
    listener = FakeListener()
    dispatcher.attach(0, listener.theirs)
    dispatcher.start()
    address = dispatcher.address
    _connect(dispatcher).close()
    listener.take()
    dispatcher.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


def test_a_taken_port_is_refused() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError):
            bind_port("127.0.0.1", holder.getsockname()[1])
