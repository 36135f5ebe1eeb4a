"""Several workers draining one queue at once, as ``vaenode serve`` processes would."""

from __future__ import annotations

import threading

from sqlalchemy.orm import Session, sessionmaker

from node.queue import repo


def drain_queue(factory: sessionmaker[Session], workers: int = 4) -> list[tuple[str, int]]:
    """Threads ``w0``... claim queued series (each its own session) until none is left;
    returns (worker, series id) for every claim, in claim order."""
    claims: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            with factory.begin() as session:
                got = repo.claim_next_queued(session, name, lease_s=60)
            if got is None:
                return
            with lock:
                claims.append((name, got.id))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return claims
