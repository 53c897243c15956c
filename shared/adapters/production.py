"""What production requires of the settings (SPEC 8 "Production").

The service runs in production when ``APP_ENV=production`` or the Stripe key is live
(``sk_live_…``, ``rk_live_…``). There, a value published in this repository (the
development secrets, the emulator's webhook secret, Flower's development login) would
let anyone with the repository mint a token, forge a console cookie or sign a Stripe
event, so every process refuses to start on one (``shared.adapters.config.load_settings``), and
``refunds check-config`` says so too. Each problem names the setting it is about.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from shared.adapters.config import DEV_CONSOLE_SECRET, DEV_JWT_SECRET, DEV_WEBHOOK_SECRET, Settings

PRODUCTION = "production"
LIVE_KEY_PREFIXES = ("sk_live_", "rk_live_")
TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")
#: The only host the Stripe SDK may talk to in production (unset STRIPE_API_BASE means it).
STRIPE_API_HOST = "api.stripe.com"

#: Values published in the repository (README, docker-compose.yml, the emulator, make run).
PUBLIC_JWT_SECRETS = frozenset({DEV_JWT_SECRET})
PUBLIC_CONSOLE_SECRETS = frozenset({DEV_CONSOLE_SECRET})
PUBLIC_WEBHOOK_SECRETS = frozenset({DEV_WEBHOOK_SECRET})
DEV_FLOWER_LOGINS = frozenset({"admin:admin"})


def is_live_key(key: str) -> bool:
    return key.startswith(LIVE_KEY_PREFIXES)


def is_production(settings: Settings) -> bool:
    return settings.app_env == PRODUCTION or is_live_key(settings.stripe_api_key)


def production_problems(settings: Settings) -> list[str]:
    """Why these settings must not run in production, one ``NAME: what to do`` each;
    empty when they may (or when this is not production)."""
    if not is_production(settings):
        return []
    problems = []
    explicit_env = "app_env" in settings.model_fields_set
    if is_live_key(settings.stripe_api_key) and explicit_env and settings.app_env != PRODUCTION:
        problems.append(
            f"APP_ENV: is {settings.app_env!r} with a live STRIPE_API_KEY "
            "(set APP_ENV=production, or use a test key outside production)"
        )
    if settings.app_env == PRODUCTION and not is_live_key(settings.stripe_api_key):
        problems.append(
            "STRIPE_API_KEY: is a test-mode key with APP_ENV=production "
            "(use the live key, sk_live_... or rk_live_...)"
        )
    if settings.jwt_secret is not None and settings.jwt_secret in PUBLIC_JWT_SECRETS:
        problems.append(
            "JWT_SECRET: is "
            + ("the public development default" if "jwt_secret" in settings.model_fields_set
               else "unset, so the public development default")
            + " (set a secret of your own, 32+ random bytes, or JWT_JWKS_URL)"
        )
    if settings.console_secret_key in PUBLIC_CONSOLE_SECRETS:
        problems.append(
            "CONSOLE_SECRET_KEY: is unset or the public development default "
            "(set a secret of your own, 32+ random bytes)"
        )
    if (
        "stripe_webhook_secret" not in settings.model_fields_set
        or settings.stripe_webhook_secret in PUBLIC_WEBHOOK_SECRETS
    ):
        problems.append(
            "STRIPE_WEBHOOK_SECRET: is unset or the public development default "
            "(set the endpoint's signing secret from Stripe's dashboard)"
        )
    if settings.stripe_api_base is not None and not _is_stripe(settings.stripe_api_base):
        problems.append(
            f"STRIPE_API_BASE: points at {settings.stripe_api_base!r}, not Stripe "
            "(unset it in production)"
        )
    if settings.flower_basic_auth and any(
        login.strip() in DEV_FLOWER_LOGINS for login in settings.flower_basic_auth.split(",")
    ):
        problems.append("FLOWER_BASIC_AUTH: is the development login (set a login of your own)")
    if not settings.metrics_token:
        problems.append(
            "METRICS_TOKEN: is unset (/metrics is never open in production: set a token "
            "and give it to Prometheus)"
        )
    return problems


def _is_stripe(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" and parts.hostname == STRIPE_API_HOST and parts.path in ("", "/")


def verdict(settings: Settings) -> str:
    """One line for ``refunds check-config`` when the settings may run."""
    where = "production" if is_production(settings) else f"{settings.app_env} (not production)"
    return f"configuration ok for {where}"
