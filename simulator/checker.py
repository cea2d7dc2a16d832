"""An independent checker of the sharded ledger: what storage holds, judged from storage alone.

It reads every shard's ledger partition with the Tables SDK directly and uses none of the app's
code: only the row formats documented in ``shared/domain/exchange.py`` (``account:{id}`` with
``balance`` and ``reserved``, ``request:{R}`` with ``status``, ``legs`` and ``settled``,
``flight:coord:{R}``, ``flight:escrow:{R}|{account}``, ``flight:inbox:{R}|{kind}|{sender}``,
``vote:{R}``, ``applied:{R}``) and the documented shard map (``shared/domain/sharding.py``: an
id's slot is the first four bytes of its SHA-256, big-endian, modulo 64; slot ``s`` is on shard
``s % K``; a one-step request's home is its account's shard, any other request's its id's), both
written again here so that a bug in the app's copy cannot hide itself.

**At any time** (``check_invariants``, run periodically during a chaos run), in every
partition: no balance and no ``reserved`` is negative; an account lives on its own shard;
``reserved`` is the sum of the account's escrow rows (judged only when the account row did not
change while the escrows were read); an escrow holds exactly the request's net debit of that
account; every escrow, message and yes-vote names a request that is undecided (its
``flight:coord:`` row at its home) or decided (its outcome row at its home); every applied
marker names a decided request, with the same status and, on a commit, exactly the request's
legs on that shard; a coordination and an outcome exist only at the request's home. Rows are
read shard after shard, so a reference that looks dangling is read again at its home before it
counts: a coordination exists from before the first escrow or message until the outcome exists,
and an outcome is never deleted, so a later read must find one of them.

**Once quiet** (``check_final``): nothing in flight (no ``flight:`` row, ``reserved`` zero
everywhere); every request sent has exactly one outcome row, at its home, final (``settled``),
with a status its steps allow (aborted when a step failed; committed, or rejected for
insufficient funds when the workload made its outcome depend on order; committed otherwise) and,
committed, exactly its legs; a committed request that crosses shards has an applied marker with
its legs on every shard holding one of its accounts and on no other; a request that does not
commit applied nothing anywhere; every balance is the sum of the committed legs on it, to the
cent. The verdict counts:

- **lost**: requests with no outcome (never decided, or work left in flight for them with no
  outcome);
- **double-applied**: requests with more than one outcome row, legs applied on a shard that holds
  none of them, or a balance off by exactly one of the account's committed legs (applied twice);
- **partial**: decided requests not applied everywhere: an outcome not settled, a shard holding a
  leg without its applied marker, money still in escrow for them, applied legs on a request that
  did not commit, or a balance short of exactly one committed leg;
- **drift**: the sum over accounts of ``|balance - committed legs|``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from azure.data.tables import TableClient

SLOTS = 64
ZERO = Decimal("0.00")
Leg = tuple[str, Decimal]
Row = dict[str, Any]


# --- the documented shard map, written again --------------------------------------------------

def slot(identifier: str) -> int:
    """The id's slot: SHA-256, first four bytes big-endian, modulo 64."""
    return int.from_bytes(hashlib.sha256(identifier.encode()).digest()[:4], "big") % SLOTS


def account_shard(account_id: str, shards: int) -> int:
    return slot(account_id) % shards if shards > 1 else 0


def partition_of(shard: int) -> str:
    return "ledger" if shard == 0 else f"ledger-{shard}"


@dataclass(frozen=True)
class Sent:
    """A request as the workload sent it: its legs (one per step) and what it may end as."""

    request_id: str
    legs: tuple[Leg, ...]
    failed: bool = False  # a step reported failure: it must end aborted
    may_reject: bool = False  # its outcome depends on order: committed, or rejected for funds

    def home(self, shards: int) -> int:
        if shards == 1:
            return 0
        if len(self.legs) == 1:
            return account_shard(self.legs[0][0], shards)
        return slot(self.request_id) % shards


def net(legs: Iterable[Leg]) -> dict[str, Decimal]:
    """Each account's net amount over ``legs`` (zero nets left out)."""
    total: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for account, amount in legs:
        total[account] += amount
    return {a: m for a, m in sorted(total.items()) if m != 0}


def legs_on(legs: Iterable[Leg], shard: int, shards: int) -> list[Leg]:
    return sorted((a, m) for a, m in legs if account_shard(a, shards) == shard)


def money(value: Any) -> Decimal:
    """A money property as stored (a string with two decimals); never a float."""
    if isinstance(value, float):
        raise ValueError(f"money stored as a float: {value!r}")
    try:
        return Decimal(str(value if value not in (None, "") else "0.00"))
    except InvalidOperation as exc:
        raise ValueError(f"not an amount: {value!r}") from exc


def parse_legs(text: Any) -> list[Leg]:
    return sorted((str(a), money(m)) for a, m in json.loads(text or "[]"))


def request_of(row_key: str) -> str:
    """The request a cross-shard row is about (``prefix:{R}`` or ``prefix:{R}|...``)."""
    for prefix in ("flight:coord:", "flight:escrow:", "flight:inbox:", "applied:", "vote:",
                   "request:", "claim:"):
        if row_key.startswith(prefix):
            return row_key.removeprefix(prefix).split("|", 1)[0]
    return ""


# --- reading storage --------------------------------------------------------------------------

class LedgerReader:
    """Reads the ledger table's shard partitions with the Tables SDK (no app code)."""

    PREFIXES = ("account:", "applied:", "flight:", "request:", "vote:")

    def __init__(self, connection_string: str, table: str, shards: int) -> None:
        self.table = TableClient.from_connection_string(connection_string, table)
        self.shards = shards

    def rows(self, shard: int, prefix: str) -> dict[str, Row]:
        """The shard's rows whose key starts with ``prefix`` (etag under ``"@etag"``)."""
        high = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        found = self.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @low and RowKey lt @high",
            parameters={"pk": partition_of(shard), "low": prefix, "high": high})
        return {str(e["RowKey"]): {**e, "@etag": e.metadata.get("etag")} for e in found}

    def row(self, shard: int, row_key: str) -> Row | None:
        found = list(self.table.query_entities(
            "PartitionKey eq @pk and RowKey eq @rk",
            parameters={"pk": partition_of(shard), "rk": row_key}))
        return {**found[0], "@etag": found[0].metadata.get("etag")} if found else None

    def snapshot(self) -> Snapshot:
        """Every shard's rows of interest, shard after shard; accounts read before and after
        the rest, so that ``reserved`` is compared with escrows read while it held still."""
        shards: dict[int, dict[str, Row]] = {}
        stable: dict[int, set[str]] = {}
        for shard in range(self.shards):
            before = self.rows(shard, "account:")
            rows: dict[str, Row] = dict(before)
            for prefix in self.PREFIXES[1:]:
                rows.update(self.rows(shard, prefix))
            after = self.rows(shard, "account:")
            stable[shard] = {k for k, r in after.items()
                             if k in before and before[k]["@etag"] == r["@etag"]}
            rows.update(after)
            shards[shard] = rows
        return Snapshot(self.shards, shards, stable)

    def count_outcomes(self) -> int:
        """Outcome rows in every shard (keys only)."""
        total = 0
        for shard in range(self.shards):
            total += sum(1 for _ in self.table.query_entities(
                "PartitionKey eq @pk and RowKey ge 'request:' and RowKey lt 'request;'",
                parameters={"pk": partition_of(shard)}, select=["RowKey"]))
        return total

    def close(self) -> None:
        self.table.close()


@dataclass
class Snapshot:
    """Rows per shard as read (not one instant: shard after shard)."""

    shards: int
    rows: dict[int, dict[str, Row]]
    stable: dict[int, set[str]] = field(default_factory=dict)  # account keys that held still

    def prefixed(self, shard: int, prefix: str) -> dict[str, Row]:
        return {k: r for k, r in self.rows.get(shard, {}).items() if k.startswith(prefix)}


# --- the verdict -----------------------------------------------------------------------------

@dataclass
class Verdict:
    """What the final check found; ``ok`` when every count is zero and no problem was found."""

    lost: set[str] = field(default_factory=set)
    double_applied: set[str] = field(default_factory=set)
    partial: set[str] = field(default_factory=set)
    drift: Decimal = ZERO
    problems: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    accounts: int = 0
    total: Decimal = ZERO

    @property
    def ok(self) -> bool:
        return not (self.lost or self.double_applied or self.partial or self.drift
                    or self.problems)

    def line(self) -> str:
        drift = "0" if self.drift == 0 else str(self.drift)
        return (f"{len(self.lost)} lost, {len(self.double_applied)} double-applied, "
                f"{len(self.partial)} partial requests, {drift} drift")


def _home(request_id: str, row: Row, sent: Mapping[str, Sent] | None, shards: int) -> int | None:
    if sent is not None and request_id in sent:
        return sent[request_id].home(shards)
    home = row.get("home")
    return int(home) if isinstance(home, int) else None


def check_invariants(reader: LedgerReader, sent: Mapping[str, Sent] | None = None,
                     snapshot: Snapshot | None = None) -> list[str]:
    """What must hold at any time (see the module docstring); problems found, each once."""
    snap = snapshot or reader.snapshot()
    shards = snap.shards
    problems: list[str] = []
    # Cross-partition references to confirm: (request, home) -> what needs it.
    needs_any: dict[tuple[str, int], list[str]] = defaultdict(list)  # coord or outcome
    needs_outcome: dict[tuple[str, int], list[tuple[int, Row]]] = defaultdict(list)

    for shard in range(shards):
        accounts = snap.prefixed(shard, "account:")
        escrows = snap.prefixed(shard, "flight:escrow:")
        held: dict[str, Decimal] = defaultdict(lambda: ZERO)
        for key, row in accounts.items():
            account = key.removeprefix("account:")
            balance, reserved = money(row.get("balance")), money(row.get("reserved"))
            if balance < 0:
                problems.append(f"negative balance: {account} on shard {shard} is {balance}")
            if reserved < 0:
                problems.append(f"negative reserved: {account} on shard {shard} is {reserved}")
            if account_shard(account, shards) != shard:
                problems.append(f"account {account} has a row on shard {shard}, its shard is "
                                f"{account_shard(account, shards)}")
        for key, row in escrows.items():
            request_id, account = key.removeprefix("flight:escrow:").split("|", 1)
            amount = money(row.get("amount"))
            held[account] += amount
            home = _home(request_id, row, sent, shards)
            if amount <= 0:
                problems.append(f"escrow {key} on shard {shard} holds {amount}")
            if sent is not None:
                if request_id not in sent:
                    problems.append(f"escrow {key} on shard {shard}: request never sent")
                    continue
                debit = -net(sent[request_id].legs).get(account, ZERO)
                if amount != debit:
                    problems.append(f"escrow {key} on shard {shard} holds {amount}, the "
                                    f"request debits {account} by {debit}")
            if home is not None:
                needs_any[(request_id, home)].append(f"escrow {key} on shard {shard}")
        for key in snap.stable.get(shard, set()):
            account = key.removeprefix("account:")
            reserved = money(accounts[key].get("reserved"))
            if reserved != held.get(account, ZERO):
                problems.append(f"{account} on shard {shard}: reserved {reserved}, its escrow "
                                f"rows hold {held.get(account, ZERO)}")
        for account, amount in held.items():
            if f"account:{account}" not in accounts:
                problems.append(f"escrow of {amount} for {account} on shard {shard}, which has "
                                "no account row")
        for key, row in snap.prefixed(shard, "flight:inbox:").items():
            request_id = request_of(key)
            home = _home(request_id, row, sent, shards)
            if sent is not None and request_id not in sent:
                problems.append(f"message {key} on shard {shard}: request never sent")
            elif home is not None:
                needs_any[(request_id, home)].append(f"message {key} on shard {shard}")
        for key, row in snap.prefixed(shard, "vote:").items():
            request_id = request_of(key)
            home = _home(request_id, row, sent, shards)
            if sent is not None and request_id in sent:
                debits = [a for a, m in net(sent[request_id].legs).items()
                          if m < 0 and account_shard(a, shards) == shard]
                if not debits:
                    problems.append(f"vote {key} on shard {shard}, which holds no debit of it")
            if row.get("vote") == "yes" and home is not None:
                needs_any[(request_id, home)].append(f"yes-vote {key} on shard {shard}")
        for key, row in snap.prefixed(shard, "applied:").items():
            request_id = request_of(key)
            home = _home(request_id, row, sent, shards)
            if sent is not None and request_id not in sent:
                problems.append(f"applied marker {key} on shard {shard}: request never sent")
            elif home is not None:
                needs_outcome[(request_id, home)].append((shard, row))
        for key in snap.prefixed(shard, "flight:coord:"):
            request_id = request_of(key)
            if sent is not None and request_id in sent and sent[request_id].home(shards) != shard:
                problems.append(f"coordination {key} on shard {shard}, its home is "
                                f"{sent[request_id].home(shards)}")
        if sent is not None:
            for key in snap.prefixed(shard, "request:"):
                request_id = request_of(key)
                if request_id in sent and sent[request_id].home(shards) != shard:
                    problems.append(f"outcome {key} on shard {shard}, its home is "
                                    f"{sent[request_id].home(shards)}")

    def outcome_at(request_id: str, home: int, again: bool) -> Row | None:
        found = snap.rows.get(home, {}).get(f"request:{request_id}")
        if found is None and again:
            found = reader.row(home, f"request:{request_id}")
        return found

    for (request_id, home), what in sorted(needs_any.items()):
        if f"flight:coord:{request_id}" in snap.rows.get(home, {}) or \
                outcome_at(request_id, home, again=False) is not None:
            continue
        if reader.row(home, f"flight:coord:{request_id}") is None and \
                reader.row(home, f"request:{request_id}") is None:
            problems.append(f"{what[0]} names request {request_id}, which has neither a "
                            f"coordination nor an outcome at its home shard {home}"
                            + (f" (and {len(what) - 1} more row(s))" if len(what) > 1 else ""))
    for (request_id, home), markers in sorted(needs_outcome.items()):
        outcome = outcome_at(request_id, home, again=True)
        if outcome is None:
            problems.append(f"applied marker of {request_id} on shard(s) "
                            f"{sorted(s for s, _ in markers)}, but no outcome at its home "
                            f"shard {home}")
            continue
        status = str(outcome.get("status"))
        for shard, marker in markers:
            if str(marker.get("status")) != status:
                problems.append(f"applied marker of {request_id} on shard {shard} says "
                                f"{marker.get('status')}, its outcome says {status}")
            applied = parse_legs(marker.get("legs"))
            want = legs_on(parse_legs(outcome.get("legs")), shard, shards) \
                if status == "committed" else []
            if applied != want:
                problems.append(f"applied marker of {request_id} on shard {shard} holds legs "
                                f"{_show(applied)}, the outcome's legs there are {_show(want)}")
    return problems


def _show(legs: Iterable[Leg]) -> str:
    return "[" + ", ".join(f"{a} {m}" for a, m in legs) + "]"


def check_final(reader: LedgerReader, sent: Mapping[str, Sent],
                snapshot: Snapshot | None = None) -> Verdict:
    """The end state once the run is quiet (see the module docstring)."""
    snap = snapshot or reader.snapshot()
    shards = snap.shards
    verdict = Verdict(problems=check_invariants(reader, sent, snap))
    outcomes: dict[str, list[tuple[int, Row]]] = defaultdict(list)
    applied: dict[str, dict[int, Row]] = defaultdict(dict)
    balances: dict[str, Decimal] = {}
    in_flight: list[tuple[int, str]] = []
    for shard in range(shards):
        for key, row in snap.rows.get(shard, {}).items():
            if key.startswith("request:"):
                outcomes[request_of(key)].append((shard, row))
            elif key.startswith("applied:"):
                applied[request_of(key)][shard] = row
            elif key.startswith("flight:"):
                in_flight.append((shard, key))
            elif key.startswith("account:"):
                account = key.removeprefix("account:")
                balances[account] = balances.get(account, ZERO) + money(row.get("balance"))
                reserved = money(row.get("reserved"))
                if reserved:
                    verdict.problems.append(f"{account} on shard {shard} still holds "
                                            f"{reserved} in escrow")
    for shard, key in in_flight:
        verdict.problems.append(f"left in flight on shard {shard}: {key}")
        request_id = request_of(key)
        (verdict.partial if request_id in outcomes else verdict.lost).add(request_id)
    for request_id in sorted(set(outcomes) - set(sent)):
        verdict.problems.append(f"an outcome for {request_id}, which was never sent")
    committed_legs: dict[str, list[tuple[str, Decimal]]] = defaultdict(list)  # account -> legs
    expected: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for request_id, request in sent.items():
        found = outcomes.get(request_id, [])
        home = request.home(shards)
        if not found:
            verdict.lost.add(request_id)
            continue
        if len(found) > 1:
            verdict.double_applied.add(request_id)
            verdict.problems.append(f"{request_id} has {len(found)} outcome rows, on shards "
                                    f"{sorted(s for s, _ in found)}")
        shard, row = next(((s, r) for s, r in found if s == home), found[0])
        if shard != home:
            verdict.problems.append(f"the outcome of {request_id} is on shard {shard}, its "
                                    f"home is {home}")
        status = str(row.get("status"))
        verdict.outcomes[status] += 1
        if row.get("settled") is False:
            verdict.partial.add(request_id)
            verdict.problems.append(f"{request_id} is {status} but not settled")
        allowed = {"aborted"} if request.failed else (
            {"committed", "rejected"} if request.may_reject else {"committed"})
        if status not in allowed:
            verdict.problems.append(f"{request_id} ended {status}, its steps allow "
                                    f"{' or '.join(sorted(allowed))}")
        if status == "rejected" and not str(row.get("reason", "")).startswith(
                "insufficient funds"):
            verdict.problems.append(f"{request_id} rejected for {row.get('reason')!r}")
        legs = parse_legs(row.get("legs"))
        markers = applied.get(request_id, {})
        if status != "committed":
            if legs:
                verdict.problems.append(f"{request_id} is {status} with legs {_show(legs)}")
            moved = sorted(s for s, m in markers.items()
                           if parse_legs(m.get("legs")) or m.get("status") == "committed")
            if moved:
                verdict.partial.add(request_id)
                verdict.problems.append(f"{request_id} is {status}, yet shard(s) {moved} "
                                        "applied it")
            continue
        if legs != sorted(request.legs):
            verdict.problems.append(f"{request_id} committed legs {_show(legs)}, it sent "
                                    f"{_show(sorted(request.legs))}")
        for account, amount in legs:
            expected[account] += amount
            committed_legs[account].append((request_id, amount))
        holding = {account_shard(a, shards) for a, _ in legs}
        if holding <= {home}:  # one shard: the outcome row itself applied it
            extra = sorted(s for s, m in markers.items() if parse_legs(m.get("legs")))
            if extra:
                verdict.double_applied.add(request_id)
                verdict.problems.append(f"{request_id} committed on its home shard alone, "
                                        f"yet shard(s) {extra} have applied markers with legs")
            continue
        for shard in sorted(holding):
            marker = markers.get(shard)
            here = legs_on(legs, shard, shards)
            if marker is None or marker.get("status") != "committed":
                verdict.partial.add(request_id)
                verdict.problems.append(f"{request_id} committed, shard {shard} holds "
                                        f"{_show(here)} and has not applied them")
            elif parse_legs(marker.get("legs")) != here:
                verdict.partial.add(request_id)
        for shard in sorted(set(markers) - holding):
            if parse_legs(markers[shard].get("legs")):
                verdict.double_applied.add(request_id)
                verdict.problems.append(f"{request_id}: shard {shard} applied legs though it "
                                        "holds none")
    for account in sorted(set(balances) | set(expected)):
        have, should = balances.get(account, ZERO), expected.get(account, ZERO)
        verdict.drift += abs(have - should)
        if have == should:
            continue
        verdict.problems.append(f"{account}: balance {have}, its committed legs sum to {should}")
        diff = have - should
        twice = [r for r, amount in committed_legs.get(account, []) if amount == diff]
        missing = [r for r, amount in committed_legs.get(account, []) if amount == -diff]
        if twice:
            verdict.double_applied.add(twice[0])
        elif missing:
            verdict.partial.add(missing[0])
    deposits = sum((amount for request_id, request in sent.items() if len(request.legs) == 1
                    and any(str(row.get("status")) == "committed"
                            for _, row in outcomes.get(request_id, []))
                    for _, amount in request.legs), ZERO)
    verdict.total = sum(balances.values(), ZERO)
    verdict.accounts = len(balances)
    if verdict.total != deposits:
        verdict.problems.append(f"money not conserved: balances sum to {verdict.total}, the "
                                f"committed deposits to {deposits}")
    verdict.problems = list(dict.fromkeys(verdict.problems))
    return verdict
