"""``refunds worker-health``: is a Celery worker alive and answering? Exit 0 or 1.

Made for container healthchecks and on-call checks: it pings workers through the
broker's control channel (the same path Flower uses), so a worker that is up but
cut off from the broker, or stuck, fails it too.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from shared.adapters.celery_app import get_celery


@dataclass(frozen=True)
class Health:
    ok: bool
    message: str


def check_workers(*, timeout: float, node: str | None = None, this_host: bool = False) -> Health:
    """Ping ``node`` (a Celery node name such as ``worker@host``), the workers on this
    machine (``this_host``), or any worker."""
    app = get_celery()
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            # One named node: return on its answer. Otherwise wait out the timeout,
            # since nobody knows how many workers should answer.
            replies = app.control.ping(
                destination=[node] if node else None,
                timeout=timeout,
                limit=1 if node else None,
                connection=conn,
            )
    except Exception as exc:
        kind = type(exc).__name__
        return Health(False, f"broker unreachable ({kind}): check CELERY_BROKER_URL / REDIS_URL")
    names = sorted(name for reply in replies for name in reply)
    if this_host:
        suffix = "@" + socket.gethostname()
        names = [name for name in names if name.endswith(suffix)]
    if not names:
        target = node or (f"on {socket.gethostname()}" if this_host else "at all")
        return Health(False, f"no worker answered {target} within {timeout:g}s")
    return Health(True, f"ok: {', '.join(names)} answered")
