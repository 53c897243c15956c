"""/console: the operators' refunds console (issue 7).

Server-rendered pages over ``shared.services.console_queries``; no script at all, so the
Content-Security-Policy allows none. Sign-in turns a pasted bearer token into a
signed session cookie (``api/console/session.py``); every POST checks a CSRF token.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from flask import (
    Blueprint,
    Response,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException

from api.console import format as fmt
from api.console.chart import per_minute_chart
from api.console.session import (
    CONSOLE_PATH,
    CSRF_FIELD,
    LoginRefused,
    check_csrf,
    configure,
    csrf_token,
    current_operator,
    login_required,
    safe_next,
    sign_in,
    sign_out,
)
from shared.adapters.celery_app import PROCESS_REFUND_TASK
from shared.adapters.config import get_settings
from shared.adapters.db import unit_of_work
from shared.domain.errors import NotFound, RefundServiceError
from shared.domain.models import TERMINAL_STATUSES, RefundStatus
from shared.services import console_queries as queries
from shared.services.refunds import InvalidCursor

bp = Blueprint(
    "console",
    __name__,
    url_prefix=CONSOLE_PATH,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

PAGE_SIZE = 50
FILTER_MAX = 255
OVERVIEW_REFRESH_SECONDS = 30

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "style-src 'self'",
        "img-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    configure(state.app, get_settings())


@bp.before_request
def _csrf() -> None:
    if request.method == "POST":
        check_csrf()


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.app_template_global()
def console_csrf_token() -> str:
    return csrf_token()


@bp.context_processor
def _globals() -> dict[str, Any]:
    return {
        "operator": current_operator(),
        "csrf_field": CSRF_FIELD,
        "fmt": fmt,
        "statuses": [s.value for s in RefundStatus],
        "terminal": {s.value for s in TERMINAL_STATUSES},
    }


ERROR_TITLES = {
    400: "The request was refused",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Nothing to do",
}


def _error_page(status: int, message: str) -> tuple[str, int]:
    title = ERROR_TITLES.get(status, "Something went wrong")
    page = render_template("console/error.html", status=status, title=title, message=message)
    return page, status


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    if status == 400 and exc.description == "csrf":
        return _error_page(
            400,
            "This form was not sent from your current console session (its CSRF token is "
            "missing or wrong). Reload the page and try again.",
        )
    return _error_page(status, exc.description or "")


@bp.errorhandler(RefundServiceError)
def _domain_error(exc: RefundServiceError) -> tuple[str, int]:
    return _error_page(404 if isinstance(exc, NotFound) else 409, exc.message)


@bp.get("/login")
def login() -> Any:
    next_path = safe_next(request.args.get("next"))
    if current_operator() is not None:
        return redirect(next_path or url_for(".overview"))
    return render_template(
        "console/login.html", next_path=next_path, expired=request.args.get("expired") == "1"
    )


@bp.post("/login")
def login_submit() -> Any:
    next_path = safe_next(request.form.get("next"))
    try:
        sign_in(request.form.get("token", ""), get_settings())
    except LoginRefused as exc:
        page = render_template("console/login.html", next_path=next_path, error=exc.message)
        return page, exc.status
    return redirect(next_path or url_for(".overview"), code=303)


@bp.post("/logout")
def logout() -> Any:
    sign_out()
    return redirect(url_for(".login"), code=303)


@bp.get("/")
@login_required
def overview() -> Any:
    settings = get_settings()
    with unit_of_work() as session:
        data = queries.overview(
            session=session,
            stuck_alert_seconds=settings.stuck_alert_seconds,
        )
        refresh = OVERVIEW_REFRESH_SECONDS if request.args.get("refresh") != "off" else None
        # Rendered inside the unit of work: its rows are live until it closes.
        return render_template(
            "console/overview.html",
            data=data,
            chart=per_minute_chart(data.minutes),
            refresh=refresh,
        )


def _filter(name: str) -> str | None:
    value = request.args.get(name, "").strip()
    if len(value) > FILTER_MAX or not value.isprintable():
        raise _BadFilter(f"{name} must be at most {FILTER_MAX} printable characters.")
    return value or None


class _BadFilter(Exception):
    pass


@bp.get("/refunds")
@login_required
def refunds() -> Any:
    try:
        filters = {
            "status": _filter("status"),
            "charge_id": _filter("charge_id"),
            "payment_id": _filter("payment_id"),
            "initiated_by": _filter("initiated_by"),
        }
        refund_id = _filter("refund_id")
        cursor = _filter("cursor")
        known = [s.value for s in RefundStatus]
        if filters["status"] is not None and filters["status"] not in known:
            raise _BadFilter(f"status must be one of: {', '.join(known)}.")
    except _BadFilter as exc:
        return _error_page(400, str(exc))
    if refund_id is not None:
        return redirect(url_for(".refund", refund_id=refund_id))
    with unit_of_work() as session:
        try:
            page = queries.list_refunds(session=session, limit=PAGE_SIZE, cursor=cursor, **filters)
        except InvalidCursor:
            return _error_page(400, "That page link is not one this console made; start again.")
        active = {k: v for k, v in filters.items() if v is not None}
        next_url = (
            url_for(".refunds", **active, cursor=page.next_cursor) if page.next_cursor else None
        )
        return render_template(
            "console/refunds.html",
            page=page,
            filters=filters,
            filtered=bool(active),
            paged=cursor is not None,
            first_url=url_for(".refunds", **active),
            next_url=next_url,
        )


def _flower_link(refund_id: str) -> str | None:
    base = get_settings().flower_url
    if not base:
        return None
    # Flower's task list takes its search from the query string; args match by substring.
    search = f"{PROCESS_REFUND_TASK} args:{refund_id}"
    return f"{base.rstrip('/')}/tasks?{urlencode({'name': search}, quote_via=quote)}"


@bp.get("/refunds/<refund_id>")
@login_required
def refund(refund_id: str) -> Any:
    settings = get_settings()
    with unit_of_work() as session:
        detail = queries.refund_detail(
            session=session,
            refund_id=refund_id,
            stuck_alert_seconds=settings.stuck_alert_seconds,
        )
        return render_template(
            "console/refund.html", d=detail, flower_url=_flower_link(detail.refund.id)
        )


@bp.post("/refunds/<refund_id>/reconcile")
@login_required
def reconcile(refund_id: str) -> Any:
    operator = current_operator()
    assert operator is not None  # login_required
    if not operator.can_write:
        scope = get_settings().refunds_write_scope
        return _error_page(403, f"Reconciling needs a token with the '{scope}' scope.")
    with unit_of_work() as session:
        done = queries.reconcile_now(session=session, refund_id=refund_id, actor=operator.subject)
    if not done.enqueued:
        flash(
            "Recorded, but the queue refused the task; "
            "the reconciler will take the refund on its next run.",
            "warn",
        )
    elif done.task == PROCESS_REFUND_TASK:
        flash(f"Sent to the workers again ({done.task}); the audit trail records that you asked.",
              "ok")
    else:
        flash(
            f"Stripe already holds this refund: asked for a reconcile pass ({done.task}), which "
            "polls Stripe for in-flight refunds. The audit trail records that you asked.",
            "ok",
        )
    return redirect(url_for(".refund", refund_id=refund_id), code=303)


# The approvals pages register their views on this blueprint.
from api.console import approvals  # noqa: E402, F401
from api.console import webhooks as _webhooks  # noqa: E402,F401 - its pages, on ``bp``
