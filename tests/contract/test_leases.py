"""The lease lock's contract, run on the in-memory fake and on Azure's blob lease (Azurite).

Both implementations of ``shared.election.lock.LeaseLock`` must behave as Azure's documentation
says a blob lease does ("Lease Blob": outcomes of lease operations by lease state), so that the
elector's tests on ``MemoryLease`` say something about production. Where Azurite departs from the
documentation, its case is marked ``xfail(strict=True)`` with the difference.

On the fake, time passes in an instant (a fake clock); on Azurite it passes for real: the leases
the expiry tests need are taken when the rig is made, so that they expire (15 s, Azure's
shortest lease) while the other tests run, and one test waits for a 1 s break.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest
from azure.storage.blob import BlobServiceClient

from shared.domain.leases import INFINITE, LeaseStatus
from shared.election.lock import LeaseLock
from shared.errors import ConditionFailed, NotFound, StorageRefused
from shared.storage.azure_leases import AzureBlobLease
from simulator.azurite import Azurite
from tests.fakes.leases import MemoryLease

SHORTEST = 15  # seconds: Azure's shortest fixed lease
EXPIRING = ("renewed", "taken", "released", "broken")  # one lease per expiry test


class BreakableLease(LeaseLock, Protocol):
    """The port plus the operator's break (both implementations have it)."""

    def break_lease(self, break_period_s: int | None = None) -> int: ...


class FakeClock:
    """Monotonic time that moves only when told (``sleep`` moves it too)."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def monotonic(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += max(seconds, 0.0)

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.now_s)


class Rig:
    """Makes leases of one implementation and lets time pass for them."""

    kind = ""

    def __init__(self) -> None:
        self._expiring: dict[str, tuple[BreakableLease, str]] = {}

    def new_lease(self, exists: bool = True) -> BreakableLease:
        raise NotImplementedError

    def wait_for(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        """Let ``seconds`` pass; ``condition`` must then hold."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def start_expiring(self, names: tuple[str, ...]) -> None:
        """Take a shortest lease per name now, for the expiry tests to find expired later."""
        for name in names:
            lease, holder = self.new_lease(), new_id()
            lease.acquire(SHORTEST, holder)
            self._expiring[name] = (lease, holder)

    def expired(self, name: str) -> tuple[BreakableLease, str]:
        """The lease taken for ``name`` and its holder, once it has expired."""
        lease, holder = self._expiring.pop(name)
        self.wait_for(lambda: state(lease) == ("expired", "unlocked"), SHORTEST,
                      f"lease {name} expired")
        return lease, holder


class MemoryRig(Rig):
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()

    def new_lease(self, exists: bool = True) -> BreakableLease:
        return MemoryLease(self.clock, exists=exists)

    def wait_for(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        self.clock.sleep(seconds)
        assert condition(), f"{what} after {seconds:g} s"


class AzuriteRig(Rig):
    kind = "azurite"
    GRACE_SECONDS = 5.0  # past the nominal time: Azurite's clock, the poll interval

    def __init__(self, azurite: Azurite) -> None:
        super().__init__()
        self.service = BlobServiceClient.from_connection_string(azurite.connection_string)
        self.container = self.service.get_container_client(f"c{uuid.uuid4().hex[:12]}")

    def new_lease(self, exists: bool = True) -> BreakableLease:
        lease = AzureBlobLease(self.container, f"b{uuid.uuid4().hex[:12]}", call_timeout_seconds=5)
        if exists:
            lease.ensure_exists()
        return lease

    def wait_for(self, condition: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds + self.GRACE_SECONDS
        while not condition():
            assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
            time.sleep(0.1)

    def close(self) -> None:
        self.container.delete_container()


@pytest.fixture(scope="module",
                params=["memory", pytest.param("azurite", marks=pytest.mark.azurite)])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """One rig per implementation for the whole module (pytest groups the tests by it), so its
    expiring leases count down while the other tests run."""
    made: Rig = (MemoryRig() if request.param == "memory"
                 else AzuriteRig(request.getfixturevalue("azurite")))
    made.start_expiring(EXPIRING)
    yield made
    made.close()


def differs_on_azurite(rig: Rig, request: pytest.FixtureRequest, reason: str) -> None:
    """Azurite does not do what the documentation says here (the fake does)."""
    if rig.kind == "azurite":
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def new_id() -> str:
    return str(uuid.uuid4())


def state(lease: LeaseLock) -> tuple[str, str]:
    status = lease.state()
    return status.state, status.status


def conflict(call: Callable[[], object]) -> ConditionFailed:
    """``call`` is refused as a lease conflict (409)."""
    with pytest.raises(ConditionFailed) as caught:
        call()
    assert caught.value.status == 409
    return caught.value


# --- existence ---------------------------------------------------------------------------------
def test_a_lease_whose_blob_is_missing_is_available_and_not_found_until_ensured(rig: Rig) -> None:
    lease = rig.new_lease(exists=False)
    assert lease.state() == LeaseStatus("available", "unlocked", None)
    with pytest.raises(NotFound) as caught:
        lease.acquire(SHORTEST, new_id())
    assert caught.value.status == 404
    lease.ensure_exists()
    lease.ensure_exists()  # idempotent
    holder = new_id()
    assert lease.acquire(SHORTEST, holder) == holder
    lease.ensure_exists()  # a leased blob exists: still fine
    assert state(lease) == ("leased", "locked")


# --- acquire -----------------------------------------------------------------------------------
def test_an_available_lease_is_taken_under_the_proposed_id(rig: Rig) -> None:
    lease = rig.new_lease()
    assert lease.state() == LeaseStatus("available", "unlocked", None)
    holder = new_id()
    assert lease.acquire(SHORTEST, holder) == holder
    assert lease.state() == LeaseStatus("leased", "locked", "fixed")


def test_acquiring_again_under_the_holding_id_succeeds_and_any_other_id_conflicts(
        rig: Rig) -> None:
    lease = rig.new_lease()
    holder = new_id()
    lease.acquire(SHORTEST, holder)
    assert lease.acquire(60, holder) == holder  # same id: renewed with the new duration
    refused = conflict(lambda: lease.acquire(SHORTEST, new_id()))
    assert refused.code == "LeaseAlreadyPresent"
    assert state(lease) == ("leased", "locked")
    lease.renew(holder)  # the holder was not disturbed


@pytest.mark.parametrize("seconds", [0, 14, 61, -2])
def test_durations_outside_15_to_60_or_infinite_are_refused_not_conflicts(
        rig: Rig, seconds: int) -> None:
    lease = rig.new_lease()
    with pytest.raises(StorageRefused) as caught:
        lease.acquire(seconds, new_id())
    assert not isinstance(caught.value, ConditionFailed)
    assert caught.value.status == 400
    assert state(lease) == ("available", "unlocked")


def test_an_infinite_lease_is_held_until_released(rig: Rig) -> None:
    lease = rig.new_lease()
    holder = new_id()
    lease.acquire(INFINITE, holder)
    assert lease.state() == LeaseStatus("leased", "locked", "infinite")
    conflict(lambda: lease.acquire(SHORTEST, new_id()))
    lease.release(holder)
    assert state(lease) == ("available", "unlocked")


# --- renew and release -------------------------------------------------------------------------
def test_renew_works_only_under_the_holding_id(rig: Rig) -> None:
    lease = rig.new_lease()
    conflict(lambda: lease.renew(new_id()))  # nothing to renew
    holder = new_id()
    lease.acquire(SHORTEST, holder)
    lease.renew(holder, within_s=10)
    refused = conflict(lambda: lease.renew(new_id()))
    assert refused.code == "LeaseIdMismatchWithLeaseOperation"
    assert state(lease) == ("leased", "locked")


def test_release_frees_the_lease_at_once_and_only_under_the_holding_id(rig: Rig) -> None:
    lease = rig.new_lease()
    holder = new_id()
    conflict(lambda: lease.release(holder))  # nothing to release
    lease.acquire(SHORTEST, holder)
    conflict(lambda: lease.release(new_id()))
    assert state(lease) == ("leased", "locked")
    lease.release(holder, within_s=10)
    assert state(lease) == ("available", "unlocked")
    conflict(lambda: lease.renew(holder))  # released: gone for good
    conflict(lambda: lease.release(holder))
    successor = new_id()
    assert lease.acquire(SHORTEST, successor) == successor


# --- break -------------------------------------------------------------------------------------
def test_nothing_to_break_is_a_conflict(rig: Rig) -> None:
    conflict(lambda: rig.new_lease().break_lease(0))


def test_a_break_without_period_ends_an_infinite_lease_at_once(rig: Rig) -> None:
    lease = rig.new_lease()
    lease.acquire(INFINITE, new_id())
    assert lease.break_lease() == 0
    assert state(lease) == ("broken", "unlocked")


def test_a_broken_lease_cannot_be_renewed_but_can_be_taken_or_released(rig: Rig) -> None:
    lease = rig.new_lease()
    holder = new_id()
    lease.acquire(SHORTEST, holder)
    assert lease.break_lease(0) == 0
    assert state(lease) == ("broken", "unlocked")
    conflict(lambda: lease.renew(holder))
    lease.release(holder)  # the breaker's holder may still give it back
    assert state(lease) == ("available", "unlocked")
    lease.acquire(SHORTEST, holder)
    lease.break_lease(0)
    successor = new_id()
    assert lease.acquire(SHORTEST, successor) == successor  # broken: anyone may take it
    conflict(lambda: lease.renew(holder))


def test_a_breaking_lease_stays_locked_for_its_break_period_then_is_broken(
        rig: Rig) -> None:
    lease = rig.new_lease()
    holder = new_id()
    lease.acquire(SHORTEST, holder)
    assert lease.break_lease(1) == 1
    assert lease.state() == LeaseStatus("breaking", "locked", None)
    conflict(lambda: lease.acquire(SHORTEST, new_id()))
    conflict(lambda: lease.acquire(SHORTEST, holder))  # not even its holder
    conflict(lambda: lease.renew(holder))
    rig.wait_for(lambda: state(lease) == ("broken", "unlocked"), 1, "the lease broken")
    successor = new_id()
    assert lease.acquire(SHORTEST, successor) == successor


def test_a_breaking_lease_may_be_released_by_its_holder(rig: Rig) -> None:
    lease = rig.new_lease()
    holder = new_id()
    lease.acquire(SHORTEST, holder)
    lease.break_lease(10)
    conflict(lambda: lease.release(new_id()))
    lease.release(holder)
    assert state(lease) == ("available", "unlocked")


def test_a_break_period_longer_than_the_lease_left_is_cut_to_it(rig: Rig) -> None:
    lease = rig.new_lease()
    lease.acquire(SHORTEST, new_id())
    assert 0 < lease.break_lease(60) <= SHORTEST


# --- expiry (one real wait on Azurite: the leases are taken when the rig is made) ---------------
def test_an_expired_lease_is_unlocked_and_its_holder_may_renew_it(
        rig: Rig) -> None:
    lease, holder = rig.expired("renewed")
    assert lease.state() == LeaseStatus("expired", "unlocked", None)
    lease.renew(holder)  # nobody took it meanwhile: its holder gets it back
    assert state(lease) == ("leased", "locked")
    conflict(lambda: lease.acquire(SHORTEST, new_id()))


def test_anyone_may_take_an_expired_lease_and_then_its_old_holder_cannot_renew(
        rig: Rig) -> None:
    lease, holder = rig.expired("taken")
    successor = new_id()
    assert lease.acquire(SHORTEST, successor) == successor
    conflict(lambda: lease.renew(holder))
    conflict(lambda: lease.release(holder))
    lease.renew(successor)


def test_only_its_holder_may_release_an_expired_lease(rig: Rig) -> None:
    lease, holder = rig.expired("released")
    conflict(lambda: lease.release(new_id()))
    lease.release(holder)
    assert state(lease) == ("available", "unlocked")


def test_breaking_an_expired_lease_frees_it(rig: Rig, request: pytest.FixtureRequest) -> None:
    differs_on_azurite(rig, request, "Azurite leaves an expired lease broken when broken; the "
                       "documentation's outcome table says it becomes available")
    lease, _ = rig.expired("broken")
    assert lease.break_lease(0) == 0
    assert state(lease) == ("available", "unlocked")
