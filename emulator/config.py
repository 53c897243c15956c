"""Runtime settings of one emulator, changeable through ``POST /_emulator/config``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Config:
    webhook_url: str | None = None
    webhook_secret: str = "whsec_local"  # noqa: S105 - the public local-dev default, not a secret
    pending_refund_delay: float = 1.0  # pm_card_pendingRefund: pending -> succeeded after this
    failing_refund_delay: float = 1.0  # pm_card_refundFail: succeeded -> failed after this
    idempotency_ttl: float = 86400.0  # Stripe prunes keys after 24 h
    webhook_max_attempts: int = 5
    webhook_retry_base: float = 0.5  # seconds before the 2nd attempt, doubling after
    webhook_timeout: float = 5.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, values: dict[str, Any]) -> None:
        """Apply a partial update; raises ValueError naming the bad field."""
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name not in self.__dataclass_fields__:
                raise ValueError(f"unknown config field: {name}")
            if name == "webhook_url":
                if value is not None and (
                    not isinstance(value, str) or not value.startswith(("http://", "https://"))
                ):
                    raise ValueError("webhook_url must be an http(s) URL or null")
                checked[name] = value or None
            elif name == "webhook_secret":
                if not isinstance(value, str) or not value:
                    raise ValueError("webhook_secret must be a non-empty string")
                checked[name] = value
            elif name in ("webhook_max_attempts",):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be an integer >= 1")
                checked[name] = value
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"{name} must be a number >= 0")
                checked[name] = float(value)
        for name, value in checked.items():
            setattr(self, name, value)
