"""Settings, read once from the environment (12-factor) and validated at start.

A missing or malformed setting stops the process with one line naming it
(see ``load_settings``); everything else reads ``get_settings()``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me"  # noqa: S105 - the documented local default
DEV_CONSOLE_SECRET = "dev-only-insecure-console-secret-change-me"  # noqa: S105 - local default
DEV_WEBHOOK_SECRET = "whsec_local"  # noqa: S105 - the emulator's and make run's default


#: URL schemes each URL setting accepts (kombu's transports for the broker).
REDIS_SCHEMES = ("redis", "rediss", "unix")
BROKER_SCHEMES = (*REDIS_SCHEMES, "sentinel", "amqp", "amqps", "pyamqp")
HTTP_SCHEMES = ("http", "https")
#: Optional settings where an empty value (``FOO=`` in an .env or compose file) means unset.
EMPTY_MEANS_UNSET = (
    "celery_broker_url", "stripe_api_base", "jwt_jwks_url", "jwt_audience", "jwt_issuer",
    "metrics_token", "flower_url", "approval_threshold_cents", "approval_thresholds",
)


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path.strip("/")):
        *others, last = (f"{scheme}://" for scheme in schemes)
        return f"must be a URL starting with {', '.join(others)} or {last}"
    if parts.scheme in HTTP_SCHEMES and not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "has a port that is not a number"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # "production" turns on the checks of shared/adapters/production.py (so does a live Stripe key).
    app_env: Literal["development", "test", "staging", "production"] = "development"

    database_url: str = "postgresql+psycopg://postgres@localhost:5432/refunds"
    redis_url: str = "redis://localhost:6379/0"
    celery_broker_url: str | None = None

    stripe_api_key: str = "sk_test_local"
    stripe_api_base: str | None = None
    stripe_webhook_secret: str = DEV_WEBHOOK_SECRET
    stripe_max_rps: float = Field(default=25.0, gt=0)
    stripe_timeout_seconds: float = Field(default=10.0, gt=0)

    jwt_secret: str | None = DEV_JWT_SECRET
    jwt_jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    refunds_write_scope: str = "refunds:write"
    refunds_read_scope: str = "refunds:read"

    reconcile_interval_seconds: float = Field(default=60.0, gt=0)
    stuck_after_seconds: float = Field(default=300.0, gt=0)
    stuck_alert_seconds: float = Field(default=3600.0, gt=0)
    # Retention (SPEC 7), applied by beat: idempotency keys are honoured for 24 h, so
    # their records may not go sooner; Stripe redelivers an event for 3 days at most.
    idempotency_retention_seconds: float = Field(default=24 * 3600.0, ge=24 * 3600.0)
    stripe_event_retention_seconds: float = Field(default=30 * 24 * 3600.0, ge=3 * 24 * 3600.0)
    # Refund events out with their delivery log (those still being delivered stay); at
    # least a day, so the log shows what went out lately.
    webhook_event_retention_seconds: float = Field(default=30 * 24 * 3600.0, ge=24 * 3600.0)

    # Worker retries of transient Stripe errors (SPEC 6): countdown base * 2**n with jitter,
    # capped by celery_app.MAX_RETRY_COUNTDOWN_SECONDS; after max_attempts the reconciler owns it.
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    # Threads of one worker process (the Procfile's threads pool). A refund holds a thread
    # while it waits for Stripe (300 ms or more) and a few ms of CPU otherwise, so a high
    # count is what keeps Stripe's limit busy from one process (make bench).
    worker_concurrency: int = Field(default=64, ge=1, le=256)
    # Postgres connections one process keeps for the worker's claim/record statements.
    worker_db_connections: int = Field(default=8, ge=1, le=64)
    # How long a claim keeps other workers off a refund: longer than any one attempt
    # (a lookup, a wait for the rate limiter and a create, each bounded) can last.
    claim_lease_seconds: float = Field(default=90.0, gt=0)

    # /metrics (web and worker) answers only "Authorization: Bearer <token>" when set;
    # required in production (shared/adapters/production.py).
    metrics_token: str | None = None

    port: int = Field(default=8000, ge=1, le=65535)
    max_request_bytes: int = Field(default=64 * 1024, gt=0)
    flower_basic_auth: str | None = None
    log_level: str = "INFO"
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)  # 0: the worker serves none
    # gunicorn processes, and the requests each serves at once as greenlets (gunicorn's
    # gevent worker, gunicorn.conf.py says why). A request is about a millisecond of CPU
    # and a few round trips, so a process is CPU bound long before its connections run
    # out: more cores, more processes. Requests beyond WEB_DB_CONNECTIONS wait in the
    # process for a Postgres connection, so Postgres sees a bounded number whatever the load.
    web_concurrency: int = Field(default=2, ge=1, le=64)
    web_connections: int = Field(default=100, ge=1, le=10_000)
    web_db_connections: int = Field(default=4, ge=1, le=256)

    # The operators' console (/console): session cookies are signed with this key.
    console_secret_key: str = DEV_CONSOLE_SECRET
    console_cookie_secure: bool = False  # set true wherever the console is served over HTTPS
    flower_url: str | None = None  # where operators open Flower, for links to tasks

    # Refund events out (SPEC 13): signed webhooks to subscribers' endpoints.
    refunds_admin_scope: str = "refunds:admin"
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Seconds to wait before each retry; after the last one a delivery is failed.
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,36000"
    webhook_disable_after_seconds: float = Field(default=5 * 86400.0, gt=0)
    # How often workers look for due retries and events not yet fanned out (besides
    # the NOTIFY each status change sends).
    webhook_dispatch_interval_seconds: float = Field(default=1.0, gt=0, le=60)

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _retry_schedule(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.split(",")]
        except ValueError:
            raise ValueError("must be comma-separated seconds, e.g. 5,300,1800") from None
        if not all(0 < delay <= 7 * 86400 for delay in delays):
            raise ValueError("each delay must be more than 0 and at most 604800 seconds")
        return value

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.webhook_retry_schedule.split(","))

    @property
    def is_production(self) -> bool:
        """SPEC 8: APP_ENV=production, or a live Stripe key (``production.is_production``)."""
        from shared.adapters.production import is_production

        return is_production(self)

    # Four eyes for large refunds (SPEC 12). A refund at or above its currency's threshold
    # (APPROVAL_THRESHOLDS, e.g. "usd=50000,jpy=5000000", in the currency's smallest unit),
    # else APPROVAL_THRESHOLD_CENTS, waits for a second person. Neither set: off.
    approval_threshold_cents: int | None = Field(default=None, gt=0)
    approval_thresholds: str | None = None
    approval_expires_seconds: float = Field(default=72 * 3600.0, gt=0)
    refunds_approve_scope: str = "refunds:approve"

    @field_validator("approval_thresholds")
    @classmethod
    def _thresholds_parse(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_thresholds(value)  # refuse a malformed list at start, not on a refund
        return value

    def approval_threshold(self, currency: str) -> int | None:
        """The amount at or above which a refund in ``currency`` needs approval; None: never."""
        per_currency = _parse_thresholds(self.approval_thresholds or "")
        return per_currency.get(currency.lower(), self.approval_threshold_cents)

    def approval_threshold_table(self) -> dict[str, int] | None:
        """``approval_threshold`` as a table for the database: each currency's threshold,
        ``"*"`` for every other; None when approvals are off."""
        table = dict(_parse_thresholds(self.approval_thresholds or ""))
        if self.approval_threshold_cents is not None:
            table["*"] = self.approval_threshold_cents
        return table or None

    @field_validator(*EMPTY_MEANS_UNSET, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("app_env", mode="before")
    @classmethod
    def _lower_app_env(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return _checked_url(value, REDIS_SCHEMES)

    @field_validator("celery_broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        return None if value is None else _checked_url(value, BROKER_SCHEMES)

    @field_validator("stripe_api_base", "jwt_jwks_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else _checked_url(value, HTTP_SCHEMES)

    @field_validator(
        "refunds_write_scope", "refunds_read_scope", "refunds_approve_scope", "refunds_admin_scope"
    )
    @classmethod
    def _scope(cls, value: str) -> str:
        # A token's scopes are one space-separated claim: a scope is one non-empty word.
        if not value or value.split() != [value]:
            raise ValueError("must be one scope name, not empty and without spaces")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.database_url.startswith(("postgresql", "postgres")):
            raise ValueError("DATABASE_URL must be a postgresql:// URL")
        if not (self.jwt_secret or self.jwt_jwks_url):
            raise ValueError("set JWT_SECRET or JWT_JWKS_URL")
        if self.jwt_jwks_url and "jwt_secret" not in self.model_fields_set:
            # The dev default secret is public: once real keys come from a JWKS, tokens
            # signed with it must not be accepted too. HS256 stays on only if set explicitly.
            self.jwt_secret = None
        if self.jwt_secret and len(self.jwt_secret.encode()) < 32:
            raise ValueError("JWT_SECRET must be at least 32 bytes (HS256 needs a 256-bit key)")
        if len(self.console_secret_key.encode()) < 32:
            raise ValueError("CONSOLE_SECRET_KEY must be at least 32 bytes")
        if self.claim_lease_seconds < 2 * (self.stripe_timeout_seconds + 5):
            # An attempt is a lookup and a create, each after at most 5 s in the limiter.
            raise ValueError(
                "CLAIM_LEASE_SECONDS must outlast an attempt: 2 x (STRIPE_TIMEOUT_SECONDS + 5)"
            )
        if self.flower_url is not None and not self.flower_url.startswith(("http://", "https://")):
            raise ValueError("FLOWER_URL must be an http:// or https:// URL")
        return self

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def libpq_url(self) -> str:
        """DATABASE_URL as psycopg itself takes it (no SQLAlchemy driver suffix)."""
        return "postgresql://" + self.sqlalchemy_url.removeprefix("postgresql+psycopg://")

    @property
    def sqlalchemy_url(self) -> str:
        # Accept the common postgres:// and postgresql:// spellings; always drive psycopg 3.
        url = self.database_url
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


@functools.lru_cache(maxsize=8)
def _parse_thresholds(value: str) -> Mapping[str, int]:
    """``"usd=50000,jpy=5000000"`` -> ``{"usd": 50000, "jpy": 5000000}``, or ValueError."""
    thresholds: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        currency, sep, amount = (part.strip() for part in item.partition("="))
        currency = currency.lower()
        if not sep or len(currency) != 3 or not (currency.isascii() and currency.isalpha()):
            raise ValueError(f"{item!r} is not currency=amount, e.g. usd=50000,jpy=5000000")
        if not (amount.isascii() and amount.isdigit() and int(amount) > 0):
            raise ValueError(
                f"the amount for {currency} must be a positive integer in its smallest unit"
            )
        if currency in thresholds:
            raise ValueError(f"{currency} is given twice")
        thresholds[currency] = int(amount)
    return thresholds
def _checked_url(value: str, schemes: tuple[str, ...]) -> str:
    problem = _url_problem(value, schemes)
    if problem:
        raise ValueError(problem)
    return value


def load_settings() -> Settings:
    """Build settings, or exit with one clear line naming the bad setting.

    In production (``shared.adapters.production``) settings that are valid but unsafe there, such
    as a public development secret, stop the process the same way, all named on the line.
    """
    from shared.adapters.production import production_problems

    try:
        settings = Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        name = ".".join(str(p) for p in err["loc"]).upper()
        # Cross-field checks have no single location; their message names the setting.
        sys.exit(
            f"configuration error: {name}: {message}" if name else f"configuration error: {message}"
        )
    problems = production_problems(settings)
    if problems:
        sys.exit(
            f"configuration error: {'; '.join(problems)} "
            "(production: APP_ENV=production or a live Stripe key)"
        )
    return settings


@functools.cache
def get_settings() -> Settings:
    return load_settings()
