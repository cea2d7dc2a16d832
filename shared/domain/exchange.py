"""Requests across shards: the rows, the messages and one fenced transaction's worth of work (pure).

A request whose legs touch accounts of other shards is decided by its **home shard** (the one
that recorded its steps) and applied by every shard that holds one of its accounts. It commits
all of its legs or none, exactly once, without a transaction manager:

1. **Coordinate** (home, once the request is complete by its steps). One fenced transaction
   creates the coordination row ``flight:coord:{R}``. The home's own debits are reserved in it
   (escrow rows, the money leaves ``balance`` for ``reserved``), or the request is rejected at
   once when they cannot be. When no other shard has a debit there is nothing to vote on: the
   same transaction writes the decision (the outcome row), applies the home's legs and records
   its applied marker. Otherwise it sends PREPARE to each shard with a debit (a *voter*).
2. **Vote** (voter). One fenced transaction reserves the voter's debits in escrow and records
   its vote (``vote:{R}``, create-once), or records a refusal (insufficient funds); it consumes
   the PREPARE and sends VOTE home.
3. **Decide** (home). The decision is the outcome row ``request:{R}`` in the home's partition,
   create-once, like every outcome: commit when every voter said yes, ``rejected`` at the first
   no. The same transaction applies (or releases) the home's own legs. DECISION goes to every
   other shard with a leg (commit) or with a reservation to release (a voter, on rejection).
4. **Apply** (participant). One fenced transaction lands the credits, consumes (commit) or
   refunds (rejection) the escrows, and creates the applied marker ``applied:{R}`` (create-once:
   a second DECISION changes nothing); it consumes the DECISION and sends ACK home.
5. **Settle** (home). When every participant acknowledged, the home deletes the coordination
   and marks the outcome ``settled``. Only then does the read API say ``committed`` or
   ``rejected``; until then ``committing``.

**Messages** are create-once rows in the *receiver's* partition, ``flight:inbox:{R}|{kind}|{from}``:
the sender writes no fenced row anywhere but in its own partition, and only the receiver's fenced
leader acts on (and deletes) them, in the same transaction as what they cause. A message sent
twice is the same row; a message acted on twice is refused by a create-once row (vote, outcome,
applied marker), after which the receiver sends its answer again. A request is decided once,
ever: the coordination creates the request's permanent claim ``claim:{R}`` too
(``shared/domain/planning.py``, "claims"). The home sends
again whatever a coordination still waits for once it has made no progress for
``RESEND_SECONDS``, so a message lost with a crashed sender is sent again.

Nothing here does I/O: ``ExchangeBatch`` turns items into the writes of one transaction of at
most 100 operations, and the messages to send once it landed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from shared.domain.model import AccountRow, Outcome, OutcomeStatus, bounded
from shared.domain.money import format_money, parse_balance
from shared.domain.planning import (
    MAX_TRANSACTION_OPERATIONS,
    Subject,
    Write,
    claim_entity,
    request_key,
)

FLIGHT_PREFIX = "flight:"
COORD_PREFIX = FLIGHT_PREFIX + "coord:"
ESCROW_PREFIX = FLIGHT_PREFIX + "escrow:"
INBOX_PREFIX = FLIGHT_PREFIX + "inbox:"
VOTE_PREFIX = "vote:"
APPLIED_PREFIX = "applied:"

SEPARATOR = "|"  # outside the identifier charset
RESEND_SECONDS = 5.0  # a coordination without progress this long has its messages sent again
ZERO = Decimal("0.00")
COMMITTING = "committing"  # what a request being coordinated or applied reads as
# Distinct accounts of one cross-shard request a shard can hold: each shard's transaction of it
# (the home's coordination and decision, a voter's reservation, a participant's apply) writes at
# most 2 rows per account (the account, its escrow) and 5 more, within 100 operations.
MAX_ACCOUNTS_PER_SHARD = (MAX_TRANSACTION_OPERATIONS - 5) // 2

Leg = tuple[str, Decimal]


class MessageKind(StrEnum):
    PREPARE = "prepare"  # home -> voter: reserve your debits and vote
    VOTE = "vote"  # voter -> home: yes (reserved) or no (why)
    DECISION = "decision"  # home -> participant: apply (committed) or release (rejected)
    ACK = "ack"  # participant -> home: applied or released


# The order a round handles a shard's messages in: decisions first, so that a rejection that
# overtook its PREPARE closes the vote before the PREPARE could reserve.
HANDLING_ORDER = (MessageKind.DECISION, MessageKind.ACK, MessageKind.VOTE, MessageKind.PREPARE)


def inbox_key(request_id: str, kind: MessageKind, sender: int) -> str:
    return f"{INBOX_PREFIX}{request_id}{SEPARATOR}{kind.value}{SEPARATOR}{sender}"


def coord_key(request_id: str) -> str:
    return COORD_PREFIX + request_id


def escrow_key(request_id: str, account_id: str) -> str:
    return f"{ESCROW_PREFIX}{request_id}{SEPARATOR}{account_id}"


def vote_key(request_id: str) -> str:
    return VOTE_PREFIX + request_id


def applied_key(request_id: str) -> str:
    return APPLIED_PREFIX + request_id


def _legs_json(legs: Iterable[Leg]) -> str:
    return json.dumps([[account, format_money(amount)] for account, amount in legs])


def _legs(text: Any) -> tuple[Leg, ...]:
    return tuple((str(a), parse_balance(m)) for a, m in json.loads(text or "[]"))


def net_by_account(legs: Iterable[Leg]) -> dict[str, Decimal]:
    """Each account's net amount over ``legs`` (a withdraw and an add on one account net out)."""
    net: dict[str, Decimal] = {}
    for account, amount in legs:
        net[account] = net.get(account, ZERO) + amount
    return {account: amount for account, amount in sorted(net.items()) if amount != 0}


def debits_of(legs: Iterable[Leg]) -> dict[str, Decimal]:
    """The money each account gives (positive amounts), net over the legs."""
    return {account: -amount for account, amount in net_by_account(legs).items() if amount < 0}


@dataclass(frozen=True)
class ShardMessage:
    """One message between shards: a create-once row in the receiver's partition."""

    kind: MessageKind
    request_id: str
    sender: int
    home: int
    legs: tuple[Leg, ...] = ()  # the receiver's legs (PREPARE, DECISION)
    yes: bool = True  # VOTE
    status: str = ""  # DECISION: committed or rejected
    reason: str = ""
    etag: str = ""  # the row's version as read (the receiver deletes that version only)

    @property
    def key(self) -> str:
        return inbox_key(self.request_id, self.kind, self.sender)

    def entity(self, partition: str) -> dict[str, Any]:
        return {"PartitionKey": partition, "RowKey": self.key, "kind": self.kind.value,
                "requestId": self.request_id, "sender": self.sender, "home": self.home,
                "legs": _legs_json(self.legs), "yes": self.yes, "status": self.status,
                "reason": bounded(self.reason)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any], etag: str = "") -> ShardMessage:
        return cls(MessageKind(str(row["kind"])), str(row["requestId"]), int(row["sender"]),
                   int(row["home"]), _legs(row.get("legs")), bool(row.get("yes", True)),
                   str(row.get("status") or ""), str(row.get("reason") or ""), etag)


@dataclass(frozen=True)
class Coordination:
    """The home's record of a request in flight between shards (``flight:coord:{R}``)."""

    request_id: str
    home: int
    legs: tuple[Leg, ...]  # every leg of the request
    remote: Mapping[int, tuple[Leg, ...]]  # the legs of each other shard
    voters: tuple[int, ...]  # other shards with a debit: they vote
    outcome: Outcome  # what the decision writes (its status is set when decided)
    votes: Mapping[int, str] = field(default_factory=dict)  # shard -> "" (yes) or why not
    acks: tuple[int, ...] = ()
    status: str = ""  # "" while the votes are out; then the outcome's status
    updated_at: datetime | None = None  # storage's Timestamp of the row, when read

    @property
    def decided(self) -> bool:
        return bool(self.status)

    @property
    def awaited_acks(self) -> tuple[int, ...]:
        """The shards that must apply or release the decision before the request is settled."""
        if self.status == OutcomeStatus.COMMITTED:
            return tuple(sorted(self.remote))
        return tuple(sorted(shard for shard in self.voters))

    @property
    def missing_votes(self) -> tuple[int, ...]:
        return tuple(shard for shard in self.voters if shard not in self.votes)

    def entity(self, partition: str) -> dict[str, Any]:
        outcome = self.outcome
        return {"PartitionKey": partition, "RowKey": coord_key(self.request_id),
                "home": self.home, "legs": _legs_json(self.legs),
                "remote": json.dumps({str(k): [[a, format_money(m)] for a, m in v]
                                      for k, v in sorted(self.remote.items())}),
                "voters": json.dumps(list(self.voters)),
                "votes": json.dumps({str(k): v for k, v in sorted(self.votes.items())}),
                "acks": json.dumps(list(self.acks)), "status": self.status,
                "operations": outcome.operations,
                "expectedOperations": outcome.expected_operations,
                "steps": json.dumps(dict(outcome.steps), separators=(",", ":"))}

    @classmethod
    def from_row(cls, row: Mapping[str, Any], updated_at: datetime | None = None) -> Coordination:
        request_id = str(row["RowKey"]).removeprefix(COORD_PREFIX)
        legs = _legs(row.get("legs"))
        remote = {int(k): tuple((a, parse_balance(m)) for a, m in v)
                  for k, v in json.loads(row.get("remote") or "{}").items()}
        outcome = Outcome(request_id, OutcomeStatus.COMMITTED, "", legs,
                          int(row.get("operations") or 0),
                          int(row.get("expectedOperations") or 0),
                          tuple(sorted(json.loads(row.get("steps") or "{}").items())),
                          shards=tuple(sorted(remote)))
        return cls(request_id, int(row["home"]), legs, remote,
                   tuple(json.loads(row.get("voters") or "[]")), outcome,
                   {int(k): v for k, v in json.loads(row.get("votes") or "{}").items()},
                   tuple(json.loads(row.get("acks") or "[]")), str(row.get("status") or ""),
                   updated_at)


@dataclass(frozen=True)
class Escrow:
    """Money a shard holds for a request in flight (``flight:escrow:{R}|{account}``)."""

    request_id: str
    account_id: str
    amount: Decimal  # positive: what left the balance

    def entity(self, partition: str, home: int) -> dict[str, Any]:
        return {"PartitionKey": partition, "RowKey": escrow_key(self.request_id, self.account_id),
                "requestId": self.request_id, "accountId": self.account_id,
                "amount": format_money(self.amount), "home": home}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Escrow:
        return cls(str(row["requestId"]), str(row["accountId"]), parse_balance(row["amount"]))


@dataclass(frozen=True)
class Flight:
    """A shard's work in flight, as one read of its partition found it."""

    coordinations: Mapping[str, Coordination] = field(default_factory=dict)
    inbox: tuple[ShardMessage, ...] = ()
    escrows: Mapping[str, tuple[Escrow, ...]] = field(default_factory=dict)  # by request


@dataclass
class ExchangeBatch:
    """The writes of one fenced transaction of cross-shard work on shard ``me``.

    Items are added one at a time (``coordinate``, ``handle``); each changes the working
    balances and coordinations the next item sees. ``fits`` says whether an item of ``size``
    operations still fits. After the transaction landed, ``messages`` are to be sent and
    ``outcomes`` were decided.
    """

    me: int
    partition: str
    accounts: Mapping[str, AccountRow]  # as read (every account the items touch)
    coordinations: dict[str, Coordination]
    escrows: Mapping[str, tuple[Escrow, ...]]
    home_of_account: Any  # account id -> shard (the shard map's)
    rows: dict[str, tuple[Subject, Write]] = field(default_factory=dict)
    working: dict[str, tuple[Decimal, Decimal]] = field(default_factory=dict)  # balance, reserved
    messages: list[tuple[int, ShardMessage]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    coordinated: list[str] = field(default_factory=list)  # requests whose steps are consumed
    handled: list[ShardMessage] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    closed: set[str] = field(default_factory=set)  # requests whose decision this batch applied

    # --- bookkeeping ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Operations so far: the fence, the outcomes, the rows, the accounts changed."""
        return 1 + len(self.outcomes) + len(self.rows) + len(self.working)

    def fits(self, upper_bound: int) -> bool:
        return self.size + upper_bound <= MAX_TRANSACTION_OPERATIONS

    def _holding(self, account: str) -> tuple[Decimal, Decimal]:
        if account in self.working:
            return self.working[account]
        row = self.accounts[account]
        return row.balance, row.reserved

    def _put(self, subject: Subject, write: Write) -> None:
        key = str(write.entity["RowKey"])
        earlier = self.rows.pop(key, None)
        if earlier is not None and earlier[1].kind == "create":
            if write.kind == "delete":
                return  # made and gone within one transaction: nothing to write
            write = Write("create", write.entity)
        self.rows[key] = (subject, write)

    def _row(self, kind: str, request_id: str, entity: dict[str, Any],
             write: str = "create") -> None:
        self._put((kind, request_id), Write(write, {"PartitionKey": self.partition, **entity}))  # type: ignore[arg-type]

    def _delete(self, kind: str, request_id: str, row_key: str, etag: str | None = None) -> None:
        self._put((kind, request_id),
                  Write("delete", {"PartitionKey": self.partition, "RowKey": row_key}, etag))

    def _send(self, shard: int, message: ShardMessage) -> None:
        self.messages.append((shard, message))

    def _change(self, account: str, balance: Decimal, reserved: Decimal) -> None:
        self.working[account] = (balance, reserved)

    def _short(self, debits: Mapping[str, Decimal]) -> str:
        """Why ``debits`` cannot be taken from the balances (``""`` when they can)."""
        for account, amount in debits.items():
            balance, _ = self._holding(account)
            if balance - amount < 0:
                return (f"insufficient funds: account {account} would go to "
                        f"{format_money(balance - amount)}")
        return ""

    def _reserve(self, request_id: str, debits: Mapping[str, Decimal], home: int) -> str:
        """Move ``debits`` from balance to reserved, with an escrow row each; or say why not."""
        if why := self._short(debits):
            return why
        for account, amount in debits.items():
            balance, reserved = self._holding(account)
            self._change(account, balance - amount, reserved + amount)
            self._row("escrow", request_id,
                      Escrow(request_id, account, amount).entity(self.partition, home))
        return ""

    def _release(self, request_id: str, consume: bool) -> None:
        """This shard's escrows of the request: consumed (committed) or refunded (rejected)."""
        for escrow in self.escrows.get(request_id, ()):
            balance, reserved = self._holding(escrow.account_id)
            refund = ZERO if consume else escrow.amount
            self._change(escrow.account_id, balance + refund, reserved - escrow.amount)
            self._delete("escrow", request_id, escrow_key(request_id, escrow.account_id))

    def _credit(self, legs: Iterable[Leg]) -> None:
        for account, amount in net_by_account(legs).items():
            if amount > 0:
                balance, reserved = self._holding(account)
                self._change(account, balance + amount, reserved)

    def _debit_now(self, legs: Iterable[Leg]) -> str:
        """Apply the legs' debits directly (a decision made in this very transaction)."""
        debits = debits_of(legs)
        if why := self._short(debits):
            return why
        for account, amount in debits.items():
            balance, reserved = self._holding(account)
            self._change(account, balance - amount, reserved)
        return ""

    def _applied(self, request_id: str, status: str, home: int, legs: Iterable[Leg]) -> None:
        self._row("applied", request_id, {"RowKey": applied_key(request_id), "status": status,
                                          "home": home, "legs": _legs_json(legs)})

    # --- the home shard ------------------------------------------------------------------------
    @staticmethod
    def coordinate_size(legs: tuple[Leg, ...]) -> int:
        return 5 + 2 * len(legs)

    def coordinate(self, outcome: Outcome) -> Outcome | None:
        """Start (or, with no remote debit, finish) the cross-shard commit of a complete request.

        Returns the outcome when it was decided in this transaction (rejected for the home's own
        funds, or committed because no other shard has a debit), ``None`` while votes are out.
        """
        request_id = outcome.request_id
        by_shard: dict[int, list[Leg]] = {}
        for account, amount in outcome.legs:
            by_shard.setdefault(self.home_of_account(account), []).append((account, amount))
        crowded = [shard for shard, legs in by_shard.items()
                   if len({account for account, _ in legs}) > MAX_ACCOUNTS_PER_SHARD]
        local = tuple(by_shard.pop(self.me, ()))
        remote = {shard: tuple(legs) for shard, legs in sorted(by_shard.items())}
        voters = tuple(shard for shard, legs in remote.items() if debits_of(legs))
        outcome = replace(outcome, shards=tuple(sorted(remote)))
        self.coordinated.append(request_id)
        # Create-once and kept: the same request coordinated again (its steps sent anew after
        # it settled) is refused here, before it could reserve anything a second time.
        self._row("claim", request_id, claim_entity(request_id, self.me))
        if crowded:
            return self._decide_alone(replace(
                outcome, status=OutcomeStatus.REJECTED, legs=(), shards=(),
                reason=f"more than {MAX_ACCOUNTS_PER_SHARD} of its accounts live on shard "
                       f"{crowded[0]}: its part there would not fit one transaction"))
        if not voters:  # nothing to vote on: decide now
            why = self._debit_now(local)
            if why:
                return self._decide_alone(replace(outcome, status=OutcomeStatus.REJECTED,
                                                  reason=why, legs=(), shards=()))
            self._credit(local)
            coordination = Coordination(request_id, self.me, outcome.legs, remote, voters,
                                        outcome, status=OutcomeStatus.COMMITTED)
            outcome = replace(outcome, shards=coordination.awaited_acks)
            self.outcomes.append(outcome)
            if local:
                self._applied(request_id, OutcomeStatus.COMMITTED, self.me, local)
            self._row("coord", request_id, coordination.entity(self.partition))
            self.coordinations[request_id] = coordination
            for shard, legs in remote.items():
                self._send(shard, ShardMessage(MessageKind.DECISION, request_id, self.me, self.me,
                                               legs, status=OutcomeStatus.COMMITTED))
            return outcome
        why = self._reserve(request_id, debits_of(local), self.me)
        if why:
            return self._decide_alone(replace(outcome, status=OutcomeStatus.REJECTED,
                                              reason=why, legs=(), shards=()))
        coordination = Coordination(request_id, self.me, outcome.legs, remote, voters, outcome)
        self._row("coord", request_id, coordination.entity(self.partition))
        self.coordinations[request_id] = coordination
        for shard in voters:
            self._send(shard, ShardMessage(MessageKind.PREPARE, request_id, self.me, self.me,
                                           remote[shard]))
        return None

    def _decide_alone(self, outcome: Outcome) -> Outcome:
        """A decision that needs no other shard (nothing was reserved anywhere)."""
        self.outcomes.append(outcome)
        return outcome

    def resend(self, coordination: Coordination) -> None:
        """Send again what ``coordination`` still waits for (no write: the rows are as they are)."""
        request_id, me = coordination.request_id, self.me
        if not coordination.decided:
            for shard in coordination.missing_votes:
                self._send(shard, ShardMessage(MessageKind.PREPARE, request_id, me, me,
                                               coordination.remote[shard]))
            return
        for shard in coordination.awaited_acks:
            if shard not in coordination.acks:
                self._send(shard, self._decision(coordination, shard))

    def _decision(self, coordination: Coordination, shard: int) -> ShardMessage:
        return ShardMessage(MessageKind.DECISION, coordination.request_id, self.me, self.me,
                            coordination.remote.get(shard, ()), status=coordination.status,
                            reason=coordination.outcome.reason)

    # --- messages ------------------------------------------------------------------------------
    def message_size(self, message: ShardMessage) -> int:
        """At most how many operations handling ``message`` adds."""
        coordination = self.coordinations.get(message.request_id)
        legs = len(message.legs) + (len(coordination.legs) if coordination else 0)
        return 6 + 2 * legs + len(self.escrows.get(message.request_id, ()))

    def consume(self, message: ShardMessage) -> None:
        """Delete a message already acted on (its create-once row exists): no other effect."""
        self._delete("inbox", message.request_id, message.key, message.etag or None)
        self.handled.append(message)

    def handle(self, message: ShardMessage) -> None:
        """Act on one message of this shard's inbox (and consume it in the same transaction)."""
        {MessageKind.PREPARE: self._on_prepare, MessageKind.VOTE: self._on_vote,
         MessageKind.DECISION: self._on_decision, MessageKind.ACK: self._on_ack}[message.kind](
            message)
        self._delete("inbox", message.request_id, message.key, message.etag or None)
        self.handled.append(message)

    def _on_prepare(self, message: ShardMessage) -> None:
        if message.request_id in self.closed:  # its rejection came first: never reserve
            return
        why = self._reserve(message.request_id, debits_of(message.legs), message.home)
        self._row("vote", message.request_id, {
            "RowKey": vote_key(message.request_id), "vote": "no" if why else "yes",
            "reason": why, "home": message.home, "legs": _legs_json(message.legs)})
        self._send(message.home, ShardMessage(MessageKind.VOTE, message.request_id, self.me,
                                              message.home, yes=not why, reason=why))

    def _on_vote(self, message: ShardMessage) -> None:
        coordination = self.coordinations.get(message.request_id)
        if coordination is None or coordination.decided or message.sender in coordination.votes:
            return  # a vote sent again, for a decision already made: nothing to do
        votes = {**coordination.votes, message.sender: "" if message.yes else
                 (message.reason or "refused")}
        coordination = replace(coordination, votes=votes)
        refusals = [why for why in votes.values() if why]
        if refusals:
            self._decide(coordination, OutcomeStatus.REJECTED, refusals[0])
        elif not coordination.missing_votes:
            self._decide(coordination, OutcomeStatus.COMMITTED, "")
        else:
            self._row("coord", message.request_id, coordination.entity(self.partition),
                      "replace_any")
            self.coordinations[message.request_id] = coordination

    def _decide(self, coordination: Coordination, status: OutcomeStatus, reason: str) -> None:
        request_id = coordination.request_id
        committed = status is OutcomeStatus.COMMITTED
        coordination = replace(coordination, status=status.value)
        outcome = replace(coordination.outcome, status=status, reason=reason,
                          legs=coordination.legs if committed else (),
                          shards=coordination.awaited_acks)
        coordination = replace(coordination, outcome=outcome)
        self.outcomes.append(outcome)
        local = tuple(leg for leg in coordination.legs
                      if self.home_of_account(leg[0]) == self.me)
        self._release(request_id, consume=committed)
        if committed:
            self._credit(local)
        if local:
            self._applied(request_id, status.value, self.me, local if committed else ())
        awaited = coordination.awaited_acks
        if awaited:
            self._row("coord", request_id, coordination.entity(self.partition), "replace_any")
            self.coordinations[request_id] = coordination
            for shard in awaited:
                self._send(shard, self._decision(coordination, shard))
        else:
            self._delete("coord", request_id, coord_key(request_id))
            self.coordinations.pop(request_id, None)
            self.settled.append(request_id)

    def _on_decision(self, message: ShardMessage) -> None:
        request_id = message.request_id
        self.closed.add(request_id)
        committed = message.status == OutcomeStatus.COMMITTED
        self._release(request_id, consume=committed)
        if committed:
            self._credit(message.legs)
        else:  # a refusal that overtook its PREPARE: close the vote, so it never reserves
            self._row("vote", request_id, {"RowKey": vote_key(request_id), "closed": True},
                      "upsert_merge")
        self._applied(request_id, message.status, message.home,
                      message.legs if committed else ())
        self._send(message.home, ShardMessage(MessageKind.ACK, request_id, self.me,
                                              message.home, status=message.status))

    def _on_ack(self, message: ShardMessage) -> None:
        request_id = message.request_id
        coordination = self.coordinations.get(request_id)
        if coordination is None or not coordination.decided or \
                message.sender in coordination.acks:
            return
        coordination = replace(coordination, acks=tuple(sorted({*coordination.acks,
                                                                 message.sender})))
        if set(coordination.awaited_acks) <= set(coordination.acks):
            self._delete("coord", request_id, coord_key(request_id))
            self._row("request", request_id, {"RowKey": request_key(request_id),
                                              "settled": True}, "merge")
            self.coordinations.pop(request_id, None)
            self.settled.append(request_id)
        else:
            self._row("coord", request_id, coordination.entity(self.partition), "replace_any")
            self.coordinations[request_id] = coordination

    # --- the transaction -----------------------------------------------------------------------
    def account_writes(self) -> dict[str, tuple[AccountRow, Decimal, Decimal]]:
        """Every account changed: (the row as read, its new balance, its new reserved)."""
        return {account: (self.accounts[account], balance, reserved)
                for account, (balance, reserved) in sorted(self.working.items())}

    def extra_writes(self) -> list[tuple[Subject, Write]]:
        return list(self.rows.values())

    def __bool__(self) -> bool:
        return bool(self.rows or self.working or self.outcomes or self.messages)
