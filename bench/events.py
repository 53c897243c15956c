"""Refund events out in ``make bench`` (issue 14): two figures on the bench's stack.

1. latency: one refund at a time through the API, from the change to ``succeeded``
   (the event's ``timestamp``, the change's transaction time) to a local receiver's
   2xx; target p50 <= 100 ms;
2. throughput: a pile of BENCH_EVENTS_REFUNDS pending refunds drained by the workers
   while every event (``refund.created`` and ``refund.succeeded`` of each, and a backlog
   of BENCH_EVENTS_BACKLOG events made beforehand, so delivery is not paced by the
   drain) goes to one fast local endpoint: events delivered per second (target >= 300)
   and the drain's refunds/s against the bench's drain without subscribers (target: at
   most 10 % lower).

``bench.run`` calls ``run(bench)`` after its end-to-end phase; ``python -m bench.events``
runs the stack's setup and these two phases alone (BENCH_PAYMENTS=400 is enough).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from bench.loadgen import latency_summary

if TYPE_CHECKING:
    from bench.run import Bench

REFUND_AMOUNT = 100


class Receiver:
    """A fast local endpoint: answers 204 at once, remembers when each event arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[str, str], float] = {}  # (refund_id, type) -> wall time
        self.count = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                arrived = time.time()
                event = json.loads(body)
                key = (event["data"]["refund"]["refund_id"], event["type"])
                with receiver.lock:
                    receiver.count += 1
                    receiver.arrivals.setdefault(key, arrived)
                    receiver.timestamps[key] = event["timestamp"]

            def log_message(self, *args: Any) -> None:
                pass

        self.timestamps: dict[tuple[str, str], str] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _api(bench: Bench) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", int(bench.url.rsplit(":", 1)[1]), timeout=30)


def _admin_call(bench: Bench, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    from shared.adapters.config import get_settings
    from shared.adapters.tokens import issue_token

    admin = issue_token(get_settings(), subject="bench-admin", scopes=["refunds:admin"],
                        ttl_seconds=3600)
    api = _api(bench)
    api.request(method, path, body=None if body is None else json.dumps(body),
                headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
    response = api.getresponse()
    answer = json.loads(response.read())
    api.close()
    return response.status, answer


def _subscribe(bench: Bench, url: str) -> str:
    status, body = _admin_call(bench, "POST", "/v1/admin/webhook-endpoints", {"url": url})
    if status != 201:
        raise RuntimeError(f"could not subscribe: {status} {body}")
    return str(body["id"])


def latency(bench: Bench, receiver: Receiver, charges: list[str], samples: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {bench.token}", "Content-Type": "application/json"}
    waits: list[float] = []
    missing = 0
    for charge in charges[:samples]:
        # A connection per sample: a wait for the receiver can outlast the web server's
        # keep-alive, and the timing does not include the request anyway.
        api = _api(bench)
        api.request("POST", "/v1/admin/refunds", headers=headers,
                    body=json.dumps({"charge_id": charge, "amount_cents": REFUND_AMOUNT}))
        response = api.getresponse()
        payload = json.loads(response.read())
        api.close()
        if response.status != 201:
            missing += 1
            continue
        key = (payload["refund_id"], "refund.succeeded")
        deadline = time.monotonic() + 30
        while key not in receiver.arrivals and time.monotonic() < deadline:
            time.sleep(0.001)
        if key not in receiver.arrivals:
            missing += 1
            continue
        changed = datetime.fromisoformat(receiver.timestamps[key]).timestamp()
        waits.append(receiver.arrivals[key] - changed)
        time.sleep(0.02)
    return {
        "samples": len(waits),
        "missing": missing,
        "change_to_receiver_ms": latency_summary(waits),
        "how": "one refund at a time through the API; the 'refund.succeeded' event's "
               "timestamp (the change's transaction) to its arrival at a local receiver",
    }


def _backlog(bench: Bench, count: int) -> None:
    """``count`` events waiting before the workers start (refunds recorded as canceled,
    which hold nothing on their payment), so delivery runs ahead of the drain."""
    payment = bench.sql("SELECT id FROM payments ORDER BY id LIMIT 1")[0][0]
    bench.sql("""
        WITH made AS (
            INSERT INTO refunds (id, payment_id, amount, currency, status,
                                 stripe_idempotency_key, initiated_by)
            SELECT 'rf_evbench_' || n, %s, 1, 'usd', 'canceled', 'evbench-' || n, 'bench'
            FROM generate_series(1, %s) AS n RETURNING id
        )
        INSERT INTO refund_events (refund_id, from_status, to_status, actor)
        SELECT id, NULL, 'canceled', 'bench' FROM made RETURNING 1
    """, (payment, count))


def throughput(bench: Bench, receiver: Receiver, refunds: int, backlog: int) -> dict[str, Any]:
    bench.stop_workers()
    pending = bench.top_up(refunds)
    _backlog(bench, backlog)
    before = receiver.count
    bench.admin.clear_faults()
    bench.admin.reset_stats()
    bench.stripe_refunds_before = bench.admin.stats().get("refunds", 0)
    started = time.monotonic()
    bench.start_workers(bench.config.workers, bench.config.worker_concurrency,
                        STRIPE_MAX_RPS="100000")
    spy = bench.profile_worker("profile-worker-events") if bench.config.profile else None
    drain = bench.drain("drain with a subscriber", pending, timeout=1800)
    expected = 2 * pending + backlog  # created and succeeded of each refund, the backlog
    deadline = time.monotonic() + 600
    while receiver.count - before < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    seconds = time.monotonic() - started
    delivered = receiver.count - before
    if spy is not None:
        spy.wait(120)
    without = bench.result.get("drain", {}).get("refunds_per_s")
    ratio = round(drain["refunds_per_s"] / without, 3) if without else None
    return {
        "refunds": pending,
        "events_waiting_at_start": backlog + pending,
        "events_expected": expected,
        "events_delivered": delivered,
        "seconds": round(seconds, 2),
        "events_per_s": round(delivered / seconds, 1) if seconds else 0.0,
        "drain_refunds_per_s": drain["refunds_per_s"],
        "drain_refunds_per_s_without_subscribers": without,
        "drain_ratio": ratio,
        "drain": drain,
    }


def run(bench: Bench) -> None:
    refunds = int(os.environ.get("BENCH_EVENTS_REFUNDS", "5000"))
    backlog = int(os.environ.get("BENCH_EVENTS_BACKLOG", str(2 * refunds)))
    samples = bench.config.e2e_samples
    receiver = Receiver()
    endpoint_id = None
    try:
        endpoint_id = _subscribe(bench, receiver.url)
        if not bench.workers:
            bench.start_workers(bench.config.workers, bench.config.worker_concurrency,
                                STRIPE_MAX_RPS="100000")
        time.sleep(2)  # the workers' dispatchers are listening
        charges = list(reversed(bench.charges))
        out: dict[str, Any] = {"latency": latency(bench, receiver, charges, samples)}
        out["throughput"] = throughput(bench, receiver, refunds, backlog)
        p50 = out["latency"]["change_to_receiver_ms"].get("p50", 1e9)
        ratio = out["throughput"]["drain_ratio"]
        out["targets"] = {
            "status change -> receiver 2xx p50 <= 100 ms": p50 <= 100,
            "delivery >= 300 events/s": out["throughput"]["events_per_s"] >= 300,
            "drain with a subscriber >= 0.9 x without": ratio is not None and ratio >= 0.9,
        }
        bench.result["events_out"] = out
        from bench.run import log

        log(f"events out: change -> receiver p50 {p50} ms; "
            f"{out['throughput']['events_per_s']} events/s; drain ratio {ratio}")
    finally:
        # Later phases measure refunds alone: no subscriber left behind to deliver to.
        if endpoint_id is not None:
            _admin_call(bench, "DELETE", f"/v1/admin/webhook-endpoints/{endpoint_id}")
        receiver.stop()


def main() -> int:
    """Setup, a short drain without subscribers (the comparison), then the two phases."""
    import shutil
    import tempfile
    from pathlib import Path

    from bench.run import ROOT, Bench, BenchError, Config, log

    config = Config.from_env()
    (ROOT / ".bench").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="events-", dir=ROOT / ".bench"))
    bench = Bench(config, work)
    try:
        bench.setup()
        bench.zero_latency_drain()
        run(bench)
    except BenchError as exc:
        log(f"failed: {exc} (logs in {work})")
        return 1
    finally:
        bench.close()
    print(json.dumps({k: bench.result.get(k) for k in ("drain", "events_out")}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

