"""Test helpers: run the emulator as a real process and drive its admin API.

Typical use in a test module::

    @pytest.fixture(scope="module")
    def emulator():
        with EmulatorProcess(webhook_url=receiver_url) as emu:
            yield emu

    def test_something(emulator):
        emulator.admin.reset()
        client = emulator.client()            # stripe.StripeClient for this emulator
        seeded = emulator.admin.seed(count=3, amount=1000)
        emulator.admin.faults(fail_next={"status": 503, "count": 1, "path_prefix": "/v1/refunds"})
        ...
        assert emulator.admin.stats()["refunds_by_metadata_refund_id"] == {"r_1": 1}
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    import stripe

_ROOT = Path(__file__).resolve().parent.parent
_BANNER = "stripe emulator listening on "


class EmulatorError(RuntimeError):
    """The emulator did not start, or an admin call was refused."""


class Admin:
    """Thin client for the emulator's ``/_emulator`` admin API (JSON in, JSON out, no auth).

    Every method returns the decoded JSON answer and raises ``EmulatorError``
    on a non-2xx answer.
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def _session(self) -> requests.Session:
        # One session per thread: tests call the admin API from worker threads too.
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # the emulator is local: never through a proxy
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def request(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        response = self._session().request(
            method,
            f"{self.url}/_emulator/{path.lstrip('/')}",
            json=body,
            params=params,
            timeout=self.timeout,
        )
        if not 200 <= response.status_code < 300:
            raise EmulatorError(
                f"{method} /_emulator/{path} answered {response.status_code}: {response.text}"
            )
        return response.json()

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    def health(self) -> dict[str, Any]:
        return self.request("GET", "health")

    # Faults ------------------------------------------------------------------

    def faults(self, **spec: Any) -> dict[str, Any]:
        """Merge faults into the current ones and return them all. Fields (each optional):

        - ``latency_ms``: added to every Stripe API call.
        - ``rate_limit_rps``: token bucket over all Stripe API calls; beyond it 429 ``rate_limit``
          with ``Retry-After: 1``. ``None`` turns it off.
        - ``fail_next={"status": 500|502|503|429|409|408|400, "count": N,
          "path_prefix": "/v1/refunds", "method": "POST"}``: the next N matching requests get
          that error and change nothing.
        - ``timeout_next={"count": N, "seconds": S, "path_prefix": ..., "method": ...}``:
          hang S seconds, then close the connection without an answer; nothing is applied.
        - ``drop_after_apply_next={"count": N, "path_prefix": ..., "method": ...}``: apply the
          request (and save it for idempotent replay), then close the connection unanswered.

        A field set to ``None`` clears that fault.
        """
        return self.request("POST", "faults", spec)

    def get_faults(self) -> dict[str, Any]:
        return self.request("GET", "faults")

    def clear_faults(self) -> dict[str, Any]:
        return self.request("DELETE", "faults")

    # Observation -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: ``requests`` by ``"METHOD /v1/path/{id}"``, ``responses`` by status,
        ``rate_limited``, ``faults_fired``, ``idempotent_replays``, ``refunds``,
        ``refunds_by_status``, ``refunds_by_metadata_refund_id``, ``payment_intents``,
        ``charges``, ``events``,
        ``webhooks`` (``delivered``, ``failed_attempts``, ``gave_up``, ``pending``)."""
        return self.request("GET", "stats")

    def reset_stats(self) -> dict[str, Any]:
        """Zero the request, fault and webhook counters (objects stay)."""
        return self.request("DELETE", "stats")

    def refunds(self, metadata_refund_id: str | None = None) -> list[dict[str, Any]]:
        """All Stripe refunds, oldest first, or those whose ``metadata[refund_id]`` is this one."""
        params = (
            {"metadata_refund_id": metadata_refund_id} if metadata_refund_id is not None else None
        )
        return self.request("GET", "refunds", params=params)["data"]

    def webhook_deliveries(self) -> dict[str, Any]:
        """``{"pending": n, "deliveries": [...]}``, each delivery attempt being
        ``{"event", "type", "attempt", "status", "error", "ok", "at"}`` (the last 1000)."""
        return self.request("GET", "webhooks")

    # Moving things along -----------------------------------------------------

    def fail_refund(self, refund_id: str, failure_reason: str | None = None) -> dict[str, Any]:
        """Fail a pending or succeeded refund.

        Emits ``refund.failed``, ``refund.updated`` and ``charge.refund.updated``."""
        body = {"failure_reason": failure_reason} if failure_reason else {}
        return self.request("POST", f"refunds/{refund_id}/fail", body)

    def succeed_refund(self, refund_id: str) -> dict[str, Any]:
        """Complete a pending refund (``refund.updated``, ``charge.refund.updated``)."""
        return self.request("POST", f"refunds/{refund_id}/succeed", {})

    def dispute_charge(
        self, charge_id: str, *, reason: str = "fraudulent", inquiry: bool = False
    ) -> dict[str, Any]:
        """Open a dispute on a succeeded charge (``charge.dispute.created``).

        A charge with a dispute refuses refunds (``charge_disputed``), unless it is an inquiry."""
        return self.request(
            "POST", f"charges/{charge_id}/dispute", {"reason": reason, "inquiry": inquiry}
        )

    def seed(
        self,
        count: int,
        *,
        amount: int = 1000,
        currency: str = "usd",
        payment_method: str = "pm_card_visa",
        metadata: dict[str, str] | None = None,
        events: bool = False,
    ) -> dict[str, Any]:
        """Create ``count`` succeeded PaymentIntents with their charges, fast.

        Returns ``{"count", "payment_intents": [ids], "charges": [ids], "seconds"}``, the two
        lists aligned. No events (nor webhooks) unless ``events=True``.
        """
        body = {
            "count": count,
            "amount": amount,
            "currency": currency,
            "payment_method": payment_method,
            "metadata": metadata or {},
            "events": events,
        }
        return self.request("POST", "seed", body)

    # State -------------------------------------------------------------------

    def forget_idempotency_keys(self) -> int:
        """Forget every idempotency key, as Stripe does after 24 h. Returns how many."""
        return int(self.request("POST", "forget_idempotency_keys", {})["forgotten"])

    def reset(self) -> None:
        """Wipe objects, events, idempotency keys, faults and counters; the config stays."""
        self.request("POST", "reset", {})

    def config(self, **values: Any) -> dict[str, Any]:
        """Change settings: ``webhook_url``, ``webhook_secret``, ``pending_refund_delay``,
        ``failing_refund_delay``, ``idempotency_ttl``, ``webhook_max_attempts``,
        ``webhook_retry_base``, ``webhook_timeout``. Returns them all."""
        return self.request("POST", "config", values)

    def get_config(self) -> dict[str, Any]:
        return self.request("GET", "config")


class EmulatorProcess:
    """``python -m emulator`` as a child process, for a ``with`` block.

    Starts on a free port (unless ``port`` is given), waits until it answers,
    and stops it (SIGTERM, then SIGKILL) on exit. Attributes: ``url``, ``port``,
    ``admin`` (an ``Admin``), ``process`` (the ``subprocess.Popen``).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        webhook_url: str | None = None,
        webhook_secret: str = "whsec_local",  # noqa: S107 - the public local-dev default
        pending_refund_delay: float | None = None,
        failing_refund_delay: float | None = None,
        idempotency_ttl: float | None = None,
        verbose: bool = False,
        startup_timeout: float = 15.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.pending_refund_delay = pending_refund_delay
        self.failing_refund_delay = failing_refund_delay
        self.idempotency_ttl = idempotency_ttl
        self.verbose = verbose
        self.startup_timeout = startup_timeout
        self.env = env
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.port = 0
        self._admin: Admin | None = None

    @property
    def admin(self) -> Admin:
        if self._admin is None:
            raise EmulatorError("the emulator is not running")
        return self._admin

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "emulator",
            "--host",
            self.host,
            "--port",
            str(self.requested_port),
        ]
        if self.webhook_url:
            cmd += ["--webhook-url", self.webhook_url]
        cmd += ["--webhook-secret", self.webhook_secret]
        if self.pending_refund_delay is not None:
            cmd += ["--pending-refund-delay", str(self.pending_refund_delay)]
        if self.failing_refund_delay is not None:
            cmd += ["--failing-refund-delay", str(self.failing_refund_delay)]
        if self.idempotency_ttl is not None:
            cmd += ["--idempotency-ttl", str(self.idempotency_ttl)]
        if self.verbose:
            cmd.append("--verbose")
        return cmd

    def start(self) -> EmulatorProcess:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.command(), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env
        )
        try:
            line = self._first_line()
            self.url = line.strip()[len(_BANNER) :]
            self.port = int(self.url.rsplit(":", 1)[1])
            self._admin = Admin(self.url)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _first_line(self) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmulatorError(
                    f"the emulator exited at start with code {self.process.returncode}"
                )
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith(_BANNER):
                    return line
                if not line:
                    continue
                raise EmulatorError(f"unexpected first line from the emulator: {line!r}")
        raise EmulatorError(f"the emulator did not start within {self.startup_timeout} s")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self.admin.health()
                return
            except (requests.RequestException, EmulatorError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``); returns its exit code."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def client(self, api_key: str = "sk_test_emulator", **kwargs: Any) -> stripe.StripeClient:
        """A ``stripe.StripeClient`` for this emulator (``max_network_retries=0`` unless given).

        Pass ``http_client=stripe.RequestsClient(timeout=...)`` for a client-side timeout.
        """
        import stripe

        kwargs.setdefault("max_network_retries", 0)
        return stripe.StripeClient(api_key, base_addresses={"api": self.url}, **kwargs)

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
