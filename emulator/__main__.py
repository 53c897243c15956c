"""``python -m emulator --port N [--host H] [--webhook-url URL] [--webhook-secret S]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .server import DEFAULT_PORT, serve


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emulator", description="In-memory Stripe API emulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument("--webhook-url", default=None, help="POST every event, signed, to this URL")
    parser.add_argument(
        "--webhook-secret",
        default="whsec_local",
        help="webhook signing secret (default whsec_local)",
    )
    parser.add_argument(
        "--pending-refund-delay",
        type=float,
        default=1.0,
        help="seconds a pm_card_pendingRefund refund stays pending",
    )
    parser.add_argument(
        "--failing-refund-delay",
        type=float,
        default=1.0,
        help="seconds before a pm_card_refundFail refund fails",
    )
    parser.add_argument(
        "--idempotency-ttl", type=float, default=86400.0, help="seconds idempotency keys are kept"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    serve(
        args.host,
        args.port,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        pending_refund_delay=args.pending_refund_delay,
        failing_refund_delay=args.failing_refund_delay,
        idempotency_ttl=args.idempotency_ttl,
        verbose=args.verbose,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
