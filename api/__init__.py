"""The Flask application: thin HTTP entry points over ``shared``."""

from __future__ import annotations

from flask import Flask, Response, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from api.errors import register_error_handlers
from api.plain_endpoints import PlainEndpoints
from api.request_id import request_id_from
from shared.adapters import db
from shared.adapters.config import get_settings


def create_app() -> Flask:
    settings = get_settings()
    db.bound_engine_pool(settings.web_db_connections)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # No implicit OPTIONS answers: an unsupported method gets the JSON 405 like any other.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # Werkzeug would answer '//' in a path with an HTML 308 redirect; every answer is JSON.
    app.url_map.merge_slashes = False

    @app.before_request
    def _request_id() -> None:
        g.request_id = request_id_from(request.headers.get("X-Request-Id", ""))

    @app.before_request
    def _whole_streamed_body() -> None:
        # A chunked body has no Content-Length to check up front, and Werkzeug stops
        # reading it at MAX_CONTENT_LENGTH without saying so: read it here and refuse one
        # that reaches the limit, rather than let a view parse a truncated body.
        streamed = request.content_length is None and "Transfer-Encoding" in request.headers
        if streamed and len(request.get_data(cache=True)) >= settings.max_request_bytes:
            raise RequestEntityTooLarge()

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response

    from api import (
        approvals,
        console,
        health,
        metrics,
        openapi,
        refunds,
        webhook_endpoints,
        webhooks,
    )

    blueprints = (refunds.bp, approvals.bp, webhooks.bp, health.bp, metrics.bp, openapi.bp,
                  console.bp, webhook_endpoints.bp)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    # POST /v1/admin/refunds and /v1/webhooks/stripe are answered in front of Flask
    # (api/plain_endpoints.py).
    app.wsgi_app = PlainEndpoints(  # type: ignore[method-assign]
        app.wsgi_app, settings.max_request_bytes)
    return app
