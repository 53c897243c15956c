"""Idempotency-Key records (SPEC 3.4), scoped to the caller.

The record is claimed inside the same transaction as the refund it answers for (the
database's ``initiate_refund``, migration 0015), so two concurrent requests with one key
serialize on its primary key: the second waits for the first to commit and then
replays its answer. A record lives ``KEY_TTL_HOURS``; retention deletes it later."""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_TTL_HOURS = 24


def request_fingerprint(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
