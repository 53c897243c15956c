"""Service endpoints that need no token."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from shared.adapters.celery_app import get_celery
from shared.adapters.db import get_engine

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    down = []
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        down.append("database")
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception:
        down.append("broker")
    if down:
        body = jsonify(
            error="unavailable", message=f"Not ready: {', '.join(down)} unreachable.", down=down
        )
        return body, 503
    return jsonify(status="ready"), 200
