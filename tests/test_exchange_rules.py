"""The cross-shard planner (``shared/domain/exchange.py`` ``ExchangeBatch``) on its own: no I/O.

Each test builds the batch a shard's leader would plan (accounts as read, coordinations and
escrows as read) and checks the writes of the one transaction it plans, the messages it sends
once that landed and the outcomes it decided: coordinate, PREPARE, VOTE, DECISION, ACK, the
100-operation bound and the merging of writes on one row. Money is asserted to the cent.

Three shards; accounts ``h*`` live on shard 0 (the home of every request here), ``v*`` on
shard 1 and ``w*`` on shard 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest

from shared.domain.exchange import (
    Coordination,
    Escrow,
    ExchangeBatch,
    MessageKind,
    ShardMessage,
    applied_key,
    coord_key,
    escrow_key,
    inbox_key,
    vote_key,
)
from shared.domain.model import AccountRow, Outcome, OutcomeStatus
from shared.domain.planning import MAX_TRANSACTION_OPERATIONS, Write, claim_key, request_key

HOME, V, W = 0, 1, 2
R = "req-1"
STEPS = (("op-1", "c1"), ("op-2", "c2"), ("op-3", "c3"))


def D(text: str) -> Decimal:  # noqa: N802 - reads as a literal
    return Decimal(text)


def shard_of(account: str) -> int:
    return {"h": HOME, "v": V, "w": W}[account[0]]


def row(account: str, balance: str, reserved: str = "0.00") -> AccountRow:
    return AccountRow(account, D(balance), f"etag-{account}", D(reserved))


def batch(me: int, accounts: Mapping[str, AccountRow] | None = None, *,
          coordinations: Mapping[str, Coordination] | None = None,
          escrows: Mapping[str, tuple[Escrow, ...]] | None = None) -> ExchangeBatch:
    return ExchangeBatch(me, f"ledger-{me}" if me else "ledger", dict(accounts or {}),
                         dict(coordinations or {}), dict(escrows or {}), shard_of)


def request(*legs: tuple[str, str]) -> Outcome:
    """A complete request, as the home's leader hands it to ``coordinate``."""
    parsed = tuple((account, D(amount)) for account, amount in legs)
    return Outcome(R, OutcomeStatus.COMMITTED, "", parsed, len(parsed), len(parsed),
                   STEPS[:len(parsed)])


def writes(planned: ExchangeBatch) -> dict[str, Write]:
    """The rows the transaction writes (accounts apart), by row key."""
    return {str(w.entity["RowKey"]): w for _, w in planned.extra_writes()}


def kinds(planned: ExchangeBatch) -> dict[str, str]:
    return {key: w.kind for key, w in writes(planned).items()}


def money(planned: ExchangeBatch) -> dict[str, tuple[Decimal, Decimal]]:
    """Every account the transaction changes: (balance, reserved)."""
    return {a: (balance, held) for a, (_, balance, held) in planned.account_writes().items()}


def sent(planned: ExchangeBatch) -> list[tuple[int, MessageKind, tuple[tuple[str, Decimal], ...],
                                              str]]:
    """The messages to send once the transaction landed: (shard, kind, legs, status or vote)."""
    return [(shard, m.kind, m.legs,
             m.status or ("yes" if m.yes else f"no: {m.reason}"))
            for shard, m in planned.messages]


def legs_of(write: Write) -> list[list[str]]:
    found: list[list[str]] = json.loads(write.entity["legs"])
    return found


def message(kind: MessageKind, sender: int, me: int, *legs: tuple[str, str],
            home: int = HOME, **fields: Any) -> ShardMessage:
    parsed = tuple((account, D(amount)) for account, amount in legs)
    return ShardMessage(kind, R, sender, home, parsed, etag=f"etag-{kind.value}-{sender}",
                        **fields)


def coordination(*legs: tuple[str, str], votes: Mapping[int, str] | None = None,
                 acks: tuple[int, ...] = (), status: str = "") -> Coordination:
    """The home's coordination of a request with ``legs``, as read back from its row."""
    outcome = request(*legs)
    planned = batch(HOME, {a: row(a, "1000.00") for a, _ in legs if shard_of(a) == HOME})
    planned.coordinate(outcome)
    made = planned.coordinations[R]
    entity = made.entity("ledger")
    stored = Coordination.from_row({**entity, "votes": json.dumps(
        {str(k): v for k, v in (votes or {}).items()}), "acks": json.dumps(list(acks)),
        "status": status})
    assert stored.legs == outcome.legs
    return stored


# --- coordinate ------------------------------------------------------------------------------
def test_a_transfer_with_a_remote_debit_sends_prepare_and_reserves_nothing_at_home() -> None:
    planned = batch(HOME, {"h1": row("h1", "0.00")})
    assert planned.coordinate(request(("v1", "-30.00"), ("h1", "30.00"))) is None
    assert kinds(planned) == {claim_key(R): "create", coord_key(R): "create"}
    assert money(planned) == {}, "the home's credit waits for the decision"
    assert sent(planned) == [(V, MessageKind.PREPARE, (("v1", D("-30.00")),), "yes")]
    coord = planned.coordinations[R]
    assert (coord.voters, coord.missing_votes, coord.decided) == ((V,), (V,), False)
    assert dict(coord.remote) == {V: (("v1", D("-30.00")),)}
    assert planned.outcomes == []
    assert planned.coordinated == [R]


def test_home_and_remote_debits_reserve_the_homes_share_in_escrow_before_the_vote() -> None:
    planned = batch(HOME, {"h1": row("h1", "100.00")})
    decided = planned.coordinate(request(("h1", "-10.00"), ("v1", "-20.00"), ("w1", "30.00")))
    assert decided is None
    assert money(planned) == {"h1": (D("90.00"), D("10.00"))}
    escrow = writes(planned)[escrow_key(R, "h1")]
    assert (escrow.kind, escrow.entity["amount"], escrow.entity["home"]) == ("create", "10.00",
                                                                              HOME)
    assert sent(planned) == [(V, MessageKind.PREPARE, (("v1", D("-20.00")),), "yes")], \
        "only the shard with a debit votes; the credit's shard waits for the decision"


def test_no_remote_debit_decides_and_applies_the_homes_legs_in_the_same_transaction() -> None:
    planned = batch(HOME, {"h1": row("h1", "100.00")})
    decided = planned.coordinate(request(("h1", "-30.00"), ("w1", "30.00")))
    assert decided is not None
    assert (decided.status, decided.shards, decided.legs) == (
        OutcomeStatus.COMMITTED, (W,), (("h1", D("-30.00")), ("w1", D("30.00"))))
    assert planned.outcomes == [decided]
    assert money(planned) == {"h1": (D("70.00"), D("0.00"))}, "debited at once, no escrow"
    rows = writes(planned)
    assert {k: w.kind for k, w in rows.items()} == {
        claim_key(R): "create", applied_key(R): "create", coord_key(R): "create"}
    assert legs_of(rows[applied_key(R)]) == [["h1", "-30.00"]]
    assert rows[coord_key(R)].entity["status"] == "committed"
    assert sent(planned) == [(W, MessageKind.DECISION, (("w1", D("30.00")),), "committed")]


def test_home_funds_short_rejects_alone_with_nothing_reserved_or_sent() -> None:
    planned = batch(HOME, {"h1": row("h1", "5.00")})
    decided = planned.coordinate(request(("h1", "-10.00"), ("v1", "-5.00"), ("w1", "15.00")))
    assert decided is not None
    assert decided.status is OutcomeStatus.REJECTED
    assert decided.reason == "insufficient funds: account h1 would go to -5.00"
    assert (decided.legs, decided.shards) == ((), ())
    assert planned.outcomes == [decided]
    assert kinds(planned) == {claim_key(R): "create"}, "no coordination, no escrow"
    assert money(planned) == {}
    assert planned.messages == []


def test_home_funds_short_without_voters_rejects_alone_too() -> None:
    planned = batch(HOME, {"h1": row("h1", "29.99")})
    decided = planned.coordinate(request(("h1", "-30.00"), ("w1", "30.00")))
    assert decided is not None
    assert decided.status is OutcomeStatus.REJECTED
    assert decided.reason == "insufficient funds: account h1 would go to -0.01"
    assert money(planned) == {}
    assert planned.messages == []


def test_the_homes_debits_count_net_per_account() -> None:
    """A withdraw and an add on one account net out: only the net is reserved."""
    planned = batch(HOME, {"h1": row("h1", "3.00")})
    planned.coordinate(request(("h1", "-10.00"), ("h1", "7.00"), ("v1", "-1.00"),
                               ("w1", "4.00")))
    assert money(planned) == {"h1": (D("0.00"), D("3.00"))}


# --- PREPARE (on a voter) -----------------------------------------------------------------------
def test_prepare_reserves_the_voters_debit_and_votes_yes() -> None:
    planned = batch(V, {"v1": row("v1", "50.00")})
    prepare = message(MessageKind.PREPARE, HOME, V, ("v1", "-20.00"))
    planned.handle(prepare)
    assert money(planned) == {"v1": (D("30.00"), D("20.00"))}
    rows = writes(planned)
    assert {k: w.kind for k, w in rows.items()} == {
        escrow_key(R, "v1"): "create", vote_key(R): "create", prepare.key: "delete"}
    assert rows[escrow_key(R, "v1")].entity["amount"] == "20.00"
    assert rows[vote_key(R)].entity["vote"] == "yes"
    assert rows[prepare.key].etag == "etag-prepare-0", "only the version read is consumed"
    assert sent(planned) == [(HOME, MessageKind.VOTE, (), "yes")]


def test_prepare_refuses_when_the_voter_falls_short_and_reserves_nothing() -> None:
    planned = batch(V, {"v1": row("v1", "19.99", reserved="5.00")})
    planned.handle(message(MessageKind.PREPARE, HOME, V, ("v1", "-20.00")))
    assert money(planned) == {}, "money already in escrow is not spendable"
    rows = writes(planned)
    assert escrow_key(R, "v1") not in rows
    assert rows[vote_key(R)].entity["vote"] == "no"
    why = "insufficient funds: account v1 would go to -0.01"
    assert rows[vote_key(R)].entity["reason"] == why
    assert sent(planned) == [(HOME, MessageKind.VOTE, (), f"no: {why}")]


def test_a_refusal_that_overtook_its_prepare_closes_the_vote() -> None:
    """A rejection (another voter said no) reaches this voter before its PREPARE: handled in
    ``HANDLING_ORDER`` (decisions first), the PREPARE then reserves nothing."""
    planned = batch(V, {"v1": row("v1", "50.00")})
    decision = message(MessageKind.DECISION, HOME, V, status="rejected", reason="no funds")
    prepare = message(MessageKind.PREPARE, HOME, V, ("v1", "-20.00"))
    planned.handle(decision)
    planned.handle(prepare)
    assert money(planned) == {}
    rows = writes(planned)
    assert {k: w.kind for k, w in rows.items()} == {
        vote_key(R): "upsert_merge", applied_key(R): "create", decision.key: "delete",
        prepare.key: "delete"}
    assert rows[vote_key(R)].entity == {"PartitionKey": "ledger-1", "RowKey": vote_key(R),
                                        "closed": True}
    assert rows[applied_key(R)].entity["status"] == "rejected"
    assert legs_of(rows[applied_key(R)]) == []
    assert sent(planned) == [(HOME, MessageKind.ACK, (), "rejected")], "no vote is sent"


# --- VOTE (at home) ---------------------------------------------------------------------------
TWO_VOTERS = (("h1", "-10.00"), ("v1", "-20.00"), ("w1", "-5.00"), ("h2", "35.00"))


def home_after_coordinating() -> tuple[dict[str, AccountRow], dict[str, tuple[Escrow, ...]]]:
    """The home's accounts and escrows once TWO_VOTERS was coordinated (h1 had 100.00)."""
    return ({"h1": row("h1", "90.00", reserved="10.00"), "h2": row("h2", "1.00")},
            {R: (Escrow(R, "h1", D("10.00")),)})


def test_a_first_yes_of_two_is_recorded_and_nothing_is_decided() -> None:
    accounts, escrows = home_after_coordinating()
    planned = batch(HOME, accounts, coordinations={R: coordination(*TWO_VOTERS)},
                    escrows=escrows)
    vote = message(MessageKind.VOTE, V, HOME)
    planned.handle(vote)
    assert planned.outcomes == []
    assert planned.messages == []
    assert money(planned) == {}
    rows = writes(planned)
    assert {k: w.kind for k, w in rows.items()} == {coord_key(R): "replace_any",
                                                    vote.key: "delete"}
    assert json.loads(rows[coord_key(R)].entity["votes"]) == {"1": ""}
    assert planned.coordinations[R].missing_votes == (W,)


def test_every_yes_commits_consumes_the_homes_escrow_credits_and_sends_decisions() -> None:
    accounts, escrows = home_after_coordinating()
    planned = batch(HOME, accounts, coordinations={R: coordination(*TWO_VOTERS, votes={V: ""})},
                    escrows=escrows)
    planned.handle(message(MessageKind.VOTE, W, HOME))
    [decided] = planned.outcomes
    assert decided.status is OutcomeStatus.COMMITTED
    assert decided.shards == (V, W)
    assert sorted(decided.legs) == sorted((a, D(m)) for a, m in TWO_VOTERS)
    assert money(planned) == {"h1": (D("90.00"), D("0.00")), "h2": (D("36.00"), D("0.00"))}
    rows = writes(planned)
    assert rows[escrow_key(R, "h1")].kind == "delete"
    assert rows[applied_key(R)].entity["status"] == "committed"
    assert sorted(legs_of(rows[applied_key(R)])) == [["h1", "-10.00"], ["h2", "35.00"]]
    assert rows[coord_key(R)].entity["status"] == "committed"
    assert sent(planned) == [(V, MessageKind.DECISION, (("v1", D("-20.00")),), "committed"),
                             (W, MessageKind.DECISION, (("w1", D("-5.00")),), "committed")]


def test_a_no_rejects_refunds_the_homes_escrow_and_releases_only_the_voters() -> None:
    legs = (("h1", "-10.00"), ("v1", "-20.00"), ("w1", "30.00"))  # w1 only receives
    accounts = {"h1": row("h1", "90.00", reserved="10.00")}
    planned = batch(HOME, accounts, coordinations={R: coordination(*legs)},
                    escrows={R: (Escrow(R, "h1", D("10.00")),)})
    why = "insufficient funds: account v1 would go to -1.00"
    planned.handle(message(MessageKind.VOTE, V, HOME, yes=False, reason=why))
    [decided] = planned.outcomes
    assert (decided.status, decided.reason, decided.legs, decided.shards) == (
        OutcomeStatus.REJECTED, why, (), (V,))
    assert money(planned) == {"h1": (D("100.00"), D("0.00"))}, "refunded to the cent"
    rows = writes(planned)
    assert rows[escrow_key(R, "h1")].kind == "delete"
    assert rows[applied_key(R)].entity["status"] == "rejected"
    assert legs_of(rows[applied_key(R)]) == []
    assert sent(planned) == [(V, MessageKind.DECISION, (("v1", D("-20.00")),), "rejected")], \
        "the shard that only receives has nothing to release: no message"


def test_a_vote_sent_again_changes_nothing_but_its_own_row() -> None:
    accounts, escrows = home_after_coordinating()
    planned = batch(HOME, accounts, coordinations={R: coordination(*TWO_VOTERS, votes={V: ""})},
                    escrows=escrows)
    again = message(MessageKind.VOTE, V, HOME)
    planned.handle(again)
    assert kinds(planned) == {again.key: "delete"}
    assert planned.outcomes == []
    assert planned.messages == []
    assert money(planned) == {}


# --- DECISION (on a participant) ------------------------------------------------------------------
def test_a_commit_consumes_the_escrow_lands_the_credits_and_acks() -> None:
    planned = batch(V, {"v1": row("v1", "30.00", reserved="20.00"), "v2": row("v2", "0.50")},
                    escrows={R: (Escrow(R, "v1", D("20.00")),)})
    decision = message(MessageKind.DECISION, HOME, V, ("v1", "-20.00"), ("v2", "4.25"),
                       status="committed")
    planned.handle(decision)
    assert money(planned) == {"v1": (D("30.00"), D("0.00")), "v2": (D("4.75"), D("0.00"))}
    rows = writes(planned)
    assert {k: w.kind for k, w in rows.items()} == {
        escrow_key(R, "v1"): "delete", applied_key(R): "create", decision.key: "delete"}
    assert rows[applied_key(R)].entity["status"] == "committed"
    assert legs_of(rows[applied_key(R)]) == [["v1", "-20.00"], ["v2", "4.25"]]
    assert sent(planned) == [(HOME, MessageKind.ACK, (), "committed")]


def test_a_rejection_refunds_the_escrow_and_closes_the_vote() -> None:
    planned = batch(V, {"v1": row("v1", "30.00", reserved="20.00")},
                    escrows={R: (Escrow(R, "v1", D("20.00")),)})
    planned.handle(message(MessageKind.DECISION, HOME, V, ("v1", "-20.00"), status="rejected"))
    assert money(planned) == {"v1": (D("50.00"), D("0.00"))}
    rows = writes(planned)
    assert rows[escrow_key(R, "v1")].kind == "delete"
    assert rows[vote_key(R)].kind == "upsert_merge"
    assert rows[applied_key(R)].entity["status"] == "rejected"
    assert sent(planned) == [(HOME, MessageKind.ACK, (), "rejected")]


# --- ACK (at home) --------------------------------------------------------------------------------
def decided_home() -> ExchangeBatch:
    committed = coordination(("h1", "-10.00"), ("v1", "5.00"), ("w1", "5.00"),
                             status="committed")
    assert committed.awaited_acks == (V, W)
    return batch(HOME, coordinations={R: committed})


def test_the_request_settles_once_every_ack_is_in() -> None:
    planned = decided_home()
    planned.handle(message(MessageKind.ACK, V, HOME, status="committed"))
    assert kinds(planned)[coord_key(R)] == "replace_any"
    assert planned.settled == []
    assert planned.coordinations[R].acks == (V,)
    planned.handle(message(MessageKind.ACK, W, HOME, status="committed"))
    rows = writes(planned)
    assert rows[coord_key(R)].kind == "delete", "an update then a delete: the delete"
    assert (rows[request_key(R)].kind, rows[request_key(R)].entity["settled"]) == ("merge", True)
    assert planned.settled == [R]
    assert R not in planned.coordinations
    assert money(planned) == {}
    assert planned.messages == []


def test_an_ack_sent_again_is_ignored() -> None:
    planned = decided_home()
    planned.handle(message(MessageKind.ACK, V, HOME, status="committed"))
    planned.handle(message(MessageKind.ACK, V, HOME, status="committed"))
    assert planned.coordinations[R].acks == (V,)
    assert request_key(R) not in writes(planned)
    assert planned.settled == []


def test_an_ack_before_the_decision_is_ignored() -> None:
    planned = batch(HOME, coordinations={R: coordination(("h1", "-1.00"), ("v1", "-1.00"),
                                                          ("w1", "2.00"))})
    ack = message(MessageKind.ACK, V, HOME, status="committed")
    planned.handle(ack)
    assert kinds(planned) == {ack.key: "delete"}


# --- the 100-operation bound --------------------------------------------------------------------
def test_fits_counts_the_fence_the_rows_and_the_accounts() -> None:
    planned = batch(HOME)
    assert planned.size == 1, "the fence"
    assert planned.fits(MAX_TRANSACTION_OPERATIONS - 1)
    assert not planned.fits(MAX_TRANSACTION_OPERATIONS)
    planned = batch(HOME, {"h1": row("h1", "100.00")})
    planned.coordinate(request(("h1", "-10.00"), ("v1", "-10.00"), ("w1", "20.00")))
    # coordinated, coord, escrow rows + one account + the fence
    assert planned.size == 1 + 3 + 1
    assert planned.fits(95)
    assert not planned.fits(96)


@pytest.mark.parametrize("legs", [
    (("h1", "-1.00"), ("v1", "1.00")),
    (("h1", "-1.00"), ("v1", "-1.00"), ("w1", "2.00")),
    (("v1", "-1.00"), ("h1", "0.50"), ("h2", "0.50")),
])
def test_coordinate_size_bounds_what_coordinating_adds(legs: tuple[tuple[str, str], ...]) -> None:
    planned = batch(HOME, {"h1": row("h1", "100.00"), "h2": row("h2", "0.00")})
    before = planned.size
    outcome = request(*legs)
    planned.coordinate(outcome)
    assert planned.size - before <= ExchangeBatch.coordinate_size(outcome.legs)


def test_message_size_bounds_what_handling_adds() -> None:
    accounts, escrows = home_after_coordinating()
    home = batch(HOME, accounts, coordinations={R: coordination(*TWO_VOTERS, votes={V: ""})},
                 escrows=escrows)
    vote = message(MessageKind.VOTE, W, HOME)
    bound = home.message_size(vote)
    home.handle(vote)
    assert home.size - 1 <= bound
    voter = batch(V, {"v1": row("v1", "30.00", reserved="20.00"), "v2": row("v2", "0.00")},
                  escrows={R: (Escrow(R, "v1", D("20.00")),)})
    decision = message(MessageKind.DECISION, HOME, V, ("v1", "-20.00"), ("v2", "20.00"),
                       status="committed")
    bound = voter.message_size(decision)
    voter.handle(decision)
    assert voter.size - 1 <= bound


def test_a_batch_filled_while_it_fits_never_passes_100_operations() -> None:
    accounts = {f"h{i}": row(f"h{i}", "10.00") for i in range(40)}
    planned = ExchangeBatch(HOME, "ledger", accounts, {}, {}, shard_of)
    taken = 0
    for i in range(40):
        outcome = Outcome(f"r{i}", OutcomeStatus.COMMITTED, "",
                          ((f"h{i}", D("-1.00")), ("v1", D("-1.00")), ("w1", D("2.00"))), 3, 3)
        if not planned.fits(planned.coordinate_size(outcome.legs)):
            break
        planned.coordinate(outcome)
        taken += 1
    assert 0 < taken < 40
    assert planned.size <= MAX_TRANSACTION_OPERATIONS
    assert planned.size == 1 + len(planned.extra_writes()) + len(planned.account_writes())


# --- writes on one row within a transaction -------------------------------------------------------
def test_a_row_made_and_deleted_in_one_transaction_is_not_written() -> None:
    planned = batch(HOME)
    planned._row("coord", R, {"RowKey": coord_key(R), "status": ""})
    planned._delete("coord", R, coord_key(R))
    assert writes(planned) == {}
    assert planned.size == 1


def test_a_row_made_then_replaced_is_one_create_of_the_last_version() -> None:
    planned = batch(HOME)
    planned._row("coord", R, {"RowKey": coord_key(R), "status": ""})
    planned._row("coord", R, {"RowKey": coord_key(R), "status": "committed"}, "replace_any")
    only = writes(planned)[coord_key(R)]
    assert (only.kind, only.entity["status"]) == ("create", "committed")
    assert planned.size == 2


def test_a_row_that_existed_replaced_then_deleted_is_deleted() -> None:
    planned = batch(HOME)
    planned._row("coord", R, {"RowKey": coord_key(R), "status": "x"}, "replace_any")
    planned._delete("coord", R, coord_key(R))
    assert kinds(planned) == {coord_key(R): "delete"}


def test_inbox_keys_name_the_request_the_kind_and_the_sender() -> None:
    assert inbox_key(R, MessageKind.VOTE, 2) == "flight:inbox:req-1|vote|2"
    assert message(MessageKind.VOTE, 2, HOME).key == inbox_key(R, MessageKind.VOTE, 2)
