"""The refunds console in a real browser, over the real pipeline (issue 7)."""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.domain.models import Refund
from shared.services.refunds import RefundRequest, initiate_refund
from tests.console.conftest import (
    DOCS,
    FLOWER_URL,
    OPERATOR,
    STACK_SETTINGS,
    Stack,
    csrf_of,
    events_of,
    seed_charge,
    sign_in,
    wait_until,
)
from tests.support import free_port

STUCK_ALERT_SECONDS = float(STACK_SETTINGS["STUCK_ALERT_SECONDS"])
XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    """A tab that fails its test if a console page breaks its own Content-Security-Policy
    (an inline style or script, say) or asks for a resource it does not have."""
    tab = context.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text
           or "Refused to" in m.text else None)
    tab.on("response", lambda r: problems.append(f"{r.status} {r.url}")
           if r.status == 404 and "/console/static/" in r.url else None)
    yield tab
    assert not problems, problems


def session_claims(value: str) -> dict[str, Any]:
    """What a signed session cookie holds (it is signed, not encrypted: no secrets in it)."""
    compressed = value.startswith(".")
    payload = value.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return dict(json.loads(zlib.decompress(raw) if compressed else raw))


def status_of(db: Session, refund_id: str) -> str | None:
    db.expire_all()
    return db.scalar(select(Refund.status).where(Refund.id == refund_id))


def initiate(db: Session, charge_id: str, amount: int) -> str:
    """A pending refund recorded as the API records it, but never enqueued."""
    # On the stack's database, with a connection like the API's (autocommit: the call
    # commits itself).
    url = db.get_bind().url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as connection:
        return initiate_refund(
            connection,
            request=RefundRequest(charge_id=charge_id, amount_cents=amount, reason=None),
            initiated_by="support@example.com",
            idempotency_key=None,
            fingerprint="",
        ).refund_id


def stuck_refund(stack: Stack, db: Session, *, amount: int = 1_500) -> str:
    """A pending refund whose message was lost: committed, never enqueued, created long
    enough ago to count as stuck."""
    refund_id = initiate(db, seed_charge(stack, db, amount=5_000), amount)
    db.execute(
        update(Refund).where(Refund.id == refund_id)
        .values(created_at=func.now() - func.make_interval(0, 0, 0, 0, 0, 10))
    )
    db.commit()
    return refund_id


def test_sign_in_refuses_bad_expired_and_unscoped_tokens(page: Any, stack: Stack) -> None:
    wrong_secret = stack.token().rsplit(".", 1)[0] + ".c2lnbmF0dXJlLW9mLWFub3RoZXI"
    cases = [
        ("not-a-jwt", 401, "not a well-formed JWT"),
        (wrong_secret, 401, "rejected"),
        (stack.token(ttl=-120), 401, "expired"),
        (stack.token(scopes=("refunds:write",)), 403, "lacks the 'refunds:read' scope"),
    ]
    for bearer, status, message in cases:
        answer = sign_in(page, stack, bearer)
        assert answer.status == status, (bearer[:20], answer.status)
        assert message in page.inner_text(".flash.error")
        assert bearer not in page.content()  # a refused token is never echoed back
        page.goto(f"{stack.url}/console/")
        assert "/console/login" in page.url  # still signed out


def test_sign_in_sets_a_signed_httponly_strict_cookie_and_sign_out_ends_it(
    context: Any, page: Any, stack: Stack
) -> None:
    bearer = stack.token()
    answer = sign_in(page, stack, bearer, path="/console/refunds?status=pending")
    assert answer.status == 303
    assert page.url == f"{stack.url}/console/refunds?status=pending"  # back where it started
    (cookie,) = [c for c in context.cookies() if c["name"] == "refunds_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    claims = session_claims(cookie["value"])
    assert claims["sub"] == OPERATOR and claims["write"] is True
    assert bearer not in json.dumps(claims)  # the token itself is not kept
    assert page.locator("header .operator").inner_text() == OPERATOR

    body, _, signature = cookie["value"].rpartition(".")
    forged = f"{body}.{signature[::-1]}"
    for value, status in ((cookie["value"], 200), (forged, 302)):
        answer = httpx.get(f"{stack.url}/console/", cookies={"refunds_console": value})
        assert answer.status_code == status  # a cookie whose signature fails is no session
    page.click("text=Sign out")
    page.wait_for_url("**/console/login")
    page.goto(f"{stack.url}/console/refunds")
    assert "/console/login" in page.url


def test_refund_created_over_http_appears_and_succeeds(
    page: Any, stack: Stack, db: Session
) -> None:
    charge_id = seed_charge(stack, db, amount=8_000)
    response = sign_in(page, stack, stack.token(), path=f"/console/refunds?charge_id={charge_id}")
    assert response.status == 303
    assert "No refunds match these filters" in page.inner_text("main")

    refund_id = stack.create_refund(charge_id, 2_500, reason=XSS)
    page.reload()
    row = page.locator(f"tr[data-refund-id='{refund_id}']")
    assert "25.00 USD" in row.inner_text()
    row.locator("a.refund-link").click()
    page.wait_for_url(f"**/console/refunds/{refund_id}")

    def succeeded() -> bool:
        page.reload()
        return page.locator("h1 .status").inner_text() == "succeeded"

    wait_until(succeeded, timeout=15, what="the refund page to show succeeded")
    assert page.inner_text("#stripe-refund-id").startswith("re_")
    assert page.inner_text("#attempts") == "1"
    trail = page.inner_text("table.events")
    # Whoever records Stripe's answer first moves it: the worker, or Stripe's webhook.
    assert "support@example.com" in trail and ("worker" in trail or "webhook" in trail)
    assert XSS in page.inner_text("main")  # shown as text, never run
    assert page.evaluate("window.__xss") is None
    payment_link = page.get_attribute("#payment-link", "href")
    assert payment_link.startswith("/console/refunds?payment_id=pay_")
    flower = page.get_attribute("#flower-link", "href")
    assert flower.startswith(f"{FLOWER_URL}/tasks?name=refunds.process") and refund_id in flower
    assert page.locator("#reconcile-now").count() == 0  # nothing to reconcile once finished

    headers = page.request.get(f"{stack.url}/console/refunds/{refund_id}").headers
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"


def test_reconcile_now_sends_a_stuck_refund_again_and_records_the_operator(
    page: Any, stack: Stack, db: Session
) -> None:
    # Some traffic for the overview: one refund that succeeds, one Stripe fails later.
    stack.create_refund(seed_charge(stack, db), 1_000)
    failing = stack.create_refund(seed_charge(stack, db, payment_method="pm_card_refundFail"), 700)
    wait_until(lambda: status_of(db, failing) == "failed", timeout=15,
               what="Stripe to fail the refundFail card's refund")
    # Stripe answers 503 to every refund call: the worker retries, then leaves it pending.
    stack.admin.faults(fail_next={"status": 503, "count": 1000, "path_prefix": "/v1/refunds"})
    try:
        stuck_id = stack.create_refund(seed_charge(stack, db), 4_200)
        wait_until(
            lambda: any((e.detail or {}).get("note") == "left for the reconciler"
                        for e in events_of(db, stuck_id)),
            timeout=20, what="the worker to leave the refund to the reconciler",
        )
    finally:
        stack.admin.clear_faults()
    last_error = db.get(Refund, stuck_id).last_error
    assert last_error
    time.sleep(STUCK_ALERT_SECONDS)  # now it is stuck: no progress for longer than that

    sign_in(page, stack, stack.token())
    page.goto(f"{stack.url}/console/?refresh=off")
    row = page.locator(f"#stuck tr[data-refund-id='{stuck_id}']")
    assert last_error in row.inner_text()  # why it is stuck, as the worker recorded it
    assert int(page.inner_text("#stuck-count .value").replace(",", "")) >= 1
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "console-overview.png"), full_page=True)

    row.locator("a.refund-link").click()
    page.wait_for_url(f"**/console/refunds/{stuck_id}")
    assert page.locator("#stuck-banner").is_visible()
    before = len(events_of(db, stuck_id))
    with page.expect_navigation():
        page.click("#reconcile-now")
    assert "Sent to the workers again" in page.inner_text(".flash.ok")

    events = events_of(db, stuck_id)
    asked = events[before]
    assert (asked.from_status, asked.to_status, asked.actor) == ("pending", "pending", OPERATOR)
    assert asked.detail == {"action": "reconcile_now", "task": "refunds.process"}

    def finished() -> Refund | None:
        db.expire_all()
        refund = db.get(Refund, stuck_id)
        return refund if refund is not None and refund.status == "succeeded" else None

    refund = wait_until(finished, timeout=15, what="the worker to finish the reconciled refund")
    assert refund.amount == 4_200
    stripe_refunds = stack.admin.refunds(metadata_refund_id=stuck_id)
    assert [r["amount"] for r in stripe_refunds] == [4_200]  # one refund at Stripe, not more
    assert db.scalar(select(func.count()).select_from(Refund)
                     .where(Refund.payment_id == refund.payment_id)) == 1

    page.reload()
    assert page.locator("h1 .status").inner_text() == "succeeded"
    assert "reconcile_now" in page.inner_text("table.events")
    page.screenshot(path=str(DOCS / "console-refund.png"), full_page=True)

    settled = len(events_of(db, stuck_id))
    again = page.request.post(f"{stack.url}/console/refunds/{stuck_id}/reconcile",
                              form={"csrf_token": csrf_of(page.content())}, max_redirects=0)
    assert again.status == 409  # a finished refund is never sent again
    assert len(events_of(db, stuck_id)) == settled


def test_forms_refuse_a_missing_or_wrong_csrf_token(
    context: Any, page: Any, stack: Stack, db: Session
) -> None:
    refund_id = stuck_refund(stack, db)
    sign_in(page, stack, stack.token())
    page.goto(f"{stack.url}/console/refunds/{refund_id}")
    target = f"{stack.url}/console/refunds/{refund_id}/reconcile"
    for form in ({}, {"csrf_token": ""}, {"csrf_token": "forged-" + "x" * 40}):
        answer = context.request.post(target, form=form, max_redirects=0)
        assert answer.status == 400, form
        assert "CSRF" in answer.text()
    assert context.request.post(f"{stack.url}/console/logout", form={},
                                max_redirects=0).status == 400
    assert len(events_of(db, refund_id)) == 1  # only its creation: nothing was reconciled
    page.goto(f"{stack.url}/console/")
    assert "/console/login" not in page.url  # the refused logout did not sign anyone out

    answer = context.request.post(target, form={"csrf_token": csrf_of(page.content())},
                                  max_redirects=0)
    assert answer.status == 303  # the same request with the session's token goes through
    assert any(e.detail == {"action": "reconcile_now", "task": "refunds.process"}
               for e in events_of(db, refund_id))

    fresh = context.browser.new_context()
    try:
        login = fresh.request.post(f"{stack.url}/console/login",
                                   form={"token": stack.token()}, max_redirects=0)
        assert login.status == 400  # sign-in needs the form's token too (no login CSRF)
    finally:
        fresh.close()


def test_read_only_operator_sees_but_cannot_reconcile(
    context: Any, page: Any, stack: Stack, db: Session
) -> None:
    refund_id = stuck_refund(stack, db)
    sign_in(page, stack, stack.token(scopes=("refunds:read",), sub="viewer@example.com"))
    page.goto(f"{stack.url}/console/refunds/{refund_id}")
    assert page.locator("header .scope").inner_text() == "read only"
    assert page.locator("#reconcile-now").count() == 0
    answer = context.request.post(f"{stack.url}/console/refunds/{refund_id}/reconcile",
                                  form={"csrf_token": csrf_of(page.content())}, max_redirects=0)
    assert answer.status == 403
    assert len(events_of(db, refund_id)) == 1


def test_list_filters_and_pages_by_cursor(page: Any, stack: Stack, db: Session) -> None:
    charge_id = seed_charge(stack, db, amount=60_000)
    created = [initiate(db, charge_id, 100 + i) for i in range(53)]
    sign_in(page, stack, stack.token())
    page.goto(f"{stack.url}/console/refunds?charge_id={charge_id}")
    first = page.locator("tr[data-refund-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.refundId)")
    assert first == created[::-1][:50]  # newest first, one page
    with page.expect_navigation():
        page.click("a[rel=next]")
    rest = page.locator("tr[data-refund-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.refundId)")
    assert rest == created[::-1][50:]
    assert page.locator("a[rel=next]").count() == 0
    page.goto(f"{stack.url}/console/refunds?charge_id={charge_id}&initiated_by=nobody")
    assert page.locator("tr[data-refund-id]").count() == 0
    page.goto(f"{stack.url}/console/refunds?status=sent")
    assert "status must be one of" in page.inner_text("main")
    for path, status in (("/console/refunds?charge_id=ch_%00", 400),
                         ("/console/refunds?cursor=bm90LWEtY3Vyc29y", 400),
                         ("/console/refunds/rf_%00", 404), ("/console/refunds/rf_nope", 404)):
        assert page.goto(f"{stack.url}{path}").status == status, path  # a page, never a 500


@pytest.mark.parametrize("path", ["/console/?refresh=off", "/console/refunds", "REFUND"])
def test_pages_fit_a_phone(browser: Any, stack: Stack, db: Session, path: str) -> None:
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = phone.new_page()
        sign_in(page, stack, stack.token())
        if path == "REFUND":
            path = f"/console/refunds/{stuck_refund(stack, db)}"
        page.goto(f"{stack.url}{path}")
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than a phone"
    finally:
        phone.close()


def test_reconcile_now_on_a_refund_stripe_holds_polls_stripe_for_it(
    page: Any, stack: Stack, db: Session
) -> None:
    # Stripe holds the refund as pending, then settles it; its webhooks go nowhere, so
    # only a poll can tell us. refunds.process does nothing past pending: a pass must run.
    stack.admin.config(webhook_url=f"http://127.0.0.1:{free_port()}/nowhere")
    try:
        refund_id = stack.create_refund(
            seed_charge(stack, db, payment_method="pm_card_pendingRefund"), 900)
        wait_until(lambda: status_of(db, refund_id) == "processing", timeout=10,
                   what="Stripe to hold the refund as pending")
        (held,) = stack.admin.refunds(metadata_refund_id=refund_id)
        wait_until(lambda: stack.admin.refunds(metadata_refund_id=refund_id)[0]["status"]
                   == "succeeded", timeout=10, what="Stripe to settle the refund")
        assert status_of(db, refund_id) == "processing"  # nobody told us

        sign_in(page, stack, stack.token(), path=f"/console/refunds/{refund_id}")
        with page.expect_navigation():
            page.click("#reconcile-now")
        assert "asked for a reconcile pass (refunds.reconcile)" in page.inner_text(".flash.ok")
        (asked,) = [e for e in events_of(db, refund_id) if e.actor == OPERATOR]
        assert (asked.from_status, asked.to_status) == ("processing", "processing")
        assert asked.detail == {"action": "reconcile_now", "task": "refunds.reconcile"}
        wait_until(lambda: status_of(db, refund_id) == "succeeded", timeout=15,
                   what="the reconcile pass to poll Stripe and move the refund on")
        assert [r["id"] for r in stack.admin.refunds(metadata_refund_id=refund_id)] == [held["id"]]
    finally:
        stack.admin.config(webhook_url=f"{stack.url}/v1/webhooks/stripe")
