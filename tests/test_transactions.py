"""``shared.transactions.submit_transaction`` answers exactly as the SDK's own
``TableClient.submit_transaction`` does, on the same operations (against a real Azurite)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError, UpdateMode

from shared.transactions import submit_transaction
from simulator.azurite import Azurite
from tests.helpers import Namespace

Submit = Callable[[TableClient, list[Any]], Any]
SUBMITTERS: dict[str, Submit] = {
    "sdk": lambda table, operations: list(table.submit_transaction(operations)),
    "fast": submit_transaction,
}


def _replace(entity: dict[str, Any], etag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    return ("update", entity, {"mode": UpdateMode.REPLACE, "etag": etag,
                               "match_condition": MatchConditions.IfNotModified})


def _scenario(table: TableClient, name: str) -> list[Any]:
    """Seed ``table`` and return the operations of one scenario."""
    seeded = table.create_entity({"PartitionKey": "p", "RowKey": "fence", "epoch": 1})
    table.create_entity({"PartitionKey": "p", "RowKey": "request:r0", "status": "committed"})
    etag = seeded["etag"]
    fence = {"PartitionKey": "p", "RowKey": "fence", "epoch": 2, "holder": "i1/lease"}
    new = {"PartitionKey": "p", "RowKey": "request:r1", "status": "committed",
           "reason": "naïve ünïcode and 'quotes'", "complete": True, "operations": 2}
    account = {"PartitionKey": "p", "RowKey": "account:a.b-c:d_e", "balance": "1.00"}
    if name == "applied":
        return [_replace(fence, etag), ("create", new), ("create", account)]
    if name == "fenced out":
        return [_replace(fence, 'W/"datetime\'2020-01-01T00%3A00%3A00Z\'"'), ("create", new)]
    if name == "outcome exists":
        return [_replace(fence, etag), ("create", new),
                ("create", {"PartitionKey": "p", "RowKey": "request:r0", "status": "x"})]
    if name == "value too large":
        return [_replace(fence, etag), ("create", {**new, "reason": "r" * 40_000})]
    raise AssertionError(name)


def _outcome(submit: Submit, table: TableClient, operations: list[Any]) -> Any:
    try:
        results = submit(table, operations)
    except TableTransactionError as exc:
        return ("refused", exc.index, getattr(exc, "error_code", None), exc.status_code)
    rows = sorted((e["RowKey"], {k: v for k, v in e.items()})
                  for e in table.list_entities())
    return ("applied", len(results), all(r["etag"] for r in results), rows)


@pytest.mark.parametrize("scenario", ["applied", "fenced out", "outcome exists",
                                      "value too large"])
def test_the_fast_path_answers_as_the_sdk_does(azurite: Azurite, ns: Namespace,
                                              scenario: str) -> None:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    answers = {}
    for name, submit in SUBMITTERS.items():
        table = service.create_table(f"{ns.prefix}{name}")
        answers[name] = _outcome(submit, table, _scenario(table, scenario))
    assert answers["fast"] == answers["sdk"]
    assert answers["sdk"][0] == ("applied" if scenario == "applied" else "refused")
