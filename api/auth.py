"""Bearer JWT authentication and scopes (SPEC 3.5)."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import jwt
from cachetools import TTLCache
from flask import g, request

from api.errors import ApiError
from shared.adapters.config import Settings, get_settings

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

LEEWAY_SECONDS = 30
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")


@dataclass(frozen=True)
class Caller:
    subject: str
    scopes: frozenset[str]


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        headers={"WWW-Authenticate": 'Bearer realm="refunds", error="invalid_token"'},
    )


@functools.cache
def _jwks_client(url: str) -> jwt.PyJWKClient:
    return jwt.PyJWKClient(url, cache_keys=True, lifespan=300, timeout=5)


def _verification_key(token: str, settings: Settings) -> tuple[Any, str]:
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError as exc:
        raise _unauthorized("The bearer token is not a well-formed JWT.") from exc
    if alg == "HS256" and settings.jwt_secret:
        return settings.jwt_secret, alg
    if alg == "RS256" and settings.jwt_jwks_url:
        try:
            return _jwks_client(settings.jwt_jwks_url).get_signing_key_from_jwt(token).key, alg
        except jwt.PyJWKClientConnectionError as exc:
            # Our outage, not the caller's fault: a 401 would send them to fetch a new token.
            log.error("JWKS endpoint unreachable: %s", type(exc).__name__)
            raise ApiError(
                503, "The service cannot fetch its token keys right now; try again shortly."
            ) from exc
        except jwt.PyJWTError as exc:
            raise _unauthorized("The token's signing key is not one this service trusts.") from exc
    raise _unauthorized("The token's signing algorithm is not accepted.")


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    found: set[str] = set()
    for name in ("scope", "scp", "scopes"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return frozenset(found)


# Callers send the same token on every request until it expires, and checking its
# signature again each time was a tenth of the CPU of a POST (make bench). A token that
# passed is remembered for a minute at most, under everything its check depended on;
# its expiry is still checked on every request. (A key removed from the JWKS already
# keeps working for as long as PyJWKClient caches keys: 5 minutes.)
VERIFIED_TOKEN_SECONDS = 60
_verified: TTLCache[tuple[str | None, ...], tuple[Caller, float]] = TTLCache(
    maxsize=4096, ttl=VERIFIED_TOKEN_SECONDS
)
_verified_lock = threading.Lock()


def authenticate(header: str | None, settings: Settings) -> Caller:
    if not header:
        raise _unauthorized("Send 'Authorization: Bearer <token>'.")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("Send 'Authorization: Bearer <token>'.")
    token = token.strip()
    cache_key = (
        token,
        settings.jwt_secret,
        settings.jwt_jwks_url,
        settings.jwt_audience,
        settings.jwt_issuer,
    )
    with _verified_lock:
        remembered = _verified.get(cache_key)
    if remembered is not None:
        caller, expires_at = remembered
        if time.time() < expires_at + LEEWAY_SECONDS:
            return caller
        raise _unauthorized("The token has expired; get a new one.")
    caller, expires_at = _verify(token, settings)
    with _verified_lock:
        _verified[cache_key] = (caller, expires_at)
    return caller


def _verify(token: str, settings: Settings) -> tuple[Caller, float]:
    """The caller a token names and when it expires, once its signature and claims pass."""
    key, alg = _verification_key(token, settings)
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=LEEWAY_SECONDS,
            options={"require": ["exp", "sub"], "verify_aud": settings.jwt_audience is not None},
        )
    except jwt.ExpiredSignatureError as exc:
        raise _unauthorized("The token has expired; get a new one.") from exc
    except jwt.PyJWTError as exc:
        raise _unauthorized(f"The token was rejected: {exc}.") from exc
    for name in NUMERIC_DATE_CLAIMS:
        # PyJWT also takes a string of digits; RFC 7519 says a NumericDate is a number,
        # and an issuer that sends a string has a bug worth hearing about.
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _unauthorized(f"The token's '{name}' claim must be a number of seconds.")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > 255:
        raise _unauthorized("The token's 'sub' claim must name the caller.")
    return Caller(subject=subject, scopes=_scopes(claims)), float(claims["exp"])


Scope = Literal["read", "write", "approve"]


def authorize(header: str | None, kind: Scope) -> Caller:
    """The caller an ``Authorization`` header names: 401 without a valid token, 403
    without the ``kind`` scope."""
    settings = get_settings()
    caller = authenticate(header, settings)
    needed = {
        "read": settings.refunds_read_scope,
        "write": settings.refunds_write_scope,
        "approve": settings.refunds_approve_scope,
    }[kind]
    if needed not in caller.scopes:
        raise ApiError(403, f"The token lacks the '{needed}' scope this endpoint needs.")
    return caller


def require_scope(kind: Scope) -> Callable[[F], F]:
    """Decorate a view: 401 without a valid token, 403 without the ``kind`` scope."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            g.caller = authorize(request.headers.get("Authorization"), kind)
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorator
