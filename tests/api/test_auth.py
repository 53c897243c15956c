"""Bearer JWT authentication and scopes over real HTTP (SPEC 3.5).

HS256 is checked on the run's server; RS256 keys from a JWKS, `aud` and `iss` on a
second gunicorn whose environment names a JWKS served from this test process."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from shared.adapters.config import DEV_JWT_SECRET
from shared.domain.models import Refund, RefundEvent
from tests.api.helpers import REFUNDS, assert_error
from tests.support import auth, seed_payment, table_counts, wait_for_http, web_process

AUDIENCE = "refunds-api"
ISSUER = "https://issuer.example.test/"
KID = "test-key-1"


def claims(**overrides: Any) -> dict[str, Any]:
    base = {
        "sub": "ops@example.com",
        "scope": "refunds:read refunds:write",
        "iat": int(time.time()),
        "exp": int(time.time()) + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(settings, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), settings.jwt_secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unsigned(**overrides: Any) -> str:
    """An `alg: none` token: a header and claims, no signature."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims(**overrides))}."


def assert_unauthorized(resp: httpx.Response) -> None:
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


# --- HS256 on the run's server ---------------------------------------------------------


def hs512(settings) -> str:
    """A token signed with the right secret but an algorithm the service does not accept."""
    with warnings.catch_warnings():
        # PyJWT warns that the secret is short for SHA-512; this token is meant to be refused.
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims(), settings.jwt_secret, algorithm="HS512")


def bad_tokens(settings) -> dict[str, dict[str, str]]:
    return {
        "no header": {},
        "bearer without token": {"Authorization": "Bearer"},
        "basic scheme": {"Authorization": "Basic b3BzOnNlY3JldA=="},
        "not a jwt": bearer("not-a-jwt"),
        "garbled jwt": bearer("eyJhbGciOiJIUzI1NiJ9.@@@.###"),
        "wrong signature": bearer(
            jwt.encode(claims(), "another-secret-that-is-32-bytes-long!!", algorithm="HS256")
        ),
        "alg none": bearer(unsigned()),
        "HS512 with the secret": bearer(hs512(settings)),
        "expired": bearer(hs256(settings, exp=int(time.time()) - 120)),
        "missing exp": bearer(hs256(settings, exp=None)),
        "missing sub": bearer(hs256(settings, sub=None)),
        "not yet valid": bearer(hs256(settings, nbf=int(time.time()) + 600)),
        "exp as a string": bearer(hs256(settings, exp=str(int(time.time()) + 300))),
        "iat as a string": bearer(hs256(settings, iat=str(int(time.time())))),
    }


BAD_TOKEN_CASES = [
    "no header",
    "bearer without token",
    "basic scheme",
    "not a jwt",
    "garbled jwt",
    "wrong signature",
    "alg none",
    "HS512 with the secret",
    "expired",
    "missing exp",
    "missing sub",
    "not yet valid",
    "exp as a string",
    "iat as a string",
]


@pytest.mark.parametrize("case", BAD_TOKEN_CASES)
def test_bad_tokens_are_401_on_every_refund_endpoint_and_write_nothing(
    client, settings, db, contract, case
) -> None:
    headers = bad_tokens(settings)[case]
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)

    posted = client.post(REFUNDS, json={"charge_id": charge.id, "full": True}, headers=headers)
    listed = client.get(REFUNDS, headers=headers)
    one = client.get(f"{REFUNDS}/rf_anything", headers=headers)

    for resp in (posted, listed, one):
        assert_unauthorized(resp)
        token = headers.get("Authorization", "").partition(" ")[2].strip()
        if token:
            assert token not in resp.text  # never echo the credential
    contract.check(posted, "POST", REFUNDS)
    contract.check(one, "GET", f"{REFUNDS}/{{refund_id}}")
    assert table_counts(db) == before


@pytest.mark.parametrize(
    ("scopes", "method", "path"),
    [
        ((), "POST", REFUNDS),
        (("refunds:read",), "POST", REFUNDS),
        (("refunds:write",), "GET", REFUNDS),
        (("refunds:write",), "GET", f"{REFUNDS}/rf_anything"),
        (("refunds:admin", "openid"), "GET", REFUNDS),
    ],
    ids=["no scope", "read on write", "write on list", "write on get", "other scopes"],
)
def test_missing_scope_is_403_and_writes_nothing(
    client, settings, db, scopes, method, path
) -> None:
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    resp = client.request(
        method,
        path,
        json={"charge_id": charge.id, "full": True} if method == "POST" else None,
        headers=auth(settings, scopes=scopes),
    )
    body = assert_error(resp, 403, "forbidden")
    assert ("refunds:write" if method == "POST" else "refunds:read") in body["message"]
    assert table_counts(db) == before


def test_scope_claim_may_be_a_scp_or_scopes_list(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=1000)
    write_scp = bearer(hs256(settings, scope=None, scp=["refunds:write"]))
    read_scopes = bearer(hs256(settings, scope=None, scopes=["openid", "refunds:read"]))

    created = client.post(REFUNDS, json={"charge_id": charge.id, "full": True}, headers=write_scp)
    assert created.status_code == 201, created.text
    got = client.get(created.headers["Location"], headers=read_scopes)
    assert got.status_code == 200, got.text
    assert_error(client.get(REFUNDS, headers=write_scp), 403, "forbidden")


def test_initiated_by_is_the_tokens_sub(client, settings, db) -> None:
    _, charge = seed_payment(db, amount=1000)
    sub = f"support-agent-{uuid.uuid4().hex[:8]}@example.com"
    created = client.post(
        REFUNDS, json={"charge_id": charge.id, "amount_cents": 10}, headers=auth(settings, sub=sub)
    )
    assert created.status_code == 201
    refund_id = created.json()["refund_id"]
    db.expire_all()
    assert db.get(Refund, refund_id).initiated_by == sub
    actors = db.scalars(select(RefundEvent.actor).where(RefundEvent.refund_id == refund_id)).all()
    assert actors == [sub]
    shown = client.get(created.headers["Location"], headers=auth(settings)).json()
    assert shown["initiated_by"] == sub and shown["events"][0]["actor"] == sub


def test_expired_token_within_leeway_is_still_accepted(client, settings) -> None:
    # Clocks drift a little between the token issuer and this service.
    resp = client.get(REFUNDS, headers=bearer(hs256(settings, exp=int(time.time()) - 5)))
    assert resp.status_code == 200


# --- RS256 from a JWKS, with aud and iss configured --------------------------------------


class Keys:
    def __init__(self) -> None:
        self.trusted = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> bytes:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.trusted.public_key()))
        return json.dumps({"keys": [jwk | {"kid": KID, "use": "sig", "alg": "RS256"}]}).encode()


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def jwks_url(keys: Keys) -> Iterator[str]:
    """A JWKS document served over HTTP from a thread of this test process."""
    document = keys.jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def jwks_api(service_env: dict[str, str], log_dir: Path, jwks_url: str) -> Iterator[str]:
    """A gunicorn that trusts only the JWKS keys (no JWT_SECRET) and checks aud and iss."""
    env = {k: v for k, v in service_env.items() if k != "JWT_SECRET"}
    env |= {"JWT_JWKS_URL": jwks_url, "JWT_AUDIENCE": AUDIENCE, "JWT_ISSUER": ISSUER}
    web, url = web_process(env, log_dir, workers=1)
    with web:
        wait_for_http(f"{url}/healthz", proc=web.proc)
        yield url


def rs256(key: rsa.RSAPrivateKey, *, kid: str | None = KID, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    payload = claims(**({"aud": AUDIENCE, "iss": ISSUER} | overrides))
    return jwt.encode(payload, key, algorithm="RS256", headers=headers)


def test_rs256_token_signed_by_a_jwks_key_is_accepted(jwks_api, keys, db) -> None:
    _, charge = seed_payment(db, amount=1000)
    token = bearer(rs256(keys.trusted, sub="rs-caller@example.com"))
    with httpx.Client(base_url=jwks_api, timeout=10) as c:
        created = c.post(REFUNDS, json={"charge_id": charge.id, "full": True}, headers=token)
        assert created.status_code == 201, created.text
        assert c.get(created.headers["Location"], headers=token).json()["initiated_by"] == (
            "rs-caller@example.com"
        )


def test_rs256_token_with_an_audience_list_containing_ours_is_accepted(jwks_api, keys) -> None:
    token = bearer(rs256(keys.trusted, aud=["other-api", AUDIENCE]))
    assert httpx.get(f"{jwks_api}{REFUNDS}", headers=token, timeout=10).status_code == 200


@pytest.mark.parametrize(
    "case",
    [
        "other key",
        "unknown kid",
        "no kid",
        "wrong aud",
        "missing aud",
        "wrong iss",
        "missing iss",
        "HS256 with the public dev secret",
        "HS256 with the run's secret",
        "expired",
    ],
)
def test_tokens_the_jwks_server_must_refuse(jwks_api, keys, settings, case) -> None:
    good_claims = claims(aud=AUDIENCE, iss=ISSUER)
    token = {
        "other key": lambda: rs256(keys.stranger),
        "unknown kid": lambda: rs256(keys.trusted, kid="rotated-away"),
        "no kid": lambda: rs256(keys.trusted, kid=None),
        "wrong aud": lambda: rs256(keys.trusted, aud="someone-else"),
        "missing aud": lambda: rs256(keys.trusted, aud=None),
        "wrong iss": lambda: rs256(keys.trusted, iss="https://evil.example/"),
        "missing iss": lambda: rs256(keys.trusted, iss=None),
        "HS256 with the public dev secret": lambda: jwt.encode(
            good_claims, DEV_JWT_SECRET, algorithm="HS256"
        ),
        "HS256 with the run's secret": lambda: jwt.encode(
            good_claims, settings.jwt_secret, algorithm="HS256"
        ),
        "expired": lambda: rs256(keys.trusted, exp=int(time.time()) - 120),
    }[case]()
    resp = httpx.get(f"{jwks_api}{REFUNDS}", headers=bearer(token), timeout=10)
    assert_unauthorized(resp)


# --- verified tokens are remembered (api.auth._verified), never beyond what they allow


def test_a_remembered_token_still_expires(settings, monkeypatch) -> None:
    from api import auth as api_auth
    from shared.adapters.tokens import issue_token

    token = issue_token(settings, subject="ops@example.com", scopes=["refunds:read"],
                        ttl_seconds=60)
    header = f"Bearer {token}"
    assert api_auth.authenticate(header, settings).subject == "ops@example.com"  # verified
    assert api_auth.authenticate(header, settings).subject == "ops@example.com"  # remembered

    later = time.time() + 60 + api_auth.LEEWAY_SECONDS + 1
    monkeypatch.setattr(api_auth.time, "time", lambda: later)
    with pytest.raises(api_auth.ApiError) as refused:
        api_auth.authenticate(header, settings)
    assert refused.value.status == 401
    assert "expired" in refused.value.message


def test_a_remembered_token_is_checked_again_under_other_settings(settings) -> None:
    from api import auth as api_auth
    from shared.adapters.tokens import issue_token

    token = issue_token(settings, subject="ops@example.com", scopes=["refunds:read"],
                        ttl_seconds=60)
    header = f"Bearer {token}"
    assert api_auth.authenticate(header, settings).subject == "ops@example.com"

    rotated = settings.model_copy(update={"jwt_secret": "another-secret-of-32-bytes-at-least!"})
    with pytest.raises(api_auth.ApiError) as refused:
        api_auth.authenticate(header, rotated)
    assert refused.value.status == 401
    audience = settings.model_copy(update={"jwt_audience": "someone-else"})
    with pytest.raises(api_auth.ApiError):
        api_auth.authenticate(header, audience)
