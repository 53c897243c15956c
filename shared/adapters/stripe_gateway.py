"""The one adapter to Stripe. Real Stripe by default; the project's emulator when
STRIPE_API_BASE points at it. Everything else talks to Stripe through this class.

Every request first takes a token from the shared rate limiter (SPEC 6), and
``classify_error`` is the one place that decides what a Stripe error means for a refund.
"""

from __future__ import annotations

import enum
import functools
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pycurl
import stripe
import urllib3

from shared.adapters.config import Settings, get_settings
from shared.adapters.metrics import observe_stripe_call, stripe_endpoint
from shared.adapters.rate_limit import RateLimited, get_limiter

# Stripe sends these as `reason`; any other text travels in metadata only.
STRIPE_REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})
PAGE_SIZE = 100


class ErrorKind(enum.StrEnum):
    #: Outcome unknown or Stripe busy (network, timeout, 429, 408, 409, 5xx, an answer
    #: that is not Stripe's): try again later, looking the refund up first.
    TRANSIENT = "transient"
    #: Stripe refused this request for good: a 4xx carrying a Stripe error body.
    DEFINITE = "definite"
    #: Our key is wrong or lacks a permission: retrying cannot help, a person must act.
    AUTH = "auth"
    #: The idempotency key was used with other parameters: a bug on our side, and a
    #: refund may exist at Stripe, so it must not be failed either.
    KEY_CONFLICT = "key_conflict"


@dataclass(frozen=True)
class StripeFailure:
    kind: ErrorKind
    code: str | None
    message: str
    http_status: int | None = None
    retry_after: float | None = None

    def describe(self) -> str:
        """``code: message``, as stored in ``failure_reason`` / ``last_error``."""
        return f"{self.code or self.http_status or self.kind}: {self.message}"[:500]


class UnexpectedAnswer(stripe.APIError):
    """A 2xx whose body is not the object asked for (a proxy's page, a cut-off body):
    whether Stripe acted is unknown."""


def classify_error(exc: Exception) -> StripeFailure:
    """What a Stripe error (or our own rate limiter) means for the refund being sent.

    "Definite" means Stripe said no (SPEC 6): only a 4xx that carries a Stripe error
    body. Anything else, from something between us and Stripe or from a Stripe that did
    not finish, leaves the outcome unknown."""
    if isinstance(exc, RateLimited):
        return StripeFailure(ErrorKind.TRANSIENT, "rate_limited", exc.user_message or "", None,
                             exc.retry_after)
    if not isinstance(exc, stripe.StripeError):
        raise TypeError(f"not a Stripe error: {type(exc).__name__}")
    status = exc.http_status
    code = exc.code or _stripe_error_code(exc)
    message = (exc.user_message or type(exc).__name__).strip()
    if isinstance(exc, stripe.APIConnectionError) or status is None:
        # The request may or may not have reached Stripe: unknown, never definite.
        return StripeFailure(ErrorKind.TRANSIENT, code or "connection_error", message, status)
    if status == 429 or isinstance(exc, stripe.RateLimitError):
        return StripeFailure(ErrorKind.TRANSIENT, code or "rate_limit", message, status,
                             _retry_after(exc))
    if not 400 <= status < 500 or status in (408, 409) or not _has_stripe_error_body(exc):
        # 5xx, a 2xx without the object, 408 (timed out), 409 (the same key in flight
        # elsewhere, or Stripe's lock_timeout), or a 4xx from something in between.
        return StripeFailure(ErrorKind.TRANSIENT, code or f"http_{status}", message, status)
    if status in (401, 403):
        return StripeFailure(ErrorKind.AUTH, code or "authentication_error", message, status)
    if isinstance(exc, stripe.IdempotencyError):
        return StripeFailure(ErrorKind.KEY_CONFLICT, code or "idempotency_error", message, status)
    return StripeFailure(ErrorKind.DEFINITE, code or "invalid_request_error", message, status)


def _stripe_error(exc: stripe.StripeError) -> dict[str, Any] | None:
    """The ``error`` object of a Stripe error body, if the answer carried one."""
    body = exc.json_body
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) and isinstance(error.get("type"), str) else None


def _has_stripe_error_body(exc: stripe.StripeError) -> bool:
    return _stripe_error(exc) is not None


def _stripe_error_code(exc: stripe.StripeError) -> str | None:
    # The SDK leaves ``code`` empty on some classes (a 409's) though the body has one.
    code = (_stripe_error(exc) or {}).get("code")
    return code if isinstance(code, str) else None


def _retry_after(exc: stripe.StripeError) -> float | None:
    value = (exc.headers or {}).get("Retry-After") or (exc.headers or {}).get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class StripeHttpClient(stripe.HTTPClient):
    """The SDK's HTTP client on libcurl (pycurl), one handle per thread, timing every
    request.

    The SDK's default (requests) spent more CPU per call than the rest of a worker's
    refund, and urllib3 under it still a sixth of the worker's CPU (make bench,
    BENCH_PROFILE=1: header parsing, pool lookups, a socket check per request). libcurl
    does the whole exchange in C with the GIL released; its pycurl binding is the one
    the SDK offers (``stripe.PycurlClient``), whose single handle cannot be shared by
    threads, hence one per thread here. A handle keeps its keep-alive connection
    between requests, so a worker holds one connection to Stripe per busy thread.

    ``timeout`` bounds the whole request (connect, send, answer). Proxies come from
    ``HTTPS_PROXY`` as with requests; no redirect is followed and nothing is retried
    here (retries are the worker's decision, SPEC 6): libcurl may send a GET again once
    on a kept-alive connection that died before any answer (a lookup, which changes
    nothing at Stripe), never a create (below). It blocks in C, so it is for threads,
    never a gevent process: the web never calls Stripe (SPEC 3.3)."""

    name = "pycurl"

    def __init__(self, *, timeout: float) -> None:
        super().__init__()
        self._timeout_ms = max(1, round(timeout * 1000))
        self._proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or ""
        self._local = threading.local()

    def _handle(self) -> Any:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = pycurl.Curl()
        return handle

    def request(  # type: ignore[override]
        self, method: str, url: str, headers: Any, post_data: Any = None, **_: Any
    ) -> tuple[bytes, int, Any]:
        start = time.perf_counter()
        status: int | str = "error"
        handle = self._handle()
        body = io.BytesIO()
        head: list[bytes] = []
        try:
            handle.reset()  # options only: the connection stays open for the next request
            handle.setopt(pycurl.URL, url)
            verb = method.lower()
            if verb == "post":
                # libcurl quietly sends a request again when a reused connection dies
                # before any answer; a POST is a create, and sending one again is the
                # worker's decision, after a lookup (SPEC 6). A body libcurl cannot
                # rewind makes that an error (curl error 65) the worker then handles.
                data = post_data.encode() if isinstance(post_data, str) else post_data or b""
                handle.setopt(pycurl.POST, 1)
                handle.setopt(pycurl.POSTFIELDSIZE, len(data))
                handle.setopt(pycurl.READFUNCTION, io.BytesIO(data).read)
                handle.setopt(pycurl.SEEKFUNCTION, _cannot_rewind)
            elif verb != "get":
                handle.setopt(pycurl.CUSTOMREQUEST, method.upper())
            # "Expect:" drops curl's 100-continue round trip for larger bodies.
            handle.setopt(pycurl.HTTPHEADER, [f"{k}: {v}" for k, v in headers.items()]
                          + ["Expect:"])
            handle.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
            handle.setopt(pycurl.TIMEOUT_MS, self._timeout_ms)
            handle.setopt(pycurl.NOSIGNAL, 1)  # timeouts without SIGALRM: safe in threads
            handle.setopt(pycurl.CAINFO, stripe.ca_bundle_path)
            handle.setopt(pycurl.PROXY, self._proxy)  # "": none, whatever else is set
            handle.setopt(pycurl.WRITEFUNCTION, body.write)
            handle.setopt(pycurl.HEADERFUNCTION, head.append)
            handle.perform()
            status = handle.getinfo(pycurl.RESPONSE_CODE)
        except pycurl.error as exc:
            # Timeouts, refused or dropped connections: the request may or may not have
            # reached Stripe (classify_error: unknown outcome). The handle starts afresh.
            self._local.handle = None
            handle.close()
            code = exc.args[0] if exc.args else None
            raise stripe.APIConnectionError(
                f"Could not complete the request to Stripe ({_CURL_ERRORS.get(code, 'failed')},"
                f" curl error {code}).",
                should_retry=False,
            ) from exc
        finally:
            observe_stripe_call(method=method, endpoint=stripe_endpoint(url), status=status,
                                seconds=time.perf_counter() - start)
        return body.getvalue(), int(status), _last_header_block(head)

    def request_stream(self, *args: Any, **kwargs: Any) -> Any:  # never used: no streams
        raise NotImplementedError("StripeHttpClient does not stream")

    def close(self) -> None:
        """Close this thread's handle and its connection (other threads' go with them)."""
        handle = getattr(self._local, "handle", None)
        self._local.handle = None
        if handle is not None:
            handle.close()


#: What the usual libcurl failures mean, in words for ``last_error`` (libcurl's own text
#: can name hosts and proxies).
_CURL_ERRORS = {
    pycurl.E_OPERATION_TIMEDOUT: "timed out",
    pycurl.E_COULDNT_CONNECT: "could not connect",
    pycurl.E_COULDNT_RESOLVE_HOST: "could not resolve the host",
    pycurl.E_COULDNT_RESOLVE_PROXY: "could not resolve the proxy",
    pycurl.E_GOT_NOTHING: "no answer",
    pycurl.E_SEND_ERROR: "connection dropped while sending",
    pycurl.E_RECV_ERROR: "connection dropped while receiving",
    pycurl.E_PARTIAL_FILE: "answer cut off",
    pycurl.E_SSL_CONNECT_ERROR: "TLS handshake failed",
    pycurl.E_PEER_FAILED_VERIFICATION: "Stripe's certificate was not trusted",
    pycurl.E_SEND_FAIL_REWIND: "connection dropped before an answer",
}


def _cannot_rewind(_offset: int, _origin: int) -> int:
    return pycurl.SEEKFUNC_CANTSEEK


def _last_header_block(lines: list[bytes]) -> urllib3.HTTPHeaderDict:
    """The final answer's headers, looked up by any case as the SDK does ("Request-Id",
    "request-id"); a proxy's CONNECT answer comes first and is skipped."""
    headers = urllib3.HTTPHeaderDict()
    for raw in lines:
        line = raw.decode("latin-1")
        if line.startswith("HTTP/"):
            headers = urllib3.HTTPHeaderDict()
        name, colon, value = line.partition(":")
        if colon:
            headers.add(name.strip(), value.strip())
    return headers


#: Errors ``classify_error`` understands: what callers of this gateway catch.
GATEWAY_ERRORS = (stripe.StripeError,)


class StripeGateway:
    def __init__(self, settings: Settings, *, throttle: Callable[[], None] | None = None) -> None:
        #: Called before every request; by default the shared limiter.
        self._throttle = throttle if throttle is not None else get_limiter().acquire
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self._client = stripe.StripeClient(
            settings.stripe_api_key,
            base_addresses=base,  # type: ignore[arg-type]
            # Retries are the worker's decision (SPEC 6), never hidden in the SDK.
            max_network_retries=0,
            http_client=StripeHttpClient(timeout=settings.stripe_timeout_seconds),  # timed
        )

    # Refunds -----------------------------------------------------------------
    #
    # Refunds come back as plain dicts (Stripe's JSON): building the SDK's objects cost
    # more CPU than the rest of a worker's refund (make bench, BENCH_PROFILE=1).

    def create_refund(
        self,
        *,
        refund_id: str,
        idempotency_key: str,
        amount: int,
        charge_id: str | None,
        payment_intent_id: str | None,
        reason: str | None,
    ) -> dict[str, Any]:
        """Create the Stripe refund for our refund. The same arguments on every attempt."""
        params: dict[str, Any] = {"amount": amount, "metadata": {"refund_id": refund_id}}
        if charge_id is not None:
            params["charge"] = charge_id
        else:
            params["payment_intent"] = payment_intent_id
        if reason in STRIPE_REFUND_REASONS:
            params["reason"] = reason
        elif reason:
            params["metadata"]["reason"] = reason[:500]
        return self._refund("post", "/v1/refunds", idempotency_key=idempotency_key, **params)

    def retrieve_refund(self, stripe_refund_id: str) -> dict[str, Any]:
        return self._refund("get", f"/v1/refunds/{quote(stripe_refund_id, safe='')}")

    def iter_refunds(
        self, *, charge_id: str | None = None, payment_intent_id: str | None = None
    ) -> Iterator[dict[str, Any]]:
        filters: dict[str, Any] = {}
        if charge_id is not None:
            filters["charge"] = charge_id
        elif payment_intent_id is not None:
            filters["payment_intent"] = payment_intent_id
        return self._plain_pages("/v1/refunds", None, **filters)

    def find_refund(
        self, *, refund_id: str, charge_id: str | None, payment_intent_id: str | None
    ) -> dict[str, Any] | None:
        """The Stripe refund whose ``metadata.refund_id`` is ours, if Stripe has one."""
        for refund in self.iter_refunds(charge_id=charge_id, payment_intent_id=payment_intent_id):
            if (refund.get("metadata") or {}).get("refund_id") == refund_id:
                return refund
        return None

    def _refund(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        self._throttle()
        response = self._client.raw_request(method, path, **params)
        data = response.data
        if not (isinstance(data, dict) and data.get("object") == "refund"
                and isinstance(data.get("id"), str) and isinstance(data.get("status"), str)):
            raise UnexpectedAnswer(
                "Stripe's answer did not carry a refund.", http_status=response.code
            )
        return data

    # Payments in -------------------------------------------------------------

    def iter_payment_intents(
        self, *, starting_after: str | None = None
    ) -> Iterator[dict[str, Any]]:
        return self._plain_pages("/v1/payment_intents", starting_after)

    def iter_charges(self, *, starting_after: str | None = None) -> Iterator[dict[str, Any]]:
        return self._plain_pages("/v1/charges", starting_after)

    def iter_all_refunds(self, *, starting_after: str | None = None) -> Iterator[dict[str, Any]]:
        return self._plain_pages("/v1/refunds", starting_after)

    def _plain_pages(
        self, path: str, starting_after: str | None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Every item of a list (after ``starting_after``) as a plain dict, for bulk reads.

        Building the SDK's objects costs several times more CPU than the request itself
        (20,000 charges: ~15 s against ~2 s), so these pages stay the parsed JSON."""
        params: dict[str, Any] = {"limit": PAGE_SIZE, **filters}
        if starting_after is not None:
            params["starting_after"] = starting_after
        while True:
            self._throttle()
            response = self._client.raw_request("get", path, **params)
            page = response.data
            if not (isinstance(page, dict) and isinstance(page.get("data"), list)):
                raise UnexpectedAnswer("Stripe's answer did not carry a list.",
                                       http_status=response.code)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            params["starting_after"] = page["data"][-1]["id"]

    def retrieve_charge(self, charge_id: str) -> stripe.Charge:
        self._throttle()
        return self._client.v1.charges.retrieve(charge_id)

    def retrieve_payment_intent(self, payment_intent_id: str) -> stripe.PaymentIntent:
        self._throttle()
        return self._client.v1.payment_intents.retrieve(payment_intent_id)


@functools.cache
def get_gateway() -> StripeGateway:
    return StripeGateway(get_settings())
