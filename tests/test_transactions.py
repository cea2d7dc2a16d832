"""``shared.transactions.submit_transaction`` answers exactly as the SDK's own
``TableClient.submit_transaction`` does, on the same operations (against a real Azurite): what
storage applies or refuses, and what the SDK refuses before sending, with the same exceptions.
One refusal is its own: an ETag with a folded line, which the SDK would send."""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError
from azure.data.tables import (
    RequestTooLargeError,
    TableClient,
    TableServiceClient,
    TableTransactionError,
    UpdateMode,
)

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
    if name == "values that look like headers":  # JSON escapes CR and LF: stored as written
        return [_replace(fence, etag), ("create", {
            **new, "reason": "x\r\nIf-Match: *\r\n\r\n--changeset_x--\r\n", "If-Match": "*"})]
    if name == "a key that looks like a header":  # keys are URL-quoted; storage refuses CR, LF
        return [_replace(fence, etag), ("create", {**account, "RowKey": "a\r\nIf-Match: *"})]
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
                                      "value too large", "values that look like headers",
                                      "a key that looks like a header"])
def test_the_fast_path_answers_as_the_sdk_does(azurite: Azurite, ns: Namespace,
                                              scenario: str) -> None:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    answers = {}
    for name, submit in SUBMITTERS.items():
        table = service.create_table(f"{ns.prefix}{name}")
        answers[name] = _outcome(submit, table, _scenario(table, scenario))
    assert answers["fast"] == answers["sdk"]
    assert answers["sdk"][0] == ("applied" if scenario in ("applied",
                                                           "values that look like headers")
                                 else "refused")


# --- what the SDK refuses before anything is applied -------------------------------------------
def _stale_fence(table: TableClient) -> tuple[dict[str, Any], str]:
    """A fence row, and an ETag it had before it was written again."""
    stale = table.create_entity({"PartitionKey": "p", "RowKey": "fence", "epoch": 1})["etag"]
    table.update_entity({"PartitionKey": "p", "RowKey": "fence", "epoch": 1},
                        mode=UpdateMode.REPLACE)
    return {"PartitionKey": "p", "RowKey": "fence", "epoch": 2, "holder": "i1/lease"}, stale


def _refused(table: TableClient, name: str) -> list[Any]:
    fence, stale = _stale_fence(table)
    other = {"PartitionKey": "q", "RowKey": "request:r1", "status": "committed"}
    if name == "ETag, CR LF, If-Match: *":  # a stale ETag that would become unconditional
        return [_replace(fence, stale + "\r\nIf-Match: *")]
    if name == "ETag, LF, If-Match: *":
        return [_replace(fence, stale + "\nIf-Match: *")]
    if name == "ETag, CR":
        return [_replace(fence, stale + "\rIf-Match: *")]
    if name == "ETag not Latin-1":
        return [_replace(fence, stale + "\u20ac")]
    if name == "two partitions":
        return [("create", {**other, "PartitionKey": "p"}), ("create", other)]
    if name == "two partitions after a bad ETag":  # the SDK checks partitions before headers
        return [_replace(fence, stale + "\r\nIf-Match: *"), ("create", other)]
    if name == "no RowKey":
        return [_replace(fence, stale), ("create", {"PartitionKey": "p", "status": "x"})]
    if name == "over 4 MiB":
        return [("create", {"PartitionKey": "p", "RowKey": f"r{i}", "a": "a" * 21_000,
                            "b": "b" * 21_000}) for i in range(100)]
    raise AssertionError(name)


def _rows(table: TableClient) -> list[tuple[str, dict[str, Any], str | None]]:
    return sorted((e["RowKey"], dict(e), e.metadata["etag"]) for e in table.list_entities())


@pytest.mark.parametrize("scenario", ["ETag, CR LF, If-Match: *", "ETag, LF, If-Match: *",
                                      "ETag, CR", "ETag not Latin-1", "two partitions",
                                      "two partitions after a bad ETag", "no RowKey",
                                      "over 4 MiB"])
def test_the_fast_path_refuses_what_the_sdk_refuses_with_the_same_error(
        azurite: Azurite, ns: Namespace, scenario: str) -> None:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    refusals: dict[str, tuple[type[BaseException], str]] = {}
    for name, submit in SUBMITTERS.items():
        table = service.create_table(f"{ns.prefix}{name}")
        operations = _refused(table, scenario)
        before = _rows(table)
        with pytest.raises((ValueError, HttpResponseError)) as refused:
            submit(table, operations)
        assert _rows(table) == before, f"{name}: nothing may be written"
        error = refused.value
        # A storage error names its request id and time; anything else must read the same,
        # but for the time in the ETag it quotes.
        refusals[name] = (type(error), "" if isinstance(error, HttpResponseError)
                          else re.sub(r"datetime\\?'[^'\\]*", "datetime'T", str(error)))
    assert refusals["fast"] == refusals["sdk"]
    if scenario == "over 4 MiB":
        assert refusals["sdk"][0] is RequestTooLargeError
    else:
        assert refusals["sdk"][0] in (ValueError, UnicodeEncodeError)


def test_a_folded_etag_that_the_sdk_would_send_is_refused_too(azurite: Azurite,
                                                              ns: Namespace) -> None:
    # A CR LF followed by a space is a folded header line to http.client, which lets it through
    # the SDK: Azurite then reads "If-Match: *" and replaces the row whatever its ETag. The fast
    # path refuses any CR or LF in a header value.
    table = TableServiceClient.from_connection_string(azurite.connection_string).create_table(
        f"{ns.prefix}folded")
    fence, stale = _stale_fence(table)
    before = _rows(table)
    with pytest.raises(ValueError, match="Invalid header value"):
        submit_transaction(table, [_replace(fence, stale + "\r\n If-Match: *")])
    assert _rows(table) == before


def test_101_operations_are_refused_by_storage_and_nothing_is_written(azurite: Azurite,
                                                                     ns: Namespace) -> None:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    operations = [("create", {"PartitionKey": "p", "RowKey": f"r{i}"}) for i in range(101)]
    fast = service.create_table(f"{ns.prefix}fast")
    with pytest.raises(TableTransactionError) as refused:
        submit_transaction(fast, operations)
    assert getattr(refused.value, "error_code", None) == "InvalidInput"
    assert _rows(fast) == []
    # The SDK sends them too, and raises TableTransactionError against Azure (its own
    # test_batch_too_many_ops); Azurite's answer to 101 operations has a stray line before the
    # status line, on which azure-core's parser fails with BadStatusLine instead.
    sdk = service.create_table(f"{ns.prefix}sdk")
    with pytest.raises((TableTransactionError, http.client.HTTPException)):
        sdk.submit_transaction(operations)
    assert _rows(sdk) == []
