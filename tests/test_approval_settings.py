"""Approval settings (SPEC 12): thresholds overall and per currency, read and checked at
start like every other setting; and the state machine's approval moves."""

from __future__ import annotations

import subprocess

import pytest

from shared.adapters.config import Settings
from shared.services.transitions import can_move
from tests.support import BIN, ROOT


def settings(**values: object) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


def test_approvals_are_off_unless_a_threshold_is_set() -> None:
    assert settings().approval_threshold("usd") is None


def test_a_currency_listed_has_its_own_threshold_and_the_others_the_overall_one() -> None:
    both = settings(approval_threshold_cents=50_000, approval_thresholds="usd=40000, JPY=5000000")
    assert both.approval_threshold("usd") == 40_000
    assert both.approval_threshold("jpy") == 5_000_000
    assert both.approval_threshold("JPY") == 5_000_000
    assert both.approval_threshold("eur") == 50_000
    only_yen = settings(approval_thresholds="jpy=5000000")
    assert only_yen.approval_threshold("jpy") == 5_000_000
    assert only_yen.approval_threshold("usd") is None


def test_blank_settings_mean_unset() -> None:
    blank = settings(approval_threshold_cents="", approval_thresholds=" ")
    assert blank.approval_threshold("usd") is None


def test_the_defaults() -> None:
    defaults = settings()
    assert defaults.approval_expires_seconds == 72 * 3600
    assert defaults.refunds_approve_scope == "refunds:approve"


def test_the_approval_moves_of_the_state_machine() -> None:
    assert can_move("awaiting_approval", "pending")
    assert can_move("awaiting_approval", "canceled")
    for target in ("processing", "requires_action", "succeeded", "failed"):
        assert not can_move("awaiting_approval", target), target
    assert not can_move("pending", "awaiting_approval")
    assert not can_move("canceled", "pending")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("APPROVAL_THRESHOLDS", "usd", "'usd' is not currency=amount"),
        ("APPROVAL_THRESHOLDS", "usd=lots", "the amount for usd must be a positive integer"),
        ("APPROVAL_THRESHOLDS", "usd=0", "the amount for usd must be a positive integer"),
        ("APPROVAL_THRESHOLDS", "usd=-5", "the amount for usd must be a positive integer"),
        ("APPROVAL_THRESHOLDS", "dollars=5", "'dollars=5' is not currency=amount"),
        ("APPROVAL_THRESHOLDS", "usd=5,USD=6", "usd is given twice"),
        ("APPROVAL_THRESHOLD_CENTS", "0", "greater than 0"),
        ("APPROVAL_THRESHOLD_CENTS", "500.5", "valid integer"),
        ("APPROVAL_EXPIRES_SECONDS", "-1", "greater than 0"),
        ("REFUNDS_APPROVE_SCOPE", "refunds approve", "one scope name"),
    ],
)
def test_a_malformed_approval_setting_stops_the_process_with_one_line_naming_it(
    service_env: dict[str, str], name: str, value: str, says: str
) -> None:
    result = subprocess.run(
        [str(BIN / "refunds"), "check-config"], env={**service_env, name: value}, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"configuration error: {name}: "), lines[0]
    assert says in lines[0], lines[0]
