"""The v1 completion message contract (``shared.domain.contract.parse_completion``), rule by
rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from shared.domain.contract import (
    Completion,
    MalformedMessage,
    Operation,
    StepStatus,
    parse_completion,
)

VALID: dict[str, Any] = {
    "requestId": "req-1",
    "operationId": "req-1.withdraw",
    "operation": "withdraw_funds",
    "accountId": "acct:42",
    "amount": "12.50",
    "expectedOperations": 2,
    "status": "succeeded",
}
MISSING = object()


def body(**changes: Any) -> str:
    """The valid message with fields changed (``MISSING`` removes one)."""
    message = {**VALID, **changes}
    return json.dumps({k: v for k, v in message.items() if v is not MISSING})


def refused(text: str | bytes) -> str:
    """The error text of a message that must be refused."""
    with pytest.raises(MalformedMessage) as caught:
        parse_completion(text)
    return str(caught.value)


def test_a_valid_message_parses_to_typed_fields() -> None:
    completion = parse_completion(body())
    assert completion.request_id == "req-1"
    assert completion.operation_id == "req-1.withdraw"
    assert completion.operation is Operation.WITHDRAW_FUNDS
    assert completion.account_id == "acct:42"
    assert completion.amount == Decimal("12.50")
    assert completion.signed_amount == Decimal("-12.50")
    assert completion.expected_operations == 2
    assert completion.status is StepStatus.SUCCEEDED
    assert completion.completed_at is None


def test_bytes_and_str_bodies_are_equivalent() -> None:
    assert parse_completion(body().encode()) == parse_completion(body())


# --- identifiers ---------------------------------------------------------------------------
IDENTIFIER_FIELDS = ["requestId", "operationId", "accountId"]


@pytest.mark.parametrize("field", IDENTIFIER_FIELDS)
@pytest.mark.parametrize("value", ["a", "Z", "0", "A-Za-z0-9._:-", "x" * 128, "2026:01.01_a-b"])
def test_identifiers_accept_1_to_128_chars_of_the_charset(field: str, value: str) -> None:
    parse_completion(body(**{field: value}))


@pytest.mark.parametrize("field", IDENTIFIER_FIELDS)
@pytest.mark.parametrize("value", [
    "", "x" * 129, "has space", "a/b", "a~b", "a#b", "caf\u00e9", "a\nb", "tab\t", "abc\n",
    "{}", 42, None, ["a"], True,
])
def test_identifiers_outside_the_charset_or_length_are_refused(field: str, value: Any) -> None:
    assert field in refused(body(**{field: value}))


# --- operation and status ------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("add_funds", Operation.ADD_FUNDS), ("withdraw_funds", Operation.WITHDRAW_FUNDS)])
def test_operation_enum(value: str, expected: Operation) -> None:
    assert parse_completion(body(operation=value)).operation is expected


@pytest.mark.parametrize("value", ["ADD_FUNDS", "deposit", "add", "", " add_funds", 1, None])
def test_other_operations_are_refused(value: Any) -> None:
    assert "operation" in refused(body(operation=value))


@pytest.mark.parametrize(("value", "expected"), [
    ("succeeded", StepStatus.SUCCEEDED), ("failed", StepStatus.FAILED)])
def test_status_enum(value: str, expected: StepStatus) -> None:
    assert parse_completion(body(status=value)).status is expected


@pytest.mark.parametrize("value", ["success", "SUCCEEDED", "ok", "", True, None])
def test_other_statuses_are_refused(value: Any) -> None:
    assert "status" in refused(body(status=value))


# --- amount --------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("1", "1.00"),
    ("1.5", "1.50"),
    ("12.50", "12.50"),
    ("0.01", "0.01"),
    ("007.10", "7.10"),
    ("1000000000000", "1000000000000.00"),
    ("1000000000000.00", "1000000000000.00"),
])
def test_amounts_that_are_accepted(text: str, value: str) -> None:
    amount = parse_completion(body(amount=text)).amount
    assert amount == Decimal(value)
    assert str(amount) == value, "normalised to exactly 2 decimals"


@pytest.mark.parametrize(("text", "why"), [
    ("1e3", "digits"),
    ("1E3", "digits"),
    (" 1.00", "decimal string"),
    ("1.00 ", "decimal string"),
    ("", "decimal string"),
    ("0", "greater than 0"),
    ("0.00", "greater than 0"),
    ("-1", "digits"),
    ("+1", "digits"),
    ("1.005", "more than 2 decimals"),
    ("1.000", "more than 2 decimals"),
    ("1000000000000.01", "exceeds"),
    ("99999999999999", "exceeds"),
    ("1,00", "digits"),
    ("1.2.3", "not a decimal"),
    ("NaN", "digits"),
    ("Infinity", "digits"),
    ("\u0661", "digits"),  # an Arabic-Indic digit one
    ("0x10", "digits"),
])
def test_amounts_that_are_refused(text: str, why: str) -> None:
    error = refused(body(amount=text))
    assert "amount" in error
    assert why in error


@pytest.mark.parametrize("value", [12.5, 12, 0.1, 1e3, True, None, ["1.00"], {"value": "1.00"}])
def test_an_amount_that_is_not_a_string_is_refused(value: Any) -> None:
    error = refused(body(amount=value))
    assert "amount" in error
    assert "decimal string" in error


def test_a_json_number_amount_is_refused_even_when_written_exactly() -> None:
    text = body().replace('"12.50"', "12.50")
    assert '"amount": 12.50' in text
    assert "JSON numbers are refused" in refused(text)


# --- expectedOperations ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [1, 2, 50])
def test_expected_operations_from_1_to_50(value: int) -> None:
    assert parse_completion(body(expectedOperations=value)).expected_operations == value


@pytest.mark.parametrize("value", [0, 51, -1, True, False, "2", 2.0, 2.5, None])
def test_expected_operations_outside_1_to_50_or_not_an_integer_are_refused(value: Any) -> None:
    assert "expectedOperations" in refused(body(expectedOperations=value))


# --- completedAt -----------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ("2026-01-02T03:04:05.123+00:00", datetime(2026, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)),
    (MISSING, None),
    (None, None),
])
def test_completed_at_is_optional_iso_8601(value: Any, expected: datetime | None) -> None:
    assert parse_completion(body(completedAt=value)).completed_at == expected


def test_completed_at_keeps_its_offset() -> None:
    completed = parse_completion(body(completedAt="2026-01-02T05:04:05+02:00")).completed_at
    assert completed == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize("value", ["yesterday", "2026-13-01T00:00:00Z", "02/01/2026", "",
                                   1767225600, 1767225600.5])
def test_completed_at_that_is_not_a_timestamp_is_refused(value: object) -> None:
    assert "completedAt" in refused(body(completedAt=value))


# --- the message as a whole ----------------------------------------------------------------
def test_unknown_fields_are_ignored() -> None:
    extra = parse_completion(body(schemaVersion=2, traceId="abc", nested={"a": [1, 2]}))
    assert extra == parse_completion(body())


@pytest.mark.parametrize("field", list(VALID))
def test_every_required_field_is_required(field: str) -> None:
    error = refused(body(**{field: MISSING}))
    assert field in error
    assert "required" in error.lower()


@pytest.mark.parametrize(("text", "why"), [
    ("", "not JSON"),
    ("{", "not JSON"),
    ("not json", "not JSON"),
    ("{'requestId': 'r1'}", "not JSON"),
    ("[]", "one JSON object"),
    ('"a string"', "one JSON object"),
    ("12.5", "one JSON object"),
    ("null", "one JSON object"),
    ("[" + body() + "]", "one JSON object"),
])
def test_a_body_that_is_not_one_json_object_is_refused(text: str, why: str) -> None:
    assert why in refused(text)


def test_a_body_that_is_not_utf8_is_refused() -> None:
    assert "UTF-8" in refused(b'{"requestId": "\xff"}')


def test_the_error_names_every_bad_field() -> None:
    error = refused(body(requestId="bad id", operationId=MISSING, operation="deposit",
                         accountId="", amount=1.5, expectedOperations=51, status="ok",
                         completedAt="never"))
    for field in ("requestId", "operationId", "operation", "accountId", "amount",
                  "expectedOperations", "status", "completedAt"):
        assert field in error, f"{field} missing from: {error}"


def test_valid_fields_are_not_blamed() -> None:
    error = refused(body(amount="0"))
    assert error.startswith("amount:")
    for field in ("requestId", "operationId", "accountId", "expectedOperations", "status"):
        assert field not in error


# --- what the pipeline relies on -------------------------------------------------------------
def test_to_message_round_trips() -> None:
    completion = parse_completion(body(completedAt="2026-01-02T03:04:05Z", amount="7.5"))
    again = parse_completion(completion.to_message())
    assert again == completion
    assert json.loads(completion.to_message())["amount"] == "7.50"


def test_content_key_ignores_completed_at_but_not_the_step() -> None:
    first: Completion = parse_completion(body(completedAt="2026-01-02T03:04:05Z"))
    restamped = parse_completion(body(completedAt="2026-01-03T00:00:00Z"))
    assert first.content_key() == restamped.content_key()
    for change in ({"amount": "12.51"}, {"status": "failed"}, {"accountId": "other"},
                   {"operation": "add_funds"}, {"expectedOperations": 3}):
        assert parse_completion(body(**change)).content_key() != first.content_key(), change


def test_equal_amounts_written_differently_are_the_same_content() -> None:
    assert (parse_completion(body(amount="12.5")).content_key()
            == parse_completion(body(amount="12.50")).content_key())


def test_add_funds_is_a_positive_change() -> None:
    assert parse_completion(body(operation="add_funds")).signed_amount == Decimal("12.50")
