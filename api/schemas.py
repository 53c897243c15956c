"""Request models: strict, closed to unknown fields (SPEC 3.1)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_SAFE_INTEGER = 2**53

# No control characters: ids are printable, and Postgres rejects NUL in text outright.
PrintableId = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]


class RefundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    charge_id: PrintableId
    amount_cents: Annotated[int, Field(gt=0, le=MAX_SAFE_INTEGER)] | None = None
    full: bool | None = None
    reason: Annotated[str, Field(max_length=500, pattern=r"^[^\x00]*$")] | None = None

    @model_validator(mode="after")
    def _exactly_one_amount(self) -> RefundCreate:
        if self.amount_cents is not None and self.full:
            raise ValueError('give either amount_cents or "full": true, not both')
        if self.amount_cents is None and not self.full:
            raise ValueError('give amount_cents (a positive integer) or "full": true')
        return self


RefundStatusName = Literal["pending", "processing", "requires_action", "succeeded", "failed", "canceled"]


class RefundListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    charge_id: PrintableId | None = None
    payment_id: PrintableId | None = None
    status: RefundStatusName | None = None
    initiated_by: PrintableId | None = None


def describe(exc: ValidationError) -> str:
    """One sentence naming each field that is wrong and why."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; allowed are charge_id, amount_cents, full, reason"
        elif err["type"] == "string_pattern_mismatch":
            msg = "must not contain control characters"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts[:5]) + "."
