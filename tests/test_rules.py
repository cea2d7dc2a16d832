"""The pure rules, table-driven and without storage: ``assess``, ``apply_legs``,
``plan_batches``, ``contradiction``, ``plan_transaction`` and ``classify_refusal``."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from shared.domain.contract import Operation, StepStatus
from shared.domain.model import (
    AccountRow,
    DecidedOutcome,
    Fence,
    Outcome,
    OutcomeStatus,
    RecordedStep,
)
from shared.domain.planning import (
    AccountChanged,
    FencedOut,
    LedgerWriteError,
    OutcomeExists,
    classify_refusal,
    plan_batches,
    plan_transaction,
)
from shared.domain.rules import (
    Assessment,
    InsufficientFunds,
    Verdict,
    apply_legs,
    assess,
    contradiction,
    name_some,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = timedelta(seconds=900)


def s(op: str, kind: str = "add", account: str = "alice", amount: str = "1.00",
      expected: int = 2, failed: bool = False, conflict: bool = False, at: float = 0,
      content: str | None = None) -> RecordedStep:
    """A recorded step of request r1."""
    return RecordedStep.model_construct(
        request_id="r1", row_key=op + ("~conflict" if conflict else ""), operation_id=op,
        operation=Operation.ADD_FUNDS if kind == "add" else Operation.WITHDRAW_FUNDS,
        account_id=account, amount=Decimal(amount), expected_operations=expected,
        status=StepStatus.FAILED if failed else StepStatus.SUCCEEDED,
        stored_key=content or f"k-{op}{'-x' if conflict else ''}",
        recorded_at=T0 + timedelta(seconds=at), conflict=conflict)


ASSESS_CASES = [
    # (id, steps, seconds after T0, verdict, words in the reason)
    ("one of two", [s("a")], 10, Verdict.PENDING, "1 of 2 steps"),
    ("both", [s("a"), s("w", "withdraw", "bob")], 10, Verdict.COMMIT, ""),
    ("duplicate row counts once", [s("a"), s("a")], 10, Verdict.PENDING, "1 of 2"),
    ("conflict first", [s("a"), s("a", conflict=True), s("w", failed=True)], 10,
     Verdict.REJECTED, "different content: a"),
    ("expected disagrees", [s("a"), s("w", expected=3)], 10, Verdict.REJECTED,
     "disagree on expectedOperations: 2, 3"),
    ("too many", [s("a"), s("b"), s("c")], 10, Verdict.REJECTED, "3 distinct steps"),
    ("failed aborts before all arrive", [s("a", failed=True)], 10, Verdict.ABORTED,
     "step failed: a"),
    ("not yet expired at 899 s", [s("a")], 899, Verdict.PENDING, ""),
    ("not expired within the grace after 900 s", [s("a")], 900.5, Verdict.PENDING, ""),
    ("expired 1 s after 900 s", [s("a")], 901, Verdict.EXPIRED,
     "1 of 2 steps arrived within 900"),
    ("complete on time, looked at late", [s("a"), s("b")], 5000, Verdict.COMMIT, ""),
    ("expiry counts from the first step", [s("a", at=0), s("a", at=800)], 901,
     Verdict.EXPIRED, ""),
    # The deadline (first step + timeout) cuts: a step stamped at or after it never counts.
    ("a last step stamped at the deadline is late: expired",
     [s("a"), s("w", "withdraw", "bob", at=900)], 1000, Verdict.EXPIRED, "1 of 2"),
    ("a last step stamped just before the deadline counts",
     [s("a"), s("w", "withdraw", "bob", at=899.999)], 5000, Verdict.COMMIT, ""),
    ("a failed step past the deadline does not abort",
     [s("a"), s("w", failed=True, at=950)], 1000, Verdict.EXPIRED, "1 of 2"),
    ("a conflict past the deadline does not reject",
     [s("a"), s("w", "withdraw", "bob"), s("a", conflict=True, at=950)], 1000, Verdict.COMMIT,
     ""),
    ("an extra step past the deadline does not reject",
     [s("a"), s("w", "withdraw", "bob"), s("x", at=901)], 1000, Verdict.COMMIT, ""),
]


@pytest.mark.parametrize(("steps", "seconds", "verdict", "words"),
                         [case[1:] for case in ASSESS_CASES],
                         ids=[case[0] for case in ASSESS_CASES])
def test_assess(steps: list[RecordedStep], seconds: float, verdict: Verdict,
                words: str) -> None:
    found = assess("r1", steps, T0 + timedelta(seconds=seconds), TIMEOUT)
    assert found.verdict is verdict
    assert words in found.reason


def test_steps_past_the_deadline_are_set_aside_as_late_whenever_the_leader_looks() -> None:
    steps = [s("a"), s("w", "withdraw", "bob", at=907)]  # 7 s past the deadline: late
    for seconds in (907, 950, 10_000):  # the verdict does not depend on when the look is made
        found = assess("r1", steps, T0 + timedelta(seconds=seconds), TIMEOUT)
        assert found.verdict is Verdict.EXPIRED
        assert [x.operation_id for x in found.steps] == ["a"]
        assert [x.operation_id for x in found.late] == ["w"]
        assert [x.operation_id for x in found.rows] == ["a", "w"]


def test_assess_gives_the_legs_in_operation_order_and_what_the_steps_expected() -> None:
    found = assess("r1", [s("w", "withdraw", "bob", "3.00"), s("a", amount="3.00")],
                   T0, TIMEOUT)
    assert found.legs == (("alice", Decimal("3.00")), ("bob", Decimal("-3.00")))
    assert found.expected_operations == 2
    assert found.step_contents == (("a", "k-a"), ("w", "k-w"))


def test_assess_names_five_offenders_and_counts_the_rest() -> None:
    steps = [s(f"op{i:03d}", expected=50) for i in range(300)]
    steps += [s(f"op{i:03d}", expected=50, conflict=True) for i in range(300)]
    found = assess("r1", steps, T0, TIMEOUT)
    assert found.reason == ("operationId arrived twice with different content: op000, op001, "
                            "op002, op003, op004 and 295 more (300 in all)")


@pytest.mark.parametrize(("items", "text"), [
    ([], ""), (["a"], "a"), (list("abcde"), "a, b, c, d, e"),
    (list("abcdef"), "a, b, c, d, e and 1 more (6 in all)"),
])
def test_name_some(items: list[str], text: str) -> None:
    assert name_some(items) == text


APPLY_CASES = [
    ("deposit", {"a": "0.00"}, [("a", "5.00")], {"a": "5.00"}),
    ("transfer", {"a": "5.00", "b": "0.00"}, [("a", "-5.00"), ("b", "5.00")],
     {"a": "0.00", "b": "5.00"}),
    ("legs on one account net out", {"a": "1.00"}, [("a", "-3.00"), ("a", "2.50")],
     {"a": "0.50"}),
]


@pytest.mark.parametrize(("balances", "legs", "after"), [c[1:] for c in APPLY_CASES],
                         ids=[c[0] for c in APPLY_CASES])
def test_apply_legs(balances: dict[str, str], legs: list[tuple[str, str]],
                    after: dict[str, str]) -> None:
    changed = apply_legs({k: Decimal(v) for k, v in balances.items()},
                         [(k, Decimal(v)) for k, v in legs])
    assert changed == {k: Decimal(v) for k, v in after.items()}


@pytest.mark.parametrize(("balances", "legs", "account"), [
    ({"a": "4.99"}, [("a", "-5.00")], "a"),
    ({"a": "5.00", "b": "0.00"}, [("b", "-0.01"), ("a", "-1.00")], "b"),
])
def test_apply_legs_refuses_a_negative_balance_all_or_nothing(
        balances: dict[str, str], legs: list[tuple[str, str]], account: str) -> None:
    with pytest.raises(InsufficientFunds) as refused:
        apply_legs({k: Decimal(v) for k, v in balances.items()},
                   [(k, Decimal(v)) for k, v in legs])
    assert refused.value.account_id == account


def ready(request_id: str, *accounts: str) -> Assessment:
    return Assessment(request_id, Verdict.COMMIT, "", (),
                      tuple((a, Decimal("1.00")) for a in accounts))


@pytest.mark.parametrize(("requests", "sizes"), [
    ([ready("r0", "a")], [1]),
    # 1 fence + n outcomes + distinct accounts <= 100
    ([ready(f"r{i}", f"a{i}") for i in range(49)], [49]),
    ([ready(f"r{i}", f"a{i}") for i in range(50)], [49, 1]),
    ([ready(f"r{i}", "hot") for i in range(98)], [98]),  # one hot account: 1 + 98 + 1
    ([ready(f"r{i}", "hot") for i in range(99)], [98, 1]),
    ([ready(f"r{i}", *[f"a{i}-{j}" for j in range(50)]) for i in range(3)], [1, 1, 1]),
], ids=["one", "49 spread", "50 spread", "98 hot", "99 hot", "wide requests"])
def test_plan_batches(requests: list[Assessment], sizes: list[int]) -> None:
    batches = plan_batches(requests)
    assert [len(b) for b in batches] == sizes
    assert [a for b in batches for a in b] == requests, "order kept"


def decided(status: str, expected: int = 2, steps: dict[str, str] | None = None,
            complete: bool = True) -> DecidedOutcome:
    contents = steps if steps is not None else {"a": "k-a", "w": "k-w"}
    return DecidedOutcome(Outcome("r1", OutcomeStatus(status), "", (), len(contents), expected,
                                  tuple(sorted(contents.items()))), "", 3, "x", complete)


CONTRADICTION_CASES = [
    ("duplicate", decided("committed"), s("a"), None),
    ("second content", decided("committed"), s("a", content="other"), "content different"),
    ("conflict row", decided("aborted"), s("a", conflict=True), "content different"),
    ("other expected", decided("committed"), s("b", expected=3), "expectedOperations 3"),
    ("extra leg", decided("committed"), s("b"), "not one of the 2 steps"),
    ("extra leg, digests cut", decided("committed", complete=False), s("b"), None),
    ("late leg of an aborted request", decided("aborted"), s("b"), None),
    ("late leg of an expired request", decided("expired"), s("b", expected=3), None),
    ("old row without digests", decided("committed", steps={}, complete=False), s("b"), None),
]


@pytest.mark.parametrize(("outcome", "late", "words"), [c[1:] for c in CONTRADICTION_CASES],
                         ids=[c[0] for c in CONTRADICTION_CASES])
def test_contradiction(outcome: DecidedOutcome, late: RecordedStep, words: str | None) -> None:
    why = contradiction(outcome, late)
    if words is None:
        assert why is None
    else:
        assert why is not None
        assert words in why


FENCE = Fence(7, "etag-7", "me/lease", "t0")


def test_plan_transaction_starts_with_the_fenced_update_then_outcomes_then_accounts() -> None:
    plan = plan_transaction("ledger", FENCE, [Outcome("r1", OutcomeStatus.COMMITTED, "")], {
        "new": (AccountRow("new", Decimal(0), None), Decimal("1.00")),
        "old": (AccountRow("old", Decimal(5), "etag-old"), Decimal("4.00"))}, "t1")
    kinds = [write.kind for write in plan.writes]
    assert kinds == ["replace", "create", "create", "replace"]
    assert plan.writes[0].etag == "etag-7"
    assert plan.writes[3].etag == "etag-old"
    assert plan.subjects == [("fence", ""), ("request", "r1"), ("account", "new"),
                             ("account", "old")]
    assert plan.writes[2].entity["balance"] == "1.00"


def test_plan_transaction_refuses_more_than_a_transaction_holds() -> None:
    outcomes = [Outcome(f"r{i}", OutcomeStatus.ABORTED, "") for i in range(100)]
    with pytest.raises(ValueError, match="101 operations"):
        plan_transaction("ledger", FENCE, outcomes, {}, "t1")
    with pytest.raises(ValueError, match="needs something to write"):
        plan_transaction("ledger", FENCE, [], {}, "t1")


PLAN = plan_transaction("ledger", FENCE, [Outcome("r1", OutcomeStatus.COMMITTED, "")], {
    "acct": (AccountRow("acct", Decimal(0), "e"), Decimal("1.00"))}, "t1")
REFUSALS = [
    ("fence condition", 0, "UpdateConditionNotSatisfied", FencedOut),
    ("fence gone", 0, "ResourceNotFound", FencedOut),
    ("fence other", 0, "InternalError", LedgerWriteError),
    ("outcome exists", 1, "EntityAlreadyExists", OutcomeExists),
    ("outcome too large", 1, "PropertyValueTooLarge", LedgerWriteError),
    ("outcome bad value", 1, "InvalidInput", LedgerWriteError),
    ("account changed", 2, "UpdateConditionNotSatisfied", AccountChanged),
    ("account throttled", 2, "ServerBusy", LedgerWriteError),
    ("no index", -1, "", LedgerWriteError),
]


@pytest.mark.parametrize(("index", "code", "kind"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_classify_refusal_by_row_and_code(index: int, code: str, kind: type) -> None:
    subject = PLAN.subjects[index] if index >= 0 else ("?", "")
    refusal = classify_refusal(subject, code, 7)
    assert type(refusal) is kind
    if kind is LedgerWriteError:
        assert (code or "no code") in str(refusal)


def test_outcome_rows_keep_reasons_and_digests_bounded() -> None:
    long = Outcome("r1", OutcomeStatus.REJECTED, "why " * 10_000, (), 500, 50,
                   tuple((f"op{i}", "k" * 32) for i in range(500)))
    entity = plan_transaction("ledger", FENCE, [long], {}, "t1").writes[1].entity
    assert len(entity["reason"]) == 1_000
    assert entity["reason"].endswith("more characters)")
    assert entity["stepsComplete"] is False
    assert len(entity["steps"]) < 32_000
    short = replace(long, reason="ok", steps=(("a", "k"),))
    entity = plan_transaction("ledger", FENCE, [short], {}, "t1").writes[1].entity
    assert entity["reason"] == "ok"
    assert entity["stepsComplete"] is True
