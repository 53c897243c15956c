"""The id every answer carries in ``X-Request-Id`` and every log line of its request."""

from __future__ import annotations

import uuid

REQUEST_ID_MAX = 128


def request_id_from(incoming: str) -> str:
    """The caller's ``X-Request-Id`` when it is usable in a log line, else a new one."""
    valid = 0 < len(incoming) <= REQUEST_ID_MAX and incoming.isascii() and incoming.isprintable()
    return incoming if valid else uuid.uuid4().hex
