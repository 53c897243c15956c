"""initiate_refund(): a refund's whole initiation as one statement

``POST /v1/admin/refunds`` made five round trips to Postgres (a ping, then lock, read of
the payment's refunds, insert, commit), and the client side of them was about a third
of the web process's CPU per POST (make bench, py-spy). This function does the same
transaction in one call, run in autocommit: claim the Idempotency-Key, lock the payment
row, sum what its refunds hold, apply the rules, insert the refund and its first audit
event, store the answer under the key.

The guarantee that refunds never add up to more than was captured rests on the lock:
every initiation of a payment takes its row lock before it reads the payment's refunds,
and in READ COMMITTED each statement of a (volatile) function takes a new snapshot, so
the read after the lock sees every refund committed by the transactions it waited for.

The rules are those of ``shared.domain.rules`` (what is left; what a request takes);
tests/test_initiate_function.py checks the function against them. Nothing is written
for a request that is refused: the key it claimed is given back.

Revision ID: 0015
Revises: 0014
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Returns one row (outcome, detail): outcome 'created' (detail: the refund), 'replayed'
# (detail: the stored status and body), or the refusal with what its message needs
# ('refused_by_what_is_left': the amount left, for the rules' own error).
INITIATE_REFUND = """
CREATE FUNCTION initiate_refund(
    p_ref text,             -- a Stripe charge id, a PaymentIntent id or our payment id
    p_requested bigint,     -- amount_cents; NULL: everything that is left ("full")
    p_reason text,
    p_actor text,           -- the token's sub: initiated_by, the audit event's actor
    p_refund_id text,
    p_stripe_key text,      -- the Stripe idempotency key of the refund
    p_thresholds jsonb,     -- approval thresholds by currency, '*' for any other; NULL: none
    p_key text,             -- the Idempotency-Key; NULL: none
    p_fingerprint text,     -- the request body's fingerprint, compared on a replay
    p_key_ttl_hours integer
) RETURNS TABLE (outcome text, detail jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_claimed boolean := false;
    v_payment record;
    v_stored record;
    v_held bigint;
    v_left bigint;
    v_amount bigint;
    v_threshold bigint;
    v_status text;
    v_body jsonb;
BEGIN
    IF p_key IS NOT NULL THEN
        -- Claimed before anything else: a second request with the key waits here for the
        -- first to commit, then replays its answer.
        INSERT INTO idempotency_records AS r (subject, key, request_hash)
        VALUES (p_actor, p_key, p_fingerprint)
        ON CONFLICT (subject, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, response_status = NULL,
                response_body = NULL, created_at = now()
            WHERE r.created_at < now() - make_interval(hours => p_key_ttl_hours)
        RETURNING true INTO v_claimed;
        IF v_claimed IS NULL THEN
            SELECT request_hash, response_status, response_body INTO v_stored
            FROM idempotency_records WHERE subject = p_actor AND key = p_key;
            IF NOT FOUND THEN
                -- Given back by a refused request between our two statements: try again.
                RAISE EXCEPTION 'idempotency record released meanwhile'
                    USING ERRCODE = 'serialization_failure';
            ELSIF v_stored.request_hash <> p_fingerprint THEN
                RETURN QUERY SELECT 'idempotency_key_reused', NULL::jsonb;
            ELSE
                RETURN QUERY SELECT 'replayed', jsonb_build_object(
                    'status', v_stored.response_status, 'body', v_stored.response_body);
            END IF;
            RETURN;
        END IF;
    END IF;

    -- The payment, locked until the end of the statement, with the charge the refund is
    -- made against: the id as a charge id first (the common case, one index lookup), then
    -- as a PaymentIntent id or our payment id (its succeeded charge, else its latest).
    SELECT p.id, p.amount, p.currency, p.status,
           c.id AS charge_id, c.status AS charge_status, c.disputed
    INTO v_payment
    FROM charges c JOIN payments p ON p.id = c.payment_id
    WHERE c.id = p_ref
    FOR UPDATE OF p;
    IF NOT FOUND THEN
        SELECT p.id, p.amount, p.currency, p.status,
               c.id AS charge_id, c.status AS charge_status,
               coalesce(c.disputed, false) AS disputed
        INTO v_payment
        FROM payments p
        LEFT JOIN LATERAL (
            SELECT id, status, disputed FROM charges WHERE payment_id = p.id
            ORDER BY status = 'succeeded' DESC, created_at DESC LIMIT 1
        ) c ON true
        WHERE p.stripe_payment_intent_id = p_ref OR p.id = p_ref
        FOR UPDATE OF p;
    END IF;

    IF v_payment.id IS NULL THEN
        outcome := 'not_found';
    ELSIF v_payment.status <> 'succeeded'
          OR (v_payment.charge_id IS NOT NULL AND v_payment.charge_status <> 'succeeded') THEN
        outcome := 'payment_not_succeeded';
        detail := jsonb_build_object('state', CASE
            WHEN v_payment.charge_id IS NOT NULL AND v_payment.charge_status <> 'succeeded'
            THEN v_payment.charge_status ELSE v_payment.status END);
    ELSIF v_payment.disputed THEN
        outcome := 'charge_disputed';
    ELSE
        -- What is left: captured minus every refund that still holds money (pending ones
        -- count), read under the lock.
        SELECT coalesce(sum(amount), 0) INTO v_held
        FROM refunds WHERE payment_id = v_payment.id AND status NOT IN ('failed', 'canceled');
        v_left := greatest(v_payment.amount - v_held, 0);
        v_amount := coalesce(p_requested, v_left);
        IF v_left <= 0 OR v_amount > v_left THEN
            outcome := 'refused_by_what_is_left';
            detail := jsonb_build_object('left', v_left, 'currency', v_payment.currency);
        END IF;
    END IF;

    IF outcome IS NOT NULL THEN
        IF v_claimed THEN
            -- Only a 201 is kept under a key (SPEC 3.4): the same key may succeed later.
            DELETE FROM idempotency_records WHERE subject = p_actor AND key = p_key;
        END IF;
        RETURN NEXT;
        RETURN;
    END IF;

    v_threshold := coalesce((p_thresholds ->> lower(v_payment.currency))::bigint,
                            (p_thresholds ->> '*')::bigint);
    v_status := CASE WHEN v_amount >= v_threshold THEN 'awaiting_approval' ELSE 'pending' END;
    IF v_status = 'pending' THEN
        v_threshold := NULL;
    END IF;

    INSERT INTO refunds (id, payment_id, charge_id, amount, currency, status, reason,
                         stripe_idempotency_key, initiated_by, approval_threshold)
    VALUES (p_refund_id, v_payment.id, v_payment.charge_id, v_amount, v_payment.currency,
            v_status, p_reason, p_stripe_key, p_actor, v_threshold);
    INSERT INTO refund_events (refund_id, from_status, to_status, actor, detail)
    VALUES (p_refund_id, NULL, v_status, p_actor,
            jsonb_build_object('amount', v_amount, 'reason', p_reason,
                               'full', p_requested IS NULL)
            || CASE WHEN v_threshold IS NULL THEN '{}'::jsonb
                    ELSE jsonb_build_object('approval_threshold', v_threshold) END);

    v_body := jsonb_build_object(
        'refund_id', p_refund_id, 'payment_id', v_payment.id,
        'charge_id', v_payment.charge_id, 'amount_cents', v_amount, 'status', v_status,
        'stripe_refund_id', '');
    IF v_claimed THEN
        UPDATE idempotency_records SET response_status = 201, response_body = v_body
        WHERE subject = p_actor AND key = p_key;
    END IF;
    RETURN QUERY SELECT 'created', v_body;
END;
$$
"""


def upgrade() -> None:
    op.execute(INITIATE_REFUND)


def downgrade() -> None:
    op.execute("DROP FUNCTION initiate_refund(text, bigint, text, text, text, text, jsonb, text, "
               "text, integer)")
