"""Correctly signed but malformed Stripe events.

Only Stripe holds the webhook secret, so these bodies can only come from a Stripe bug
or a leaked secret; either way the endpoint must answer as documented (SPEC 3.3): 200
for what it applied or ignored, 400 ``invalid_payload`` for what is not an event it
can read, 503 when Stripe cannot be asked, and never a 500, which would have Stripe
deliver the same bad event again for days. Every answer is JSON.

``make test`` runs FUZZ_EXAMPLES (default 25) examples, replayed deterministically;
``make test-long`` runs 1,000 random ones.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as given_settings
from hypothesis import strategies as st

from shared.services.stripe_events import HANDLERS
from tests.payments.conftest import Stack
from tests.payments.test_webhooks import deliver, event

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ_DERANDOMIZE = "FUZZ_EXAMPLES" not in os.environ

# Values of every JSON kind, the kinds a field should have among them.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)
FIELDS = (
    "id", "object", "amount", "amount_received", "amount_refunded", "currency", "status",
    "payment_intent", "charge", "latest_charge", "refunded", "disputed", "metadata",
    "created", "refunds",
)
# Sometimes an id like Stripe's, so some events reach the emulator and the database.
plausible_ids = st.sampled_from(["pi_", "ch_", "re_", "dp_", "py_"]).map(
    lambda prefix: f"{prefix}fuzz{uuid.uuid4().hex[:12]}"
)
event_objects = st.fixed_dictionaries(
    {},
    optional={name: (plausible_ids | json_values) if name in ("id", "charge", "payment_intent")
              else json_values for name in FIELDS},
)


@given_settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=FUZZ_DERANDOMIZE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(event_type=st.sampled_from(sorted(HANDLERS)) | st.text(min_size=1, max_size=20),
       obj=event_objects)
def test_signed_malformed_events_are_never_a_500(
    stack: Stack, event_type: str, obj: dict[str, Any]
) -> None:
    resp = deliver(stack, event(event_type, obj))
    assert resp.status_code in (200, 400, 503), (resp.status_code, event_type, obj)
    body = resp.json()
    if resp.status_code == 400:
        assert body["error"] == "invalid_payload", body
