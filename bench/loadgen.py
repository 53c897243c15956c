"""A closed-loop HTTP/1.1 load generator: ``python -m bench.loadgen ...``.

Plain asyncio streams on keep-alive connections, one coroutine per connection,
requests pre-encoded: a few tens of microseconds of CPU per request, so on a
2-core machine it is not what limits the figures (it reports its own CPU use,
``cpu_cores``, to show that).

Each connection refunds its own share of the payments (``payments[i::connections]``),
cycling through it, so no two requests in flight ever lock the same payment unless
the list names one payment only (the hot-spot case). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import os
import resource
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

PATH = "/v1/admin/refunds"


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def latency_summary(latencies_s: list[float]) -> dict[str, float]:
    values = sorted(latencies_s)
    ms = 1000.0
    return {
        "p50": round(percentile(values, 50) * ms, 2),
        "p90": round(percentile(values, 90) * ms, 2),
        "p99": round(percentile(values, 99) * ms, 2),
        "max": round((values[-1] if values else 0.0) * ms, 2),
        "mean": round(sum(values) / len(values) * ms, 2) if values else 0.0,
    }


class Run:
    def __init__(self, args: argparse.Namespace, payments: list[str]) -> None:
        url = urlsplit(args.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.connections = args.connections
        self.duration = args.duration
        self.remaining = args.requests  # None: run for ``duration`` instead
        self.expect = args.expect
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {args.token}\r\nContent-Type: application/json\r\n"
        )
        self.requests = [
            self._encode(head, charge, args.amount, args.reason) for charge in payments
        ]
        if args.get:  # the HTTP stack alone: one tokenless GET, over and over
            get = f"GET {args.get} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n"
            self.requests = [get.encode()]
        if args.webhook_events:  # Stripe's side: signed events to the webhook endpoint
            self.requests = _signed_events(args.webhook_events, args.webhook_secret,
                                           f"{self.host}:{self.port}")
        # With --rate the connections together send at most that many requests a second
        # (each connection its share, on a fixed schedule): a burst of a given size.
        self.interval = args.connections / args.rate if args.rate else 0.0
        # With --idempotency-keys every request carries a key of its own, as a careful
        # client's would: a fresh one per refund, never a replay.
        self.key_prefix = (
            f"Idempotency-Key: {args.key_prefix}-".encode() if args.idempotency_keys else None
        )
        self.sent = 0
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.refund_ids: list[str] = []
        self.keep_ids = args.ids
        self.keep_latencies = args.latencies
        self.deadline = 0.0

    @staticmethod
    def _encode(head: str, charge: str, amount: int, reason: str) -> bytes:
        body = json.dumps({"charge_id": charge, "amount_cents": amount, "reason": reason})
        return f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode()

    def _take(self) -> bool:
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
            return True
        return time.perf_counter() < self.deadline

    async def connection(self, index: int) -> None:
        mine = self.requests[index :: self.connections] or self.requests
        reader = writer = None
        next_at = time.perf_counter() + self.interval * index / self.connections
        for request in itertools.cycle(mine):
            if self.interval:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += self.interval
            if not self._take():
                break
            if writer is None:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            assert reader is not None
            if self.key_prefix is not None:
                self.sent += 1
                key = b"%s%d\r\n" % (self.key_prefix, self.sent)
                request = request.replace(b"\r\n", b"\r\n" + key, 1)  # after the request line
            started = time.perf_counter()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status, length, close = _parse_head(head)
                body = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                self.statuses[type(exc).__name__] += 1
                writer.close()
                reader = writer = None
                continue
            self.latencies.append(time.perf_counter() - started)
            self.statuses[str(status)] += 1
            if self.keep_ids and status == self.expect:
                self.refund_ids.append(json.loads(body)["refund_id"])
            if close:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def main(self) -> dict[str, Any]:
        cpu0 = _cpu()
        started = time.perf_counter()
        self.deadline = started + (self.duration or 0)
        await asyncio.gather(*(self.connection(i) for i in range(self.connections)))
        wall = time.perf_counter() - started
        cpu = _cpu() - cpu0
        ok = self.statuses.get(str(self.expect), 0)
        out: dict[str, Any] = {
            "connections": self.connections,
            "seconds": round(wall, 3),
            "requests": sum(self.statuses.values()),
            "ok": ok,
            "errors": sum(self.statuses.values()) - ok,
            "statuses": dict(self.statuses),
            "requests_per_s": round(ok / wall, 1) if wall else 0.0,
            "latency_ms": latency_summary(self.latencies),
            "loadgen_cpu_cores": round(cpu / wall, 3) if wall else 0.0,
            "loadgen_cpu_us_per_request": round(cpu / max(len(self.latencies), 1) * 1e6, 1),
        }
        if self.keep_ids:
            out["refund_ids"] = self.refund_ids
        if self.keep_latencies:
            out["latencies_s"] = [round(x, 6) for x in self.latencies]
        return out


def _signed_events(path: str, secret: str, host: str) -> list[bytes]:
    """POST /v1/webhooks/stripe requests for the events in ``path`` (one JSON object a
    line), each signed as Stripe signs them, timestamped now."""
    timestamp = int(time.time())
    requests = []
    with open(path) as f:
        for line in f:
            body = line.strip()
            if not body:
                continue
            mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
            requests.append((
                f"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\n"
                f"Stripe-Signature: t={timestamp},v1={mac.hexdigest()}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode())
    return requests


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return status, length, close


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", required=True, help="base URL of the API")
    parser.add_argument("--token", default=os.environ.get("LOADGEN_TOKEN"),
                        help="bearer token with the write scope (default: $LOADGEN_TOKEN)")
    parser.add_argument("--payments", required=True, help="file: one charge id per line")
    parser.add_argument("--connections", type=int, default=8)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--duration", type=float, help="seconds to run")
    group.add_argument("--requests", type=int, help="requests to send, then stop")
    parser.add_argument("--amount", type=int, default=100, help="amount_cents of each refund")
    parser.add_argument("--reason", default="requested_by_customer")
    parser.add_argument("--expect", type=int, default=201, help="the status that is not an error")
    parser.add_argument("--ids", action="store_true", help="list the refund ids created")
    parser.add_argument("--latencies", action="store_true",
                        help="list every request's latency (seconds), for pooling runs")
    parser.add_argument("--get", metavar="PATH",
                        help="send GET PATH instead of refunds (with --expect 200)")
    parser.add_argument("--idempotency-keys", action="store_true",
                        help="send a fresh Idempotency-Key with every request")
    parser.add_argument("--webhook-events", metavar="FILE",
                        help="send these Stripe events (one JSON object a line), signed, to "
                             "/v1/webhooks/stripe instead of refunds (with --expect 200)")
    parser.add_argument("--webhook-secret", default=os.environ.get("LOADGEN_WEBHOOK_SECRET", ""),
                        help="the webhook signing secret (default: $LOADGEN_WEBHOOK_SECRET)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests per second over all connections (default: flat out)")
    parser.add_argument("--key-prefix", default=f"bench-{os.getpid()}-{int(time.time())}",
                        help="Idempotency-Key prefix (a counter follows)")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give --token or set LOADGEN_TOKEN")
    with open(args.payments) as f:
        payments = [line.strip() for line in f if line.strip()]
    if not payments:
        parser.error("no payments")
    result = asyncio.run(Run(args, payments).main())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
