"""The ``refunds`` command: operator and developer tasks.

Each subcommand is a thin wrapper over one function in ``shared`` (or runs the emulator),
imported only when that subcommand runs so every command starts fast."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from shared.adapters.config import load_settings


def _token(args: argparse.Namespace) -> int:
    from shared.adapters.tokens import issue_token

    settings = load_settings()
    scopes = args.scope or [settings.refunds_read_scope, settings.refunds_write_scope]
    print(issue_token(settings, subject=args.sub, scopes=scopes, ttl_seconds=args.ttl))
    return 0


def _show(args: argparse.Namespace) -> int:
    from shared.adapters.db import unit_of_work
    from shared.domain.errors import NotFound
    from shared.services.refunds import get_refund

    load_settings()
    with unit_of_work() as session:
        try:
            print(json.dumps(get_refund(session=session, refund_id=args.refund_id), indent=2))
        except NotFound as exc:
            print(exc.message, file=sys.stderr)
            return 1
    return 0


def _payments_sync(args: argparse.Namespace) -> int:
    from shared.services.payments import sync_from_stripe

    load_settings()
    print(json.dumps(sync_from_stripe()))
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    load_settings()
    if args.refund_id is not None:
        return _reconcile_refund(args.refund_id, actor=args.actor)
    from shared.services.reconcile import reconcile_once

    print(json.dumps(reconcile_once()))
    return 0


def _reconcile_refund(refund_id: str, *, actor: str | None) -> int:
    """What the console's "Reconcile now" does, for one refund: it is sent to the workers
    again (a refund held for a person is released), and the audit trail records who
    asked."""
    import getpass

    from shared.adapters.db import unit_of_work
    from shared.domain.errors import RefundServiceError
    from shared.services.console_queries import reconcile_now

    with unit_of_work() as session:
        try:
            done = reconcile_now(
                session=session, refund_id=refund_id, actor=actor or f"cli:{getpass.getuser()}"
            )
        except RefundServiceError as exc:
            print(exc.message, file=sys.stderr)
            return 1
    print(json.dumps({"refund_id": refund_id, "status": done.status, "task": done.task,
                      "enqueued": done.enqueued}))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

    load_settings()
    command.upgrade(Config(str(Path(__file__).resolve().parent.parent / "alembic.ini")), "head")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from shared.adapters.production import verdict

    # load_settings exits non-zero with the problems on one line, production's included.
    settings = load_settings()
    print(f"{verdict(settings)} (database {settings.sqlalchemy_url.rsplit('@', 1)[-1]})")
    return 0


def _stripe_emulator(args: argparse.Namespace) -> int:
    # The emulator is a test tool shipped beside the product, never imported by it
    # (make lint): this process becomes ``python -m emulator``.
    import os

    argv = [sys.executable, "-m", "emulator", "--host", args.host, "--port", str(args.port),
            "--webhook-secret", args.webhook_secret]
    if args.webhook_url:
        argv += ["--webhook-url", args.webhook_url]
    os.execv(sys.executable, argv)  # noqa: S606 - our own module, arguments from argparse
    return 0


def _worker_health(args: argparse.Namespace) -> int:
    from shared.adapters.worker_health import check_workers

    load_settings()
    health = check_workers(timeout=args.timeout, node=args.node, this_host=args.this_host)
    print(health.message, file=sys.stdout if health.ok else sys.stderr)
    return 0 if health.ok else 1


def _flower(args: argparse.Namespace) -> int:
    from cli.flower import main as flower_main

    return flower_main(args.passthrough)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refunds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("token", _token, "Print a development bearer token signed with JWT_SECRET.")
    p.add_argument(
        "--scope", action="append", help="a scope to grant (repeatable); default read and write"
    )
    p.add_argument("--sub", default="dev@localhost", help="the caller recorded as initiated_by")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")

    p = add("show", _show, "Print one refund with its audit trail.")
    p.add_argument("refund_id")

    payments = sub.add_parser("payments", help="Payments and charges.").add_subparsers(
        dest="action", required=True
    )
    p = payments.add_parser("sync", help="Backfill payments, charges and refunds from Stripe.")
    p.set_defaults(func=_payments_sync)

    p = add(
        "reconcile",
        _reconcile,
        "Run one reconciliation pass (what beat runs on a schedule), or send one refund to "
        "the workers again, as the console's 'Reconcile now' does.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--once", action="store_true", help="run a single pass and exit")
    what.add_argument(
        "--refund", dest="refund_id", metavar="ID",
        help="retry this refund now, including one held for a person after MAX_ATTEMPTS",
    )
    p.add_argument(
        "--as", dest="actor", metavar="NAME",
        help="who asks, for the audit trail (default cli:<your user name>)",
    )

    add("migrate", _migrate, "Apply database migrations (alembic upgrade head).")
    add("check-config", _check_config, "Validate the settings and exit.")

    p = add("worker-health", _worker_health, "Ping Celery workers; exit 0 if one answers.")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument("--node", help="ping only this worker, e.g. worker@host")
    p.add_argument("--this-host", action="store_true", help="only workers named ...@<hostname>")

    p = add(
        "flower",
        _flower,
        "Run Flower; needs FLOWER_BASIC_AUTH. Flower's own options (--port, --address, "
        "--url_prefix...) and FLOWER_* variables apply, as with `celery flower`.",
    )
    p.set_defaults(passes_options_through=True)

    p = add(
        "stripe-emulator", _stripe_emulator, "Run the Stripe emulator for development and tests."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=12111)
    p.add_argument("--webhook-url", default=None)
    p.add_argument("--webhook-secret", default="whsec_local")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Options this parser does not know go to the program a subcommand wraps (Flower's
    # own), and are an error anywhere else.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_options_through", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.passthrough = rest
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
