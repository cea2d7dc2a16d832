"""The v1 completion message contract: validation of one queue message into a ``Completion``."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from shared.domain.money import MoneyError, parse_amount
from shared.errors import BadInput

_ISO_DATE_START = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)  # YYYY-MM-DD, then pydantic
IDENTIFIER_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_EXPECTED_OPERATIONS = 50

Identifier = Annotated[StrictStr, Field(pattern=IDENTIFIER_PATTERN)]


class Operation(StrEnum):
    """What a step did to its account."""

    ADD_FUNDS = "add_funds"
    WITHDRAW_FUNDS = "withdraw_funds"


class StepStatus(StrEnum):
    """How a step ended upstream."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


class MalformedMessage(BadInput):
    """A queue message breaks the v1 contract. It is parked, never retried as it is."""


class Completion(BaseModel):
    """One validated completion message (one step of one request)."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    request_id: Identifier = Field(alias="requestId")
    operation_id: Identifier = Field(alias="operationId")
    operation: Operation
    account_id: Identifier = Field(alias="accountId")
    amount: Decimal
    expected_operations: StrictInt = Field(alias="expectedOperations", ge=1,
                                           le=MAX_EXPECTED_OPERATIONS)
    status: StepStatus
    completed_at: datetime | None = Field(default=None, alias="completedAt")

    @field_validator("amount", mode="before")
    @classmethod
    def _amount_is_a_decimal_string(cls, value: Any) -> Decimal:
        if not isinstance(value, str):
            raise ValueError("amount must be a decimal string such as \"12.50\"; JSON numbers are "
                             "refused so that money is never a float")
        try:
            return parse_amount(value)
        except MoneyError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("completed_at", mode="before")
    @classmethod
    def _completed_at_is_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError("completedAt must be an ISO-8601 timestamp string")
        if value is not None and not _ISO_DATE_START.match(value):
            # pydantic would read "1700000000" as seconds since 1970: not the contract's format.
            raise ValueError("completedAt must be an ISO-8601 timestamp such as "
                             "\"2026-11-26T10:00:00Z\", not a number")
        return value

    def content_key(self) -> str:
        """A digest of what makes two deliveries of one operationId the same step.

        ``completedAt`` is left out: an upstream retry may restamp it without changing the step.
        """
        parts = [self.request_id, self.operation_id, self.operation.value, self.account_id,
                 str(self.amount), str(self.expected_operations), self.status.value]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]

    @property
    def signed_amount(self) -> Decimal:
        """The change this step makes to its account's balance when committed."""
        return self.amount if self.operation is Operation.ADD_FUNDS else -self.amount

    def to_message(self) -> str:
        """The JSON text of this completion, as upstream systems send it."""
        return completion_message(**self.model_dump(include=set(Completion.model_fields),
                                                    exclude_none=True))


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "message"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise MalformedMessage(f"key {key!r} appears twice in one object; another parser "
                                   "could read the other value, so the message is refused")
        seen[key] = value
    return seen


# The v1 names are camelCase; the Python names of the aliased fields are not accepted on the wire.
_WIRE_NAMES = {name: field.alias for name, field in Completion.model_fields.items()
               if field.alias and field.alias != name}


def parse_completion(body: bytes | str) -> Completion:
    """Validate one message body; raise ``MalformedMessage`` saying every field that is wrong.

    Strict: any body the JSON decoder refuses (not UTF-8, not JSON, nested too deep, an integer
    of thousands of digits even in an ignored field), a key given twice, or a snake_case name
    for a camelCase field is malformed, never an exception of another kind.
    """
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"message is not UTF-8 text: {exc}") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except MalformedMessage:
        raise
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"message is not JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessage("message is nested too deeply to be a v1 completion") from None
    except ValueError as exc:  # e.g. an integer longer than Python's conversion limit
        raise MalformedMessage(f"message is not acceptable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage("message must be one JSON object (v1 completion contract)")
    wrong_names = sorted(name for name in data if name in _WIRE_NAMES)
    if wrong_names:
        raise MalformedMessage("; ".join(f"{name}: the v1 name is {_WIRE_NAMES[name]!r}"
                                         for name in wrong_names))
    try:
        return Completion.model_validate(data)
    except ValidationError as exc:
        raise MalformedMessage(_describe(exc)) from None
    except RecursionError:  # a deeply nested value in a field pydantic walks
        raise MalformedMessage("a field is nested too deeply to be a v1 completion") from None


# --- building messages ----------------------------------------------------------------------
def message_body(**fields: object) -> dict[str, object]:
    """A v1 message body from ``Completion`` field names (``request_id=...``), not validated.

    The one place that knows the wire names: keys are ``Completion``'s aliases, values are
    written as given (enum members as their value, ``Decimal`` as its text, datetimes in
    ISO-8601), and only the fields given appear. It does not validate, so a test or
    ``enqueue --raw`` can build a message that breaks the contract; ``parse_completion`` judges.
    """
    body: dict[str, object] = {}
    for name, value in fields.items():
        info = Completion.model_fields.get(name)
        if info is None:
            raise TypeError(f"Completion has no field {name!r} (fields: "
                            f"{', '.join(Completion.model_fields)})")
        body[info.alias or name] = _wire_value(value)
    return body


def completion_message(**fields: object) -> str:
    """The compact JSON text of ``message_body(**fields)``, as a queue message carries it."""
    return json.dumps(message_body(**fields), separators=(",", ":"))


def _wire_value(value: object) -> object:
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value
