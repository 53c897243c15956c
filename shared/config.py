"""Settings, read once from the environment (12-factor) and validated at start.

A missing or malformed setting stops the process with one line naming it
(see ``load_settings``); everything else reads ``get_settings()``.
"""

from __future__ import annotations

import functools
import sys

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me"  # noqa: S105 - the documented local default
DEV_CONSOLE_SECRET = "dev-only-insecure-console-secret-change-me"  # noqa: S105 - local default


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@localhost:5432/refunds"
    redis_url: str = "redis://localhost:6379/0"
    celery_broker_url: str | None = None

    stripe_api_key: str = "sk_test_local"
    stripe_api_base: str | None = None
    stripe_webhook_secret: str = "whsec_local"  # noqa: S105 - the documented local default
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

    # Worker retries of transient Stripe errors (SPEC 6): countdown base * 2**n with jitter,
    # capped by celery_app.MAX_RETRY_COUNTDOWN_SECONDS; after max_attempts the reconciler owns it.
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    worker_concurrency: int = Field(default=8, ge=1, le=64)

    port: int = Field(default=8000, ge=1, le=65535)
    max_request_bytes: int = Field(default=64 * 1024, gt=0)
    flower_basic_auth: str | None = None
    log_level: str = "INFO"
    worker_metrics_port: int = Field(default=9808, ge=0, le=65535)  # 0: the worker serves none
    # gunicorn processes and threads per process (the Procfile passes them to gunicorn).
    # A request holds a thread for a few milliseconds of mostly CPU, and a process's
    # threads share one GIL: past 4, more threads only contend for it (make bench: 2 x 4
    # served more than 2 x 8 or 2 x 16 at 32 connections). More cores: more processes.
    web_concurrency: int = Field(default=2, ge=1, le=64)
    web_threads: int = Field(default=4, ge=1, le=256)

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
    app_env: str = "development"

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
        """SPEC 8: APP_ENV=production, or a live Stripe key."""
        live_key = self.stripe_api_key.startswith(("sk_live_", "rk_live_"))
        return self.app_env.strip().lower() == "production" or live_key

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
        if self.flower_url is not None and not self.flower_url.startswith(("http://", "https://")):
            raise ValueError("FLOWER_URL must be an http:// or https:// URL")
        return self

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    @property
    def sqlalchemy_url(self) -> str:
        # Accept the common postgres:// and postgresql:// spellings; always drive psycopg 3.
        url = self.database_url
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


def load_settings() -> Settings:
    """Build settings, or exit with one clear line naming the bad setting."""
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        name = ".".join(str(p) for p in err["loc"]).upper()
        # Cross-field checks have no single location; their message names the setting.
        sys.exit(
            f"configuration error: {name}: {message}" if name else f"configuration error: {message}"
        )


@functools.cache
def get_settings() -> Settings:
    return load_settings()
