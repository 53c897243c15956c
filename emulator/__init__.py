"""An in-memory Stripe emulator for development, tests and benchmarks.

Run it with ``python -m emulator --port 12111`` and point the official SDK at
it (``stripe.StripeClient(key, base_addresses={"api": url})``). Tests start one
with ``emulator.testing.EmulatorProcess``. See ``emulator/README.md``.
"""

from .server import create_server, serve

__all__ = ["create_server", "serve"]
