"""Reconciliation of a sharded ledger from its rows (pure): findings, per-shard totals, the report.

``ShardTally`` is fed the rows of one shard's ledger partition as a paged read streams them
(``account:``, ``flight:``, ``request:``, ``applied:`` and the retention carry row
``archive:totals``), keeps only what the checks need (never every account), and says what it
found. ``Reconciliation`` gathers the tallies of every shard into the report.

**What is checked, and why it holds on a healthy ledger** (``shared/domain/exchange.py`` for the
rows):

- *No negative balance, no negative reserved* (an error whenever seen: no transaction writes one).
- *Nothing in flight too long*: every ``flight:`` row (a coordination, i.e. a request undecided
  or decided and not settled; an escrow; a message) whose storage ``Timestamp`` is older than
  ``RECONCILE_MAX_FLIGHT_SECONDS``. A coordination exists from before the first escrow until the
  request is settled, so an unsettled outcome always has one: checking ``flight:`` rows covers
  unsettled requests without scanning every outcome. A coordination's Timestamp is its last
  progress (a vote or an ack rewrites it); escrows and messages are written once.
- *Escrow rows sum to the accounts' reserved*: per account of the shard.
- *Totals add up*, per shard: ``sum(balance + reserved)`` of the shard's accounts equals the net
  of the committed legs that **this partition's rows say were applied here**: the legs of each
  committed outcome that crossed no shard (its row has no ``shards``: the outcome's own
  transaction applied them) plus the legs of each committed ``applied:`` marker (a cross-shard
  request's legs on that shard, applied with the marker), plus ``archivedNet`` of the carry row
  (what the retention step deleted of both, added in the same transaction as its deletes),
  plus the ``movedNet`` of each reshard's ``archive:reshard:{generation}`` row (balances its
  moves brought into the shard minus those they took out: history is never moved). Money
  in escrow is still counted (it left ``balance`` for ``reserved``) until its shard applies the
  decision, exactly when the marker starts counting the debit: so the equality holds at every
  commit, in flight or not. Across shards the grand totals must agree too; when only the shard
  totals disagree and the grand total agrees, accounts moved between shards (a reshard) and it is
  a warning, not an error.

The per-shard equality is judged only on a *stable* read: the fence row's ETag was the same
before and after the shard was read (every fenced commit changes it), and the carry row too.
A shard that kept changing is reported ``verified: false`` (info), never as a problem.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from shared.domain.exchange import (
    APPLIED_PREFIX,
    COORD_PREFIX,
    ESCROW_PREFIX,
    INBOX_PREFIX,
)
from shared.domain.money import MoneyError, format_money, parse_balance
from shared.domain.planning import ACCOUNT_PREFIX, REQUEST_PREFIX

ZERO = Decimal("0.00")
CARRY_ROW = "archive:totals"  # the retention step's running total of what it deleted
ARCHIVED_NET = "archivedNet"  # the carry row's money property: the net of deleted legs
MOVED_PREFIX = "archive:reshard:"  # one row per reshard generation: money moved in or out
MOVED_NET = "movedNet"  # its money property: balances moved in minus balances moved out
COMMITTED = "committed"


class Severity(StrEnum):
    ERROR = "error"  # money or the protocol is wrong: the alert fires
    WARNING = "warning"  # stuck or suspicious: the alert fires too
    INFO = "info"  # could not be judged (a shard that kept changing, a read cut short)


PROBLEMS = (Severity.ERROR, Severity.WARNING)  # what makes a report fail


@dataclass(frozen=True)
class Finding:
    """One thing reconciliation found: how bad, where (shard, row key), what."""

    severity: Severity
    kind: str  # a stable code: negative-balance, stale-flight, reserved-mismatch, shard-total...
    shard: int | None
    row: str
    what: str

    def view(self) -> dict[str, Any]:
        return {"severity": self.severity.value, "kind": self.kind, "shard": self.shard,
                "row": self.row, "what": self.what}


def money(value: Any) -> Decimal:
    """A stored money property (a string); a float or garbage raises ``MoneyError``."""
    if isinstance(value, float):
        raise MoneyError(f"money stored as a float: {value!r}")
    return parse_balance(str(value if value not in (None, "") else "0.00"))


def legs_net(text: Any) -> Decimal:
    """The net of a ``legs`` property (a JSON list of ``[account, amount]``)."""
    return sum((money(amount) for _, amount in json.loads(text or "[]")), ZERO)


def applied_here(row: Mapping[str, Any]) -> Decimal:
    """What a committed outcome or ``applied:`` row contributes to its own partition's money."""
    key = str(row.get("RowKey", ""))
    if str(row.get("status")) != COMMITTED:
        return ZERO
    if key.startswith(REQUEST_PREFIX):
        # A cross-shard outcome's legs are counted by its applied markers (home's included).
        return ZERO if json.loads(row.get("shards") or "[]") else legs_net(row.get("legs"))
    if key.startswith(APPLIED_PREFIX):
        return legs_net(row.get("legs"))
    return ZERO


@dataclass
class ShardTotals:
    """One shard's sums as read."""

    shard: int
    accounts: int = 0
    balance: Decimal = ZERO
    reserved: Decimal = ZERO
    escrow: Decimal = ZERO
    committed_net: Decimal = ZERO  # live rows' applied legs
    archived_net: Decimal = ZERO  # the carry row
    moved_net: Decimal = ZERO  # reshards: balances moved in minus moved out (their history stays)
    outcomes: int = 0
    markers: int = 0
    in_flight: int = 0
    oldest_flight_seconds: float = 0.0
    verified: bool = True  # read while nothing changed: the equality was judged
    truncated: bool = False  # a read stopped at its bound: totals not judged

    @property
    def total(self) -> Decimal:
        return self.balance + self.reserved

    @property
    def expected(self) -> Decimal:
        return self.committed_net + self.archived_net + self.moved_net

    def view(self) -> dict[str, Any]:
        return {"shard": self.shard, "accounts": self.accounts,
                "balance": format_money(self.balance), "reserved": format_money(self.reserved),
                "total": format_money(self.total), "escrow": format_money(self.escrow),
                "committedNet": format_money(self.committed_net),
                "archivedNet": format_money(self.archived_net),
                "movedNet": format_money(self.moved_net),
                "expected": format_money(self.expected), "outcomes": self.outcomes,
                "appliedMarkers": self.markers, "inFlight": self.in_flight,
                "oldestInFlightSeconds": round(self.oldest_flight_seconds, 1),
                "verified": self.verified, "truncated": self.truncated}


@dataclass
class ShardTally:
    """The checks of one shard, fed row by row (see the module docstring)."""

    shard: int
    now: datetime  # storage's time of the read
    max_flight_seconds: float
    totals: ShardTotals = field(init=False)
    findings: list[Finding] = field(default_factory=list)
    reserved_of: dict[str, Decimal] = field(default_factory=dict)  # accounts with reserved != 0
    escrow_of: dict[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.totals = ShardTotals(self.shard)

    def _find(self, severity: Severity, kind: str, row: str, what: str) -> None:
        self.findings.append(Finding(severity, kind, self.shard, row, what))

    def _money(self, row: Mapping[str, Any], name: str) -> Decimal | None:
        try:
            return money(row.get(name))
        except (MoneyError, ValueError) as exc:
            self._find(Severity.ERROR, "bad-row", str(row.get("RowKey")), f"{name}: {exc}")
            return None

    def account(self, row: Mapping[str, Any]) -> None:
        key = str(row["RowKey"])
        account = key.removeprefix(ACCOUNT_PREFIX)
        balance, reserved = self._money(row, "balance"), self._money(row, "reserved")
        if balance is None or reserved is None:
            return
        self.totals.accounts += 1
        self.totals.balance += balance
        self.totals.reserved += reserved
        if balance < 0:
            self._find(Severity.ERROR, "negative-balance", key,
                       f"account {account} has a negative balance {format_money(balance)}")
        if reserved < 0:
            self._find(Severity.ERROR, "negative-reserved", key,
                       f"account {account} has negative reserved {format_money(reserved)}")
        if reserved != 0:
            self.reserved_of[account] = reserved

    def flight(self, row: Mapping[str, Any], stamp: datetime | None) -> None:
        key = str(row["RowKey"])
        self.totals.in_flight += 1
        age = max(0.0, (self.now - stamp).total_seconds()) if stamp is not None else 0.0
        self.totals.oldest_flight_seconds = max(self.totals.oldest_flight_seconds, age)
        if key.startswith(ESCROW_PREFIX):
            amount = self._money(row, "amount")
            if amount is not None:
                account = str(row.get("accountId") or key.rsplit("|", 1)[-1])
                self.escrow_of[account] = self.escrow_of.get(account, ZERO) + amount
                self.totals.escrow += amount
        if age > self.max_flight_seconds:
            what = ("escrow" if key.startswith(ESCROW_PREFIX) else
                    "message" if key.startswith(INBOX_PREFIX) else
                    "coordination (undecided or unsettled request)"
                    if key.startswith(COORD_PREFIX) else "in-flight row")
            self._find(Severity.WARNING, "stale-flight", key,
                       f"{what} {key} unchanged for {age:.0f} s (threshold "
                       f"{self.max_flight_seconds:g} s)")

    def outcome(self, row: Mapping[str, Any]) -> None:
        self.totals.outcomes += 1
        self._applied(row)

    def marker(self, row: Mapping[str, Any]) -> None:
        self.totals.markers += 1
        self._applied(row)

    def _applied(self, row: Mapping[str, Any]) -> None:
        try:
            self.totals.committed_net += applied_here(row)
        except (MoneyError, ValueError, TypeError) as exc:
            self._find(Severity.ERROR, "bad-row", str(row.get("RowKey")), f"legs: {exc}")

    def carry(self, row: Mapping[str, Any] | None) -> None:
        if row is not None:
            self.totals.archived_net = self._money(row, ARCHIVED_NET) or ZERO

    def moved(self, row: Mapping[str, Any]) -> None:
        """A reshard's row: the money its accounts' moves brought in (or took out) of this
        shard, whose history (outcomes, applied markers) stayed where it was written."""
        self.totals.moved_net += self._money(row, MOVED_NET) or ZERO

    def finish(self, verified: bool, truncated: bool) -> None:
        """Judge what needs a whole, stable read: reserved against escrows, the totals."""
        self.totals.verified, self.totals.truncated = verified, truncated
        if truncated:
            self._find(Severity.INFO, "truncated", "",
                       "a read stopped at its bound: totals and reserved not judged")
            return
        if not verified:
            self._find(Severity.INFO, "unverified", "",
                       "the shard kept changing while it was read: totals and reserved not "
                       "judged this time")
            return
        for account in sorted(set(self.reserved_of) | set(self.escrow_of)):
            reserved = self.reserved_of.get(account, ZERO)
            held = self.escrow_of.get(account, ZERO)
            if reserved != held:
                self._find(Severity.ERROR, "reserved-mismatch", ACCOUNT_PREFIX + account,
                           f"account {account} has reserved {format_money(reserved)}, its "
                           f"escrow rows hold {format_money(held)}")


@dataclass
class Reconciliation:
    """The report over every shard."""

    shards: list[ShardTotals]
    findings: list[Finding]
    checked_at: str
    max_flight_seconds: float
    grand_checked: bool = False

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity in PROBLEMS]

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in Severity}
        for finding in self.findings:
            counts[finding.severity.value] += 1
        counts["accounts"] = sum(s.accounts for s in self.shards)
        counts["outcomes"] = sum(s.outcomes for s in self.shards)
        counts["inFlight"] = sum(s.in_flight for s in self.shards)
        return counts

    def grand(self) -> dict[str, str]:
        return {"total": format_money(sum((s.total for s in self.shards), ZERO)),
                "expected": format_money(sum((s.expected for s in self.shards), ZERO))}

    def view(self) -> dict[str, Any]:
        return {"ok": self.ok, "checkedAt": self.checked_at,
                "maxFlightSeconds": self.max_flight_seconds, "counts": self.counts(),
                "totals": {**self.grand(), "checked": self.grand_checked},
                "shards": [s.view() for s in self.shards],
                "findings": [f.view() for f in self.findings]}


def reconcile(tallies: list[ShardTally], checked_at: str,
              max_flight_seconds: float) -> Reconciliation:
    """Judge the totals of every shard and across them; the report."""
    findings = [f for t in tallies for f in t.findings]
    totals = [t.totals for t in tallies]
    judged = all(t.verified and not t.truncated for t in totals)
    off = [t for t in totals if t.verified and not t.truncated and t.total != t.expected]
    grand_off = judged and sum((t.total for t in totals), ZERO) != \
        sum((t.expected for t in totals), ZERO)
    for t in off:
        severity = Severity.ERROR if (grand_off or not judged) else Severity.WARNING
        why = "" if severity is Severity.ERROR else (
            " (the grand total agrees: did a reshard move accounts between shards?)")
        findings.append(Finding(severity, "shard-total", t.shard, "",
                                f"shard {t.shard}: balances + reserved = {format_money(t.total)},"
                                f" its committed legs net {format_money(t.expected)} (off by "
                                f"{format_money(t.total - t.expected)}){why}"))
    return Reconciliation(totals, findings, checked_at, max_flight_seconds, judged)
