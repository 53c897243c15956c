"""The console's approvals (SPEC 12) in a real browser, over the real pipeline: the
queue, approve and reject with a note, withdrawal, and what the server refuses whatever
the page shows. The stack runs with APPROVAL_THRESHOLD_CENTS=20000."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.domain.models import Refund
from tests.console.conftest import (
    DOCS,
    Stack,
    csrf_of,
    events_of,
    seed_charge,
    sign_in,
    wait_until,
)

INITIATOR = "support@example.com"  # Stack.create_refund's caller
APPROVER = "controller@example.com"
APPROVER_SCOPES = ("refunds:read", "refunds:approve")
LARGE = 25_000


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: Any) -> Iterator[Any]:
    """A tab that fails its test if a page breaks its Content-Security-Policy."""
    tab = context.new_page()
    problems: list[str] = []
    tab.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text
           or "Refused to" in m.text else None)
    yield tab
    assert not problems, problems


def refund_of(db: Session, refund_id: str) -> Refund:
    db.expire_all()
    refund = db.get(Refund, refund_id)
    assert refund is not None
    return refund


def large_refund(stack: Stack, db: Session, *, captured: int = 60_000,
                 minutes_ago: int = 0) -> str:
    refund_id = stack.create_refund(seed_charge(stack, db, amount=captured), LARGE,
                                    reason="damaged on arrival")
    assert refund_of(db, refund_id).status == "awaiting_approval"
    if minutes_ago:
        db.execute(update(Refund).where(Refund.id == refund_id).values(
            created_at=func.now() - func.make_interval(0, 0, 0, 0, 0, minutes_ago)))
        db.commit()
    return refund_id


def queue_ids(page: Any) -> list[str]:
    return page.locator("table.approvals tr[data-refund-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.refundId)")


def test_the_queue_lists_oldest_first_and_an_approver_approves_with_a_note(
    page: Any, stack: Stack, db: Session
) -> None:
    older = large_refund(stack, db, minutes_ago=90)
    newer = large_refund(stack, db, captured=40_000, minutes_ago=5)

    sign_in(page, stack, stack.token(scopes=APPROVER_SCOPES, sub=APPROVER),
            path="/console/approvals")
    ids = queue_ids(page)
    assert ids.index(older) < ids.index(newer)  # oldest first
    row = page.locator(f"tr[data-refund-id='{newer}']")
    text = row.inner_text()
    for shown in ("250.00 USD", "400.00 USD", "150.00 USD", INITIATOR, "5 min"):
        assert shown in text, (shown, text)  # amount, captured, left, who asked, age
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "console-approvals.png"), full_page=True)

    older_row = page.locator(f"tr[data-refund-id='{older}']")
    older_row.locator("textarea").fill("Checked against order 1234")
    with page.expect_navigation():
        older_row.locator("button.approve").click()

    assert page.url.endswith("/console/approvals")
    assert "Approved" in page.inner_text(".flash.ok")
    assert older not in queue_ids(page)
    refund = wait_until(lambda: (r := refund_of(db, older)).status == "succeeded" and r,
                        timeout=15, what="the approved refund to reach Stripe and succeed")
    assert (refund.decision, refund.decided_by, refund.decision_note) == (
        "approved", APPROVER, "Checked against order 1234")
    decided = [e for e in events_of(db, older) if e.from_status == "awaiting_approval"]
    assert [(e.to_status, e.actor, e.detail) for e in decided] == [
        ("pending", APPROVER, {"decision": "approved", "note": "Checked against order 1234"})]
    assert [r["amount"] for r in stack.admin.refunds(metadata_refund_id=older)] == [LARGE]

    page.goto(f"{stack.url}/console/refunds/{older}")
    assert "approved by" in page.inner_text("#decision")
    assert APPROVER in page.inner_text("#decision")
    assert page.inner_text("#decision-note") == "Checked against order 1234"


def test_an_approver_rejects_from_the_refund_page(page: Any, stack: Stack, db: Session) -> None:
    refund_id = large_refund(stack, db)
    sign_in(page, stack, stack.token(scopes=APPROVER_SCOPES, sub=APPROVER),
            path=f"/console/refunds/{refund_id}")
    assert page.locator("#reconcile-now").count() == 0  # nothing to send yet
    page.fill("#approval textarea", "Customer already refunded by bank transfer")
    with page.expect_navigation():
        page.click("#approval button.reject")

    assert "Rejected" in page.inner_text(".flash.ok")
    refund = refund_of(db, refund_id)
    assert (refund.status, refund.decision, refund.decided_by) == ("canceled", "rejected",
                                                                    APPROVER)
    assert stack.admin.refunds(metadata_refund_id=refund_id) == []
    assert page.locator("h1 .status").inner_text() == "canceled"


def test_the_initiator_gets_no_forms_and_the_server_refuses_their_decision(
    context: Any, page: Any, stack: Stack, db: Session
) -> None:
    refund_id = large_refund(stack, db)
    sign_in(page, stack, stack.token(scopes=(*APPROVER_SCOPES, "refunds:write"), sub=INITIATOR),
            path="/console/approvals")
    row = page.locator(f"tr[data-refund-id='{refund_id}']")
    assert "another approver decides" in row.inner_text()
    assert row.locator("form").count() == 0

    for decision in ("approve", "reject"):
        answer = context.request.post(
            f"{stack.url}/console/refunds/{refund_id}/decision",
            form={"csrf_token": csrf_of(page.content()), "decision": decision}, max_redirects=0)
        assert answer.status == 403
        assert "second person" in answer.text()
    assert refund_of(db, refund_id).status == "awaiting_approval"
    assert len(events_of(db, refund_id)) == 1


def test_without_the_approve_scope_there_are_no_forms_and_the_server_refuses(
    context: Any, page: Any, stack: Stack, db: Session
) -> None:
    refund_id = large_refund(stack, db)
    sign_in(page, stack, stack.token(sub="oncall@example.com"), path="/console/approvals")
    assert page.locator("#cannot-approve").is_visible()
    assert page.locator("form.decision").count() == 0
    answer = context.request.post(
        f"{stack.url}/console/refunds/{refund_id}/decision",
        form={"csrf_token": csrf_of(page.content()), "decision": "approve"}, max_redirects=0)
    assert answer.status == 403
    assert refund_of(db, refund_id).status == "awaiting_approval"


def test_decisions_refuse_a_missing_or_wrong_csrf_token(
    context: Any, page: Any, stack: Stack, db: Session
) -> None:
    refund_id = large_refund(stack, db)
    sign_in(page, stack, stack.token(scopes=(*APPROVER_SCOPES, "refunds:write"), sub=APPROVER),
            path="/console/approvals")
    for action in ("decision", "cancel"):
        target = f"/console/refunds/{refund_id}/{action}"
        for form in ({"decision": "approve"}, {"decision": "approve", "csrf_token": "forged"}):
            answer = context.request.post(f"{stack.url}{target}", form=form, max_redirects=0)
            assert answer.status == 400 and "CSRF" in answer.text()
    too_long = context.request.post(
        f"{stack.url}/console/refunds/{refund_id}/decision",
        form={"csrf_token": csrf_of(page.content()), "decision": "approve", "note": "n" * 501},
        max_redirects=0)
    assert too_long.status == 400
    assert refund_of(db, refund_id).status == "awaiting_approval"
    assert len(events_of(db, refund_id)) == 1


def test_a_writer_withdraws_a_refund_awaiting_approval(
    page: Any, stack: Stack, db: Session
) -> None:
    refund_id = large_refund(stack, db)
    sign_in(page, stack, stack.token(sub=INITIATOR), path=f"/console/refunds/{refund_id}")
    assert "another approver must decide" in page.inner_text("#approval")
    with page.expect_navigation():
        page.click("#withdraw")
    assert "Withdrew" in page.inner_text(".flash.ok")
    refund = refund_of(db, refund_id)
    assert (refund.status, refund.decision, refund.decided_by) == ("canceled", "withdrawn",
                                                                    INITIATOR)
    assert page.locator("#withdraw").count() == 0
    held = db.scalar(select(func.count()).where(Refund.id == refund_id,
                                                Refund.status == "awaiting_approval"))
    assert held == 0


def test_the_queue_fits_a_phone(browser: Any, stack: Stack, db: Session) -> None:
    large_refund(stack, db)
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = phone.new_page()
        sign_in(page, stack, stack.token(scopes=APPROVER_SCOPES, sub=APPROVER),
                path="/console/approvals")
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the approvals page is {overflow}px wider than a phone"
    finally:
        phone.close()
