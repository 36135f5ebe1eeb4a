"""The association servers of the node's listener: pynetdicom's threaded server, whose accept
loop does nothing but accept.

Everything a peer could stall on happens in the connection's own thread: the TLS handshake
and the association request (:class:`~node.ingest.transport.NodeRequestHandler`, within one
deadline, counted among the server's :class:`~node.ingest.handshake.WaitingConnections`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from node.ingest.handshake import WaitingConnections

log = logging.getLogger(__name__)


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the connections still waiting for their association
    request (read by :class:`~node.ingest.transport.NodeRequestHandler`), and the TLS handshake
    in each connection's own thread.

    pynetdicom does the handshake in its accept loop (``get_request``), without a timeout: one
    peer that opens a connection and never completes the handshake stops every connection
    after it. Here the accept loop only accepts; the handshake is done by the connection's
    request handler with its association request (:mod:`node.ingest.handshake`), so that a
    peer that never completes it holds only its own thread, for the ACSE timeout at most, as
    one of the connections waiting.

    ``connection_ended`` (set by :class:`~node.ingest.scp.Scp` on a dispatched server) is
    called once for every connection, when its association thread ends or when it fails
    before one starts; the main process counts open connections per listener with it.
    """

    waiting: WaitingConnections
    connection_ended: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.waiting = WaitingConnections()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()  # no TLS handshake here: the request handler does it

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        started = False
        try:
            if self.ssl_context is not None:
                # No I/O yet: the handshake is the request handler's, within the deadline
                # of the association request and counted among the waiting connections.
                request = self.ssl_context.wrap_socket(request, server_side=True,
                                                       do_handshake_on_connect=False)
            self.finish_request(request, client_address)  # starts the association thread
            started = True
        except Exception:
            log.warning("cannot start an association on a connection",
                        extra={"peer": f"{client_address[0]}:{client_address[1]}"},
                        exc_info=True)
            self.shutdown_request(request)
        finally:
            if not started and self.connection_ended is not None:
                self.connection_ended()


class DispatchedAssociationServer(NodeAssociationServer):
    """pynetdicom's threaded server without a port of its own, in a listener process: the main
    process accepts each connection and passes it here (:mod:`node.ingest.dispatch`), and
    :meth:`~node.ingest.scp.Scp.adopt` runs it as pynetdicom's accept loop would."""

    def server_bind(self) -> None:
        """Nothing to bind: ``server_address`` stays the node's address, for pynetdicom."""

    def server_activate(self) -> None:
        """Nothing to listen on."""
