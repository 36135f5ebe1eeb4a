"""A real HTTP endpoint on loopback that records the alert messages posted to it."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class AlertReceiver:
    """``url`` takes POSTs of JSON; ``messages`` holds them in order. ``fail_next`` requests
    are answered 500 first (a webhook having a bad moment)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail_next = 0
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests += 1
                if receiver.fail_next > 0:
                    receiver.fail_next -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.messages.append({"content_type": self.headers.get("Content-Type"),
                                          "authorization": self.headers.get("Authorization"),
                                          **json.loads(body)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
