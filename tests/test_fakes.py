"""What only the fakes have (the clock, the stamps, the filter parser), and the translation of
the SDK's exceptions; what the fakes share with storage is in ``tests/contract/``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import RequestTooLargeError, TableTransactionError
from azure.data.tables._serialize import _parameter_filter_substitution

from shared.domain.clock import Clock
from shared.errors import (
    AlreadyExists,
    BatchRefused,
    ConditionFailed,
    NotFound,
    Retryable,
    StorageError,
    StorageRefused,
    StorageUnavailable,
)
from shared.storage.azure_tables import stamp_of_etag
from shared.storage.errors import describe, translate, translating
from shared.storage.ports import MessageQueue, Table
from tests.fakes import FakeClock, MemoryQueue, MemoryTables
from tests.fakes.tables import compile_filter, etag_of, substitute

# --- FakeClock -------------------------------------------------------------------------------


def test_fake_clock_sleeps_instantly_and_both_clocks_move() -> None:
    clock: Clock = FakeClock(datetime(2026, 5, 1, tzinfo=UTC), monotonic_start=10.0)
    assert clock.monotonic() == 10.0
    clock.sleep(2.5)
    clock.sleep(0)
    clock.sleep(-1)  # as SystemClock: nothing
    assert clock.monotonic() == 12.5
    assert clock.now() == datetime(2026, 5, 1, 0, 0, 2, 500000, tzinfo=UTC)
    assert isinstance(clock, FakeClock)
    assert clock.sleeps == [2.5, 0, -1]
    clock.advance(0.5)
    assert clock.monotonic() == 13.0
    with pytest.raises(ValueError, match="back"):
        clock.advance(-0.1)
    with pytest.raises(ValueError, match="UTC"):
        FakeClock(datetime(2026, 1, 1))  # naive: the point


# --- MemoryTables ----------------------------------------------------------------------------


def test_the_fakes_are_the_ports() -> None:
    table: Table = MemoryTables(FakeClock()).table("things")
    queue: MessageQueue = MemoryQueue("things", FakeClock())
    assert (table.name, queue.name) == ("things", "things")


def test_writes_in_one_instant_still_get_distinct_later_stamps() -> None:
    clock = FakeClock()
    table = MemoryTables(clock).table("stamps")
    written = [table.upsert({"PartitionKey": "p", "RowKey": "a", "n": n}) for n in range(3)]
    stamps = [w.timestamp for w in written]
    assert stamps[0] == clock.now()
    assert stamps == sorted(stamps)  # type: ignore[type-var]
    assert len({w.etag for w in written}) == 3
    assert all(w.date == clock.now().replace(microsecond=0) for w in written)


def test_etags_carry_the_timestamp_as_storages_do() -> None:
    stamp = datetime(2026, 12, 2, 17, 25, 9, 802230, tzinfo=UTC)
    etag = etag_of(stamp)
    assert etag == "W/\"datetime'2026-12-02T17%3A25%3A09.8022300Z'\""
    assert stamp_of_etag(etag) == stamp  # what the Azure adapter reads back from storage's


def test_tables_are_shared_by_name_case_insensitively() -> None:
    tables = MemoryTables(FakeClock())
    tables.table("Ledger").create({"PartitionKey": "p", "RowKey": "r"})
    assert tables.table("ledger").keys() == [("p", "r")]
    with pytest.raises(StorageRefused):
        tables.table("1bad")


def test_unsupported_values_are_refused_before_storage() -> None:
    table = MemoryTables(FakeClock()).table("types")
    with pytest.raises(TypeError):
        table.create({"PartitionKey": "p", "RowKey": "r", "x": [1]})
    with pytest.raises(TypeError):
        table.create({"PartitionKey": "p", "RowKey": "r", "x": 2**63})
    with pytest.raises(TypeError, match="UTC"):
        table.create({"PartitionKey": "p", "RowKey": "r",
                      "x": datetime(2026, 1, 1)})  # naive: the point


@pytest.mark.parametrize("parameters", [
    {"pk": "b1", "rk": "O'Brien", "n": 5, "big": 2**40, "flag": True, "ratio": 0.5},
    {"pk": "x y", "rk": "", "n": -1, "big": -(2**40), "flag": False, "ratio": 1e-3},
])
def test_parameters_are_substituted_as_the_sdk_substitutes_them(
        parameters: dict[str, Any]) -> None:
    query = ("( PartitionKey eq @pk and RowKey ge @rk ) or ( n lt @n and big gt @big and "
             "flag eq @flag and ratio le @ratio )")
    assert substitute(query, parameters) == _parameter_filter_substitution(parameters, query)


def test_parameters_are_substituted_as_whole_words_only() -> None:
    for substituted in (substitute, lambda q, p: _parameter_filter_substitution(p, q)):
        with pytest.raises(KeyError):  # the word is "@pk)"
            substituted("(PartitionKey eq @pk)", {"pk": "a"})
        assert substituted("PartitionKey eq (@pk)", {"pk": "a"}) == "PartitionKey eq (@pk)"
    with pytest.raises(StorageRefused):
        compile_filter("PartitionKey eq (@pk)", {"pk": "a"})  # storage cannot parse "@pk"


def test_filter_literals() -> None:
    stamp = datetime(2026, 1, 2, tzinfo=UTC)
    guid = uuid.uuid4()
    row = {"s": "it's", "n": 7, "b": True, "d": 0.5, "at": stamp, "g": guid}
    for text in ("s eq 'it''s'", "n eq 7", "n eq 7L", "b eq true", "d lt 1.0",
                 "at eq datetime'2026-01-02T00:00:00Z'", f"g eq guid'{guid}'",
                 "not ( n eq 8 )", "n gt 1 and ( s eq 'x' or b eq true )"):
        assert compile_filter(text)(row), text
    for text in ("s eq 'its'", "n eq 8", "b eq false", "missing eq 1", "missing ne 1",
                 "n eq '7'", "b eq 1"):
        assert not compile_filter(text)(row), text


# --- MemoryQueue on the fake clock -----------------------------------------------------------


def test_queue_times_are_the_clocks() -> None:
    clock = FakeClock()
    queue = MemoryQueue("alarms", clock)
    sent = queue.send("due in a minute", visibility_timeout=60, time_to_live=120)
    clock.advance(59.9)
    assert queue.receive() == []
    clock.advance(0.1)
    [message] = queue.receive(visibility_timeout=30)
    queue.update(message.handle, visibility_timeout=0)
    with pytest.raises(ConditionFailed):
        queue.delete(sent)
    clock.advance(60)
    assert queue.approximate_count() == 0  # expired at 120 s


# --- translating the SDK's exceptions --------------------------------------------------------


def _http(cls: type[HttpResponseError], status: int | None, message: str = "refused",
          code: str | None = None) -> HttpResponseError:
    exc = cls(message=message)
    exc.status_code = status
    if code is not None:
        exc.error_code = code  # type: ignore[attr-defined]  # as azure-core sets it
    return exc


@pytest.mark.parametrize(("exc", "expected", "status", "code"), [
    (_http(ResourceNotFoundError, 404, code="ResourceNotFound"), NotFound, 404,
     "ResourceNotFound"),
    (_http(ResourceExistsError, 409, code="EntityAlreadyExists"), AlreadyExists, 409,
     "EntityAlreadyExists"),
    (_http(ResourceExistsError, 409, code="LeaseAlreadyPresent"), ConditionFailed, 409,
     "LeaseAlreadyPresent"),
    (_http(ResourceModifiedError, 412, code="UpdateConditionNotSatisfied"), ConditionFailed,
     412, "UpdateConditionNotSatisfied"),
    (_http(HttpResponseError, 400, code="PopReceiptMismatch"), ConditionFailed, 400,
     "PopReceiptMismatch"),
    (_http(HttpResponseError, 400, code="InvalidInput"), StorageRefused, 400, "InvalidInput"),
    (_http(HttpResponseError, 403, code="AuthorizationFailure"), StorageRefused, 403,
     "AuthorizationFailure"),
    (_http(HttpResponseError, 429), StorageUnavailable, 429, None),
    (_http(HttpResponseError, 408), StorageUnavailable, 408, None),
    (_http(HttpResponseError, 503, code="ServerBusy"), StorageUnavailable, 503, "ServerBusy"),
    (_http(HttpResponseError, None), StorageUnavailable, None, None),
    (ServiceRequestError("connection refused"), StorageUnavailable, None, None),
    (ServiceResponseError("connection reset"), StorageUnavailable, None, None),
    (AzureError("something else"), StorageError, None, None),
])
def test_translate(exc: Exception, expected: type[StorageError], status: int | None,
                   code: str | None) -> None:
    translated = translate(exc)
    assert type(translated) is expected
    assert (translated.status, translated.code) == (status, code)
    assert isinstance(translated, Retryable) == (expected is StorageUnavailable)


def test_translate_a_refused_transaction() -> None:
    refused = translate(_http(TableTransactionError, 409, "2:The specified entity already "
                              "exists.\nErrorCode:EntityAlreadyExists", "EntityAlreadyExists"))
    assert isinstance(refused, BatchRefused)
    assert (refused.index, refused.status, refused.code) == (2, 409, "EntityAlreadyExists")
    too_large = translate(_http(RequestTooLargeError, 413, "the transaction was refused",
                                "RequestBodyTooLarge"))
    assert isinstance(too_large, BatchRefused)
    assert (too_large.index, too_large.status) == (None, 413)
    busy = translate(_http(TableTransactionError, 503, "0:busy", "ServerBusy"))
    assert isinstance(busy, StorageUnavailable)


def test_describe_is_one_line_without_endpoints_or_secrets() -> None:
    exc = _http(ResourceNotFoundError, 404, "The specified resource does not exist.\n"
                "RequestId:abc\nTime:2026-01-01", "ResourceNotFound")
    assert describe(exc) == ("ResourceNotFoundError: 404 ResourceNotFound: The specified "
                             "resource does not exist.")
    leaky = ServiceRequestError(
        "HTTPSConnectionPool(host='acct.table.core.windows.net', port=443): Max retries "
        "exceeded with url: /ledger?sv=2024&sig=SECRETSIG (Caused by NewConnectionError: "
        "[Errno 111] Connection refused) AccountKey=SECRETKEY== "
        "https://acct.table.core.windows.net/ledger?sig=SECRET2")
    text = describe(leaky)
    assert "\n" not in text
    assert text.startswith("ServiceRequestError: ")
    for secret in ("acct", "SECRET", "443", "/ledger"):
        assert secret not in text, text


def test_translating_raises_the_family_chained_to_the_original() -> None:
    original = _http(ResourceModifiedError, 412, code="ConditionNotMet")
    with pytest.raises(ConditionFailed) as caught, translating():
        raise original
    assert caught.value.__cause__ is original

    @translating()
    def read() -> None:
        raise ServiceResponseError("timed out")

    with pytest.raises(StorageUnavailable):
        read()
    with pytest.raises(KeyError), translating():  # not Azure's: not translated
        raise KeyError("x")


def test_storage_dates_are_whole_seconds_in_the_fake() -> None:
    clock = FakeClock(datetime(2026, 1, 1, 0, 0, 0, 900000, tzinfo=UTC))
    table = MemoryTables(clock).table("dates")
    written = table.create({"PartitionKey": "p", "RowKey": "r"})
    assert written.date == datetime(2026, 1, 1, tzinfo=UTC)
    assert written.timestamp is not None
    assert written.timestamp - written.date == timedelta(microseconds=900000)
