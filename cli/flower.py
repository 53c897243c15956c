"""``refunds flower``: Flower for operators, never open to anyone without the login.

Flower itself starts without authentication when ``FLOWER_BASIC_AUTH`` is unset;
this wrapper refuses to, with one line, and gives Flower the same JSON logs as
the other processes. Flower's other options are passed through as ``celery flower``
takes them (``--port``, ``--address``, ``--url_prefix``...), and its own environment
variables (``FLOWER_PORT``, ``FLOWER_ADDRESS``, ``FLOWER_URL_PREFIX``...) apply.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shared.adapters import logging as service_logging
from shared.adapters.config import load_settings


def basic_auth_problem(value: str | None) -> str | None:
    """Why ``value`` is not a usable ``user:password[,user:password]`` list, or None."""
    if not value or not value.strip():
        return "not set; Flower never runs open: set it to user:password"
    for entry in value.split(","):
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            return "must be user:password (comma-separated for several logins)"
    return None


def tornado_options(argv: Sequence[str]) -> list[str]:
    """``--port 5556`` as ``--port=5556``: Flower parses its options with tornado, which
    takes only the ``=`` form. Flower has no positional arguments, so a word after an
    option is that option's value."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and not arg.startswith("-"):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] = ()) -> int:
    settings = load_settings()
    problem = basic_auth_problem(settings.flower_basic_auth)
    if problem:
        sys.exit(f"configuration error: FLOWER_BASIC_AUTH: {problem}")
    service_logging.configure("flower", settings.log_level)

    from celery.bin.celery import celery

    # Flower reads FLOWER_BASIC_AUTH from the environment itself, so the password
    # never appears in the process list.
    celery.main(
        args=["--app", "worker.app", "flower", *tornado_options(argv)],
        prog_name="refunds flower",
        standalone_mode=True,
    )
    return 0
