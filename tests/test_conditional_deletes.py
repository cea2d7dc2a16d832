"""A delete removes only the row version it read: a stale delete cannot lose a newer row.

Every path that deletes completion rows (consumed rows, late rows, markers, tombstones) names
the ETag it read (``CompletionStore.delete``, ``If-Match``).
"""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

from shared.domain.model import RowRef
from shared.leadership.elections import run_election
from shared.storage.parking import ParkedKind
from tests.helpers import Namespace, balance, deposit, record, send, status, step, transfer


def test_a_delayed_delete_of_a_committed_request_leaves_a_step_recorded_again_since(
        ns: Namespace) -> None:
    """The review's case: L1 commits X and its background delete is delayed past its release;
    L2 settles X's rows as late; upstream sends X's step again with another amount, recorded
    as a new row; then L1's delete lands. Before, it removed the new row and the contradiction
    was never parked."""
    l1 = ns.app("L1", STORAGE_TIMEOUT_SECONDS="1")  # waits 1 s for its deletes, then releases
    gate, waiting = threading.Event(), threading.Event()
    delete = l1.completions.delete

    def delayed(*args: Any, **kwargs: Any) -> Any:
        waiting.set()
        gate.wait(30)
        return delete(*args, **kwargs)

    l1.completions.delete = delayed  # type: ignore[method-assign]
    send(l1, *deposit("d1", "alice", "10.00"), *transfer("x", "alice", "bob", "4.00"))
    assert status(l1, "x") == "committed"
    assert waiting.wait(10), "L1's deletes are queued and held"

    l2 = ns.app("L2")
    run_election(l2)  # X's rows and marker are still there: settled as late
    assert l2.completions.steps_of("x") == []
    record(l2, step("x", "x-w", "withdraw_funds", "alice", "5.00", 2))  # another content
    (again,) = l2.completions.steps_of("x")

    gate.set()  # L1's stale delete lands now
    assert l1.cleaner.wait_until_done(timeout=10)
    assert l2.completions.steps_of("x") == [again], "the newer version of the row is kept"
    run_election(l2)
    parked = [m for m in l2.parking.list() if m.kind is ParkedKind.LATE_CONTRADICTION]
    assert len(parked) == 1
    assert "different from the step" in parked[0].error
    assert balance(l2, "alice") == Decimal("6.00"), "nothing applied twice, nothing lost"
    assert balance(l2, "bob") == Decimal("4.00")
    assert l2.completions.count() == 0


def test_a_delete_names_the_version_it_read(ns: Namespace) -> None:
    app = ns.app()
    record(app, transfer("t1", "alice", "bob", "1.00")[0])
    (old,) = app.completions.steps_of("t1")
    app.completions.delete([old.ref])
    record(app, transfer("t1", "alice", "bob", "1.00")[0])
    (new,) = app.completions.steps_of("t1")
    assert new.etag != old.etag
    app.completions.delete([old.ref, RowRef(new.partition_key, "t1|nothing", "W/\"x\"")])
    assert app.completions.steps_of("t1") == [new], "a stale version's delete leaves it"
    app.completions.delete([new.ref])
    assert app.completions.steps_of("t1") == []
