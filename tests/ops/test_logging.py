"""JSON log lines: redaction of credentials and card numbers, and the context ids."""

from __future__ import annotations

import io
import json
import logging

import pytest

from shared.adapters import logging as service_logging
from shared.adapters.logging import ContextFilter, RedactingJsonFormatter, log_context, redact

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJvcHNAZXhhbXBsZS5jb20ifQ."
    "c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Authorization: Bearer {JWT}", JWT),
        ("authorization=Basic b3BzOnBhc3N3b3Jk", "b3BzOnBhc3N3b3Jk"),
        ("bearer opaque-token_value.123", "opaque-token_value.123"),
        (f"token was {JWT} in a message", JWT[:40]),
        ("key sk_live_51HxYzAbCdEf0123456789", "51HxYzAbCdEf0123456789"),
        ("key sk_test_local", "sk_test_local"),
        ("restricted rk_live_abcDEF123", "abcDEF123"),
        ("secret whsec_0123456789abcdef", "0123456789abcdef"),
        ("broker amqp://guest:hunter22@rabbit:5672//", "hunter22"),
        ("db postgresql://app:s3cr3t@db/refunds", "s3cr3t"),
        ("card 4242424242424242 declined", "4242424242424242"),
        ("card 4000 0566 5566 5556", "4000 0566 5566 5556"),
        ("card 5555-5555-5555-4444.", "5555-5555-5555-4444"),
        ("amex 378282246310005", "378282246310005"),
        ('{"pan": "4111111111111111"}', "4111111111111111"),
        # Each pattern is only run on a line holding its needle or its shape: upper case,
        # a header name in JSON, digits other than ASCII's still reach them.
        ("AUTHORIZATION: Token OPAQUE9value", "OPAQUE9value"),
        ('{"authorization": "opaque-value-7"}', "opaque-value-7"),
        ("card \u0664\u0662\u0664\u0662424242424242", "424242424242"),
    ],
)
def test_redact_masks_credentials_and_card_numbers(text: str, secret: str) -> None:
    assert secret not in redact(text)
    assert "REDACTED" in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "refund rf_16fd2c21ffe5a26a61386877 for pay_1234567890123456 succeeded",
        "charge ch_4242424242424242 and pi_3MtwBwLkdIwHu7ix28a3tqPa",
        "amount 1234567890123 cents",  # 13 digits but not a card number (Luhn)
        "took 0.0951s at 1795700994.0742106",
        "task_id 6d0d98f8-1e1c-4110-9022-a86d2944fd89",
        "risk_level high, task_sk_count 3",
    ],
)
def test_redact_leaves_ids_amounts_and_timings_alone(text: str) -> None:
    assert redact(text) == text


def _formatted(record: logging.LogRecord) -> dict[str, object]:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(RedactingJsonFormatter(process_type="test"))
    handler.addFilter(ContextFilter())
    handler.handle(record)
    stream = handler.stream
    assert isinstance(stream, io.StringIO)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _record(msg: str, *args: object, exc_info: object = None, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]
    record.__dict__.update(extra)
    return record


def test_one_json_object_per_line_with_the_bound_ids() -> None:
    with log_context(request_id="req-1", refund_id="rf_1"), log_context(task_id="task-1"):
        line = _formatted(_record("sent %s", "rf_1"))
    assert line["message"] == "sent rf_1"
    assert (line["request_id"], line["refund_id"], line["task_id"]) == ("req-1", "rf_1", "task-1")
    assert line["level"] == "ERROR" and line["process_type"] == "test"
    assert "request_id" not in _formatted(_record("outside any context"))


def test_an_explicit_extra_wins_over_the_bound_id() -> None:
    with log_context(refund_id="rf_bound"):
        assert _formatted(_record("x", refund_id="rf_explicit"))["refund_id"] == "rf_explicit"


def test_args_extras_and_tracebacks_are_all_redacted() -> None:
    try:
        raise ValueError("Stripe said: Invalid API Key provided: sk_live_tracebackLeak1234")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    line = json.dumps(
        _formatted(
            _record(
                "calling with %s",
                "Bearer argLeak0123456789",
                exc_info=exc_info,
                headers={"Authorization": "Bearer extraLeak0123456789"},
                card="4242 4242 4242 4242",
            )
        )
    )
    for leak in ("argLeak0123456789", "extraLeak0123456789", "tracebackLeak1234", "4242 4242"):
        assert leak not in line
    assert "ValueError" in line


def test_the_configured_secret_values_are_masked_wherever_they_appear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JWT_SECRET", "a-shared-secret-with-no-recognisable-shape")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:flower-password-xyz")
    monkeypatch.setenv("METRICS_TOKEN", "scrape-token-of-no-known-shape")
    line = json.dumps(_formatted(_record(
        "cfg a-shared-secret-with-no-recognisable-shape flower-password-xyz "
        "scrape-token-of-no-known-shape"
    )))
    assert "recognisable" not in line and "flower-password-xyz" not in line
    assert "scrape-token" not in line


def test_an_unknown_log_level_stops_the_process_with_one_line() -> None:
    with pytest.raises(SystemExit) as exc:
        service_logging.dict_config("web", "LOUD")
    assert str(exc.value).startswith("configuration error: LOG_LEVEL:")
