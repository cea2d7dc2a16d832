"""The ``Table`` port's contract: each case is a behaviour Azure's documentation gives Table
storage (or a choice ``shared/storage/ports.py`` documents), run on ``MemoryTable`` and on
``AzureTable`` over Azurite (``backend`` in ``conftest.py``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core import MatchConditions
from azure.data.tables import UpdateMode

from shared.errors import (
    AlreadyExists,
    BatchRefused,
    ConditionFailed,
    NotFound,
    StorageRefused,
)
from shared.storage.ports import (
    MAX_BATCH_OPERATIONS,
    MAX_KEY_UNITS,
    MAX_PROPERTIES,
    MAX_PROPERTY_NAME,
    MAX_STRING_CHARACTERS,
    Mode,
    Operation,
    Table,
)
from tests.contract.conftest import Backend


def entity(row: str, partition: str = "p", /, **properties: Any) -> dict[str, Any]:
    return {"PartitionKey": partition, "RowKey": row, **properties}


def plain(row: dict[str, Any]) -> dict[str, Any]:
    return dict(row)


# --- single entities -------------------------------------------------------------------------


def test_values_round_trip_and_none_is_left_out(table: Table) -> None:
    stamp = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    guid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    values = {"text": "naïve \u2013 🚀 O'Brien", "empty": "", "int32": -(2**31), "int64": 2**40,
              "flag": True, "off": False, "ratio": 0.25, "at": stamp, "guid": guid,
              "blob": b"\x00\xffbytes"}
    table.create(entity("a", **values, gone=None))
    row = table.get("p", "a")
    assert plain(row) == entity("a", **values)
    assert "gone" not in row
    assert "Timestamp" not in row


def test_get_of_an_absent_entity_is_not_found(table: Table) -> None:
    with pytest.raises(NotFound) as caught:
        table.get("p", "nothing")
    assert caught.value.status == 404


def test_select_projects_the_properties_named(table: Table) -> None:
    table.create(entity("a", kind="x", other=1))
    row = table.get("p", "a", select=["kind", "missing"])
    assert row.get("kind") == "x"
    assert "other" not in row
    assert "RowKey" not in row
    assert row.get("missing") is None
    assert row.etag
    assert row.timestamp is None


def test_create_is_create_once(table: Table) -> None:
    first = table.create(entity("a", n=1))
    with pytest.raises(AlreadyExists) as caught:
        table.create(entity("a", n=2))
    assert caught.value.status == 409
    row = table.get("p", "a")
    assert row["n"] == 1
    assert row.etag == first.etag


def test_every_write_gives_a_new_etag_and_a_later_timestamp(table: Table) -> None:
    written = [table.create(entity("a", n=1))]
    written.append(table.upsert(entity("a", n=2)))
    written.append(table.upsert(entity("a", n=3), mode=Mode.REPLACE))
    written.append(table.update(entity("a", n=4)))
    written.append(table.update(entity("a", n=5), mode=Mode.REPLACE, etag=written[-1].etag))
    etags = [w.etag for w in written]
    assert all(etags)
    assert len(set(etags)) == len(etags)
    stamps = [w.timestamp for w in written]
    assert all(s is not None for s in stamps)
    assert stamps == sorted(stamps)  # type: ignore[type-var]
    row = table.get("p", "a")
    assert (row.etag, row.timestamp) == (written[-1].etag, written[-1].timestamp)
    assert written[-1].date is not None  # storage's clock when it answered


def test_timestamp_is_storages_and_cannot_be_written(table: Table) -> None:
    table.create(entity("a", Timestamp=datetime(2000, 1, 1, tzinfo=UTC)))
    row = table.get("p", "a")
    assert row.timestamp is not None
    assert row.timestamp.year > 2000
    assert "Timestamp" not in row


def test_upsert_merge_keeps_properties_and_replace_drops_them(table: Table) -> None:
    table.upsert(entity("a", keep=1, change=1))  # an upsert creates
    table.upsert(entity("a", change=2))
    assert plain(table.get("p", "a")) == entity("a", keep=1, change=2)
    table.upsert(entity("a", change=3), mode=Mode.REPLACE)
    assert plain(table.get("p", "a")) == entity("a", change=3)


def test_merge_with_none_keeps_the_property(table: Table) -> None:
    table.create(entity("a", keep="yes"))
    table.upsert(entity("a", keep=None, more=1))
    assert plain(table.get("p", "a")) == entity("a", keep="yes", more=1)


def test_update_needs_the_entity(table: Table) -> None:
    with pytest.raises(NotFound):
        table.update(entity("a", n=1))
    with pytest.raises(NotFound):
        table.update(entity("a", n=1), mode=Mode.REPLACE)
    with pytest.raises(NotFound):
        table.get("p", "a")


def test_update_if_match(table: Table) -> None:
    old = table.create(entity("a", n=1))
    new = table.update(entity("a", n=2), etag=old.etag)
    with pytest.raises(ConditionFailed) as caught:
        table.update(entity("a", n=3), mode=Mode.REPLACE, etag=old.etag)
    assert caught.value.status == 412
    assert table.get("p", "a")["n"] == 2
    table.update(entity("a", n=4), etag=new.etag)
    table.update(entity("a", n=5))  # no ETag: unconditional
    assert table.get("p", "a")["n"] == 5


def test_delete_if_match_and_absent_is_fine(table: Table) -> None:
    old = table.create(entity("a"))
    new = table.update(entity("a", n=1))
    with pytest.raises(ConditionFailed):
        table.delete("p", "a", etag=old.etag)
    assert table.get("p", "a")["n"] == 1
    table.delete("p", "a", etag=new.etag)
    with pytest.raises(NotFound):
        table.get("p", "a")
    table.delete("p", "a")  # absent: not an error, with or without an ETag
    table.delete("p", "a", etag=new.etag)
    table.create(entity("b"))
    table.delete("p", "b")  # without an ETag: whatever the version
    with pytest.raises(NotFound):
        table.get("p", "b")


# --- queries ---------------------------------------------------------------------------------


@pytest.fixture
def rows(table: Table) -> Table:
    """A few rows over three partitions, as the app's tables hold them."""
    for partition in ("b1", "b2", "~ready"):
        for row in ("r1|a", "r1|b", "r1~", "r2|a", "x"):
            table.create(entity(row, partition, requestId=row[:2], n=len(row),
                                decidedAt=f"2026-01-0{len(row)}T00:00:00+00:00",
                                flag=row.endswith("a")))
    return table


def keys(found: Any) -> list[tuple[str, str]]:
    return [(row["PartitionKey"], row["RowKey"]) for row in found]


def test_query_point_and_range_in_key_order(rows: Table) -> None:
    found = rows.query("PartitionKey eq @bucket and RowKey ge @low and RowKey lt @high",
                       parameters={"bucket": "b2", "low": "r1|", "high": "r1}"})
    assert keys(found) == [("b2", "r1|a"), ("b2", "r1|b")]
    assert keys(rows.query("PartitionKey lt @special", parameters={"special": "~"})) == [
        (p, r) for p in ("b1", "b2") for r in ("r1|a", "r1|b", "r1~", "r2|a", "x")]


def test_query_or_with_parentheses_resumes_a_scan(rows: Table) -> None:
    found = rows.query("( PartitionKey eq @pk and RowKey ge @rk ) or "
                       "( PartitionKey gt @pk and PartitionKey lt @special )",
                       parameters={"pk": "b1", "rk": "r2", "special": "~"})
    assert keys(found) == [("b1", "r2|a"), ("b1", "x")] + [
        ("b2", r) for r in ("r1|a", "r1|b", "r1~", "r2|a", "x")]


def test_query_other_properties_and_types(rows: Table) -> None:
    assert keys(rows.query("PartitionKey eq 'b1' and decidedAt ge @since",
                           parameters={"since": "2026-01-04"})) == [("b1", "r1|a"),
                                                                     ("b1", "r1|b"),
                                                                     ("b1", "r2|a")]
    assert keys(rows.query("PartitionKey eq 'b1' and n eq @n and flag eq @flag",
                           parameters={"n": 4, "flag": True})) == [("b1", "r1|a"),
                                                                   ("b1", "r2|a")]
    assert keys(rows.query("PartitionKey eq 'b1' and n ne 4 and not ( RowKey eq 'x' )")) == [
        ("b1", "r1~")]


def test_query_string_parameters_are_quoted(table: Table) -> None:
    table.create(entity("O'Brien"))
    table.create(entity("O"))
    assert keys(table.query("RowKey eq @name", parameters={"name": "O'Brien"})) == [
        ("p", "O'Brien")]


def test_query_comparisons_with_a_missing_property_never_match(table: Table) -> None:
    table.create(entity("has", kind="a"))
    table.create(entity("lacks"))
    assert keys(table.query("kind ne 'b'")) == [("p", "has")]
    assert keys(table.query("kind eq 'a' or RowKey eq 'lacks'")) == [("p", "has"),
                                                                      ("p", "lacks")]


def test_query_compares_values_of_one_type_only(table: Table) -> None:
    table.create(entity("a", n=5, s="5"))
    assert keys(table.query("n eq '5'")) == []
    assert keys(table.query("s eq 5")) == []
    assert keys(table.query("n eq 5 and s eq '5'")) == [("p", "a")]


def test_query_datetime_and_guid_parameters(table: Table) -> None:
    guid = uuid.uuid4()
    table.create(entity("a", at=datetime(2026, 1, 2, tzinfo=UTC), id=guid))
    table.create(entity("b", at=datetime(2026, 1, 3, tzinfo=UTC), id=uuid.uuid4()))
    assert keys(table.query("at lt @t", parameters={"t": datetime(2026, 1, 2, 12,
                                                                  tzinfo=UTC)})) == [("p", "a")]
    assert keys(table.query("id eq @g", parameters={"g": guid})) == [("p", "a")]


def test_query_by_timestamp(table: Table, backend: Backend) -> None:
    first = table.create(entity("a"))
    backend.wait(0.05)
    table.create(entity("b"))
    assert first.timestamp is not None
    later = first.timestamp + timedelta(milliseconds=1)
    assert keys(table.query("Timestamp lt @t", parameters={"t": later})) == [("p", "a")]


def test_query_rows_carry_etag_timestamp_and_storages_date(table: Table) -> None:
    written = table.create(entity("a"))
    found = table.query("PartitionKey eq 'p'", page_size=10)
    assert found.date is None
    rows = list(found)
    assert [(r.etag, r.timestamp) for r in rows] == [(written.etag, written.timestamp)]
    assert found.date is not None
    assert written.timestamp is not None
    assert abs(found.date - written.timestamp) < timedelta(seconds=5)


def test_a_query_that_finds_nothing_still_has_storages_date(table: Table) -> None:
    found = table.query("PartitionKey eq 'nobody'")
    assert list(found) == []
    assert found.date is not None, "the app's 'now' comes from an empty answer too"


def test_query_select_limit_and_pages(rows: Table) -> None:
    found = list(rows.query("PartitionKey eq 'b1'", select=["RowKey"], page_size=2, limit=3))
    assert [plain(r) for r in found] == [{"RowKey": "r1|a"}, {"RowKey": "r1|b"},
                                         {"RowKey": "r1~"}]
    assert all(r.etag for r in found)
    assert len(list(rows.query("PartitionKey lt '~'", page_size=3))) == 10


def test_query_of_nothing(table: Table) -> None:
    assert list(table.query("PartitionKey eq 'nobody'")) == []


def test_query_that_storage_cannot_parse_is_refused(table: Table) -> None:
    with pytest.raises(StorageRefused) as caught:
        list(table.query("PartitionKey eq"))
    assert caught.value.status == 400


# --- transactions ----------------------------------------------------------------------------


def test_transaction_applies_every_operation(table: Table) -> None:
    gone = table.create(entity("gone"))
    stale = table.create(entity("kept", n=1))
    results = table.submit([
        ("create", entity("new", n=1)),
        ("upsert", entity("up", n=1), {"mode": Mode.REPLACE}),
        ("update", entity("kept", n=2), {"mode": Mode.MERGE, "etag": stale.etag}),
        ("delete", entity("gone"), {"etag": gone.etag}),
    ])
    assert [r.etag is None for r in results] == [False, False, False, True]
    for row, result in zip(("new", "up", "kept"), results, strict=False):
        got = table.get("p", row)
        assert got.etag == result.etag
        assert got.timestamp == result.timestamp
    assert table.get("p", "kept")["n"] == 2
    with pytest.raises(NotFound):
        table.get("p", "gone")


def test_transaction_takes_the_sdks_operation_tuples(table: Table) -> None:
    old = table.create(entity("a", n=1, keep=1))
    table.create(entity("b"))
    results = table.submit([
        ("update", entity("a", n=2), {"mode": UpdateMode.REPLACE, "etag": old.etag,
                                      "match_condition": MatchConditions.IfNotModified}),
        ("delete", entity("b"), {"match_condition": MatchConditions.Unconditionally}),
        ("upsert", entity("c", n=3), {"mode": UpdateMode.MERGE}),
    ])
    assert [r.etag is None for r in results] == [False, True, False]
    assert plain(table.get("p", "a")) == entity("a", n=2)
    with pytest.raises(BatchRefused) as caught:
        table.submit([("update", entity("a", n=3), {"etag": old.etag,
                                                     "match_condition":
                                                     MatchConditions.IfNotModified})])
    assert (caught.value.index, caught.value.status) == (0, 412)


def test_transaction_of_nothing(table: Table) -> None:
    assert table.submit([]) == []


@pytest.mark.parametrize("failing", ["create-existing", "stale-update", "update-absent",
                                     "stale-delete", "delete-absent"])
def test_transaction_is_all_or_nothing(table: Table, failing: str) -> None:
    first = table.create(entity("there", n=1))
    table.update(entity("there", n=2))
    operations: dict[str, Operation] = {
        "create-existing": ("create", entity("there")),
        "stale-update": ("update", entity("there", n=9), {"etag": first.etag}),
        "update-absent": ("update", entity("absent", n=9)),
        "stale-delete": ("delete", entity("there"), {"etag": first.etag}),
        "delete-absent": ("delete", entity("absent")),
    }
    operation = operations[failing]
    status = {"create-existing": 409, "stale-update": 412, "update-absent": 404,
              "stale-delete": 412, "delete-absent": 404}[failing]
    with pytest.raises(BatchRefused) as caught:
        table.submit([("create", entity("new1")), ("upsert", entity("up", n=1)), operation,
                      ("create", entity("new2"))])
    assert (caught.value.index, caught.value.status) == (2, status)
    assert keys(table.query("PartitionKey eq 'p'")) == [("p", "there")]
    assert table.get("p", "there")["n"] == 2


def test_transaction_on_two_partitions_is_refused(table: Table) -> None:
    with pytest.raises(BatchRefused) as caught:
        table.submit([("create", entity("a", "p1")), ("create", entity("b", "p2"))])
    assert (caught.value.index, caught.value.status) == (1, 400)
    assert list(table.query("RowKey ge ''")) == []


def test_transaction_names_each_entity_once(table: Table) -> None:
    with pytest.raises(BatchRefused) as caught:
        table.submit([("create", entity("a")), ("upsert", entity("a", n=1))])
    assert caught.value.status == 400
    assert list(table.query("RowKey ge ''")) == []


def test_transaction_holds_at_most_100_operations(table: Table) -> None:
    table.submit([("create", entity(f"r{i:03}")) for i in range(MAX_BATCH_OPERATIONS)])
    assert len(list(table.query("PartitionKey eq 'p'"))) == MAX_BATCH_OPERATIONS
    with pytest.raises(BatchRefused) as caught:
        table.submit([("create", entity(f"s{i:03}")) for i in range(MAX_BATCH_OPERATIONS + 1)])
    assert caught.value.status == 400
    assert len(list(table.query("PartitionKey eq 'p'"))) == MAX_BATCH_OPERATIONS


def test_transaction_payload_is_less_than_4_mib(table: Table) -> None:
    text = "x" * 30_000  # ASCII: 30,000 bytes of JSON per property
    big: list[Operation] = [("create", entity(f"r{i:02}", a=text, b=text))
                            for i in range(75)]  # ~4.5 MB
    with pytest.raises(BatchRefused) as caught:
        table.submit(big)
    assert caught.value.status == 413
    assert list(table.query("PartitionKey eq 'p'")) == []


def test_transaction_payload_under_4_mib_is_applied(table: Table) -> None:
    text = "x" * 30_000
    table.submit([("create", entity(f"r{i:02}", a=text, b=text)) for i in range(50)])  # ~3 MB
    assert len(list(table.query("PartitionKey eq 'p'", select=["RowKey"]))) == 50


# --- limits ----------------------------------------------------------------------------------


def test_at_most_255_properties(table: Table, backend: Backend) -> None:
    allowed = MAX_PROPERTIES - 3  # PartitionKey, RowKey and Timestamp count too
    table.create(entity("a", **{f"p{i}": i for i in range(allowed)}))
    assert len(table.get("p", "a")) == allowed + 2
    backend.azurite_differs("Azurite accepts more than the documented 255 properties "
                            "(Azure/Azurite#1446, open)")
    with pytest.raises(StorageRefused) as caught:
        table.create(entity("b", **{f"p{i}": i for i in range(allowed + 1)}))
    assert caught.value.status == 400


def test_an_entity_holds_at_most_1_mib(table: Table, backend: Backend) -> None:
    text = "x" * MAX_STRING_CHARACTERS  # 64 KiB of UTF-16 each
    table.create(entity("a", **{f"p{i}": text for i in range(15)}))  # 960 KiB and change
    backend.azurite_differs("Azurite accepts an entity of more than the documented 1 MiB when "
                            "each property is within its own 64 KiB")
    with pytest.raises(StorageRefused) as caught:
        table.create(entity("b", **{f"p{i}": text for i in range(17)}))  # 1,088 KiB
    assert caught.value.status == 400


def test_a_string_property_holds_64_kib(table: Table) -> None:
    table.create(entity("a", s="x" * MAX_STRING_CHARACTERS))
    with pytest.raises(StorageRefused) as caught:
        table.create(entity("b", s="x" * (MAX_STRING_CHARACTERS + 1)))
    assert caught.value.status == 400


def test_property_names_up_to_255_characters(table: Table, backend: Backend) -> None:
    table.create(entity("a", **{"n" * MAX_PROPERTY_NAME: 1}))
    backend.azurite_differs("Azurite accepts property names longer than the documented 255 "
                            "characters")
    with pytest.raises(StorageRefused) as caught:
        table.create(entity("b", **{"n" * (MAX_PROPERTY_NAME + 1): 1}))
    assert caught.value.status == 400


@pytest.mark.parametrize("key", ["PartitionKey", "RowKey"])
@pytest.mark.parametrize("character", ["k", "é", "🚀"], ids=["ascii", "bmp", "surrogates"])
def test_keys_up_to_1_kib_of_utf16(table: Table, key: str, character: str) -> None:
    count = MAX_KEY_UNITS // (len(character.encode("utf-16-le")) // 2)  # characters
    table.create({**entity("a"), key: character * count})
    with pytest.raises(StorageRefused) as caught:
        table.create({**entity("b"), key: character * (count + 1)})
    assert caught.value.status == 400


@pytest.mark.parametrize("character", ["/", "\\", "#", "?", "\x00", "\x1f", "\x7f", "\x9f"],
                         ids=["slash", "backslash", "hash", "question", "nul", "us", "del",
                              "apc"])
def test_forbidden_key_characters(table: Table, character: str) -> None:
    with pytest.raises(StorageRefused) as caught:
        table.create(entity(f"a{character}b"))
    assert caught.value.status == 400
    assert list(table.query("PartitionKey eq 'p'")) == []
