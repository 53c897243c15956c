"""Development tokens (``refunds token``): HS256 JWTs signed with JWT_SECRET."""

from __future__ import annotations

import time

import jwt

from shared.adapters.config import Settings


def issue_token(
    settings: Settings, *, subject: str, scopes: list[str], ttl_seconds: int = 3600
) -> str:
    if not settings.jwt_secret:
        raise ValueError("JWT_SECRET is not set; dev tokens are signed with it")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
