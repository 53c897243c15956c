"""Console sign-in: a pasted bearer token becomes a signed, HttpOnly, SameSite=Strict
session cookie; every POST carries the session's CSRF token."""

from __future__ import annotations

import functools
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import jwt
from flask import Flask, Request, abort, redirect, request, session, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from api.auth import authenticate
from api.errors import ApiError
from shared.adapters.config import Settings

F = TypeVar("F", bound=Callable[..., Any])

COOKIE_NAME = "refunds_console"
CONSOLE_PATH = "/console"
#: A console session never outlives the token it came from, nor this.
MAX_SESSION = timedelta(hours=12)
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True)
class Operator:
    subject: str
    can_write: bool
    can_approve: bool = False  # REFUNDS_APPROVE_SCOPE: may decide on others' large refunds
    can_admin: bool = False  # REFUNDS_ADMIN_SCOPE: may send webhook deliveries again


class LoginRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ConsoleOnlySessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, opened for the console's pages only.

    The cookie is never sent anywhere else (its path is /console), yet Flask would still
    build a signing serializer for every API request: a few percent of a POST's CPU
    (make bench). Elsewhere Flask gets its null session."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if request.path == CONSOLE_PATH or request.path.startswith(f"{CONSOLE_PATH}/"):
            return super().open_session(app, request)
        return None


def configure(app: Flask, settings: Settings) -> None:
    """Flask's signed-cookie session, scoped to the console's paths."""
    app.secret_key = settings.console_secret_key
    app.session_interface = ConsoleOnlySessions()
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH=CONSOLE_PATH,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.console_cookie_secure,
        PERMANENT_SESSION_LIFETIME=MAX_SESSION,
    )


def sign_in(raw_token: str, settings: Settings) -> Operator:
    """Check a pasted token as the API would; on success start a fresh session."""
    token = raw_token.strip()
    if token.lower().startswith("bearer "):
        token = token[len("bearer ") :].strip()
    try:
        caller = authenticate(f"Bearer {token}", settings)
    except ApiError as exc:
        raise LoginRefused(401, exc.message) from exc
    if settings.refunds_read_scope not in caller.scopes:
        raise LoginRefused(
            403, f"This token lacks the '{settings.refunds_read_scope}' scope the console needs."
        )
    # authenticate() verified the signature and required 'exp'; only read it here.
    token_exp = int(jwt.decode(token, options={"verify_signature": False})["exp"])
    operator = Operator(
        subject=caller.subject,
        can_write=settings.refunds_write_scope in caller.scopes,
        can_approve=settings.refunds_approve_scope in caller.scopes,
    )
    session.clear()  # a new session and CSRF token: nothing from before sign-in carries over
    session.permanent = True
    session["sub"] = operator.subject
    session["write"] = operator.can_write
    session["approve"] = operator.can_approve
    session["admin"] = settings.refunds_admin_scope in caller.scopes
    session["exp"] = min(token_exp, int(time.time() + MAX_SESSION.total_seconds()))
    session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return operator


def sign_out() -> None:
    session.clear()


def current_operator() -> Operator | None:
    subject = session.get("sub")
    exp = session.get("exp")
    if not isinstance(subject, str) or not isinstance(exp, int) or exp <= time.time():
        return None
    return Operator(
        subject=subject,
        can_write=bool(session.get("write")),
        can_approve=bool(session.get("approve")),
        can_admin=bool(session.get("admin")),
    )


def csrf_token() -> str:
    """The session's CSRF token, made on first use (the sign-in form needs one too)."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def check_csrf() -> None:
    """Refuse a POST whose form token is missing or is not this session's."""
    expected = session.get(CSRF_FIELD)
    sent = request.form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        abort(400, description="csrf")


def login_required(view: F) -> F:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if current_operator() is None:
            if session.get("sub"):
                sign_out()  # expired: drop it so the sign-in page says so once
                return redirect(url_for("console.login", next=_here(), expired=1))
            return redirect(url_for("console.login", next=_here()))
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def safe_next(value: str | None) -> str | None:
    """Only a path inside the console: never another host (no open redirect)."""
    if not value or not value.startswith("/console/") or value.startswith("/console//"):
        return None
    if "\\" in value or any(ord(c) < 32 for c in value):
        return None
    return value


def _here() -> str:
    return request.full_path.rstrip("?")
