"""Token attacks beyond tests/api/test_auth.py (which covers wrong signatures, ``alg:
none``, expiry, aud/iss on a JWKS server, missing and read-only scopes): tampered
payloads under a genuine signature, stripped signatures, algorithm spellings, keys the
token itself names (``jwk``, ``jku``, ``kid``), scope look-alikes and odd ``sub``s, and
a token anywhere but the Authorization header. Each one is a 401 or 403 on a real
gunicorn, writes nothing, and never makes the service fetch a key from a URL a caller
chose.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.api.helpers import REFUNDS, assert_error
from tests.support import seed_payment, table_counts, token


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "attacker@example.com", "scope": "refunds:read refunds:write", "iat": now,
            "exp": now + 300}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


class KeyServer:
    """A JWKS an attacker serves, counting every request it gets."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        document = json.dumps({"keys": [jwk | {"kid": "evil", "alg": "RS256"}]}).encode()
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def key_server(attacker_key: rsa.RSAPrivateKey) -> Iterator[KeyServer]:
    server = KeyServer(attacker_key)
    yield server
    server.close()


def signed(secret: str | bytes, payload: dict[str, Any], **header: Any) -> str:
    """HS256 by hand: over claims and headers PyJWT would refuse to write."""
    key = secret.encode() if isinstance(secret, str) else secret
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', **header})}.{b64(payload)}"
    digest = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(digest)}"


def forged_tokens(settings, attacker_key, key_server: KeyServer) -> dict[str, str]:
    secret = settings.jwt_secret
    read_only = token(settings, scopes=("refunds:read",))
    header, _, signature = read_only.split(".")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker_key.public_key()))
    return {
        # A read-only token's genuine signature over a payload that grants write.
        "payload swapped under a genuine signature": f"{header}.{b64(claims())}.{signature}",
        "signature stripped": f"{header}.{b64(claims())}.",
        "genuine header and payload, no signature part": ".".join(read_only.split(".")[:2]),
        "alg None": f"{b64({'alg': 'None', 'typ': 'JWT'})}.{b64(claims())}.",
        "alg NONE": f"{b64({'alg': 'NONE', 'typ': 'JWT'})}.{b64(claims())}.",
        "alg nOnE with a genuine signature": f"{b64({'alg': 'nOnE'})}.{b64(claims())}."
                                             f"{signature}",
        "HS256 signed with an empty key": signed(b"", claims()),
        "RS256 with its own key embedded (jwk header)": jwt.encode(
            claims(), attacker_key, algorithm="RS256", headers={"jwk": jwk}),
        "RS256 naming a key URL the attacker serves (jku)": jwt.encode(
            claims(), attacker_key, algorithm="RS256",
            headers={"jku": key_server.url, "kid": "evil"}),
        "RS256 naming a certificate URL (x5u)": jwt.encode(
            claims(), attacker_key, algorithm="RS256", headers={"x5u": key_server.url}),
        # Signed with an empty key, as if the kid had made the service read an empty file.
        "kid pointing at a file": signed(b"", claims(), kid="../../../../dev/null"),
        "kid with SQL": signed(b"", claims(), kid="x' UNION SELECT '' --"),
        "sub is a number": signed(secret, claims(sub=12345)),
        "sub is empty": signed(secret, claims(sub="")),
        "sub is 1000 characters": signed(secret, claims(sub="a" * 1000)),
        "two tokens in one header": f"{read_only} {token(settings)}",
    }


FORGERIES = [
    "payload swapped under a genuine signature",
    "signature stripped",
    "genuine header and payload, no signature part",
    "alg None",
    "alg NONE",
    "alg nOnE with a genuine signature",
    "HS256 signed with an empty key",
    "RS256 with its own key embedded (jwk header)",
    "RS256 naming a key URL the attacker serves (jku)",
    "RS256 naming a certificate URL (x5u)",
    "kid pointing at a file",
    "kid with SQL",
    "sub is a number",
    "sub is empty",
    "sub is 1000 characters",
    "two tokens in one header",
]


@pytest.mark.parametrize("case", FORGERIES)
def test_forged_tokens_are_401_write_nothing_and_fetch_no_key(
    api_url, settings, db, attacker_key, key_server, case
) -> None:
    forged = forged_tokens(settings, attacker_key, key_server)[case]
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    headers = {"Authorization": f"Bearer {forged}"}
    with httpx.Client(base_url=api_url, timeout=10) as client:
        created = client.post(REFUNDS, json={"charge_id": charge.id, "full": True},
                              headers=headers)
        listed = client.get(REFUNDS, headers=headers)
    for resp in (created, listed):
        assert_error(resp, 401, "unauthorized")
        assert forged not in resp.text
    assert table_counts(db) == before
    assert key_server.hits == 0, "the service fetched a key from a URL the token named"


@pytest.mark.parametrize(
    "scope",
    ["refunds:writes", "refunds:write:all", "xrefunds:write", "REFUNDS:WRITE",
     "refunds:read,refunds:write", "refunds:read;refunds:write", "refunds: write",
     "refunds:write\u200b"],
)
def test_scope_look_alikes_grant_nothing(api_url, settings, db, scope) -> None:
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    look_alike = signed(settings.jwt_secret, claims(scope=scope))
    headers = {"Authorization": f"Bearer {look_alike}"}
    created = httpx.post(f"{api_url}{REFUNDS}", json={"charge_id": charge.id, "full": True},
                         headers=headers, timeout=10)
    assert_error(created, 403, "forbidden")
    assert table_counts(db) == before


@pytest.mark.parametrize(
    "scope_claim",
    [{"scope": {"refunds:write": True}}, {"scope": 1}, {"scopes": [["refunds:write"]]},
     {"scp": [{"refunds:write": True}]}],
    ids=["object", "number", "nested list", "list of objects"],
)
def test_scope_claims_of_other_shapes_grant_nothing(api_url, settings, db, scope_claim) -> None:
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    payload = {**claims(scope=None), **scope_claim}
    headers = {"Authorization": f"Bearer {signed(settings.jwt_secret, payload)}"}
    created = httpx.post(f"{api_url}{REFUNDS}", json={"charge_id": charge.id, "full": True},
                         headers=headers, timeout=10)
    assert_error(created, 403, "forbidden")
    assert table_counts(db) == before


@pytest.mark.parametrize(
    "where", ["query access_token", "query token", "cookie", "X-Access-Token header",
              "Authorization without the scheme"],
)
def test_a_valid_token_anywhere_but_the_bearer_header_is_401(
    api_url, settings, db, where
) -> None:
    _, charge = seed_payment(db, amount=1000)
    before = table_counts(db)
    good = token(settings)
    params, headers, cookies = {}, {}, {}
    if where.startswith("query"):
        params[where.split()[1]] = good
    elif where == "cookie":
        cookies["access_token"] = good
    elif where == "X-Access-Token header":
        headers["X-Access-Token"] = good
    else:
        headers["Authorization"] = good
    with httpx.Client(base_url=api_url, timeout=10, cookies=cookies) as client:
        resp = client.post(REFUNDS, params=params, headers=headers,
                           json={"charge_id": charge.id, "full": True})
    assert_error(resp, 401, "unauthorized")
    assert good not in resp.text
    assert table_counts(db) == before
