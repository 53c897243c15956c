"""Reading Stripe's objects, as the SDK returns them or as plain JSON dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: A Stripe object as this service reads it: Stripe's JSON, or the SDK's object.
StripeObject = Mapping[str, Any]


def as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict of a Stripe SDK object (or of a dict already)."""
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else dict(obj)


def id_of(value: Any) -> str | None:
    """A field that names another object (``charge``, ``payment_intent``): its id,
    whether Stripe sent the id or the expanded object."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return str(value) if value else None
