"""A client generated from the served /openapi.json makes refunds with a typed body.

openapi-python-client (the dev extras pin 0.29) is run on the document the server
publishes, the generated package is imported, and a refund is made through it against
the live API. Failed before: the request body was one object with a top-level
``oneOf`` of ``not`` clauses, which generators cannot turn into a model, so
``create_refund`` took ``body: Any``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import typing
from collections.abc import Iterator
from types import ModuleType

import httpx
import pytest

from tests.support import BIN, seed_payment, token

PACKAGE = "generated_refunds_client"


@pytest.fixture(scope="module")
def client_package(api_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    workdir = tmp_path_factory.mktemp("generated-client")
    document = workdir / "openapi.json"
    document.write_text(httpx.get(f"{api_url}/openapi.json", timeout=10).text)
    generated = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", str(document),
         "--output-path", str(workdir / PACKAGE), "--meta", "none"],
        cwd=workdir, capture_output=True, text=True, timeout=300, check=False,
        # Its post-generation hook runs ruff, found on PATH.
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir)},
    )
    output = generated.stdout + generated.stderr
    assert generated.returncode == 0, output
    assert "Warning" not in output, output  # every schema became code
    sys.path.insert(0, str(workdir))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(workdir))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def test_the_request_body_is_a_typed_model_not_any(client_package: ModuleType) -> None:
    create_refund = importlib.import_module(f"{PACKAGE}.api.default.create_refund")
    models = importlib.import_module(f"{PACKAGE}.models")
    body = typing.get_type_hints(create_refund.sync_detailed)["body"]
    assert body is not typing.Any
    assert set(typing.get_args(body)) == {models.RefundByAmount, models.FullRefund}
    assert typing.get_type_hints(models.RefundByAmount)["amount_cents"] is int


def test_the_generated_client_makes_refunds_by_amount_and_full(
    client_package: ModuleType, api_url: str, settings, db
) -> None:
    create_refund = importlib.import_module(f"{PACKAGE}.api.default.create_refund")
    models = importlib.import_module(f"{PACKAGE}.models")
    _, charge = seed_payment(db, amount=5_000)
    db.commit()
    with client_package.AuthenticatedClient(
        base_url=api_url, token=token(settings, sub="generated-client@example.com")
    ) as client:
        _make_refunds(client, models, create_refund, charge.id)


def _make_refunds(client, models, create_refund, charge_id: str) -> None:

    by_amount = create_refund.sync_detailed(
        client=client,
        body=models.RefundByAmount(charge_id=charge_id, amount_cents=1_200, reason="duplicate"),
        idempotency_key=f"generated-{charge_id}",
    )
    assert by_amount.status_code == 201, by_amount.content
    assert isinstance(by_amount.parsed, models.RefundInitiated)
    assert (by_amount.parsed.amount_cents, by_amount.parsed.status) == (1_200, "pending")

    full = create_refund.sync(client=client, body=models.FullRefund(charge_id=charge_id,
                                                                     full=True))
    assert isinstance(full, models.RefundInitiated)
    assert full.amount_cents == 3_800  # what was left

    nothing_left = create_refund.sync(
        client=client, body=models.RefundByAmount(charge_id=charge_id, amount_cents=1)
    )
    assert isinstance(nothing_left, models.Error) and nothing_left.error == "already_refunded"
