"""Request models: strict, closed to unknown fields (SPEC 3.1, 3.2).

``api/openapi.py`` publishes the same rules; a test checks the two agree."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_SAFE_INTEGER = 2**53
CHARGE_ID_MAX = 255
REASON_MAX = 500
NOTE_MAX = 500
LIST_LIMIT_MAX = 100
LIST_LIMIT_DEFAULT = 20
CURSOR_MAX = 512

# No control characters: ids are printable, and Postgres rejects NUL in text outright.
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]+$"
NO_NUL_PATTERN = r"^[^\x00]*$"
PrintableId = Annotated[
    str, Field(min_length=1, max_length=CHARGE_ID_MAX, pattern=PRINTABLE_PATTERN)
]

RefundStatusName = Literal[
    "awaiting_approval", "pending", "processing", "requires_action", "succeeded", "failed",
    "canceled",
]


class RefundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    charge_id: PrintableId
    # Optional but not nullable: the published schema says integer and boolean, and an
    # explicit null must not slip through as "not given".
    amount_cents: Annotated[int, Field(gt=0, le=MAX_SAFE_INTEGER)] | None = None
    full: bool | None = None
    reason: Annotated[str, Field(max_length=REASON_MAX, pattern=NO_NUL_PATTERN)] | None = None

    @field_validator("amount_cents", "full", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null; leave the field out instead")
        return value

    @model_validator(mode="after")
    def _exactly_one_amount(self) -> RefundCreate:
        if self.amount_cents is not None and self.full:
            raise ValueError('give either amount_cents or "full": true, not both')
        if self.amount_cents is None and not self.full:
            raise ValueError('give amount_cents (a positive integer) or "full": true')
        return self


class Decision(BaseModel):
    """The optional body of approve, reject and cancel (SPEC 12)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    note: Annotated[str, Field(max_length=NOTE_MAX, pattern=NO_NUL_PATTERN)] | None = None


class RefundListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: Annotated[int, Field(ge=1, le=LIST_LIMIT_MAX)] = LIST_LIMIT_DEFAULT
    cursor: Annotated[str, Field(min_length=1, max_length=CURSOR_MAX)] | None = None
    charge_id: PrintableId | None = None
    payment_id: PrintableId | None = None
    status: RefundStatusName | None = None
    initiated_by: PrintableId | None = None


def describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """One sentence naming each field that is wrong and why."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field; allowed are {', '.join(model.model_fields)}"
        elif err["type"] == "string_pattern_mismatch":
            msg = "must not contain control characters"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts[:5]) + "."
