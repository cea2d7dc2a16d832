"""Bad input end to end: adversarial queue bodies never raise, never move money, and are parked.

Two layers, both property-based (hypothesis):

- thousands of bodies through ``parse_completion`` alone, each judged by ``contract_error``, an
  oracle of the v1 contract written here from the README (not from ``shared/domain/contract.py``):
  the
  parser refuses exactly what the oracle refuses, and only with ``MalformedMessage``;
- a few hundred invalid bodies through the queue-triggered function itself
  (``simulator.functions.indexed().queue_handler`` with real ``QueueMessage`` objects) against
  Azurite: it never raises, writes no completion, changes no balance, and parks the body as
  received with a reason an operator can read.

Then requests whose steps disagree on what the contract says must agree are delivered while
another instance holds the lease, and the sweeper's leader rejects them with a reason that names
what disagrees.

Replay a failure: hypothesis prints ``@reproduce_failure`` (print_blob) and the falsifying body;
``--hypothesis-seed=N`` replays a whole run.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import pytest
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest
from azure.storage.blob import BlobLeaseClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared import wiring as runtime
from shared.domain.contract import MalformedMessage, parse_completion
from shared.leadership.elections import run_election
from shared.leadership.instance import LedgerApp
from shared.storage.clients import ensure_queues
from shared.storage.parking import PARKED_PARTITION
from simulator.functions import indexed
from tests.helpers import Namespace, lease_blob

# --- an independent oracle of the v1 contract ------------------------------------------------
REQUIRED = ("requestId", "operationId", "operation", "accountId", "amount",
            "expectedOperations", "status")
FIELDS = (*REQUIRED, "completedAt")
SNAKE = {name: re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name) for name in FIELDS}
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z", re.ASCII)
_AMOUNT = re.compile(r"[0-9]+(\.[0-9]{1,2})?\Z", re.ASCII)
_ISO = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
                  r"(Z|[+-][0-9]{2}:[0-9]{2})?)?\Z", re.ASCII)
MAX_BODY = 49_152  # a 64 KiB queue message holds this much once the host base64-decodes it


class _Object(dict[str, Any]):
    duplicate_keys = False


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    found = _Object(pairs)
    found.duplicate_keys = len(found) != len(pairs)
    return found


def _iso_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or not _ISO.match(value):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def contract_error(body: bytes) -> str | None:
    """Why ``body`` breaks the v1 contract (README "Message contract"), or None if it is valid."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    try:
        data = json.loads(text, object_pairs_hook=_object)
    except (ValueError, RecursionError):  # includes too deep and integers of > 4300 digits
        return "not JSON"
    if not isinstance(data, _Object):
        return "not a JSON object"
    if data.duplicate_keys:
        return "duplicate keys"
    if any(name in SNAKE.values() and name not in FIELDS for name in data):
        return "a snake_case spelling of a v1 name"
    for name in ("requestId", "operationId", "accountId"):
        if not isinstance(data.get(name), str) or not _ID.match(data[name]):
            return name
    if data.get("operation") not in ("add_funds", "withdraw_funds"):
        return "operation"
    amount = data.get("amount")
    if not isinstance(amount, str) or not _AMOUNT.match(amount):
        return "amount"
    try:
        if not Decimal("0") < Decimal(amount) <= Decimal("1e12"):
            return "amount"
    except InvalidOperation:
        return "amount"
    expected = data.get("expectedOperations")
    if type(expected) is not int or not 1 <= expected <= 50:
        return "expectedOperations"
    if data.get("status") not in ("succeeded", "failed"):
        return "status"
    completed = data.get("completedAt")
    if completed is not None and not _iso_timestamp(completed):
        return "completedAt"
    return None


# --- strategies --------------------------------------------------------------------------------
identifiers = st.one_of(st.text(ID_CHARS, min_size=1, max_size=12),
                        st.integers(120, 128).map(lambda n: "x" * n))
amounts = st.one_of(
    st.decimals(Decimal("0.01"), Decimal("1e12"), places=2).map(str),
    st.integers(1, 10**12).map(str),
    st.sampled_from(["0.01", "1000000000000", "1000000000000.00", "1.5", "007.10"]),
)
offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))
zones: st.SearchStrategy[Any] = st.none() | st.just(UTC) | offsets
timestamps = st.datetimes(datetime(1970, 1, 1), datetime(2100, 1, 1), timezones=zones).map(
    lambda moment: moment.isoformat(timespec="milliseconds")
    .replace("+00:00", "Z"))

valid_fields: dict[str, st.SearchStrategy[Any]] = {
    "requestId": identifiers,
    "operationId": identifiers,
    "operation": st.sampled_from(["add_funds", "withdraw_funds"]),
    "accountId": identifiers,
    "amount": amounts,
    "expectedOperations": st.integers(1, 50),
    "status": st.sampled_from(["succeeded", "failed"]),
    "completedAt": timestamps,
}
_WRONG_TYPES: list[Any] = [None, True, False, 0, -1, 2.5, 1e300, 1e-300, 5e-324, -0.0, [], {},
                          ["x"], {"x": 1}]
_LOOKALIKES = ["\uff11\uff12.\uff15\uff10", "\u0661\u0662\u066b\u0665\u0660", "12\u066b50",
               "\u0967\u0968", "1\u00a0000.00", "\U0001d7cf\U0001d7d0"]
_BAD_IDS = ["", "x" * 129, "x" * 1000, "has space", "a/b", "a~b", "a#b", "a?b", "\uff41bc",
            "r\u0661", "caf\u00e9", "a\nb", "abc\n", "\u0000", "a\u200bb", "\ud800"]
bad_values: dict[str, list[Any]] = {
    "requestId": _BAD_IDS + _WRONG_TYPES,
    "operationId": _BAD_IDS + _WRONG_TYPES,
    "accountId": _BAD_IDS + _WRONG_TYPES,
    "operation": ["ADD_FUNDS", "add-funds", "addFunds", "transfer", "", " add_funds",
                  *_WRONG_TYPES],
    "amount": ["0", "0.00", "-1.00", "-0.00", "1.001", "0.001", "1e3", "1E-2", "1,00",
               " 1.00", "1.00 ", "+1.00", "1_000.00", "0x10", "NaN", "Infinity", "", "abc",
               "1000000000000.01", "9" * 5000, "1." + "0" * 3, *_LOOKALIKES, 12.5, 12, 1e12,
               0.1, 10**30, *_WRONG_TYPES],
    "expectedOperations": [0, 51, -1, 2.0, 2.5, "2", "\uff12", 10**30, [2], *_WRONG_TYPES],
    "status": ["SUCCEEDED", "success", "ok", "", *_WRONG_TYPES],
    "completedAt": [1700000000, True, [], {}, "yesterday", "2026-13-01T00:00:00Z",
                    "2026-02-30T00:00:00Z", "", "T10:00:00Z", "1700000000", "0", "1700000000.5",
                    "\uff12\uff10\uff12\uff16-11-28T10:00:00Z"],
}
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
unknown_names = st.text(min_size=1, max_size=12).filter(
    lambda name: name not in FIELDS and name not in SNAKE.values())


@dataclass(frozen=True)
class Mutation:
    """One way a message was spoiled, applied to its list of (name, raw JSON) pairs."""

    describe: str
    apply: Callable[[list[tuple[str, str]]], list[tuple[str, str]]]


def _set(name: str, raw: str) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]]:
    return lambda pairs: [(k, raw if k == name else v) for k, v in pairs]


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["bad value", "drop", "snake_case", "unknown field",
                                 "deep nesting", "huge integer", "duplicate key"]))
    name = draw(st.sampled_from(FIELDS))
    if kind == "bad value":
        value = draw(st.sampled_from(bad_values[name]))
        return Mutation(f"{name}={value!r:.60}", _set(name, json.dumps(value)))
    if kind == "drop":
        return Mutation(f"no {name}", lambda pairs: [(k, v) for k, v in pairs if k != name])
    if kind == "snake_case":
        return Mutation(f"{name} as {SNAKE[name]}",
                        lambda pairs: [(SNAKE[name] if k == name else k, v) for k, v in pairs])
    if kind == "unknown field":
        extra = (draw(unknown_names), json.dumps(draw(json_values)))
        return Mutation(f"unknown {extra[0]!r}", lambda pairs: [*pairs, extra])
    if kind == "deep nesting":
        # Shallow nesting is fine; past the decoder's limit it must be parked, not raised.
        depth = draw(st.sampled_from([1, 5, 20, 5_000, 20_000]))
        opener = draw(st.sampled_from(["[", '{"k":']))
        closer = "]" if opener == "[" else "}"
        nested = opener * depth + "0" + closer * depth
        return Mutation(f"nested {depth} deep",
                        lambda pairs: [*pairs, (draw(unknown_names), nested)])
    if kind == "huge integer":
        digits = draw(st.sampled_from([5_000, 20_000]))
        return Mutation(f"{digits}-digit integer",
                        lambda pairs: [*pairs, (draw(unknown_names), "9" * digits)])
    same = draw(st.booleans())
    raw = None if same else json.dumps(draw(valid_fields[name]))
    return Mutation(f"{name} twice ({'same' if same else 'other'} value)",
                    lambda pairs: [*pairs, *((k, raw or v) for k, v in pairs if k == name)])


def serialise(pairs: list[tuple[str, str]], compact: bool) -> str:
    comma, colon = (",", ":") if compact else (", ", ": ")
    return "{" + comma.join(f"{json.dumps(k)}{colon}{v}" for k, v in pairs) + "}"


@st.composite
def messages(draw: st.DrawFn, max_mutations: int = 3) -> tuple[bytes, list[str]]:
    """A valid message spoiled in 0..``max_mutations`` ways, then perhaps its bytes too."""
    values = {name: draw(strategy) for name, strategy in valid_fields.items()}
    if draw(st.booleans()):
        del values["completedAt"]
    ascii_only = draw(st.booleans())
    pairs = [(k, json.dumps(v, ensure_ascii=ascii_only)) for k, v in values.items()]
    done = []
    for mutation in draw(st.lists(mutations(), max_size=max_mutations)):
        pairs = mutation.apply(pairs)
        done.append(mutation.describe)
    text = serialise(pairs, draw(st.booleans()))
    spoil = draw(st.sampled_from(["none"] * 6 + ["truncate", "utf-16", "latin-1", "bad byte",
                                                  "bom", "array", "scalar", "trailing"]))
    if spoil != "none":
        done.append(spoil)
    if spoil == "truncate":
        text = text[:draw(st.integers(0, len(text) - 1))]
    elif spoil == "array":
        text = f"[{text}]"
    elif spoil == "scalar":
        text = json.dumps(draw(json_scalars))
    elif spoil == "bom":
        text = "\ufeff" + text
    elif spoil == "trailing":
        text += draw(st.sampled_from([" x", "}", ",", "{}"]))
    if spoil == "utf-16":
        body = text.encode("utf-16")
    elif spoil == "latin-1":
        body = text.replace('"', '"\u00e9', 1).encode("latin-1", "replace")
    elif spoil == "bad byte":
        raw = text.encode("utf-8", "surrogatepass")
        cut = draw(st.integers(0, len(raw)))
        body = raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[cut:]
    else:
        body = text.encode("utf-8", "surrogatepass")
    return body[:MAX_BODY], done


any_body = st.one_of(
    st.binary(max_size=2_000),
    st.text(max_size=2_000).map(lambda s: s.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
)


# --- parse_completion alone: thousands of bodies -----------------------------------------------
def _parse_outcome(body: bytes) -> str | None:
    """None if accepted, else the reason; any exception other than MalformedMessage fails."""
    try:
        parse_completion(body)
    except MalformedMessage as exc:
        reason = str(exc)
    else:
        return None
    assert reason.strip(), "a refusal must say why"
    return reason


@settings(max_examples=2500, deadline=None, print_blob=True)
@given(messages())
def test_the_parser_refuses_exactly_what_the_contract_refuses(
        message: tuple[bytes, list[str]]) -> None:
    body, spoiled = message
    expected = contract_error(body)
    got = _parse_outcome(body)
    if expected is None:
        assert got is None, f"valid message refused ({spoiled}): {got}"
    else:
        assert got is not None, f"accepted a message that breaks the contract: {expected} " \
                                f"({spoiled})"


@settings(max_examples=1000, deadline=None, print_blob=True)
@given(any_body)
def test_any_bytes_are_refused_with_malformed_message_or_are_a_valid_step(body: bytes) -> None:
    got = _parse_outcome(body)
    if got is None:
        assert contract_error(body) is None


@settings(max_examples=500, deadline=None, print_blob=True)
@given(st.sampled_from(FIELDS), st.data())
def test_a_single_bad_field_is_named_in_the_refusal(name: str, data: st.DataObject) -> None:
    values = {field: data.draw(strategy) for field, strategy in valid_fields.items()}
    values[name] = data.draw(st.sampled_from(bad_values[name]))
    body = json.dumps(values).encode("utf-8", "surrogatepass")
    assume(contract_error(body) == name)  # e.g. a bad requestId, not "not JSON"
    got = _parse_outcome(body)
    assert got is not None
    assert name in got, f"the reason should name {name}: {got}"


@pytest.mark.parametrize(("body", "why"), [
    (b'{"requestId": "r", "operationId": "o", "operation": "add_funds", "accountId": "a", '
     b'"amount": "1.00", "expectedOperations": 1, "status": "succeeded", "amount": "900.00"}',
     "duplicate amount: another parser could read the first"),
    (b'{"request_id": "r", "operation_id": "o", "operation": "add_funds", "account_id": "a", '
     b'"amount": "1.00", "expected_operations": 1, "status": "succeeded"}',
     "snake_case names are not the contract"),
    (b'{"requestId": "r", "operationId": "o", "operation": "add_funds", "accountId": "a", '
     b'"amount": "1.00", "expectedOperations": 1, "status": "succeeded", "x": '
     + b"9" * 5000 + b"}", "an integer the decoder refuses, in an ignored field"),
    (b'{"requestId": "r", "operationId": "o", "operation": "add_funds", "accountId": "a", '
     b'"amount": "1.00", "expectedOperations": 1, "status": "succeeded", "x": '
     + b"[" * 20_000 + b"]" * 20_000 + b"}", "nesting the decoder refuses, in an ignored field"),
])
def test_strict_parsing_edge_cases_are_refused(body: bytes, why: str) -> None:
    assert contract_error(body) is not None
    assert _parse_outcome(body) is not None, why


@pytest.mark.parametrize("completed_at", ["1700000000", "0", "1700000000.5"])
def test_completed_at_is_iso_8601_not_seconds_since_1970(completed_at: str) -> None:
    """Found by the property test: pydantic read a number in a string as Unix time."""
    body = json.dumps({"requestId": "r", "operationId": "o", "operation": "add_funds",
                       "accountId": "a", "amount": "1.00", "expectedOperations": 1,
                       "status": "succeeded", "completedAt": completed_at}).encode()
    reason = _parse_outcome(body)
    assert reason is not None
    assert "completedAt" in reason
    assert "ISO-8601" in reason


# --- through the queue function, against Azurite -------------------------------------------------
QUEUE_HANDLER = indexed().queue_handler


@pytest.fixture
def env(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[LedgerApp]:
    """This test's settings in the environment; the worker's app, with one funded account."""
    for name, value in ns.env().items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    app = runtime.get_app()
    deliver(_valid("fund", "fund-add", "add_funds", "funded", "100.00", 1))
    assert app.ledger.list_balances() == {"funded": Decimal("100.00")}
    yield app
    runtime.reset()


def _valid(request_id: str, operation_id: str, operation: str, account_id: str, amount: str,
           expected: int, status: str = "succeeded") -> bytes:
    return json.dumps({"requestId": request_id, "operationId": operation_id,
                       "operation": operation, "accountId": account_id, "amount": amount,
                       "expectedOperations": expected, "status": status}).encode()


def deliver(body: bytes, message_id: str | None = None, dequeue_count: int = 1) -> None:
    """One queue-triggered invocation, as the Functions host makes it."""
    message = QueueMessage(  # type: ignore[no-untyped-call]  # azure-functions leaves it untyped
        id=message_id or uuid.uuid4().hex, body=body, dequeue_count=dequeue_count)
    QUEUE_HANDLER(message)


def _state(app: LedgerApp) -> tuple[dict[str, Decimal], int, int]:
    return (app.ledger.list_balances(), app.completions.count(),
            len(app.ledger.list_outcomes()))


def _assert_parked(app: LedgerApp, body: bytes, message_id: str, before: Any) -> str:
    deliver(body, message_id=message_id, dequeue_count=2)  # must not raise
    parked = app.parking.get(message_id)
    assert parked is not None, "an invalid message must be parked, not recorded or dropped"
    assert parked.body == body, "parked exactly as received, so an operator can replay it"
    assert parked.error.strip(), "parked with a reason"
    assert parked.dequeue_count == 2
    assert _state(app) == before, "a malformed message changes no balance and records nothing"
    return parked.error


_E2E = settings(max_examples=150, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])


@_E2E
@given(messages())
def test_the_queue_function_parks_every_invalid_body_with_a_reason(
        env: LedgerApp, message: tuple[bytes, list[str]]) -> None:
    body, _ = message
    assume(contract_error(body) is not None)
    _assert_parked(env, body, uuid.uuid4().hex, _state(env))


@_E2E
@given(any_body)
def test_the_queue_function_parks_arbitrary_bytes(env: LedgerApp, body: bytes) -> None:
    assume(contract_error(body) is not None)
    _assert_parked(env, body, uuid.uuid4().hex, _state(env))


@pytest.mark.parametrize(("body", "reason"), [
    (b"{" + b'"a":' * 12_000 + b"0" + b"}" * 12_000, "nested objects"),
    (b"[" * 24_000 + b"]" * 24_000, "nested arrays at the size limit"),
    (_valid("r", "o", "add_funds", "funded", "1.00", 1)[:-1] + b', "x": ' + b"7" * 40_000
     + b"}", "a 40,000-digit integer in an ignored field"),
    (_valid("r", "o", "add_funds", "funded", "1.00", 1)[:-1] + b', "amount": "900.00"}',
     "a duplicate amount"),
    (_valid("r", "o", "add_funds", "funded", "1.00", 1).replace(b"requestId", b"request_id"),
     "a snake_case name"),
    (_valid("r" * 129, "o", "add_funds", "funded", "1.00", 1), "a 129-character requestId"),
    (b"\xff" * MAX_BODY, "the largest body that is not UTF-8"),
])
def test_the_queue_function_parks_edge_cases(env: LedgerApp, body: bytes, reason: str) -> None:
    assert contract_error(body) is not None, reason
    _assert_parked(env, body, uuid.uuid4().hex, _state(env))


TABLE_STRING_UNITS = 32_768  # a table string property: 64 KiB of UTF-16


def _utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def test_a_body_of_astral_characters_is_parked_whole_and_replays_unchanged(
        env: LedgerApp) -> None:
    # 23,001 ASCII characters, then 6,300 emoji (2 UTF-16 units each): 48,201 bytes, which a
    # queue message holds, but 35,601 UTF-16 units, more than one table string property holds.
    # The odd ASCII count puts an emoji across unit 32,000, where a split by units would cut it.
    body = b"x" * 23_001 + "\U0001f600".encode() * 6_300
    assert len(body) <= MAX_BODY
    message_id = uuid.uuid4().hex
    _assert_parked(env, body, message_id, _state(env))  # today: PropertyValueTooLarge, retried
    row = env.parking.table.get(PARKED_PARTITION, message_id)
    columns = [row[f"body{i}"] for i in range(int(row["chunks"]))]
    assert len(columns) > 1
    for column in columns:
        assert _utf16_units(column) <= TABLE_STRING_UNITS
        column.encode("utf-8")  # raises if a column begins or ends with half an emoji

    ensure_queues(env.clients, [env.config.completions_queue])
    env.parking.replay(message_id, env.queue())
    assert env.parking.get(message_id) is None
    [replayed] = env.queue(raw=True).receive()
    assert base64.b64decode(replayed.text) == body, "replayed byte for byte as received"


def test_a_long_error_of_astral_characters_is_cut_to_one_property_on_a_whole_character(
        env: LedgerApp) -> None:
    error = "\U0001f600" * 20_000  # 40,000 UTF-16 units; 20,000 code points
    env.parking.park("long-error", b"{}", error, 1, "instance", datetime.now(UTC))
    parked = env.parking.get("long-error")
    assert parked is not None
    assert parked.body == b"{}"
    assert 30_000 <= _utf16_units(parked.error) <= TABLE_STRING_UNITS
    assert error.startswith(parked.error)


def test_a_body_too_large_for_one_entity_is_refused_before_storage(env: LedgerApp) -> None:
    # 600,000 ASCII characters: 20 columns of 30,000, but 1.2 MB as the UTF-16 Azure counts, over
    # its 1 MiB per entity (Azurite counts UTF-8 and would take it). Nothing may be written.
    with pytest.raises(ValueError, match="too large to park"):
        env.parking.park("huge", b"x" * 600_000, "too big", 1, "instance", datetime.now(UTC))
    assert env.parking.get("huge") is None


def test_a_128_character_id_is_accepted_end_to_end(env: LedgerApp) -> None:
    request_id, account_id = "r" * 128, "a" * 128
    deliver(_valid(request_id, "o" * 128, "add_funds", account_id, "1000000000000.00", 1))
    assert env.ledger.read_account(account_id).balance == Decimal("1000000000000.00")
    assert env.parking.list() == []


# --- steps that disagree on what must agree -------------------------------------------------------
@dataclass(frozen=True)
class Disagreement:
    """A request whose steps break one of the contract's agreements, and what its reason says."""

    bodies: list[bytes]
    reason_mentions: list[str]


# How a second delivery of a step may change each field that must stay the same.
CHANGEABLE: dict[str, Callable[[Any], Any]] = {
    "operation": lambda v: "add_funds" if v == "withdraw_funds" else "withdraw_funds",
    "accountId": lambda v: v + "-other",
    "amount": lambda v: str(Decimal(v) + Decimal("0.01")),
    "status": lambda v: "failed" if v == "succeeded" else "succeeded",
    "expectedOperations": lambda v: v + 1,
}


@st.composite
def disagreements(draw: st.DrawFn) -> Disagreement:
    request_id = "r" + uuid.uuid4().hex[:12]
    expected = draw(st.integers(2, 4))
    steps = []
    for index in range(expected):
        steps.append({"requestId": request_id, "operationId": f"{request_id}-{index}",
                      "operation": "add_funds", "accountId": f"{request_id}-acct{index}",
                      "amount": draw(st.sampled_from(["1.00", "2.50", "10.00"])),
                      "expectedOperations": expected, "status": "succeeded"})
    kind = draw(st.sampled_from(["expectedOperations", "second content", "too many steps"]))
    target = draw(st.integers(0, expected - 1))
    if kind == "expectedOperations":
        other = draw(st.integers(1, 50).filter(lambda n: n != expected))
        steps[target] = {**steps[target], "expectedOperations": other}
        mentions = ["expectedOperations", str(expected), str(other)]
    elif kind == "second content":
        changed = draw(st.lists(st.sampled_from(sorted(CHANGEABLE)), min_size=1, max_size=3,
                                unique=True))
        redelivery = dict(steps[target])
        for name in changed:
            redelivery[name] = CHANGEABLE[name](redelivery[name])
        steps.insert(draw(st.integers(0, len(steps))), redelivery)
        mentions = [str(redelivery["operationId"]), *changed]
    else:
        steps.append({**steps[0], "operationId": f"{request_id}-extra"})
        mentions = [str(expected + 1), str(expected)]
    order = draw(st.permutations(range(len(steps))))
    return Disagreement([json.dumps(steps[i]).encode() for i in order], mentions)


@settings(max_examples=30, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(disagreements())
def test_steps_that_disagree_are_rejected_with_a_reason_naming_what_disagrees(
        env: LedgerApp, case: Disagreement) -> None:
    """Delivered while another instance leads (so the leader sees them together), then swept."""
    request_id = json.loads(case.bodies[0])["requestId"]
    other_leader = BlobLeaseClient(lease_blob(env))
    other_leader.acquire(lease_duration=60)
    try:
        for body in case.bodies:
            deliver(body)
    finally:
        other_leader.release()
    indexed().timer_handler(TimerRequest(past_due=False))
    decided = env.ledger.read_outcome(request_id)
    assert decided is not None, "decided by the sweeper"
    assert decided.outcome.status == "rejected", decided
    reason = decided.outcome.reason
    missing = [word for word in case.reason_mentions if word not in reason]
    assert not missing, f"the reason {reason!r} should name {missing}"
    assert env.ledger.list_balances() == {"funded": Decimal("100.00")}, "nothing applied"
    assert env.completions.steps_of(request_id) == []
    assert run_election(env).terms == [], "nothing left to decide"
