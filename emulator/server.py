"""The emulator's HTTP server: Stripe's ``/v1`` API plus the ``/_emulator`` admin API.

Stripe API requests go through, in order: request counting, the rate limiter,
``fail_next`` and ``timeout_next`` faults, authentication, the idempotency
layer, the endpoint itself (under the store's lock), and finally
``drop_after_apply_next``, which closes the connection after the request was
applied and its answer saved for idempotent replay. Injected latency is slept
once per request: after the idempotency key is claimed (so it widens the
window in which a concurrent request with the same key gets 409), or before
answering a request refused earlier.

``serve()`` runs a server in the foreground; ``create_server()`` returns one to
run however the caller likes (``serve_forever`` in a thread, say).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .config import Config
from .errors import StripeError
from .faults import FaultError, Faults, Stats
from .idempotency import IdempotencyStore
from .params import parse_form
from .scheduler import Scheduler
from .store import API_VERSION, RequestContext, Store, copy_json, new_id
from .webhooks import WebhookDispatcher

log = logging.getLogger("emulator")

DEFAULT_PORT = 12111


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class _Close:
    """Answer nothing and close the connection."""


CLOSE = _Close()
Answer = Response | _Close

Endpoint = Callable[[Store, str | None, dict[str, Any], RequestContext], dict[str, Any]]

# (method, path template) -> endpoint. In every templated path the object id is
# the fourth segment ("/v1/refunds/{id}/cancel"), which makes matching one dict hit.
STRIPE_ROUTES: dict[tuple[str, str], Endpoint] = {
    ("POST", "/v1/payment_intents"): lambda s, _id, p, c: s.create_payment_intent(p, c),
    ("GET", "/v1/payment_intents"): lambda s, _id, p, c: s.list_payment_intents(p),
    ("GET", "/v1/payment_intents/{id}"): lambda s, i, p, c: s.retrieve_payment_intent(i, p),
    ("POST", "/v1/payment_intents/{id}"): lambda s, i, p, c: s.update_payment_intent(i, p, c),
    ("POST", "/v1/payment_intents/{id}/confirm"): lambda s, i, p, c: s.confirm_payment_intent(
        i, p, c
    ),
    ("POST", "/v1/payment_intents/{id}/cancel"): lambda s, i, p, c: s.cancel_payment_intent(
        i, p, c
    ),
    ("POST", "/v1/charges"): lambda s, _id, p, c: s.create_charge(p, c),
    ("GET", "/v1/charges"): lambda s, _id, p, c: s.list_charges(p),
    ("GET", "/v1/charges/{id}"): lambda s, i, p, c: s.retrieve_charge(i, p),
    ("POST", "/v1/charges/{id}"): lambda s, i, p, c: s.update_charge(i, p, c),
    ("POST", "/v1/charges/{id}/refunds"): lambda s, i, p, c: s.create_refund(p, c, charge_id=i),
    ("GET", "/v1/charges/{id}/refunds"): lambda s, i, p, c: s.list_charge_refunds(i, p),
    ("POST", "/v1/refunds"): lambda s, _id, p, c: s.create_refund(p, c),
    ("GET", "/v1/refunds"): lambda s, _id, p, c: s.list_refunds(p),
    ("GET", "/v1/refunds/{id}"): lambda s, i, p, c: s.retrieve_refund(i, p),
    ("POST", "/v1/refunds/{id}"): lambda s, i, p, c: s.update_refund(i, p, c),
    ("POST", "/v1/refunds/{id}/cancel"): lambda s, i, p, c: s.cancel_refund(i, p, c),
    ("GET", "/v1/events"): lambda s, _id, p, c: s.list_events(p),
    ("GET", "/v1/events/{id}"): lambda s, i, p, c: s.retrieve_event(i, p),
    ("POST", "/v1/payment_methods"): lambda s, _id, p, c: s.create_payment_method(p, c),
    ("GET", "/v1/payment_methods/{id}"): lambda s, i, p, c: s.retrieve_payment_method(i, p),
    ("GET", "/v1/disputes"): lambda s, _id, p, c: s.list_disputes(p),
    ("GET", "/v1/disputes/{id}"): lambda s, i, p, c: s.retrieve_dispute(i, p),
}


def route_template(path: str) -> tuple[str, str | None]:
    """``/v1/refunds/re_1/cancel`` -> ``("/v1/refunds/{id}/cancel", "re_1")``."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[3]:
        object_id = parts[3]
        parts[3] = "{id}"
        return "/".join(parts), object_id
    return path.rstrip("/") or "/", None


def _json(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


#: What a proxy between the client and Stripe answers: not Stripe's JSON.
_PROXY_ANSWERS = {
    408: b"<html><body><h1>408 Request Time-out</h1></body></html>",
    400: b"<html><body><h1>400 Bad Request</h1></body></html>",
}


def _injected_error(status: int) -> StripeError:
    if status == 429:
        return _rate_limit_error()
    if status == 409:
        return StripeError(
            409,
            "This object cannot be accessed right now because another API request or Stripe "
            "process is currently accessing it. (injected by the emulator)",
            code="lock_timeout",
            saved=False,
        )
    messages = {
        500: "An unknown error occurred. (injected by the emulator)",
        502: "Bad gateway. (injected by the emulator)",
        503: "The service is temporarily unavailable. (injected by the emulator)",
    }
    return StripeError(status, messages[status], type="api_error", saved=False)


def _rate_limit_error() -> StripeError:
    return StripeError(
        429,
        "Request rate limit exceeded. You can learn more about rate limits here "
        "https://stripe.com/docs/rate-limits.",
        code="rate_limit",
        saved=False,
        headers={"Retry-After": "1"},
    )


def _api_key(authorization: str | None) -> str:
    """The API key from ``Authorization`` (Bearer, or Basic with the key as user), else a 401."""
    header = (authorization or "").strip()
    key = ""
    if header.lower().startswith("bearer "):
        key = header[7:].strip()
    elif header.lower().startswith("basic "):
        try:
            key = base64.b64decode(header[6:].strip()).decode("utf-8").split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            key = ""
    if not key:
        raise StripeError(
            401,
            "You did not provide an API key. You need to provide your API key in the Authorization "
            "header, using "
            "Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
            "https://stripe.com/docs/api#authentication "
            "for details, or we can help at https://support.stripe.com/.",
            saved=False,
        )
    if not key.startswith(("sk_test_", "rk_test_")) or len(key) <= len("sk_test_"):
        masked = key[:8] + "*" * 4 + key[-4:] if len(key) > 12 else "*" * len(key)
        raise StripeError(401, f"Invalid API Key provided: {masked}", saved=False)
    return key


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class EmulatorApp:
    """Everything but the sockets: state, faults, counters and request handling."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.faults = Faults()
        self.scheduler = Scheduler()
        self.webhooks = WebhookDispatcher(config, self.scheduler, self.stats)
        self.store = Store(config, self.scheduler, on_event=self.webhooks.submit)
        self.idempotency = IdempotencyStore(lambda: self.config.idempotency_ttl)

    def close(self) -> None:
        self.webhooks.stop()
        self.scheduler.stop()

    # ------------------------------------------------------------ Stripe API

    def handle_stripe(
        self, method: str, path: str, query: str, body: bytes, headers: Any
    ) -> Answer:
        request_id = new_id("req", 14)
        template, object_id = route_template(path)
        endpoint = STRIPE_ROUTES.get((method, template))
        self.stats.count_request(f"{method} {template}" if endpoint else f"{method} (unrecognized)")
        version = headers.get("Stripe-Version") or API_VERSION
        base_headers = {"Request-Id": request_id, "Stripe-Version": version}

        latency = self.faults.latency()

        def nap() -> None:
            if latency:
                time.sleep(latency)

        def error(exc: StripeError, extra: dict[str, str] | None = None) -> Response:
            nap()
            return Response(
                exc.status, _json(exc.body()), {**base_headers, **exc.headers, **(extra or {})}
            )

        if not self.faults.take_rate_token():
            self.stats.count("rate_limited")
            return error(_rate_limit_error())
        status = self.faults.take_fail(method, path)
        if status is not None:
            self.stats.count_fault("fail_next")
            if status in _PROXY_ANSWERS:
                nap()
                return Response(status, _PROXY_ANSWERS[status], {"Content-Type": "text/html"})
            return error(_injected_error(status))
        seconds = self.faults.take_timeout(method, path)
        if seconds is not None:
            self.stats.count_fault("timeout_next")
            time.sleep(seconds)
            return CLOSE
        try:
            api_key = _api_key(headers.get("Authorization"))
            if endpoint is None:
                raise StripeError(
                    404,
                    f"Unrecognized request URL ({method}: {path}). Please see "
                    "https://stripe.com/docs or we can "
                    "help at https://support.stripe.com/.",
                    saved=False,
                )
            raw = query if method != "POST" else body.decode("utf-8", errors="replace")
            params = parse_form(raw)
        except StripeError as exc:
            return error(exc)

        idempotency_key = headers.get("Idempotency-Key") if method == "POST" else None
        extra_headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        entry = None
        if idempotency_key:
            try:
                fresh, entry = self.idempotency.begin(
                    api_key, idempotency_key, method, path, params
                )
            except StripeError as exc:
                self.stats.count(
                    "idempotency_key_in_use" if exc.status == 409 else "idempotency_errors"
                )
                return error(exc, extra_headers)
            nap()
            if not fresh:
                self.stats.count("idempotent_replays")
                answer: Answer = Response(
                    entry.status,
                    entry.body,
                    {
                        **base_headers,
                        **entry.headers,
                        **extra_headers,
                        "Idempotent-Replayed": "true",
                        "Original-Request": entry.request_id,
                    },
                )
                return self._maybe_drop(method, path, answer)
        else:
            nap()
        ctx = RequestContext(request_id=request_id, idempotency_key=idempotency_key)
        result_headers: dict[str, str] = {}
        try:
            with self.store.lock:
                result = endpoint(self.store, object_id, params, ctx)
                payload = _json(result)
            status, saved = 200, True
        except StripeError as exc:
            status, payload, saved, result_headers = (
                exc.status,
                _json(exc.body()),
                exc.saved,
                exc.headers,
            )
        except Exception:
            log.exception("error handling %s %s", method, path)
            exc = StripeError(
                500, "An unknown error occurred in the emulator.", type="api_error", saved=False
            )
            status, payload, saved = 500, _json(exc.body()), False
        if entry is not None and idempotency_key:
            if saved:
                self.idempotency.finish(entry, status, payload, request_id, result_headers)
            else:
                self.idempotency.abandon(api_key, idempotency_key, entry)
        answer = Response(status, payload, {**base_headers, **result_headers, **extra_headers})
        return self._maybe_drop(method, path, answer)

    def _maybe_drop(self, method: str, path: str, answer: Answer) -> Answer:
        if self.faults.take_drop(method, path):
            self.stats.count_fault("drop_after_apply_next")
            return CLOSE
        if isinstance(answer, Response) and self.faults.take_garble(method, path):
            # Applied and saved, but the body arrives cut short (a broken proxy, a
            # truncated read): a 200 the client cannot parse.
            self.stats.count_fault("garble_after_apply_next")
            return Response(200, answer.body[: len(answer.body) // 2], answer.headers)
        return answer

    # -------------------------------------------------------------- admin API

    def handle_admin(self, method: str, path: str, query: str, body: bytes) -> Response:
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            return self._admin_error(AdminError(400, "body must be JSON"))
        try:
            result = self._admin(method, path, parse_qs(query), data)
        except AdminError as exc:
            return self._admin_error(exc)
        except (ValueError, FaultError) as exc:
            return self._admin_error(AdminError(400, str(exc)))
        except StripeError as exc:
            return Response(exc.status, _json(exc.body()), {"Request-Id": new_id("req", 14)})
        return Response(200, _json(result), {"Request-Id": new_id("req", 14)})

    @staticmethod
    def _admin_error(exc: AdminError) -> Response:
        body = {"error": {"type": "emulator_error", "message": exc.message}}
        return Response(exc.status, _json(body), {"Request-Id": new_id("req", 14)})

    def _admin(self, method: str, path: str, query: dict[str, list[str]], data: Any) -> Any:
        template, object_id = route_template(path)
        route = (method, template)
        if route == ("GET", "/_emulator/health"):
            return {"ok": True}
        if route == ("GET", "/_emulator/faults"):
            return self.faults.snapshot()
        if route == ("POST", "/_emulator/faults"):
            self.faults.update(data)
            return self.faults.snapshot()
        if route == ("DELETE", "/_emulator/faults"):
            self.faults.clear()
            return self.faults.snapshot()
        if route == ("GET", "/_emulator/stats"):
            return self.stats_snapshot()
        if route == ("DELETE", "/_emulator/stats"):
            self.stats.clear()
            return self.stats_snapshot()
        if route == ("GET", "/_emulator/refunds"):
            refund_id = query.get("metadata_refund_id", [None])[0]
            return {"data": self.store.admin_refunds(refund_id)}
        if route == ("POST", "/_emulator/refunds/{id}/fail"):
            reason = data.get("failure_reason") if isinstance(data, dict) else None
            return self.store.admin_move_refund(str(object_id), "fail", reason)
        if route == ("POST", "/_emulator/refunds/{id}/succeed"):
            return self.store.admin_move_refund(str(object_id), "succeed")
        if route == ("POST", "/_emulator/charges/{id}/dispute"):
            data = data if isinstance(data, dict) else {}
            with self.store.lock:
                dispute = self.store.dispute_charge(
                    str(object_id),
                    reason=str(data.get("reason", "fraudulent")),
                    inquiry=bool(data.get("inquiry", False)),
                )
                return copy_json(dispute)
        if route == ("POST", "/_emulator/forget_idempotency_keys"):
            return {"forgotten": self.idempotency.forget_all()}
        if route == ("POST", "/_emulator/reset"):
            self.reset()
            return {"ok": True}
        if route == ("GET", "/_emulator/config"):
            return self.config.as_dict()
        if route == ("POST", "/_emulator/config"):
            if not isinstance(data, dict):
                raise AdminError(400, "body must be a JSON object")
            self.config.update(data)
            return self.config.as_dict()
        if route == ("POST", "/_emulator/seed"):
            return self._seed(data)
        if route == ("GET", "/_emulator/webhooks"):
            return {"pending": self.webhooks.pending(), "deliveries": self.webhooks.deliveries()}
        raise AdminError(404, f"no admin endpoint {method} {path}")

    def _seed(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise AdminError(400, "body must be a JSON object")
        count = data.get("count", 1)
        amount = data.get("amount", 1000)
        for name, value, low in (("count", count, 0), ("amount", amount, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AdminError(400, f"{name} must be an integer >= {low}")
        if count > 1_000_000:
            raise AdminError(400, "count must be at most 1000000")
        currency = data.get("currency", "usd")
        if not isinstance(currency, str) or len(currency) != 3:
            raise AdminError(400, "currency must be a 3-letter code")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise AdminError(400, "metadata must be an object of strings")
        started = time.perf_counter()
        ids = self.store.seed(
            count=count,
            amount=amount,
            currency=currency.lower(),
            payment_method=str(data.get("payment_method", "pm_card_visa")),
            metadata=metadata,
            events=bool(data.get("events", False)),
        )
        return {"count": count, **ids, "seconds": round(time.perf_counter() - started, 4)}

    def stats_snapshot(self) -> dict[str, Any]:
        snapshot = self.stats.snapshot()
        snapshot.update(self.store.counts())
        snapshot["webhooks"]["pending"] = self.webhooks.pending()
        snapshot["idempotency_keys"] = len(self.idempotency)
        return snapshot

    def reset(self) -> None:
        """Wipe objects, events, idempotency keys, faults, counters and queued work.

        The config stays."""
        self.scheduler.clear()
        self.webhooks.reset()
        self.store.reset()
        self.idempotency.forget_all()
        self.faults.clear()
        self.stats.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stripe-emulator"
    sys_version = ""
    timeout = 300  # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: EmulatorServer

    def do_GET(self) -> None:
        self.server.dispatch(self)

    do_POST = do_GET
    do_DELETE = do_GET
    do_PUT = do_GET  # answered with Stripe's JSON 404
    do_PATCH = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, host: str, port: int, app: EmulatorApp, *, verbose: bool = False) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        self.verbose = verbose
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def dispatch(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length > 0 else b""
        admin = split.path.startswith("/_emulator/")
        if admin:
            answer: Answer = self.app.handle_admin(handler.command, split.path, split.query, body)
        else:
            answer = self.app.handle_stripe(
                handler.command, split.path, split.query, body, handler.headers
            )
        if isinstance(answer, _Close):
            self.app.stats.count_response("closed")
            handler.close_connection = True
            return
        if not admin:
            self.app.stats.count_response(str(answer.status))
        handler.send_response(answer.status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(answer.body)))
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(answer.body)

    def close(self) -> None:
        self.server_close()
        self.app.close()


def create_server(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    webhook_url: str | None = None,
    webhook_secret: str = "whsec_local",  # noqa: S107 - the public local-dev default
    pending_refund_delay: float = 1.0,
    failing_refund_delay: float = 1.0,
    idempotency_ttl: float = 86400,
    verbose: bool = False,
) -> EmulatorServer:
    """A bound, not yet serving, emulator. ``port=0`` picks a free port (see ``.url``)."""
    config = Config()
    config.update(
        {
            "webhook_url": webhook_url,
            "webhook_secret": webhook_secret,
            "pending_refund_delay": pending_refund_delay,
            "failing_refund_delay": failing_refund_delay,
            "idempotency_ttl": idempotency_ttl,
        }
    )
    return EmulatorServer(host, port, EmulatorApp(config), verbose=verbose)


def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    webhook_url: str | None = None,
    webhook_secret: str = "whsec_local",  # noqa: S107 - the public local-dev default
    pending_refund_delay: float = 1.0,
    failing_refund_delay: float = 1.0,
    idempotency_ttl: float = 86400,
    verbose: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then return (the process exits 0)."""
    server = create_server(
        host,
        port,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        pending_refund_delay=pending_refund_delay,
        failing_refund_delay=failing_refund_delay,
        idempotency_ttl=idempotency_ttl,
        verbose=verbose,
    )

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever to return, so it must not run on this thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    print(f"stripe emulator listening on {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.close()
