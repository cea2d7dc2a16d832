"""One builder for the v1 message: the CLI's flags, the demo workload and the test helpers all go
through ``shared.domain.contract.message_body``, and what it builds is what ``Completion`` reads."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from operator_cli import cli
from shared.domain.contract import (
    Completion,
    MalformedMessage,
    Operation,
    StepStatus,
    completion_message,
    message_body,
    parse_completion,
)
from simulator.workload import MALFORMED, generate
from tests.helpers import deposit, step, transfer

FIELDS: dict[str, object] = dict(
    request_id="tx-42", operation_id="tx-42-w", operation=Operation.WITHDRAW_FUNDS,
    account_id="alice", amount="25.00", expected_operations=2, status=StepStatus.SUCCEEDED,
    completed_at="2026-11-26T10:00:00+00:00")


def test_the_builder_writes_the_wire_names_and_the_contract_reads_them_back() -> None:
    body = message_body(**FIELDS)
    assert body == {"requestId": "tx-42", "operationId": "tx-42-w",
                    "operation": "withdraw_funds", "accountId": "alice", "amount": "25.00",
                    "expectedOperations": 2, "status": "succeeded",
                    "completedAt": "2026-11-26T10:00:00+00:00"}
    completion = parse_completion(completion_message(**FIELDS))
    assert completion.amount == Decimal("25.00")
    assert completion.to_message() == completion_message(**FIELDS), "one format, two doors"
    assert completion_message(**completion.model_dump(exclude_none=True)) == \
        completion.to_message()


def test_the_builder_names_the_fields_it_knows() -> None:
    with pytest.raises(TypeError, match="request_id, operation_id"):
        message_body(requestId="tx-42")  # a wire name is not a field name
    assert set(Completion.model_fields) == {field for _, field, _ in cli.FLAG_FIELDS}


def test_the_builder_does_not_validate_so_tests_can_break_the_contract() -> None:
    for bad in (completion_message(amount=12.5), step("r", "o", "add_funds", "a", "1.005", 1),
                step("r", "o", "add_funds", "a", "1.00", 1, expectedOperations="1")):
        with pytest.raises(MalformedMessage):
            parse_completion(bad)


def test_the_cli_flags_build_the_same_message() -> None:
    args = cli.build_parser().parse_args([
        "enqueue", "--request-id", "tx-42", "--operation-id", "tx-42-w",
        "--operation", "withdraw_funds", "--account", "alice", "--amount", "25.00",
        "--expected", "2", "--completed-at", "2026-11-26T10:00:00+00:00"])
    assert cli.bodies_from_flags(args) == [completion_message(**FIELDS)]


def test_the_demo_workload_is_built_by_the_builder() -> None:
    work = generate(accounts=3, transfers=5, malformed=len(MALFORMED), seed=1)
    valid = [m for m in work.messages if m not in MALFORMED]
    assert len(valid) == len(work.messages) - len(MALFORMED)
    for message in valid:
        assert parse_completion(message).to_message() == message
    for message in MALFORMED:
        with pytest.raises(MalformedMessage):
            parse_completion(message)


def test_the_test_helpers_are_built_by_the_builder() -> None:
    [add] = deposit("d1", "alice", "5.00")
    assert json.loads(add) == message_body(
        request_id="d1", operation_id="d1-add", operation=Operation.ADD_FUNDS,
        account_id="alice", amount="5.00", expected_operations=1, status=StepStatus.SUCCEEDED)
    withdraw, credit = (parse_completion(b) for b in transfer("t1", "a", "b", "1.00", "add"))
    assert (withdraw.status, credit.status) == (StepStatus.SUCCEEDED, StepStatus.FAILED)
