"""A term's cross-shard work: coordinate complete requests, act on the inbox, send again.

``Exchange.run`` takes one round's cross-shard requests (complete, with legs on other shards)
and the shard's messages, and commits them in fenced transactions of at most 100 operations
(``shared.domain.exchange.ExchangeBatch`` plans each), then sends the messages they caused.
The protocol and its guarantees are in ``shared/domain/exchange.py``; the crash table in
docs/design.md, section 5.

A refusal names one row; the exchange then drops the item that wrote it and plans again:

- a vote or applied marker that exists: the message was acted on before; the answer it gave
  is sent again and the message is consumed;
- a coordination (or outcome) that exists: the request's steps are late; they are settled
  against its outcome like any late step;
- a message that changed or went: it is left for the next round;
- an account that changed: it is read again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.domain.exchange import (
    COMMITTING,
    HANDLING_ORDER,
    RESEND_SECONDS,
    Coordination,
    ExchangeBatch,
    MessageKind,
    ShardMessage,
    applied_key,
    vote_key,
)
from shared.domain.model import AccountRow, Fence, Outcome, OutcomeStatus
from shared.domain.planning import (
    AccountChanged,
    AlreadyRecorded,
    ClaimedElsewhere,
    InboxGone,
    LedgerWriteError,
    OutcomeExists,
)
from shared.domain.rules import Assessment
from shared.election.elector import HeldLease
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import Publisher
from shared.leadership.report import TermReport
from shared.leadership.view import ReadyRequest, ReadyRound
from shared.storage.completions import Tombstone
from shared.storage.ledger import CommitResult


class Term(Protocol):
    """What the exchange needs of the term it works in (``shared.leadership.term.LeaderTerm``)."""

    app: LedgerApp
    lease: HeldLease
    fence: Fence
    balances: dict[str, AccountRow]
    report: TermReport
    outbox: Publisher

    def read_accounts(self, accounts: Iterable[str]) -> None: ...

    def landed(self, result: CommitResult) -> None: ...

    def settle_against(self, request: ReadyRequest, home: int) -> None: ...

logger = logging.getLogger(__name__)

MAX_REFUSALS = 200  # refusals one exchange settles before it gives the rest to the next round


@dataclass(frozen=True)
class Item:
    """One thing to do in a transaction: coordinate a request, or act on (or consume) a message."""

    request: ReadyRequest | None = None
    message: ShardMessage | None = None
    consume_only: bool = False

    @property
    def request_id(self) -> str:
        if self.request is not None:
            return self.request.request_id
        assert self.message is not None
        return self.message.request_id


class Exchange:
    """One round's cross-shard work for ``term``'s shard."""

    def __init__(self, term: Term, ready: ReadyRound) -> None:
        self.term = term
        self.app = term.app
        self.ready = ready
        self.coordinations: dict[str, Coordination] = dict(ready.flight.coordinations)

    def run(self, cross: Sequence[ReadyRequest]) -> bool:
        """Commit the round's cross-shard work; True when none of it was left for later."""
        order = {kind: i for i, kind in enumerate(HANDLING_ORDER)}
        messages = sorted(self.ready.flight.inbox,
                          key=lambda m: (order[m.kind], m.request_id, m.sender))
        items = [Item(message=m) for m in messages] + [Item(request=r) for r in cross]
        self._resend(self.ready.resend)
        return self._commit_all(items)

    # --- reads ---------------------------------------------------------------------------------
    def _accounts_of(self, item: Item) -> set[str]:
        me, shard_of = self.app.current, self.app.shard_map.account_shard
        if item.request is not None:
            return {a for a, _ in item.request.assessment.legs if shard_of(a) == me}
        assert item.message is not None
        message = item.message
        found = {a for a, _ in message.legs}
        found |= {e.account_id for e in self.ready.flight.escrows.get(message.request_id, ())}
        coordination = self.coordinations.get(message.request_id)
        if coordination is not None:
            found |= {a for a, _ in coordination.legs if shard_of(a) == me}
        return found

    # --- transactions --------------------------------------------------------------------------
    def _commit_all(self, items: list[Item]) -> bool:
        term = self.term
        pending = list(items)
        refusals = 0
        while pending:
            term.lease.ensure_can_start(self.app.config.storage_timeout_seconds)
            term.read_accounts(set().union(*(self._accounts_of(i) for i in pending)))
            readable = [i for i in pending if self._accounts_of(i) <= term.balances.keys()]
            if not readable:
                return False  # storage too slow to read them: the next round tries again
            batch, taken = self._plan(readable)
            if not batch:
                pending = [i for i in pending if i not in taken]
                continue
            if batch.coordinated or batch.coordinations:
                # Before the write: a transaction that lands while its answer is lost (an
                # error here) still leaves coordinations in flight, and the timer must be armed.
                self.app.shard.in_flight = True
            try:
                written = self._write(batch)
            except AccountChanged as exc:
                term.balances.pop(exc.account_id, None)
            except AlreadyRecorded as exc:
                pending = self._already_recorded(pending, taken, exc)
            except OutcomeExists as exc:
                pending = self._outcome_exists(pending, taken, exc.request_id)
            except ClaimedElsewhere as exc:
                pending = self._outcome_exists(pending, taken, exc.request_id)
            except InboxGone as exc:
                pending = [i for i in pending
                           if not (i.message is not None and i.request_id == exc.request_id)]
            else:
                self._landed(batch, taken, written)
                pending = [i for i in pending if i not in taken]
                continue
            refusals += 1
            if refusals > MAX_REFUSALS:
                raise LedgerWriteError(f"cross-shard work of shard {self.app.current} was "
                                       f"refused {refusals} times in one round; the term stops")
        return True

    def _plan(self, items: Sequence[Item]) -> tuple[ExchangeBatch, list[Item]]:
        app = self.app
        batch = ExchangeBatch(app.current, app.ledger.partition, self.term.balances,
                              dict(self.coordinations), self.ready.flight.escrows,
                              app.shard_map.account_shard)
        taken: list[Item] = []
        for item in items:
            if item.request is not None:
                size = batch.coordinate_size(item.request.assessment.legs)
            else:
                assert item.message is not None
                size = batch.message_size(item.message)
            if taken and not batch.fits(size + self.term.outbox.operations):
                break
            taken.append(item)
            if item.request is not None:
                batch.coordinate(committed_outcome(item.request.assessment))
            elif item.consume_only:
                assert item.message is not None
                batch.consume(item.message)
            else:
                assert item.message is not None
                batch.handle(item.message)
        return batch, taken

    def _write(self, batch: ExchangeBatch) -> CommitResult:
        term = self.term
        accounts = batch.account_writes()
        now = term.app.clock.now()
        return term.app.ledger.commit(
            term.fence, batch.outcomes,
            {a: (row, balance) for a, (row, balance, _) in accounts.items()},
            now, extra=batch.extra_writes() + term.outbox.stage_exchange(batch, term.fence, now),
            reserved={a: held for a, (_, _, held) in accounts.items()})

    def _landed(self, batch: ExchangeBatch, taken: Sequence[Item], written: CommitResult) -> None:
        term, app = self.term, self.app
        term.landed(written)
        self.coordinations = batch.coordinations
        for outcome in batch.outcomes:
            term.report.outcomes[outcome.status] += 1
        for message in batch.handled:
            term.report.messages[message.kind.value] += 1
        decided = {o.request_id: o.status.value for o in batch.outcomes}
        requests = [i.request for i in taken if i.request is not None]
        app.recently_decided.add(r.request_id for r in requests)
        app.cleaner.delete((ref for r in requests for ref in r.consumed),
                           [Tombstone(r.request_id, decided.get(r.request_id, COMMITTING))
                            for r in requests])
        self._send(batch.messages)

    # --- refusals ------------------------------------------------------------------------------
    def _already_recorded(self, pending: list[Item], taken: Sequence[Item],
                          exc: AlreadyRecorded) -> list[Item]:
        """The item that wrote ``exc``'s row was acted on before: answer again, consume it."""
        culprit = next((i for i in taken if i.request_id == exc.request_id and
                        self._writes(i, exc.kind)), None)
        if culprit is None:
            raise LedgerWriteError(f"the {exc.kind} row of {exc.request_id} exists, and no "
                                   "item of the transaction wrote it") from exc
        if culprit.request is not None:  # coordinated before: its steps are late
            return self._outcome_exists(pending, taken, culprit.request_id)
        message = culprit.message
        assert message is not None
        self._answer_again(message)
        return [Item(message=message, consume_only=True) if i is culprit else i
                for i in pending]

    @staticmethod
    def _writes(item: Item, kind: str) -> bool:
        if item.request is not None:
            return kind in ("coord", "claim", "applied", "escrow")
        assert item.message is not None
        # A voter's escrow rows come before its vote row: a PREPARE acted on before is refused
        # at whichever of them storage names.
        creates = {MessageKind.PREPARE: ("vote", "escrow"), MessageKind.DECISION: ("applied",),
                   MessageKind.VOTE: ("applied",), MessageKind.ACK: ()}
        return not item.consume_only and kind in creates[item.message.kind]

    def _answer_again(self, message: ShardMessage) -> None:
        """Send again the answer the shard gave ``message`` the first time."""
        ledger, me = self.app.ledger, self.app.current
        if message.kind is MessageKind.PREPARE:
            vote = ledger.read_row(vote_key(message.request_id))
            yes = vote is not None and vote.get("vote") == "yes"
            reason = "" if yes or vote is None else str(vote.get("reason") or "")
            reason = reason if yes else (reason or "the vote was closed")
            self._send([(message.home, ShardMessage(MessageKind.VOTE, message.request_id, me,
                                                    message.home, yes=yes, reason=reason))])
        elif message.kind is MessageKind.DECISION:
            applied = ledger.read_row(applied_key(message.request_id))
            status = str((applied.get("status") if applied is not None else "")
                         or message.status)
            self._send([(message.home, ShardMessage(MessageKind.ACK, message.request_id, me,
                                                    message.home, status=status))])

    def _outcome_exists(self, pending: list[Item], taken: Sequence[Item],
                        request_id: str) -> list[Item]:
        """A request coordinated (or decided) before: its steps are settled as late ones."""
        culprits = [i for i in taken if i.request is not None and i.request_id == request_id]
        if not culprits:
            raise LedgerWriteError(f"request {request_id} already has an outcome, and no "
                                   "request of the transaction writes one")
        home = self.app.ledger.claimed_by(request_id)
        home = self.app.current if home is None else home
        for item in culprits:
            assert item.request is not None
            self.term.settle_against(item.request, home)
        return [i for i in pending if i not in culprits]

    # --- messages ------------------------------------------------------------------------------
    def _resend(self, coordinations: Sequence[Coordination]) -> None:
        if not coordinations:
            return
        app = self.app
        batch = ExchangeBatch(app.current, app.ledger.partition, {}, {}, {},
                              app.shard_map.account_shard)
        now = app.clock.monotonic()
        for coordination in coordinations:
            batch.resend(coordination)
            app.shard.resent[coordination.request_id] = now
        logger.info("shard %d sends again the messages of %d coordination(s) without progress",
                    app.current, len(coordinations))
        self._send(batch.messages)

    def _send(self, messages: Sequence[tuple[int, ShardMessage]]) -> None:
        """Deliver messages to the other shards' inboxes (create-once rows), by shard."""
        by_shard: dict[int, list[ShardMessage]] = defaultdict(list)
        for shard, message in messages:
            by_shard[shard].append(message)
        for shard, found in sorted(by_shard.items()):
            try:
                deliver(self.app.on(shard), found)
            except StorageError as exc:  # what the transaction decided stands; sent again later
                logger.warning("could not send %d message(s) to shard %d (%s); the home sends "
                               "them again after %g s without progress", len(found), shard,
                               type(exc).__name__, RESEND_SECONDS)
                continue
            self.term.report.messaged.add(shard)


def deliver(receiver: LedgerApp, messages: Sequence[ShardMessage]) -> None:
    """Put ``messages`` in ``receiver``'s shard's inbox, then raise its mail flag."""
    receiver.ledger.deliver(messages)
    receiver.completions.raise_mail_flag()


def committed_outcome(assessment: Assessment) -> Outcome:
    """The outcome a complete request commits with (its decision may still reject it)."""
    return Outcome(assessment.request_id, OutcomeStatus.COMMITTED, "", assessment.legs,
                   assessment.operations, assessment.expected_operations,
                   assessment.step_contents)
