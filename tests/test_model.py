"""Model-based test of the leader protocol, against a real Azurite.

A hypothesis ``RuleBasedStateMachine`` plays several instances (``LedgerApp`` objects on one
storage namespace, their own clocks skewed by up to a day) and the faults between them: steps
delivered to any instance (duplicates, second contents, failed steps, disagreeing
``expectedOperations``, steps beyond the expected count), recorders that crash before electing,
sweeps, a leader paused mid-drain (a ``LeaderTerm`` begun with its scan, resumed after others
may have led), steps recorded while a leader is between its scan and a write, the lease broken or
run out, a table write or lease action whose response is lost after storage applied it, and time
moved past ``REQUEST_TIMEOUT_SECONDS``.

``contract_verdict`` and ``RequestModel`` below are a pure model of the README's contract, written
for this test (they do not use ``shared/domain/rules.py``). Each time a request's recorded steps or
the clock change, the model notes the verdict a leader scanning at that moment must reach; a
request's outcome must be one of those. After every rule:

- no balance is below zero, and the balances are exactly what replaying the landed commits in
  order gives, each committed request's legs once (so money is conserved: the sum of the balances
  is the sum of the committed legs);
- a commit or an insufficient-funds rejection is right for the balances at its place in that order;
- no request has two outcomes (an outcome never changes, and no two landed commits carry one id);
- nothing the app logs as an error comes from anything but an injected fault.

At teardown, a quiet sweep (no faults, lease free) decides every request that was decidable, and
one more after the timeout decides everything and leaves no completion row; a request that was
complete before the timeout never ends expired. The second test runs the same machine and also
requires every step that contradicts a commit to be parked.

**Shards.** ``ShardedMachine`` (the third test) runs the same instances, faults and contract
model with ``LEDGER_SHARDS=3``: four funded accounts (two on shard 0), deposits, transfers on one
shard or across two, and requests across all three shards (one debit and two credits, or two
debits), homed on a shard drawn at random. Each base rule that names a lease or a leader acts
on a shard drawn at random (a paused leader, a broken lease: on every shard); it adds one shard
elected alone (``Election(app.on(k)).run``, without driving the shards it messages), a stranger
holding a shard's lease for a while (a slow participant), one shard's lease broken, lost
responses on inbox creates and on the exchange's transactions, and steps delivered as a shard
begins an exchange transaction. The replay of the commit log does not apply as is: a
cross-shard request lands in several transactions on several shards, with no order between
them. What holds instead, after every rule, on one read of every partition:

- no balance and no ``reserved`` below zero; each account's ``reserved`` is the sum of its
  escrow rows; an escrow row's amount is its request's net debit of that account, and its
  request has a coordination on its home shard (an escrow never outlives it); an ``applied:``
  marker has the outcome of its request on its home, with that outcome's status and, for a
  commit, exactly the legs of the marker's shard;
- no request has outcome rows on two shards; an outcome never changes but for ``settled``,
  which goes from False to True once; each is one the contract allows (as with one shard), and
  an insufficient-funds rejection names one of the request's debits, below zero;
- conservation, account by account: ``balance + reserved`` is the sum of the legs that landed
  on its shard, that is the legs of every request committed on one shard and, for a commit
  across shards, the legs of each shard that has its ``applied:`` marker. Money in flight is in
  escrow (``reserved``: a reservation moves money from balance to reserved, and a refund back)
  and credits land only with the decision, so the sum over every shard of balance + reserved is
  the funding plus the legs of the committed requests landed so far; a decided commit not
  applied everywhere yet is the only money missing (or extra) from it.

The quiet end sweeps every shard, ``RESEND_SECONDS`` of the instances' clock apart, until no
``flight:`` row is left anywhere (``QUIET_SECONDS``); then every request is decided once and
settled, every committed request has its ``applied:`` marker on each shard of its legs, no
escrow or ``reserved`` is left and every balance is the net of the committed legs, to the cent.
Three bugs this run found are fixed (their shrunk cases are plain tests in
``tests/test_model_regressions.py``): steps whose ``expectedOperations`` give them another home
(claims), late steps that complete a request decided on the plain path (claims), and a PREPARE
sent again refused at its escrow row. Their inputs are sent; ``MODEL_KNOWN_BUGS=0`` leaves them
out again (and drops an example whose only unexpected log is one of their signs) to tell a new
failure from an old one.

Seeds: by default (CI, ``./dev test``) the run uses the fixed seed ``FIXED_SEED``, so it is
the same run every time; ``MODEL_SEED=random`` draws a fresh seed (explore), ``MODEL_SEED=N``
replays seed N. The seed is printed at the start (shown with a failure, or with ``-s``) with the
command that replays it; hypothesis also prints the shrunk steps and a ``@reproduce_failure``
blob. ``MODEL_EXAMPLES`` and ``MODEL_STEPS`` make a longer run (``MODEL_EXAMPLES=150
MODEL_STEPS=40``: about 10 minutes); ``MODEL_SHRINK_SECONDS`` bounds shrinking (120). Shrunk
counterexamples live on as plain tests in ``tests/test_model_regressions.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from azure.core.exceptions import AzureError, HttpResponseError, ServiceResponseError
from azure.core.pipeline import PipelineResponse
from azure.core.pipeline.transport import HttpTransport, RequestsTransport
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobLeaseClient, BlobServiceClient, LinearRetry
from azure.storage.queue import QueueServiceClient
from hypothesis import HealthCheck, reject, seed, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shared.config.names import lease_blob_name
from shared.config.settings import load_config
from shared.domain.clock import ComposedClock
from shared.domain.contract import parse_completion
from shared.domain.exchange import (
    APPLIED_PREFIX,
    COORD_PREFIX,
    ESCROW_PREFIX,
    FLIGHT_PREFIX,
    RESEND_SECONDS,
    Coordination,
    Escrow,
    debits_of,
)
from shared.domain.model import AccountRow, DecidedOutcome, Outcome
from shared.domain.planning import AccountChanged, LedgerWriteError, OutcomeExists
from shared.domain.sharding import ShardMap
from shared.election.elector import TermEnded
from shared.errors import StorageError, StorageUnavailable
from shared.leadership.elections import Election, run_election
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import announce_if_ready, handle_completion, record_completion
from shared.leadership.sweeper import repair_scan, sweep
from shared.leadership.term import LeaderTerm
from shared.leadership.view import ReadyRound, ReadyView
from shared.storage.clients import StorageClients
from simulator.azurite import Azurite
from tests.fakes.app import OwnedClock
from tests.helpers import ManualClock, Namespace, lease_blob, wait_until

INSTANCES = 3
CLOCK_SKEW_SECONDS = (0, -3600, 86_400)  # instance clocks: right, an hour slow, a day fast
SEEN: Counter[str] = Counter()  # what the runs exercised, printed after each test
ACCOUNTS = ("acct-a", "acct-b", "acct-c")
AMOUNTS = ("5.00", "10.00", "25.00", "40.00")
TIMEOUT_SECONDS = 900
# A long renew interval keeps the background renewal thread out of a run (it wakes after 50 s of
# real time); renewals happen at checkpoints when the test moves the monotonic clock.
SETTINGS = {"LEASE_SECONDS": "60", "RENEW_INTERVAL_SECONDS": "50",
            "LEASE_SAFETY_MARGIN_SECONDS": "1", "REQUEST_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS)}
FAULT_KINDS = ("record", "claim", "commit", "delete", "acquire", "renew", "release")
LEADER_WRITES = ("claim", "commit", "delete")

Verdict = tuple[Any, ...]  # ("commit", legs) | ("rejected", kind) | ("aborted",) | ("expired",)
Legs = tuple[tuple[str, Decimal], ...]
T = TypeVar("T")
KNOWN_REJECTIONS = ("conflict", "expectedOperations", "too many steps")


# --- the contract, as a pure model ----------------------------------------------------------------
@dataclass(frozen=True)
class Content:
    """What one delivery of a step says (everything the contract compares; no completedAt)."""

    operation_id: str
    operation: str
    account_id: str
    amount: Decimal
    expected: int
    status: str

    @property
    def signed(self) -> Decimal:
        return self.amount if self.operation == "add_funds" else -self.amount

    def body(self, request_id: str) -> bytes:
        return json.dumps({"requestId": request_id, "operationId": self.operation_id,
                           "operation": self.operation, "accountId": self.account_id,
                           "amount": str(self.amount), "expectedOperations": self.expected,
                           "status": self.status}).encode()


def contract_verdict(rows: dict[str, list[Content]], waited: timedelta) -> Verdict | None:
    """The README's outcome rules for the steps recorded so far; None while pending."""
    if not rows:
        return None
    if any(len(contents) > 1 for contents in rows.values()):
        return ("rejected", "conflict")
    steps = [contents[0] for contents in rows.values()]
    expected = {step.expected for step in steps}
    if len(expected) > 1:
        return ("rejected", "expectedOperations")
    wanted = expected.pop()
    if len(steps) > wanted:
        return ("rejected", "too many steps")
    if any(step.status == "failed" for step in steps):
        return ("aborted",)
    if len(steps) == wanted:
        return ("commit", tuple(sorted((step.account_id, step.signed) for step in steps)))
    if waited >= timedelta(seconds=TIMEOUT_SECONDS):
        return ("expired",)
    return None


@dataclass
class RequestModel:
    """One request: what upstream meant, what was recorded, which verdicts were reachable."""

    request_id: str
    intended: list[Content]
    rows: dict[str, list[Content]] = field(default_factory=dict)  # before its outcome existed
    late: list[Content] = field(default_factory=list)  # delivered after its outcome existed
    first_recorded: float | None = None  # seconds of test time (see ``record``)
    reachable: dict[Verdict, frozenset[Content]] = field(default_factory=dict)
    complete_in_time: bool = False  # a commit was reachable before the timeout: never expired

    def __repr__(self) -> str:
        steps = ", ".join(f"{c.operation_id} {c.operation} {c.account_id} {c.amount}"
                          for c in self.intended)
        return f"<{self.request_id}: {steps}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints a draw
        printer.text(repr(self))

    def record(self, content: Content, now: float) -> None:
        versions = self.rows.setdefault(content.operation_id, [])
        if content not in versions:
            versions.append(content)
        if self.first_recorded is None:
            # The app stamps a record with storage's time and judges expiry at storage's time
            # plus ``LedgerApp.time_shift`` (how far this test moved time since it began): a row
            # recorded at any point of a run counts as recorded at the run's start.
            self.first_recorded = 0.0
        self.note_verdict(now)

    def note_verdict(self, now: float) -> None:
        if self.first_recorded is None:
            return
        waited = timedelta(seconds=now - self.first_recorded)
        verdict = contract_verdict(self.rows, waited)
        if verdict is not None and verdict[0] == "commit" and \
                waited < timedelta(seconds=TIMEOUT_SECONDS):
            self.complete_in_time = True
        if verdict is not None and verdict not in self.reachable:
            self.reachable[verdict] = frozenset(c for cs in self.rows.values() for c in cs)


def observed_verdict(outcome: Outcome) -> Verdict:
    """An outcome as a verdict of the model's kind."""
    status, reason = outcome.status, outcome.reason
    if status == "committed":
        return ("commit", tuple(sorted(outcome.legs)))
    if status == "rejected":
        if "insufficient funds" in reason:
            return ("insufficient funds",)
        for kind, words in (("conflict", "different content"),
                            ("expectedOperations", "disagree on expectedOperations"),
                            ("too many steps", "distinct steps")):
            if words in reason:
                return ("rejected", kind)
        return ("rejected", reason)
    return (status,)


# --- instruments: the commit log, lost responses, error logs ----------------------------------
@dataclass
class Attempt:
    """One call of ``Ledger.commit`` (in the order the instances made them)."""

    instance: str
    epoch: int
    outcomes: tuple[Outcome, ...]
    error: BaseException | None = None


class Faults:
    """One instance's injected faults.

    ``armed``: lose the response to its next write of that kind after storage applied it (a
    table write: record, claim, commit, delete, and with shards deliver and exchange; or a
    lease action: acquire, renew, release). ``interleave``: the next time it starts a write of
    that kind, first run another instance's invocation (a step recorded while this one leads,
    between its scan and its commit). The kind of a table write is the ``within`` it runs in,
    on its own thread (the cleaner deletes rows on threads of its own).
    """

    def __init__(self) -> None:
        self.armed: str | None = None
        self.local = threading.local()
        self.interleave: dict[str, Callable[[], None]] = {}

    @property
    def context(self) -> str | None:
        found: str | None = getattr(self.local, "context", None)
        return found

    @context.setter
    def context(self, kind: str | None) -> None:
        self.local.context = kind

    def table_answer(self, method: str, status: int) -> None:
        """Storage answered a table request of this instance's (``LosingTransport``)."""
        if self.armed is not None and self.armed == self.context:
            self._lose(method, status)

    def blob_hook(self, response: PipelineResponse) -> None:  # type: ignore[type-arg]
        if self.armed is not None and \
                self.armed == response.http_request.headers.get("x-ms-lease-action"):
            self._lose(response.http_request.method, response.http_response.status_code)

    def _lose(self, method: str, status: int) -> None:
        if method == "GET" or status >= 300:
            return
        kind, self.armed = self.armed, None
        SEEN[f"lost response: {kind}"] += 1
        raise ServiceResponseError(f"injected: the response to a {kind} was lost after "
                                   "storage applied it")

    def within(self, kind: str | Callable[..., str],
               function: Callable[..., T]) -> Callable[..., T]:
        """``function`` as a write of ``kind`` (or of the kind ``kind(*args, **kwargs)`` names)."""
        def wrapped(*args: Any, **kwargs: Any) -> T:
            kind_now = kind if isinstance(kind, str) else kind(*args, **kwargs)
            meanwhile = self.interleave.pop(kind_now, None)
            if meanwhile is not None:
                SEEN[f"step delivered as a leader began a {kind_now}"] += 1
                meanwhile()
            outer, self.context = self.context, kind_now
            try:
                return function(*args, **kwargs)
            finally:
                self.context = outer
        return wrapped


class LosingTransport(HttpTransport):  # type: ignore[type-arg]
    """The table clients' transport: every request reaches storage, and the answer to the
    write ``faults`` has armed is lost on its way back, below the SDK's retry policy, as a
    dropped connection's is. (A client's ``raw_response_hook`` cannot do this: the adapters
    pass one per call, to read storage's ``Date``, and a per-call hook replaces the client's.)
    """

    def __init__(self, faults: Faults, **options: Any) -> None:
        self.faults = faults
        self.inner = RequestsTransport(**options)

    def __enter__(self) -> LosingTransport:
        self.inner.__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        self.inner.__exit__(*args)

    def open(self) -> None:
        self.inner.open()

    def close(self) -> None:
        self.inner.close()

    def send(self, request: Any, **kwargs: Any) -> Any:
        response = self.inner.send(request, **kwargs)
        try:
            self.faults.table_answer(request.method, response.status_code)
        except ServiceResponseError:
            response.internal_response.close()  # what storage said is dropped unread
            raise
        return response


def injected(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) is a fault this test injected."""
    while exc is not None:
        if "injected:" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class ErrorLog(logging.Handler):
    """Keeps the app's ERROR records (``handle_completion`` logs a failed election, not raises).

    ``write_errors``: also the WARNING an election logs when a term stopped on a
    ``LedgerWriteError`` (a refusal the leader could not resolve), which it does not raise.
    """

    def __init__(self, write_errors: bool = False) -> None:
        super().__init__(logging.WARNING if write_errors else logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or any(
                isinstance(arg, LedgerWriteError) for arg in (record.args or ())
                if isinstance(record.args, tuple)):
            self.records.append(record)

    def unexpected(self) -> list[str]:
        """What was kept and does not come from an injected fault."""
        def cause(record: logging.LogRecord) -> BaseException | None:
            if record.exc_info:
                return record.exc_info[1]
            if record.levelno >= logging.ERROR or not isinstance(record.args, tuple):
                return None
            return next((a for a in record.args if isinstance(a, LedgerWriteError)), None)
        return [r.getMessage() for r in self.records if not injected(cause(r))]


@dataclass
class Paused:
    """A leader stopped between its scan and its commits (GC pause, SIGSTOP)."""

    instance: int
    term: LeaderTerm
    ready: ReadyRound
    shard: int = 0


class FakeMonotonic:
    """The instances' monotonic clock, moved by the test (renewals, lease deadlines), and by
    the sleeps of the test's own thread (a leader's linger, its final look: ``OwnedClock``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


# --- the state machine ------------------------------------------------------------------------
@st.composite
def intended_requests(draw: st.DrawFn, request_id: str) -> RequestModel:
    """A deposit, a transfer or a 3-leg request among a few accounts."""
    kind = draw(st.sampled_from(["deposit", "deposit", "transfer", "transfer", "three legs"]))
    amount = Decimal(draw(st.sampled_from(AMOUNTS)))
    if kind == "deposit":
        legs = [("add_funds", draw(st.sampled_from(ACCOUNTS)), amount)]
    else:
        source, target = draw(st.permutations(ACCOUNTS))[:2]
        legs = [("withdraw_funds", source, amount), ("add_funds", target, amount)]
        if kind == "three legs":
            half = (amount / 2).quantize(Decimal("0.01"))
            legs[1] = ("add_funds", target, amount - half)
            legs.append(("add_funds", draw(st.sampled_from(ACCOUNTS)), half))
    steps = [Content(f"{request_id}-{n}", operation, account, value, len(legs), "succeeded")
             for n, (operation, account, value) in enumerate(legs)]
    return RequestModel(request_id, steps)


VARIANTS = ["as sent"] * 8 + ["failed", "other amount", "other expectedOperations",
                              "expects one step", "extra step"]


def variant_of(step: Content, variant: str) -> Content:
    if variant == "failed":
        return Content(step.operation_id, step.operation, step.account_id, step.amount,
                       step.expected, "failed")
    if variant == "other amount":
        return Content(step.operation_id, step.operation, step.account_id,
                       step.amount + Decimal("1.00"), step.expected, step.status)
    if variant == "other expectedOperations":
        return Content(step.operation_id, step.operation, step.account_id, step.amount,
                       step.expected + 1, step.status)
    if variant == "expects one step":  # e.g. a withdraw leg that says it is the only step
        return Content(step.operation_id, step.operation, step.account_id, step.amount, 1,
                       step.status)
    if variant == "extra step":
        return Content(step.operation_id.rsplit("-", 1)[0] + "-9", step.operation,
                       step.account_id, step.amount, step.expected, step.status)
    return step


def exchange_or_commit(*args: Any, **kwargs: Any) -> str:
    """The fault kind of a ``Ledger.commit``: the exchange's transactions write ``extra`` rows."""
    return "exchange" if kwargs.get("extra") else "commit"


class ProtocolMachine(RuleBasedStateMachine):
    """Several instances, one Azurite namespace, one contract model (one shard: ``SHARDS``)."""

    SHARDS = 1  # ShardedMachine below: more, with the rules and invariants shards need

    def __init__(self, connection_string: str, check_late_steps_parked: bool = False) -> None:
        super().__init__()
        self.connection_string = connection_string
        self.check_late_steps_parked = check_late_steps_parked
        self.ns = Namespace(connection_string)
        self.wallclock = ManualClock()
        self.start = self.wallclock.now
        self.monotonic = FakeMonotonic()
        self.attempts: list[Attempt] = []
        self.faults = [Faults() for _ in range(INSTANCES)]
        self.apps = [self._instance(n) for n in range(INSTANCES)]
        self.apps[0].ensure_resources(queues=False)
        self.requests: dict[str, RequestModel] = {}
        self.funding: set[str] = set()  # requests the machine sends itself (never redelivered)
        self.outcomes: dict[str, DecidedOutcome] = {}
        self.paused: Paused | None = None
        self.errors = ErrorLog(write_errors=self.SHARDS > 1)
        self.dropped = False
        logging.getLogger("shared").addHandler(self.errors)

    # --- wiring ---
    def _instance(self, n: int) -> LedgerApp:
        shards = {"LEDGER_SHARDS": str(self.SHARDS)} if self.SHARDS > 1 else {}
        config = load_config(self.ns.env(**SETTINGS, **shards), instance_id=f"i{n}")
        options: dict[str, Any] = {"connection_timeout": 5, "read_timeout": 5, "retry_total": 3}
        faults = self.faults[n]
        clients = StorageClients(
            # The blob SDK retries a lost response after 15 s by default: the same retry, at once.
            blob=BlobServiceClient.from_connection_string(
                self.connection_string, raw_response_hook=faults.blob_hook,
                retry_policy=LinearRetry(backoff=0, random_jitter_range=0), **options),
            queue=QueueServiceClient.from_connection_string(self.connection_string, **options),
            table=TableServiceClient.from_connection_string(
                self.connection_string, transport=LosingTransport(faults), **options),
        )
        skew = timedelta(seconds=CLOCK_SKEW_SECONDS[n])  # expiry must not care
        app = LedgerApp.create(config, clients, clock=OwnedClock(ComposedClock(
            monotonic=self.monotonic, now=lambda: self.wallclock() + skew,
            sleep=self.monotonic.advance)))
        app.time_shift = self.wallclock.shift  # expiry: storage's time, moved by the test
        for shard in app.each_shard():  # one with one shard: app itself
            shard.completions.record = faults.within(  # type: ignore[method-assign]
                "record", shard.completions.record)
            shard.completions.delete = faults.within(  # type: ignore[method-assign]
                "delete", shard.completions.delete)
            ledger = shard.ledger
            ledger.claim_epoch = faults.within(  # type: ignore[method-assign]
                "claim", ledger.claim_epoch)
            # The exchange's transactions (shards only) are the fault kind "exchange".
            ledger.commit = faults.within(  # type: ignore[method-assign]
                exchange_or_commit, self._logged_commit(config.instance_id, ledger.commit))
            ledger.deliver = faults.within(  # type: ignore[method-assign]
                "deliver", ledger.deliver)  # messages between shards: inbox rows
        return app

    def _logged_commit(self, instance: str, commit: Callable[..., Any]) -> Callable[..., Any]:
        def logged(fence: Any, outcomes: Any, *args: Any, **kwargs: Any) -> Any:
            attempt = Attempt(instance, fence.epoch, tuple(outcomes))
            self.attempts.append(attempt)
            try:
                return commit(fence, outcomes, *args, **kwargs)
            except BaseException as exc:
                attempt.error = exc
                raise
        return logged

    def _now(self) -> float:
        return (self.wallclock.now - self.start).total_seconds()

    # --- rules ---
    @initialize(data=st.data(), count=st.integers(2, 5))
    def requests_upstream_will_send(self, data: st.DataObject, count: int) -> None:
        for n in range(count):
            model = data.draw(intended_requests(f"r{n}"), label=f"r{n}")
            self.requests[model.request_id] = model

    @rule(data=st.data(), messages=st.lists(
        st.tuples(st.integers(0, INSTANCES - 1), st.sampled_from(VARIANTS),
                  st.sampled_from([True, True, True, False])), min_size=1, max_size=4))
    def deliver(self, data: st.DataObject, messages: list[tuple[int, str, bool]]) -> None:
        """Queue messages, each to an instance; ``elect=False``: the recorder crashed before its
        election."""
        for instance, variant, elect in messages:
            model, content = self._draw_step(data, variant)
            self._deliver(instance, model, content, elect)

    @rule(data=st.data(), leader=st.integers(0, INSTANCES - 1),
          recorder=st.integers(0, INSTANCES - 1), variant=st.sampled_from(VARIANTS),
          kind=st.sampled_from(LEADER_WRITES))
    def deliver_while_a_leader_writes(self, data: st.DataObject, leader: int, recorder: int,
                                      variant: str, kind: str) -> None:
        """Arm: when ``leader`` next starts a write of ``kind``, ``recorder`` takes a message."""
        model, content = self._draw_step(data, variant)
        self.faults[leader].interleave[kind] = lambda: self._deliver(recorder, model, content)

    def _draw_step(self, data: st.DataObject, variant: str) -> tuple[RequestModel, Content]:
        drawable = sorted(r for r in self.requests if r not in self.funding)
        model = self.requests[data.draw(st.sampled_from(drawable), label="request")]
        return model, variant_of(data.draw(st.sampled_from(model.intended), label="step"),
                                 variant)

    def _decided(self, request_id: str) -> bool:
        """The request has an outcome row (with shards: on any shard)."""
        return any(shard.ledger.read_outcome(request_id) is not None
                   for shard in self.apps[0].each_shard())

    def _pick_shard(self, data: st.DataObject) -> int:
        """The shard a rule acts on (one shard: no draw, so that the run stays as it was)."""
        return 0

    def _deliver(self, instance: int, model: RequestModel, content: Content,
                 elect: bool = True) -> None:
        if self._decided(model.request_id):
            model.late.append(content)
            SEEN["late delivery"] += 1
        else:
            model.record(content, self._now())
        app, body = self.apps[instance], content.body(model.request_id)
        if not elect:
            completion = parse_completion(body)
            home = app.home_of(completion)  # one shard: app itself
            # A lost response (the adapters raise it as StorageUnavailable): the row is there.
            with contextlib.suppress(ServiceResponseError, StorageUnavailable):
                # As a recorder that crashed right after announcing (a lost response on the
                # row leaves it unannounced: the sweeper's full scan finds it).
                announce_if_ready(home, completion, record_completion(home, completion))
            return
        message_id = uuid.uuid4().hex
        for dequeue_count in range(1, 6):  # the host retries a failed invocation
            try:
                handle_completion(app, body, message_id, dequeue_count)
                return
            except (StorageError, AzureError) as exc:
                if not injected(exc):
                    raise
        raise AssertionError("a message failed five times in a row with one fault injected")

    @rule(instance=st.integers(0, INSTANCES - 1))
    def sweep(self, instance: int) -> None:
        try:
            sweep(self.apps[instance])
        except (AzureError, StorageError) as exc:  # the timer invocation fails; the next retries
            if not injected(exc):
                raise

    @precondition(lambda self: self.paused is None)
    @rule(data=st.data(), instance=st.integers(0, INSTANCES - 1),
          variants=st.lists(st.sampled_from(VARIANTS), max_size=2))
    def pause_a_leader_mid_drain(self, data: st.DataObject, instance: int,
                                 variants: list[str]) -> None:
        """Steps recorded by instances that crashed before electing; then ``instance``
        acquires, scans and claims an epoch, and stops before committing what it found."""
        for variant in variants:
            model, content = self._draw_step(data, variant)
            self._deliver(data.draw(st.integers(0, INSTANCES - 1), label="recorder"), model,
                          content, elect=False)
        shard = self._pick_shard(data)
        app = self.apps[instance].on(shard)
        try:
            lease = app.elector.try_acquire()
        except StorageError as exc:  # the lease port's translation of an injected fault
            if not injected(exc):
                raise
            return
        if lease is None:
            return
        try:
            ready = ReadyView(app).read()
            if not ready:  # nothing to pause over: an ordinary empty election
                lease.release()
                return
            term = LeaderTerm.begin(app, lease)
        except (StorageError, AzureError, TermEnded) as exc:
            lease.release()
            if isinstance(exc, StorageError | AzureError) and not injected(exc):
                raise
            return
        self.paused = Paused(instance, term, ready, shard)

    @precondition(lambda self: self.paused is not None)
    @rule()
    def resume_the_paused_leader(self) -> None:
        """It carries on from its old scan: whatever it commits must still be right."""
        paused, self.paused = self.paused, None
        assert paused is not None
        try:
            paused.term.commit_ready(self.monotonic() + 60, paused.ready)
            SEEN["paused leader resumed and finished"] += 1
        except TermEnded as exc:
            SEEN[f"paused leader stopped: {type(exc).__name__}"] += 1
        except (StorageError, AzureError) as exc:
            if not injected(exc):
                raise
        finally:
            paused.term.lease.release()

    @precondition(lambda self: self.paused is None)
    @rule(data=st.data(), old=st.integers(0, INSTANCES - 1), new=st.integers(0, INSTANCES - 1),
          variants=st.lists(st.sampled_from(VARIANTS), min_size=1, max_size=3))
    def a_paused_leader_is_deposed_and_resumes(self, data: st.DataObject, old: int, new: int,
                                               variants: list[str]) -> None:
        """The whole story in one rule (the separate rules rarely line it up): ``old`` pauses
        over recorded work, ``new`` leads meanwhile, then ``old`` carries on from its scan."""
        self.pause_a_leader_mid_drain(data, old, variants[:1])
        if self.paused is None:
            return
        self.another_instance_takes_over(new)
        for variant in variants[1:]:
            model, content = self._draw_step(data, variant)
            self._deliver(new, model, content)
        self.resume_the_paused_leader()

    @precondition(lambda self: self.paused is not None)
    @rule(instance=st.integers(0, INSTANCES - 1))
    def another_instance_takes_over(self, instance: int) -> None:
        """The paused leader's lease is broken and another instance leads meanwhile."""
        self._break_lease()
        self.sweep(instance)

    @rule()
    def break_the_lease(self) -> None:
        """An operator (or the chaos run) breaks whatever lease is held."""
        self._break_lease()

    @rule()
    def leaders_reach_their_renewal(self) -> None:
        """Renew-interval seconds pass on the monotonic clocks (not enough for storage's lease
        to run out): a paused leader renews at its next checkpoint."""
        self.monotonic.now += float(SETTINGS["RENEW_INTERVAL_SECONDS"])

    @rule()
    def let_the_lease_run_out(self) -> None:
        """A minute passes on every monotonic clock, so storage lets the lease expire."""
        self.monotonic.now += 60
        self._break_lease()

    # No sum of these lands within seconds of the timeout, where storage's whole-second Date and
    # the real seconds a run takes could tip the app and the model different ways.
    @rule(seconds=st.sampled_from([61, 421, TIMEOUT_SECONDS + 3]))
    def time_passes(self, seconds: int) -> None:
        self._advance(seconds)

    def _break_lease(self) -> None:
        with contextlib.suppress(HttpResponseError):  # no lease to break
            BlobLeaseClient(lease_blob(self.apps[0])).break_lease(lease_break_period=0)

    def _advance(self, seconds: int) -> None:
        self.wallclock.advance(seconds)
        for model in self.requests.values():
            if model.request_id not in self.outcomes:
                model.note_verdict(self._now())

    @rule(instance=st.integers(0, INSTANCES - 1), kind=st.sampled_from(FAULT_KINDS))
    def lose_the_next_response(self, instance: int, kind: str) -> None:
        self.faults[instance].armed = kind

    # --- invariants ---
    @invariant()
    def the_ledger_is_what_the_model_allows(self) -> None:
        self._check_ledger()
        unexpected = self._unexpected_logs()
        assert not unexpected, unexpected

    def _unexpected_logs(self) -> list[str]:
        return self.errors.unexpected()

    def _check_ledger(self) -> None:
        self._observe_outcomes({decided.outcome.request_id: decided
                                for decided in self.apps[0].ledger.list_outcomes()})
        self._replay_commits()

    def _same_outcome(self, before: DecidedOutcome, now: DecidedOutcome | None) -> bool:
        return now == before

    def _observe_outcomes(self, rows: dict[str, DecidedOutcome]) -> None:
        for request_id, before in self.outcomes.items():
            assert self._same_outcome(before, rows.get(request_id)), \
                f"{request_id} got a second outcome: {before} then {rows.get(request_id)}"
            self.outcomes[request_id] = rows[request_id]
        for request_id, row in rows.items():
            if request_id in self.outcomes:
                continue
            model = self.requests[request_id]
            verdict = observed_verdict(row.outcome)
            if verdict == ("insufficient funds",):
                assert any(v[0] == "commit" for v in model.reachable), \
                    f"{request_id} rejected for funds but never complete: {model.reachable}"
            elif verdict[0] == "rejected" and verdict[1] not in KNOWN_REJECTIONS:
                assert any(v[0] == "rejected" for v in model.reachable), \
                    f"{request_id} {verdict}, the contract allows {sorted(model.reachable)}"
            else:
                assert verdict in model.reachable, \
                    f"{request_id} {verdict}, the contract allows {sorted(model.reachable)}"
            self.outcomes[request_id] = row
            SEEN[f"outcome: {verdict[0]}"] += 1

    def _landed(self, attempt: Attempt) -> bool:
        if attempt.error is None:
            return True
        if isinstance(attempt.error, (OutcomeExists, AccountChanged)):
            return False  # storage refused the transaction: nothing was written
        return all(
            (row := self.outcomes.get(o.request_id)) is not None
            and row.epoch == attempt.epoch and row.outcome.status == o.status
            for o in attempt.outcomes)

    def _replay_commits(self) -> None:
        balances: dict[str, Decimal] = {}
        decided: set[str] = set()
        for attempt in filter(self._landed, self.attempts):
            for outcome in attempt.outcomes:
                assert outcome.request_id not in decided, \
                    f"{outcome.request_id} decided by two transactions that landed"
                decided.add(outcome.request_id)
                if outcome.status == "committed":
                    after = _applied(balances, outcome.legs)
                    negative = {a: b for a, b in after.items() if b < 0}
                    assert not negative, f"{outcome.request_id} committed, taking {negative}"
                    balances.update(after)
                elif "insufficient funds" in outcome.reason:
                    legs = next(v[1] for v in self.requests[outcome.request_id].reachable
                                if v[0] == "commit")
                    after = _applied(balances, legs)
                    assert any(b < 0 for b in after.values()), \
                        f"{outcome.request_id} rejected for funds, yet {after} are all >= 0"
        real = self.apps[0].ledger.list_balances()
        assert all(b >= 0 for b in real.values()), real
        for account in set(real) | set(balances):
            assert real.get(account, Decimal(0)) == balances.get(account, Decimal(0)), \
                f"{account}: ledger {real.get(account)} but the committed legs give " \
                f"{balances.get(account)} (all balances {real})"
        committed_legs = sum((amount for row in self.outcomes.values()
                              if row.outcome.status == "committed"
                              for _, amount in row.outcome.legs), Decimal(0))
        assert sum(real.values(), Decimal(0)) == committed_legs, "money created or destroyed"

    # --- the quiet end ---
    def teardown(self) -> None:
        try:
            if self.paused is not None:  # it never wakes up again
                self.paused.term.lease.release()
                self.paused = None
            for faults in self.faults:
                faults.armed = None
                faults.interleave.clear()
            self._break_lease()
            if self.dropped:  # ShardedMachine: a known bug was hit, the example is dropped
                return
            self._quiet_sweep()
            waiting = [m.request_id for m in self.requests.values()
                       if m.reachable and m.request_id not in self.outcomes]
            assert not waiting, f"decidable but not decided after a quiet sweep: {waiting}"
            self._advance(TIMEOUT_SECONDS + 5)  # storage's Date has whole seconds
            self._quiet_sweep()
            undecided = [m.request_id for m in self.requests.values()
                         if m.rows and m.request_id not in self.outcomes]
            assert not undecided, f"not decided after the timeout: {undecided}"
            expired = [m.request_id for m in self.requests.values() if m.complete_in_time
                       and m.request_id in self.outcomes
                       and self.outcomes[m.request_id].outcome.status == "expired"]
            assert not expired, f"complete before the timeout, yet expired: {expired}"
            for shard in self.apps[0].each_shard():
                assert shard.completions.count() == 0, \
                    f"completion rows left behind on shard {shard.current}"
            self._at_the_end()
            if self.check_late_steps_parked:
                self._late_contradicting_steps_are_parked()
        finally:
            logging.getLogger("shared").removeHandler(self.errors)
            for app in self.apps:  # idle cleanup threads would pile up over the examples
                for shard in app.each_shard():
                    shard.cleaner._executor.shutdown(wait=False)  # RowCleaner has no close()

    def _quiet_sweep(self) -> None:
        repair_scan(self.apps[0], force=True)  # what the next full scan finds
        run_election(self.apps[0])
        self.the_ledger_is_what_the_model_allows()

    def _at_the_end(self) -> None:
        """What must hold once everything settled, beyond the invariant (shards: see below)."""

    def _late_contradicting_steps_are_parked(self) -> None:
        """Issue 11.2: a step that contradicts a committed outcome is kept for an operator."""
        parked = [m.body.decode("utf-8", "replace") + " " + m.error
                  for m in self.apps[0].parking.list()]
        for request_id, row in self.outcomes.items():
            if row.outcome.status != "committed":
                continue
            model = self.requests[request_id]
            seen = model.reachable[observed_verdict(row.outcome)]
            recorded = {c for cs in model.rows.values() for c in cs} | set(model.late)
            for content in sorted(recorded - seen, key=repr):
                SEEN["contradicting step parked"] += 1
                assert any(request_id in text and content.operation_id in text
                           for text in parked), \
                    f"{request_id} committed without {content}, which arrived but is not parked"


def _applied(balances: dict[str, Decimal], legs: Legs) -> dict[str, Decimal]:
    after: dict[str, Decimal] = {}
    for account, amount in legs:
        after[account] = after.get(account, balances.get(account, Decimal(0))) + amount
    return after


# --- shards -----------------------------------------------------------------------------------
SHARDS = 3
SHARD_MAP = ShardMap(SHARDS)
FUNDING = ("10.00", "60.00")  # each account's opening deposit: some transfers then fall short
QUIET_SECONDS = 45  # teardown: the longest every shard may take to settle its work in flight
# Former bugs (module docstring; tests/test_model_regressions.py), fixed: with
# MODEL_KNOWN_BUGS=0 the inputs of the first two are left out, and an example in which the app
# logs what one of the last two looked like is dropped (hypothesis.reject) rather than failed.
KNOWN_BUGS = os.environ.get("MODEL_KNOWN_BUGS", "1") == "1"  # fixed: their inputs are sent
KNOWN_BUG_SIGNS = {
    "a request decided on the plain path is coordinated":
        "already has an outcome, and no request of the transaction writes one",
    "a PREPARE sent again is refused at its escrow row": "at the escrow row",
}


def accounts_on(shard: int, count: int) -> tuple[str, ...]:
    """The first ``count`` account ids whose balances live on ``shard``."""
    return tuple(itertools.islice((f"acct-{i}" for i in itertools.count()
                                   if SHARD_MAP.account_shard(f"acct-{i}") == shard), count))


# Two accounts on shard 0 (a transfer between them homed there never crosses), one elsewhere.
SHARD_ACCOUNTS = {0: accounts_on(0, 2), 1: accounts_on(1, 1), 2: accounts_on(2, 1)}
EVERY_ACCOUNT = tuple(a for k in range(SHARDS) for a in SHARD_ACCOUNTS[k])


def request_homed_on(n: int, shard: int) -> str:
    """A request id (``r{n}.{j}``) whose multi-step request is recorded and decided on ``shard``."""
    return next(rid for j in itertools.count()
                if SHARD_MAP.home_of(rid := f"r{n}.{j}", 2, "") == shard)


def home_of(request_id: str, content: Content) -> int:
    return SHARD_MAP.home_of(request_id, content.expected, content.account_id)


@st.composite
def sharded_requests(draw: st.DrawFn, n: int) -> RequestModel:
    """A deposit, a transfer (on one shard or across two) or a request across all three shards
    (one debit and two credits, or two debits and one credit), on a home drawn at random."""
    kind = draw(st.sampled_from(["deposit", "transfer", "transfer", "one debit, three shards",
                                 "two debits, three shards"]))
    amount = Decimal(draw(st.sampled_from(AMOUNTS)))
    half = (amount / 2).quantize(Decimal("0.01"))
    if kind == "deposit":  # one step: homed on its account's shard
        request_id = f"r{n}"
        legs = [("add_funds", draw(st.sampled_from(EVERY_ACCOUNT)), amount)]
    else:
        request_id = request_homed_on(n, draw(st.integers(0, SHARDS - 1), label="home"))
        if kind == "transfer":
            source, target = draw(st.permutations(EVERY_ACCOUNT))[:2]
            legs = [("withdraw_funds", source, amount), ("add_funds", target, amount)]
        else:
            a, b, c = (draw(st.sampled_from(SHARD_ACCOUNTS[k]))
                       for k in draw(st.permutations(range(SHARDS))))
            legs = [("withdraw_funds", a, amount), ("add_funds", b, amount - half),
                    ("add_funds", c, half)] if kind.startswith("one") else \
                [("withdraw_funds", a, amount - half), ("withdraw_funds", b, half),
                 ("add_funds", c, amount)]
    steps = [Content(f"{request_id}-{i}", operation, account, value, len(legs), "succeeded")
             for i, (operation, account, value) in enumerate(legs)]
    return RequestModel(request_id, steps)


@dataclass
class ShardState:
    """Every shard's ledger partition as one read after a rule found it (nothing else writes
    between rules: the checks see one state)."""

    accounts: dict[str, AccountRow] = field(default_factory=dict)
    outcomes: dict[str, tuple[int, DecidedOutcome]] = field(default_factory=dict)  # shard, row
    coordinations: dict[str, tuple[int, Coordination]] = field(default_factory=dict)
    escrows: list[tuple[int, int, Escrow]] = field(default_factory=list)  # shard, home, escrow
    applied: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    flight: dict[int, list[str]] = field(default_factory=dict)  # row keys by shard

    @classmethod
    def read(cls, app: LedgerApp) -> ShardState:
        state = cls()
        for shard in app.each_shard():
            k = shard.current
            for account, row in shard.ledger.list_accounts().items():
                assert SHARD_MAP.account_shard(account) == k, f"{account} has a row on shard {k}"
                state.accounts[account] = row
            for decided in shard.ledger.list_outcomes():
                rid = decided.outcome.request_id
                assert rid not in state.outcomes, \
                    f"{rid} has outcome rows on shards {state.outcomes[rid][0]} and {k}: " \
                    f"{state.outcomes[rid][1].outcome} and {decided.outcome}"
                state.outcomes[rid] = (k, decided)
            for flying in shard.ledger.list_rows(FLIGHT_PREFIX):
                key = str(flying["RowKey"])
                state.flight.setdefault(k, []).append(key)
                if key.startswith(COORD_PREFIX):
                    coordination = Coordination.from_row(flying)
                    rid = coordination.request_id
                    assert coordination.home == k, coordination
                    assert rid not in state.coordinations, \
                        f"{rid} coordinated on shard {k} and {state.coordinations.get(rid)}"
                    state.coordinations[rid] = (k, coordination)
                elif key.startswith(ESCROW_PREFIX):
                    state.escrows.append((k, int(flying["home"]), Escrow.from_row(flying)))
            for marker in shard.ledger.list_rows(APPLIED_PREFIX):
                state.applied[(k, str(marker["RowKey"]).removeprefix(APPLIED_PREFIX))] = \
                    dict(marker)
        return state

    def applied_legs(self) -> dict[str, Decimal]:
        """Per account, the legs landed so far: every leg of a committed request decided on
        one shard, and the legs of a cross-shard commit on each shard that applied it."""
        landed: dict[str, Decimal] = {}
        for rid, (home, decided) in self.outcomes.items():
            outcome = decided.outcome
            if outcome.status != "committed":
                continue
            by_shard = SHARD_MAP.legs_by_shard(outcome.legs)
            crossing = set(by_shard) - {home}
            assert set(outcome.shards) == crossing, \
                f"{rid} decided on shard {home} names shards {outcome.shards}; its legs " \
                f"are on {sorted(by_shard)}"
            for shard, legs in by_shard.items():
                if crossing and (shard, rid) not in self.applied:
                    continue  # decided, not applied there yet: in transit
                for account, amount in legs:
                    landed[account] = landed.get(account, Decimal(0)) + amount
        return landed


def _marker_legs(marker: dict[str, Any]) -> list[tuple[str, Decimal]]:
    return sorted((str(a), Decimal(m)) for a, m in json.loads(marker.get("legs") or "[]"))


class ShardedMachine(ProtocolMachine):
    """The same instances, faults and contract model on ``SHARDS`` shards (``LEDGER_SHARDS``);
    the rules and invariants it adds are in the module docstring, "Shards"."""

    SHARDS = SHARDS

    def __init__(self, connection_string: str, check_late_steps_parked: bool = False) -> None:
        super().__init__(connection_string, check_late_steps_parked)
        # Strangers and operators use their own client, outside the instances' faults.
        self.blobs = BlobServiceClient.from_connection_string(connection_string)
        self.strangers: dict[int, BlobLeaseClient] = {}

    # --- requests ---
    @initialize(data=st.data(), count=st.integers(3, 6))
    def requests_upstream_will_send(self, data: st.DataObject, count: int) -> None:
        for n in range(count):
            model = data.draw(sharded_requests(n), label=f"r{n}")
            self.requests[model.request_id] = model

    @initialize(data=st.data())
    def accounts_are_funded(self, data: st.DataObject) -> None:
        for account in EVERY_ACCOUNT:
            amount = Decimal(data.draw(st.sampled_from(FUNDING), label=f"funding {account}"))
            request_id = f"fund.{account}"
            model = RequestModel(request_id, [Content(f"{request_id}-0", "add_funds", account,
                                                      amount, 1, "succeeded")])
            self.requests[request_id] = model
            self.funding.add(request_id)
            self._deliver(0, model, model.intended[0])

    def _draw_step(self, data: st.DataObject, variant: str) -> tuple[RequestModel, Content]:
        model, content = super()._draw_step(data, variant)
        sent = next((c for c in model.intended if c.operation_id == content.operation_id),
                    model.intended[0])
        if not KNOWN_BUGS and home_of(model.request_id, content) != \
                home_of(model.request_id, sent):
            SEEN["known bug left out: a step of another home sent as intended"] += 1
            return model, sent
        return model, content

    def _pick_shard(self, data: st.DataObject) -> int:
        return data.draw(st.integers(0, SHARDS - 1), label="shard")

    def _deliver(self, instance: int, model: RequestModel, content: Content,
                 elect: bool = True) -> None:
        if not KNOWN_BUGS and self._decided_without_coordination(model):
            SEEN["known bug left out: a late step of a request decided on the plain path"] += 1
            return
        super()._deliver(instance, model, content, elect)

    def _unexpected_logs(self) -> list[str]:
        """The base's, but an example that hit a known bug (and nothing else unexpected) is
        dropped: its teardown checks nothing more."""
        found = super()._unexpected_logs()
        if KNOWN_BUGS or not found:
            return found
        hit = {name for name, sign in KNOWN_BUG_SIGNS.items() if any(sign in m for m in found)}
        if any(not any(sign in m for sign in KNOWN_BUG_SIGNS.values()) for m in found):
            return found  # something else too: fail
        for name in hit:
            SEEN[f"known bug hit, example dropped: {name}"] += 1
        self.dropped = True
        reject()
        return found  # unreachable: reject raises

    def _decided_without_coordination(self, model: RequestModel) -> bool:
        """A cross-shard request (by its legs) that ended without a coordination: rejected
        (not for funds), aborted or expired on the plain path (no ``coordinated:`` row)."""
        home = home_of(model.request_id, model.intended[0])
        if all(SHARD_MAP.account_shard(c.account_id) == home for c in model.intended):
            return False
        decided = self.apps[0].on(home).ledger.read_outcome(model.request_id)
        return decided is not None and decided.outcome.status != "committed" and \
            "insufficient funds" not in decided.outcome.reason

    # --- rules shards add ---
    @rule(data=st.data())
    def upstream_sends_a_whole_request(self, data: st.DataObject) -> None:
        """Every step of one request as sent, in any order, each to any instance (so that
        more requests complete and cross shards than single deliveries make)."""
        drawable = sorted(r for r in self.requests if r not in self.funding)
        model = self.requests[data.draw(st.sampled_from(drawable), label="request")]
        for content in data.draw(st.permutations(model.intended), label="order"):
            self._deliver(data.draw(st.integers(0, INSTANCES - 1), label="instance"), model,
                          content, elect=data.draw(st.sampled_from([True, True, True, False]),
                                                   label="elect"))

    @rule(instance=st.integers(0, INSTANCES - 1), shard=st.integers(0, SHARDS - 1))
    def elect_one_shard(self, instance: int, shard: int) -> None:
        """One election of ``shard`` alone: the shards it sends messages to are not driven."""
        try:
            result = Election(self.apps[instance].on(shard)).run(False)
            SEEN[f"one shard elected: {result.role.value}"] += 1
        except (AzureError, StorageError) as exc:
            if not injected(exc):
                raise

    @rule(shard=st.integers(0, SHARDS - 1),
          change=st.sampled_from(["a stranger takes it", "the stranger lets go", "broken"]))
    def a_shards_lease_changes_hands(self, shard: int, change: str) -> None:
        """A slow participant: a stranger holds the shard's lease until it lets go (or the
        lease is broken), and meanwhile no instance can act on that shard's inbox. Or an
        operator breaks that one shard's lease."""
        if change == "broken":
            self._break_shard_lease(shard)
        elif change == "the stranger lets go":
            with contextlib.suppress(HttpResponseError, KeyError):  # none, or broken meanwhile
                self.strangers.pop(shard).release()
        elif shard not in self.strangers:
            stranger = BlobLeaseClient(self._lease_blob(shard))
            try:
                stranger.acquire(lease_duration=60)
            except HttpResponseError:  # an instance holds it (a paused leader, a lost release)
                return
            self.strangers[shard] = stranger
            SEEN["a stranger held a shard's lease"] += 1

    # The base rules of these names, with the fault kinds shards add: "deliver" (an inbox
    # create, a message to another shard) and "exchange" (a transaction of the exchange).
    @rule(instance=st.integers(0, INSTANCES - 1),
          kind=st.sampled_from([*FAULT_KINDS, "deliver", "exchange", "exchange"]))
    def lose_the_next_response(self, instance: int, kind: str) -> None:
        self.faults[instance].armed = kind

    @rule(data=st.data(), leader=st.integers(0, INSTANCES - 1),
          recorder=st.integers(0, INSTANCES - 1), variant=st.sampled_from(VARIANTS),
          kind=st.sampled_from([*LEADER_WRITES, "exchange"]))
    def deliver_while_a_leader_writes(self, data: st.DataObject, leader: int, recorder: int,
                                      variant: str, kind: str) -> None:
        super().deliver_while_a_leader_writes(data, leader, recorder, variant, kind)

    def _lease_blob(self, shard: int) -> Any:
        config = self.apps[0].config
        return self.blobs.get_blob_client(config.lease_container,
                                          lease_blob_name(config.lease_blob, shard))

    def _break_shard_lease(self, shard: int) -> None:
        with contextlib.suppress(HttpResponseError):  # no lease to break
            BlobLeaseClient(self._lease_blob(shard)).break_lease(lease_break_period=0)
        self.strangers.pop(shard, None)

    def _break_lease(self) -> None:
        for shard in range(SHARDS):
            self._break_shard_lease(shard)

    # --- invariants ---
    def _same_outcome(self, before: DecidedOutcome, now: DecidedOutcome | None) -> bool:
        """An outcome never changes; only ``settled`` goes from False to True, once."""
        return now is not None and replace(now, settled=True) == replace(before, settled=True) \
            and (now.settled or not before.settled)

    def _check_ledger(self) -> None:
        """The invariants of the module docstring, "Shards", on one read of every partition."""
        state = ShardState.read(self.apps[0])
        self._observe_outcomes({rid: decided for rid, (_, decided) in state.outcomes.items()})
        for rid, (_, decided) in state.outcomes.items():
            reason = decided.outcome.reason
            if "insufficient funds" in reason:  # names a debit of the request, below zero
                legs = next(v[1] for v in self.requests[rid].reachable if v[0] == "commit")
                account, _, below = reason.removeprefix("insufficient funds: account ") \
                    .partition(" would go to ")
                assert account in debits_of(legs), (rid, reason, legs)
                assert Decimal(below) < 0, (rid, reason)
        held: dict[str, Decimal] = {}
        for shard, home, escrow in state.escrows:
            rid, account = escrow.request_id, escrow.account_id
            assert SHARD_MAP.account_shard(account) == shard, (rid, account, shard)
            # Stronger than "a coordination or an outcome": an escrow outlives neither its
            # coordination (released or consumed before the shard's ACK) nor its home.
            found = state.coordinations.get(rid)
            assert found is not None, f"escrow of {rid} on {account} without a coordination"
            assert found[0] == home, \
                f"escrow of {rid} on {account} (shard {shard}) but no coordination on its " \
                f"home {home}: {state.outcomes.get(rid)}"
            here = [(a, m) for a, m in found[1].legs if SHARD_MAP.account_shard(a) == shard]
            assert debits_of(here).get(account) == escrow.amount, (rid, escrow, here)
            held[account] = held.get(account, Decimal(0)) + escrow.amount
        for (shard, rid), marker in state.applied.items():
            at_home = state.outcomes.get(rid)
            assert at_home is not None, f"applied:{rid} on shard {shard} but no outcome"
            assert at_home[0] == int(marker["home"]), \
                f"applied:{rid} on shard {shard}, its outcome on {at_home[0]}, not {marker}"
            outcome = at_home[1].outcome
            assert marker["status"] == outcome.status.value, (rid, shard, marker, outcome)
            expected = SHARD_MAP.legs_by_shard(outcome.legs).get(shard, ()) \
                if outcome.status == "committed" else ()
            assert _marker_legs(marker) == sorted(expected), (rid, shard, marker, outcome)
        landed = state.applied_legs()
        for account in set(state.accounts) | set(landed):
            row = state.accounts.get(account) or AccountRow(account, Decimal(0), None)
            assert row.balance >= 0, row
            assert row.reserved >= 0, row
            assert row.reserved == held.get(account, Decimal(0)), \
                f"{account} reserves {row.reserved}, its escrow rows hold {held.get(account)}"
            # Conservation: money in flight is in escrow (in ``reserved``), credits land only
            # with the decision on their shard, so balance + reserved is what landed there.
            assert row.balance + row.reserved == landed.get(account, Decimal(0)), \
                f"{account}: balance {row.balance} + reserved {row.reserved}, but the legs " \
                f"landed on its shard give {landed.get(account)}"
        SEEN["invariant: requests in flight"] += len(state.coordinations)

    # --- the quiet end ---
    def _quiet_sweep(self) -> None:
        """Sweep every shard, the resend time apart, until no shard has work in flight; then
        once more for the late steps the last decisions left."""
        app = self.apps[0]
        self.strangers.clear()  # broken with every lease before the first quiet sweep

        def sweep_all() -> None:
            for shard in app.each_shard():
                repair_scan(shard, force=True)
                run_election(shard)

        left: list[ShardState] = []

        def settled() -> bool:
            self.monotonic.advance(RESEND_SECONDS)  # this process may send messages again
            sweep_all()
            self._unexpected_logs()  # drops the example at once if it hit a known bug
            left[:] = [ShardState.read(app)]
            return not left[0].flight

        try:
            wait_until(settled, QUIET_SECONDS, "every shard to settle its work in flight",
                       interval=0.5)
        except AssertionError as exc:
            state = left[0]
            coordinations = {rid: (k, c.status, dict(c.votes), c.acks)
                             for rid, (k, c) in state.coordinations.items()}
            raise AssertionError(
                f"{exc}: left {state.flight}; coordinations (home, status, votes, acks) "
                f"{coordinations}; unexpected logs {sorted(set(self.errors.unexpected()))}",
            ) from exc
        sweep_all()
        self.the_ledger_is_what_the_model_allows()

    def _at_the_end(self) -> None:
        """Every request decided once, settled; every commit applied on each of its shards,
        once; no escrow or message left; balances are the committed legs, to the cent."""
        state = ShardState.read(self.apps[0])
        assert not state.flight, f"work in flight left: {state.flight}"
        net: dict[str, Decimal] = {}
        for rid, (home, decided) in state.outcomes.items():
            assert decided.settled, f"{rid} ({decided.outcome.status}) never settled"
            if decided.outcome.status != "committed":
                continue
            by_shard = SHARD_MAP.legs_by_shard(decided.outcome.legs)
            if set(by_shard) != {home}:
                missing = [k for k in by_shard if (k, rid) not in state.applied]
                assert not missing, f"{rid} committed, never applied on shards {missing}"
                SEEN["cross-shard commit applied everywhere"] += 1
            for account, amount in decided.outcome.legs:
                net[account] = net.get(account, Decimal(0)) + amount
        for account in set(state.accounts) | set(net):
            row = state.accounts.get(account) or AccountRow(account, Decimal(0), None)
            assert row.reserved == 0, row
            assert row.balance == net.get(account, Decimal(0)), \
                f"{account}: {row}, the committed legs give {net.get(account)}"


# --- the tests --------------------------------------------------------------------------------
MODEL_SETTINGS = settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "20")),
                          stateful_step_count=int(os.environ.get("MODEL_STEPS", "25")),
                          deadline=None, print_blob=True)


SHARDED_EXAMPLES = 8  # CI's size of the sharded run (each example is costlier)
SHARDED_STEPS = 20
FIXED_SEED = 20260101  # CI's seed; MODEL_SEED=random or MODEL_SEED=N chooses another


def model_seed() -> int:
    """``MODEL_SEED``: unset or empty, ``FIXED_SEED``; ``random``, a fresh one; else that number."""
    wanted = os.environ.get("MODEL_SEED", "").strip()
    if not wanted:
        return FIXED_SEED
    if wanted.lower() == "random":
        return secrets.randbelow(2**32)
    return int(wanted)


def _run(connection_string: str, check_late_steps_parked: bool, examples: int | None = None,
         steps: int | None = None, kind: type[ProtocolMachine] = ProtocolMachine,
         health: list[HealthCheck] | None = None) -> None:
    """Run ``kind`` with ``examples`` and ``steps`` (``MODEL_EXAMPLES`` and ``MODEL_STEPS``
    win when set; else the defaults of ``MODEL_SETTINGS``)."""
    chosen = model_seed()
    print(f"model seed {chosen}: rerun with MODEL_SEED={chosen}")  # shown when the test fails

    def machine() -> ProtocolMachine:
        return kind(connection_string, check_late_steps_parked)

    SEEN.clear()
    run_state_machine_as_test(
        seed(chosen)(machine),  # type: ignore[arg-type]  # a factory, as documented
        settings=settings(
            MODEL_SETTINGS,
            max_examples=MODEL_SETTINGS.max_examples
            if "MODEL_EXAMPLES" in os.environ or examples is None else examples,
            stateful_step_count=MODEL_SETTINGS.stateful_step_count
            if "MODEL_STEPS" in os.environ or steps is None else steps,
            suppress_health_check=health or ()))
    print("exercised:", ", ".join(f"{what} {count}" for what, count in sorted(SEEN.items())))


@pytest.fixture
def quiet_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The app logs every step at INFO; thousands of them slow the run and say nothing here.

    Shrinking a failure replays the machine hundreds of times: cap it (MODEL_SHRINK_SECONDS) so
    that a failing run ends inside the test timeout with the smallest program found by then.
    """
    monkeypatch.setattr(engine, "MAX_SHRINKING_SECONDS",
                        int(os.environ.get("MODEL_SHRINK_SECONDS", "120")), raising=False)
    logger = logging.getLogger("shared")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("quiet_logs")
def test_the_protocol_keeps_the_contract_under_faults(azurite: Azurite) -> None:
    _run(azurite.connection_string, check_late_steps_parked=False)


@pytest.mark.usefixtures("quiet_logs")
def test_late_steps_that_contradict_a_commit_are_parked(azurite: Azurite) -> None:
    """Issue 11.2 over the same machine: nothing that contradicts a commit is dropped silently."""
    _run(azurite.connection_string, check_late_steps_parked=True, examples=10)


@pytest.mark.usefixtures("quiet_logs")
def test_shards_keep_the_contract_under_faults(azurite: Azurite) -> None:
    """The machine on three shards, with cross-shard requests and the faults shards add: the
    invariants of the module docstring's "Shards" after every rule, and at the quiet end."""
    _run(azurite.connection_string, check_late_steps_parked=False, examples=SHARDED_EXAMPLES,
         steps=SHARDED_STEPS, kind=ShardedMachine,
         # Examples dropped for a known bug are rare; too many would mean another one.
         health=[] if KNOWN_BUGS else [HealthCheck.filter_too_much])
