"""Retention against a real Azurite (K = 4): the archive step exports exactly the rows older than
RETENTION_DAYS to one blob per shard and deletes them, keeps the young ones and every row of an
undecided or unsettled request, converges after a crash between upload and delete, and changes
nothing on a dry run. Reconciliation still passes afterwards (the carry row)."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from operator_cli.cli import main
from shared.domain.sharding import ShardMap
from shared.leadership.instance import LedgerApp
from shared.leadership.reconcile import reconcile_ledger
from shared.leadership.retention import archive
from shared.storage.archive import ArchiveStore
from shared.storage.parking import PARKED_PARTITION
from shared.web import api
from tests.helpers import Namespace, deposit, record, send, transfer, wait_until
from tests.test_shards import accounts_on, elect_only, request_on, settle, sharded

HISTORY = ("request:", "claim:", "applied:", "vote:")
Key = tuple[str, str, str]  # table, partition, row key


def archiving(ns: Namespace) -> LedgerApp:
    """A K = 4 app of this namespace, with an archive container of its own."""
    return sharded(ns, ARCHIVE_CONTAINER_NAME=container(ns))


def container(ns: Namespace) -> str:
    return f"{ns.prefix}-archive"


def rows_of(app: LedgerApp) -> dict[Key, datetime]:
    """Every history row (ledger and parked) with its storage Timestamp."""
    found: dict[Key, datetime] = {}
    table = app.ledger.table
    for k in range(len(app.shards)):
        partition = app.on(k).ledger.partition
        for row in table.query("PartitionKey eq @pk", parameters={"pk": partition}):
            if str(row["RowKey"]).startswith(HISTORY):
                assert row.timestamp is not None
                found[(table.name, partition, str(row["RowKey"]))] = row.timestamp
    for row in app.parking.table.query("PartitionKey eq @pk",
                                       parameters={"pk": PARKED_PARTITION}):
        assert row.timestamp is not None
        found[(app.parking.table.name, PARKED_PARTITION, str(row["RowKey"]))] = row.timestamp
    return found


def boundary(app: LedgerApp) -> datetime:
    """Storage's time after every write so far, and before any later one."""
    table = app.ledger.table
    written = table.upsert({"PartitionKey": "probe", "RowKey": "t"})
    stamp = written.timestamp or table.get("probe", "t").timestamp
    assert stamp is not None

    def later() -> bool:
        again = table.upsert({"PartitionKey": "probe", "RowKey": "t"})
        moved = again.timestamp or table.get("probe", "t").timestamp
        return moved is not None and moved > stamp
    wait_until(later, 5, "storage's clock to move past the boundary")
    return stamp


def blob_rows(store: ArchiveStore, names: list[str]) -> set[Key]:
    found: set[Key] = set()
    for name in names:
        content = store.get(name)
        assert content is not None, name
        for line in content.decode().splitlines():
            row = json.loads(line)
            found.add((row["table"], row["PartitionKey"], row["RowKey"]))
    return found


def history(ns: Namespace) -> tuple[LedgerApp, datetime, dict[str, Any]]:
    """Old history (settled requests, one parked message, one decided-unsettled and one
    undecided request), a boundary, then young history on shard 3 alone."""
    app = archiving(ns)
    [a], [b], [c] = accounts_on(1, 1), accounts_on(2, 1), accounts_on(3, 2, "c")[:1]
    c2 = accounts_on(3, 2, "c")[1]
    send(app, *deposit("old-fa", a, "100.00"), *deposit("old-fb", b, "10.00"))
    t1, t2 = request_on(0, "old-t"), request_on(2, "old-t")
    send(app, *transfer(t1, a, c, "30.00"), *transfer(t2, b, a, "2.50"))
    settle(app, [t1, t2])
    send(app, b"{not json")  # parked
    unsettled = request_on(0, "u")
    record(app, *transfer(unsettled, a, b, "1.00"))
    elect_only(app, 0)
    elect_only(app, 1)
    elect_only(app, 0)  # decided at home; shards 1 and 2 have not applied it
    undecided = request_on(0, "v")
    record(app, *transfer(undecided, a, b, "1.00"))
    elect_only(app, 0)  # coordinated, votes out
    cut = boundary(app)
    young = request_on(3, "young")
    send(app, *deposit("young-fc", c2, "5.00"), *transfer(young, c2, c, "1.00"))
    assert ShardMap(4).home_of(young, 2, "") == 3
    return app, cut, {"unsettled": unsettled, "undecided": undecided, "young": young,
                      "old": ["old-fa", "old-fb", t1, t2]}


def names_request(key: Key, request_ids: list[str]) -> bool:
    rest = key[2].split(":", 1)[-1]
    return any(rest == r for r in request_ids)


def test_archive_exports_exactly_the_old_rows_and_deletes_them(ns: Namespace) -> None:
    app, cut, ids = history(ns)
    before = rows_of(app)
    old = {k for k, stamp in before.items() if stamp < cut
           and not names_request(k, [ids["unsettled"], ids["undecided"]])}
    assert any(k[1] == PARKED_PARTITION for k in old)
    assert {k[2].split(":")[0] for k in old} >= {"request", "claim", "applied", "vote"}
    now = cut + timedelta(days=app.config.retention_days)
    store = ArchiveStore.of(app.clients.blob, app.config.archive_container)

    dry = archive(app, dry_run=True, now=now)
    assert sum(dry.rows.values()) == len(old)
    assert dry.deleted == 0
    assert rows_of(app) == before
    assert store.names() == []

    report = archive(app, now=now)
    assert report.blobs == dry.blobs  # the same rows: the same names
    assert report.skipped_unsettled == 1
    assert blob_rows(store, report.blobs) == old
    after = rows_of(app)
    assert set(after) == set(before) - old
    # Kept: every row of the undecided and unsettled requests, every young row.
    for request_id in (ids["unsettled"], ids["undecided"], ids["young"]):
        assert any(names_request(k, [request_id]) for k in after), request_id
    assert report.deleted == len(old)
    # The read API still answers for the young ones; reconciliation still adds up.
    assert api.request(app, ids["young"]).body["status"] == "committed"
    assert api.request(app, ids["unsettled"]).body["status"] == "committing"
    reconciled = reconcile_ledger(app)
    assert reconciled.ok, reconciled.findings
    assert reconciled.grand()["total"] == "115.00"
    # A second run finds nothing old left.
    again = archive(app, now=now)
    assert (again.blobs, again.deleted, sum(again.rows.values())) == ([], 0, 0)


class Crash(Exception):
    pass


def test_a_crash_between_upload_and_delete_converges_on_a_rerun(ns: Namespace) -> None:
    app = archiving(ns)
    [a], [b] = accounts_on(1, 1), accounts_on(2, 1)
    t = request_on(3, "t")
    send(app, *deposit("fa", a, "9.00"), *transfer(t, a, b, "4.00"))
    settle(app, [t])
    cut = boundary(app)
    now = cut + timedelta(days=app.config.retention_days)
    before = rows_of(app)
    store = ArchiveStore.of(app.clients.blob, app.config.archive_container)

    def crash(step: str) -> None:
        raise Crash(step)
    with pytest.raises(Crash):
        archive(app, now=now, hook=crash)
    assert rows_of(app) == before  # uploaded, nothing deleted
    [first] = store.names()
    content = store.get(first)
    report = archive(app, now=now)
    assert store.names() == sorted(report.blobs)
    assert first in report.blobs
    assert store.get(first) == content  # the same bytes again
    assert rows_of(app) == {}
    assert blob_rows(store, report.blobs) == set(before)
    assert reconcile_ledger(app).ok


def test_cli_archive_dry_run_changes_nothing(ns: Namespace) -> None:
    app = archiving(ns)
    send(app, *deposit("d", "alice", "1.00"))
    before = rows_of(app)
    out = io.StringIO()
    env = ns.env(LEDGER_SHARDS="4", ARCHIVE_CONTAINER_NAME=container(ns))
    code = main(["archive", "--dry-run", "--json"], environ=env, stdout=out,
                stderr=io.StringIO())
    assert code == 0
    view = json.loads(out.getvalue())
    assert (view["dryRun"], view["selected"], view["retentionDays"]) == (True, 0, 365)
    assert rows_of(app) == before
