"""A connection that breaks during COMMIT is answered 503 ``outcome_unknown`` (SPEC 3.4).

A proxy between the web process and Postgres lets the statement that records the
refund (one autocommit call of the database's ``initiate_refund``) reach Postgres,
which applies and commits it, and then cuts the connection before the answer gets
back: the exact moment where the service cannot know whether the refund exists. Before, this was
answered 503 ``unavailable``, "nothing was recorded", although the refund had been
recorded; a caller without an Idempotency-Key who believed it created a second one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.domain.models import Refund
from tests.support import auth, seed_payment, wait_for_http, web_process


class _Link:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.holding = threading.Event()  # answers from Postgres are no longer passed on

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class CommitCuttingProxy:
    """TCP proxy to Postgres. Once armed, the next statement that commits a refund (a
    COMMIT, or the call that records a refund in autocommit) is passed on to Postgres
    and then the connection is cut before Postgres' answer reaches the client."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.armed = threading.Event()
        self.cut = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            link = _Link(client, socket.create_connection(self.target))
            threading.Thread(target=self._up, args=(link,), daemon=True).start()
            threading.Thread(target=self._down, args=(link,), daemon=True).start()

    def _up(self, link: _Link) -> None:
        try:
            while data := link.client.recv(65536):
                commits = b"COMMIT\x00" in data or b"initiate_refund(" in data
                if self.armed.is_set() and commits:
                    self.armed.clear()
                    link.holding.set()
                    link.server.sendall(data)  # Postgres gets the COMMIT and applies it...
                    time.sleep(0.5)
                    self.cut.set()
                    link.close()  # ...and its answer never arrives
                    return
                link.server.sendall(data)
        except OSError:
            pass
        link.close()

    def _down(self, link: _Link) -> None:
        try:
            while data := link.server.recv(65536):
                if link.holding.is_set():
                    continue
                link.client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(service_env: dict[str, str]) -> Iterator[CommitCuttingProxy]:
    url = urlsplit(service_env["DATABASE_URL"])
    server = CommitCuttingProxy(url.hostname or "127.0.0.1", url.port or 5432)
    yield server
    server.close()


def test_a_commit_cut_off_is_outcome_unknown_and_the_same_key_finds_the_refund(
    service_env: dict[str, str], log_dir: Path, settings, db: Session,
    proxy: CommitCuttingProxy,
) -> None:
    url = urlsplit(service_env["DATABASE_URL"])
    through_proxy = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    web, base = web_process({**service_env, "DATABASE_URL": through_proxy}, log_dir, workers=1)
    payment, charge = seed_payment(db, amount=2_000)
    db.commit()
    headers = {**auth(settings), "Idempotency-Key": f"cut-commit-{payment.id}"}
    body = {"charge_id": charge.id, "amount_cents": 700}
    with web:
        wait_for_http(f"{base}/healthz", proc=web.proc)
        proxy.armed.set()
        cut = httpx.post(f"{base}/v1/admin/refunds", json=body, headers=headers, timeout=30)
        assert proxy.cut.is_set()

        assert cut.status_code == 503, cut.text
        error = cut.json()
        assert error["error"] == "outcome_unknown"
        assert "nothing was recorded" not in error["message"]
        assert "same Idempotency-Key" in error["message"] and "look the refund up" in error[
            "message"]
        assert cut.headers.get("Retry-After")

        # It was recorded: Postgres applied the COMMIT.
        db.expire_all()
        [recorded] = db.scalars(select(Refund).where(Refund.payment_id == payment.id)).all()
        assert (recorded.amount, recorded.status) == (700, "pending")

        # What the message says to do: the same key answers with that refund, once.
        again = httpx.post(f"{base}/v1/admin/refunds", json=body, headers=headers, timeout=30)
        assert again.status_code == 201, again.text
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json()["refund_id"] == recorded.id
    db.expire_all()
    assert len(db.scalars(select(Refund).where(Refund.payment_id == payment.id)).all()) == 1


def test_a_database_down_before_commit_still_says_nothing_was_recorded(
    service_env: dict[str, str], log_dir: Path, settings, db: Session
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once closed
    url = urlsplit(service_env["DATABASE_URL"])
    nowhere = urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{port}"))
    web, base = web_process({**service_env, "DATABASE_URL": nowhere}, log_dir, workers=1)
    with web:
        wait_for_http(f"{base}/healthz", proc=web.proc)
        resp = httpx.post(f"{base}/v1/admin/refunds", json={"charge_id": "ch_x", "full": True},
                          headers=auth(settings), timeout=30)
    assert resp.status_code == 503
    assert resp.json()["error"] == "unavailable"
    assert "nothing was recorded" in resp.json()["message"]
