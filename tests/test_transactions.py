"""``shared.storage.transactions.submit_transaction`` answers exactly as the SDK's own
``TableClient.submit_transaction`` does, on the same operations (against a real Azurite): the
same request body (but for boundaries, dates and the table's name), what storage applies or
refuses, what each operation returns, and what the SDK refuses before sending, with the same
exceptions. One refusal is its own: an ETag with a folded line, which the SDK would send."""

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

from shared.storage.transactions import submit_transaction
from simulator.azurite import Azurite
from tests.helpers import Namespace

Submit = Callable[..., Any]
SUBMITTERS: dict[str, Submit] = {
    "sdk": lambda table, operations, **kwargs: list(table.submit_transaction(operations,
                                                                             **kwargs)),
    "fast": submit_transaction,
}
STALE = 'W/"datetime\'2020-01-01T00%3A00%3A00Z\'"'


def _replace(entity: dict[str, Any], etag: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    return ("update", entity, {"mode": UpdateMode.REPLACE, "etag": etag,
                               "match_condition": MatchConditions.IfNotModified})


def _delete(row_key: str, etag: str | None = None) -> tuple[Any, ...]:
    """A delete as ``CompletionStore.delete`` sends it: If-Match ``etag``, or ``*`` without."""
    keys = {"PartitionKey": "p", "RowKey": row_key}
    if etag is None:
        return ("delete", keys)
    return ("delete", keys, {"etag": etag, "match_condition": MatchConditions.IfNotModified})


def _scenario(table: TableClient, name: str) -> list[Any]:
    """Seed ``table`` and return the operations of one scenario."""
    seeded = table.create_entity({"PartitionKey": "p", "RowKey": "fence", "epoch": 1})
    r0 = table.create_entity({"PartitionKey": "p", "RowKey": "request:r0", "status": "committed",
                              "state": "open", "steps": 2})["etag"]
    steps = [table.create_entity({"PartitionKey": "p", "RowKey": f"request:r0|op{i}",
                                  "amount": "1.00"})["etag"] for i in range(3)]
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
    tombstone = {"PartitionKey": "p", "RowKey": "request:r0", "state": "decided",
                 "status": "committed"}
    if name == "deletes":  # If-Match the ETag read, and If-Match * (no options)
        return [_delete("request:r0|op0", steps[0]), _delete("request:r0|op1"),
                _delete("request:r0", r0)]
    if name == "delete, stale ETag":
        return [_delete("request:r0|op0", steps[0]), _delete("request:r0|op1", STALE)]
    if name == "delete, row gone":  # storage answers 404 ResourceNotFound inside the batch
        return [_delete("request:r0|op0", steps[0]), _delete("request:gone", steps[1])]
    if name == "delete without ETag, row gone":
        return [_delete("request:r0|op0"), _delete("request:gone")]
    if name == "delete, unquoted ETag":  # the SDK quotes it: then it matches nothing
        return [_delete("request:r0|op0", "abc")]
    if name == "upserts":  # replace drops other properties, merge keeps them
        return [("upsert", {"PartitionKey": "p", "RowKey": "request:r0", "state": "decided"},
                 {"mode": UpdateMode.REPLACE}),
                ("upsert", {"PartitionKey": "p", "RowKey": "fence", "holder": "i2", "note": None},
                 {"mode": UpdateMode.MERGE}),
                ("upsert", {**new, "RowKey": "request:r2"}, {"mode": UpdateMode.REPLACE}),
                ("upsert", {**new, "RowKey": "request:r3"}, {"mode": UpdateMode.MERGE}),
                ("upsert", {**account, "kind": UpdateMode.MERGE}),  # an enum: as a string
                ("upsert", {"PartitionKey": "p", "RowKey": "request:r0|op0", "checked": True})]
    if name == "merge updates":
        return [("update", {"PartitionKey": "p", "RowKey": "fence", "holder": "i2"},
                 {"mode": UpdateMode.MERGE, "etag": etag,
                  "match_condition": MatchConditions.IfNotModified}),
                ("update", {"PartitionKey": "p", "RowKey": "request:r0", "state": "decided"}),
                ("update", {"PartitionKey": "p", "RowKey": "request:r0|op0", "amount": "3"},
                 {"mode": "replace"})]
    if name == "merge update, stale ETag":
        return [("update", {**fence}, {"mode": UpdateMode.MERGE, "etag": STALE,
                                       "match_condition": MatchConditions.IfNotModified})]
    if name == "merge update, row gone":  # If-Match *: the row must exist
        return [("update", {"PartitionKey": "p", "RowKey": "request:gone", "x": 1},
                 {"mode": UpdateMode.MERGE})]
    if name == "cleanup":  # what CompletionStore.delete sends: deletes, then tombstones
        return [*(_delete(f"request:r0|op{i}", steps[i]) for i in range(3)),
                ("upsert", tombstone, {"mode": UpdateMode.REPLACE}),
                ("upsert", {**tombstone, "RowKey": "request:r9"}, {"mode": UpdateMode.REPLACE})]
    if name == "cleanup, a row changed":
        table.update_entity({"PartitionKey": "p", "RowKey": "request:r0|op2", "amount": "2.00"})
        return [*(_delete(f"request:r0|op{i}", steps[i]) for i in range(3)),
                ("upsert", tombstone, {"mode": UpdateMode.REPLACE})]
    if name == "cleanup, 100 operations":
        for i in range(3, 90):
            steps.append(table.create_entity({"PartitionKey": "p", "RowKey": f"request:r0|op{i}",
                                              "amount": "1.00"})["etag"])
        return [*(_delete(f"request:r0|op{i}", steps[i]) for i in range(90)),
                *(("upsert", {**tombstone, "RowKey": f"request:t{i}"},
                   {"mode": UpdateMode.REPLACE}) for i in range(10))]
    raise AssertionError(name)


def _outcome(submit: Submit, table: TableClient, operations: list[Any],
             bodies: list[str]) -> Any:
    def hook(request: Any) -> None:
        bodies.append(_normalized(request.http_request, table.table_name))

    try:
        results = submit(table, operations, raw_request_hook=hook)
    except TableTransactionError as exc:
        return ("refused", exc.index, getattr(exc, "error_code", None), exc.status_code,
                _properties(table))
    stored = {e["RowKey"]: e.metadata["etag"] for e in table.list_entities()}
    # Each result as the SDK's: which keys, and whether its ETag is the row's (as stored now).
    answers = [(sorted(result), result.get("etag") == stored.get(operation[1]["RowKey"]))
               for operation, result in zip(operations, results, strict=True)]
    return ("applied", answers, _properties(table))


def _properties(table: TableClient) -> list[tuple[str, dict[str, Any]]]:
    return sorted((e["RowKey"], dict(e)) for e in table.list_entities())


def _normalized(request: Any, table_name: str) -> str:
    """The request's body and headers, but for what differs from one batch to the next."""
    headers = {name: value for name, value in request.headers.items()
               if name in ("x-ms-version", "DataServiceVersion", "MaxDataServiceVersion",
                           "Accept", "Content-Type")}
    text = f"{sorted(headers.items())}\n{request.content.decode()}"
    text = re.sub(r"(batch|changeset)_[0-9a-f-]{36}", r"\1_B", text)
    text = re.sub(r"(?m)^(x-ms-date|Date): .*GMT\r$", r"\1: D\r", text)
    text = re.sub(r"datetime'[^']*'", "datetime'T'", text)  # the ETags of rows just seeded
    return text.replace(f"/{table_name}", "/TABLE")


@pytest.mark.parametrize("scenario", [
    "applied", "fenced out", "outcome exists", "value too large",
    "values that look like headers", "a key that looks like a header", "deletes",
    "delete, stale ETag", "delete, row gone", "delete without ETag, row gone",
    "delete, unquoted ETag", "upserts", "merge updates", "merge update, stale ETag",
    "merge update, row gone", "cleanup", "cleanup, a row changed", "cleanup, 100 operations"])
def test_the_fast_path_answers_as_the_sdk_does(azurite: Azurite, ns: Namespace,
                                              monkeypatch: pytest.MonkeyPatch,
                                              scenario: str) -> None:
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    answers: dict[str, Any] = {}
    bodies: dict[str, list[str]] = {}
    for name, submit in SUBMITTERS.items():
        table = service.create_table(f"{ns.prefix}{name}")
        operations = _scenario(table, scenario)
        if name == "fast":  # on its own path: no falling back to the SDK
            monkeypatch.setattr(table, "submit_transaction", None)
        bodies[name] = []
        answers[name] = _outcome(submit, table, operations, bodies[name])
    assert answers["fast"] == answers["sdk"]
    assert len(bodies["sdk"]) == 1
    assert bodies["fast"] == bodies["sdk"]
    if scenario == "upserts":  # the default mode merges
        rows = dict(answers["sdk"][2])
        assert rows["request:r0"] == {"PartitionKey": "p", "RowKey": "request:r0",
                                      "state": "decided"}
        assert rows["fence"]["epoch"] == 1
        assert rows["request:r0|op0"]["amount"] == "1.00"
    assert answers["sdk"][0] == ("applied" if scenario in (
        "applied", "values that look like headers", "deletes", "upserts", "merge updates",
        "cleanup", "cleanup, 100 operations") else "refused")


def test_what_the_refusals_of_deletes_and_merges_name(azurite: Azurite, ns: Namespace) -> None:
    # The differential test above checks both paths agree; this pins down what they agree on.
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    expected = {"delete, stale ETag": (1, "UpdateConditionNotSatisfied", 412),
                "delete, row gone": (1, "ResourceNotFound", 404),
                "delete without ETag, row gone": (1, "ResourceNotFound", 404),
                "merge update, stale ETag": (0, "UpdateConditionNotSatisfied", 412),
                "merge update, row gone": (0, "ResourceNotFound", 404),
                "cleanup, a row changed": (2, "UpdateConditionNotSatisfied", 412)}
    for index, (scenario, (at, code, status)) in enumerate(expected.items()):
        table = service.create_table(f"{ns.prefix}r{index}")
        operations = _scenario(table, scenario)
        before = _rows(table)
        with pytest.raises(TableTransactionError) as refused:
            submit_transaction(table, operations)
        assert (refused.value.index, getattr(refused.value, "error_code", None),
                refused.value.status_code) == (at, code, status), scenario
        assert _rows(table) == before, f"{scenario}: nothing may be written"


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
    keys = {"PartitionKey": "p", "RowKey": "fence"}
    if name == "delete, ETag, CR LF, If-Match: *":
        return [("delete", keys, {"etag": stale + "\r\nIf-Match: *",
                                  "match_condition": MatchConditions.IfNotModified})]
    if name == "delete, ETag not Latin-1":
        return [("delete", keys, {"etag": stale + "\u20ac",
                                  "match_condition": MatchConditions.IfNotModified})]
    if name == "delete, IfNotModified without an ETag":
        return [("delete", keys, {"match_condition": MatchConditions.IfNotModified})]
    if name == "delete, an ETag unconditionally":
        return [("delete", keys, {"etag": stale,
                                  "match_condition": MatchConditions.Unconditionally})]
    if name == "delete, two partitions":
        return [("delete", keys), ("delete", {**keys, "PartitionKey": "q"})]
    if name == "upsert, a mode the SDK does not know":  # modes are lower case
        return [("upsert", {**keys, "epoch": 3}, {"mode": "REPLACE"})]
    if name == "over 4 MiB":
        return [("create", {"PartitionKey": "p", "RowKey": f"r{i}", "a": "a" * 21_000,
                            "b": "b" * 21_000}) for i in range(100)]
    raise AssertionError(name)


def _rows(table: TableClient) -> list[tuple[str, dict[str, Any], str | None]]:
    return sorted((e["RowKey"], dict(e), e.metadata["etag"]) for e in table.list_entities())


@pytest.mark.parametrize("scenario", ["ETag, CR LF, If-Match: *", "ETag, LF, If-Match: *",
                                      "ETag, CR", "ETag not Latin-1", "two partitions",
                                      "two partitions after a bad ETag", "no RowKey",
                                      "delete, ETag, CR LF, If-Match: *",
                                      "delete, ETag not Latin-1",
                                      "delete, IfNotModified without an ETag",
                                      "delete, an ETag unconditionally", "delete, two partitions",
                                      "upsert, a mode the SDK does not know", "over 4 MiB"])
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


@pytest.mark.parametrize("kind", ["update", "delete"])
def test_a_folded_etag_that_the_sdk_would_send_is_refused_too(azurite: Azurite, ns: Namespace,
                                                              kind: str) -> None:
    # A CR LF followed by a space is a folded header line to http.client, which lets it through
    # the SDK: Azurite then reads "If-Match: *" and replaces the row whatever its ETag. The fast
    # path refuses any CR or LF in a header value.
    table = TableServiceClient.from_connection_string(azurite.connection_string).create_table(
        f"{ns.prefix}folded")
    fence, stale = _stale_fence(table)
    before = _rows(table)
    with pytest.raises(ValueError, match="Invalid header value"):
        submit_transaction(table, [_replace(fence, stale + "\r\n If-Match: *")
                                   if kind == "update" else _delete("fence", stale + "\r\n *")])
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
