"""Storage faults injected at the transport, for tests and chaos runs (never deployed).

A ``FaultPlan`` names each storage call by what it does for the app (``CallKind``: record,
scan, account read, claim, commit, delete, acquire, renew, release, queue receive ...) from its
method, URL, headers and, for entity-group transactions, the table named in the body. Rules
chosen by kind, position (``after``), count (``times``) and probability (a seeded RNG) then:

- ``lose_response``: the request reaches storage and is applied, then the caller sees the
  connection reset (``ServiceResponseError``): the SDK may retry it, as it would in Azure;
- ``status``: storage answers 500/503 ``ServerBusy`` without applying anything;
- ``timeout``: the connection times out before the request is sent (nothing applied);
- ``latency``: the call is delayed, then proceeds.

The faults sit below the SDKs' retry policies, where the network is: the plan mounts a
``requests`` adapter on the session of an azure-core ``RequestsTransport`` and the clients take
that transport (``shared.storage.clients``' ``transport_factory``). A transport is the one injection
point that the blob, queue and table SDKs all accept publicly *below* their retry policy (blob
and queue take no ``per_retry_policies``; tables build their own policy list), so every retry
the SDK makes meets the plan again, exactly like a real flaky network.

A simulated instance process enables a plan from the ``SIM_FAULTS`` environment variable, a
JSON spec: ``{"seed": 7, "rules": [{"fault": "latency", "probability": 0.05, "seconds": 0.4},
{"fault": "status", "kinds": ["commit"], "probability": 0.02}]}``.

**Crashes at a protocol step** (shards, ``shared/domain/exchange.py``). The transport sees every
request, so it can tell which step of the cross-shard protocol a ledger transaction is from the
rows it writes (``protocol_steps``): *coordinate* (creates ``flight:coord:{R}``), *vote*
(creates ``vote:{R}``), *decide* (creates an outcome ``request:{R}`` beside cross-shard rows),
*apply* (consumes a DECISION from the inbox), *settle* (merges ``settled`` into an outcome),
*send* (creates ``flight:inbox:`` rows in another shard's partition). With ``"crash_dir"`` in
the spec, the supervisor arms one order at a time in that folder (``order.json``: a step, and
``before`` or ``after`` the request); the first instance whose request matches claims it
(``claim-{id}.json``, created exclusively: one process, once) and SIGKILLs itself right before
the request is sent, or right after storage applied it. No hook in the app: the process dies
the way a crashed Functions worker does.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import requests
import urllib3
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError

from shared.config.names import TABLE_SUFFIX
from shared.config.settings import AppConfig

FAULTS_ENV = "SIM_FAULTS"


class CallKind(StrEnum):
    """What one storage call does for the app."""

    RECORD = "record"  # insert a completion row (alone, or with its request's row)
    RECORD_READ = "record_read"  # read a completion row back (duplicate or conflict?)
    REQUEST_READ = "request_read"  # read one request's rows (a key range)
    ANNOUNCE = "announce"  # merge a request's marker into the ready index
    READY_READ = "ready_read"  # the leader's read of the ready index
    SCAN = "scan"  # list or query the completions table (the sweeper's full scan)
    DELETE = "delete"  # delete completion rows (transaction or single entity)
    FENCE_READ = "fence_read"
    CLAIM = "claim"  # conditional update (or create) of the fence row
    ACCOUNT_READ = "account_read"
    OUTCOME_READ = "outcome_read"
    LEDGER_SCAN = "ledger_scan"  # outcome or balance listings (operators, checks)
    COMMIT = "commit"  # the fenced entity-group transaction
    PARK = "park"  # write a parked message
    PARKED_READ = "parked_read"
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"
    BREAK = "break"
    QUEUE_RECEIVE = "queue_receive"
    QUEUE_PEEK = "queue_peek"
    QUEUE_SEND = "queue_send"
    QUEUE_DELETE = "queue_delete"  # acknowledge a message
    QUEUE_UPDATE = "queue_update"  # visibility change
    DELIVER = "deliver"  # put messages in a shard's inbox (create-once ``flight:inbox:`` rows)
    OTHER = "other"  # creating tables, queues, containers and blobs; properties


WRITE_KINDS = frozenset({CallKind.RECORD, CallKind.ANNOUNCE, CallKind.DELETE, CallKind.CLAIM,
                         CallKind.COMMIT, CallKind.PARK, CallKind.ACQUIRE, CallKind.RENEW,
                         CallKind.RELEASE, CallKind.DELIVER,
                         CallKind.QUEUE_SEND, CallKind.QUEUE_DELETE, CallKind.QUEUE_UPDATE})


class Fault(StrEnum):
    """What a rule does to a call it hits."""

    LOSE_RESPONSE = "lose_response"
    STATUS = "status"
    TIMEOUT = "timeout"
    LATENCY = "latency"


@dataclass(frozen=True)
class TableNames:
    """The app's table names, to tell a completion row from a ledger row."""

    completions: str
    ledger: str
    parked: str

    @classmethod
    def of(cls, config: AppConfig) -> TableNames:
        return cls(config.completions_table, config.ledger_table, config.parked_table)

    def is_completions(self, table: str) -> bool:
        """The completions table of any shard (shard k >= 1: ``{name}shard{k}``)."""
        shard = table.removeprefix(self.completions + TABLE_SUFFIX)
        return table == self.completions or (shard != table and shard.isdigit())


_ENTITY = re.compile(r"^/[^/]+/([A-Za-z0-9]+)\((.*)\)$")
_INBOX_ROW = '"RowKey": "flight:inbox:'


def _text(body: bytes | str | None) -> str:
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
_ROW_KEY = re.compile(r"RowKey='((?:[^']|'')*)'")
_TABLE = re.compile(r"^/[^/]+/([A-Za-z0-9]+)(?:\(\))?$")


def classify(method: str, url: str, headers: Mapping[str, str], body: bytes | str | None,
             names: TableNames) -> CallKind:
    """The kind of one HTTP request the storage SDKs send (blob, queue or table)."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    query = parse_qs(parts.query)
    lowered = {k.lower(): v for k, v in headers.items()}
    method = method.upper()
    if "x-ms-lease-action" in lowered:
        return {"acquire": CallKind.ACQUIRE, "renew": CallKind.RENEW,
                "release": CallKind.RELEASE, "break": CallKind.BREAK}.get(
            lowered["x-ms-lease-action"].lower(), CallKind.OTHER)
    if "/messages" in path:
        if method == "GET":
            return CallKind.QUEUE_PEEK if "peekonly" in query else CallKind.QUEUE_RECEIVE
        return {"POST": CallKind.QUEUE_SEND, "DELETE": CallKind.QUEUE_DELETE,
                "PUT": CallKind.QUEUE_UPDATE}.get(method, CallKind.OTHER)
    if path.endswith("/$batch"):
        text = _text(body)
        if f"/{names.ledger}(" in text:
            return CallKind.COMMIT
        if f"/{names.ledger} HTTP/" in text:  # creates in the ledger, no fence: messages
            return CallKind.DELIVER
        return CallKind.DELETE if "DELETE " in text else CallKind.RECORD
    entity = _ENTITY.match(path)
    if entity and entity.group(2):
        table, keys = entity.group(1), entity.group(2)
        found = _ROW_KEY.search(keys)
        row_key = found.group(1) if found else ""
        if table == names.ledger:
            if method == "DELETE" and row_key.startswith("outbox:"):
                return CallKind.DELETE  # an outbox row whose events were sent
            if row_key == "fence":
                return CallKind.FENCE_READ if method == "GET" else CallKind.CLAIM
            if method == "GET":
                return (CallKind.ACCOUNT_READ if row_key.startswith("account:")
                        else CallKind.OUTCOME_READ)
        elif names.is_completions(table):
            if method == "GET":
                return CallKind.RECORD_READ
            if method == "DELETE":
                return CallKind.DELETE
            return CallKind.ANNOUNCE if "PartitionKey='~ready'" in keys else CallKind.RECORD
        elif table == names.parked:
            return CallKind.PARKED_READ if method == "GET" else CallKind.PARK
        return CallKind.OTHER
    table_match = _TABLE.match(path)
    if table_match and method == "GET" and names.is_completions(table_match.group(1)):
        where = query.get("$filter", [""])[0]
        if "'~ready'" in where:
            return CallKind.READY_READ
        return CallKind.REQUEST_READ if "RowKey ge" in where and " or " not in where \
            else CallKind.SCAN
    if table_match and method in ("GET", "POST") and not {"comp", "restype"} & set(query):
        table = table_match.group(1)
        if table == names.ledger and method == "POST" and _INBOX_ROW in _text(body):
            return CallKind.DELIVER
        kinds = {names.ledger: (CallKind.LEDGER_SCAN, CallKind.CLAIM),
                 names.parked: (CallKind.PARKED_READ, CallKind.PARK)}.get(table)
        if names.is_completions(table):
            kinds = (CallKind.SCAN, CallKind.RECORD)
        if kinds:
            return kinds[0] if method == "GET" else kinds[1]
    return CallKind.OTHER


class Step(StrEnum):
    """A step of the cross-shard protocol, as the ledger request that carries it shows it."""

    COORDINATE = "coordinate"  # the home's first transaction: creates flight:coord:{R}
    VOTE = "vote"  # a voter acts on PREPARE: creates vote:{R}
    DECIDE = "decide"  # the home creates the outcome request:{R} beside cross-shard rows
    APPLY = "apply"  # a participant acts on DECISION (deletes it from its inbox)
    SETTLE = "settle"  # the home merges settled into request:{R} (every ACK in)
    SEND = "send"  # messages to another shard: creates flight:inbox: rows


class When(StrEnum):
    """Where, around the request, a crash order kills the process."""

    BEFORE = "before"  # the request is never sent
    AFTER = "after"  # storage applied it; the process dies before it learns so


_SUB_REQUEST = re.compile(r"^(POST|PUT|PATCH|MERGE|DELETE) (\S+) HTTP/1\.1\r?$", re.M)
_JSON_ROW_KEY = re.compile(r'"RowKey": "((?:[^"\\]|\\.)*)"')
_JSON_PARTITION = re.compile(r'"PartitionKey": "((?:[^"\\]|\\.)*)"')
_URL_PARTITION = re.compile(r"PartitionKey='((?:[^']|'')*)'")
_SENDER = re.compile(r'"sender": (\d+)')


@dataclass(frozen=True)
class LedgerWrite:
    """One operation of a request to the ledger table: its verb, partition and row key."""

    method: str
    partition: str
    row_key: str


def ledger_writes(method: str, url: str, body: bytes | str | None,
                  names: TableNames) -> list[LedgerWrite]:
    """The writes one request makes to the ledger table (every operation of a ``$batch``)."""
    path = unquote(urlsplit(url).path)
    text = _text(body)
    if path.endswith("/$batch"):
        subs = [(m.group(1), m.group(2), text[m.end():_next_start(text, m.end())])
                for m in _SUB_REQUEST.finditer(text)]
    else:
        subs = [(method.upper(), url, text)]
    found = []
    for verb, target, payload in subs:
        target_path = unquote(urlsplit(target).path)
        table = target_path.rsplit("/", 1)[-1].split("(", 1)[0]
        if table != names.ledger:
            continue
        key = _ROW_KEY.search(target_path)
        part = _URL_PARTITION.search(target_path)
        json_key = _JSON_ROW_KEY.search(payload)
        json_part = _JSON_PARTITION.search(payload)
        row_key = key.group(1).replace("''", "'") if key else (
            json_key.group(1) if json_key else "")
        partition = part.group(1).replace("''", "'") if part else (
            json_part.group(1) if json_part else "")
        found.append(LedgerWrite(verb, partition, row_key))
    return found


def _next_start(text: str, start: int) -> int:
    following = _SUB_REQUEST.search(text, start)
    return following.start() if following else len(text)


def protocol_steps(writes: Iterable[LedgerWrite]) -> frozenset[Step]:
    """The protocol steps a ledger request carries (a transaction may carry several)."""
    writes = list(writes)
    created = [w.row_key for w in writes if w.method == "POST"]
    steps: set[Step] = set()
    if any(k.startswith("flight:coord:") for k in created):
        steps.add(Step.COORDINATE)
    if any(k.startswith("vote:") for k in created):
        steps.add(Step.VOTE)
    # (not ``claim:``: a plain commit with shards claims its requests too)
    crossing = any(w.row_key.startswith(("flight:", "applied:", "vote:")) for w in writes)
    if crossing and any(k.startswith("request:") for k in created):
        steps.add(Step.DECIDE)
    if any(w.method == "DELETE" and w.row_key.startswith("flight:inbox:")
           and "|decision|" in w.row_key for w in writes):
        steps.add(Step.APPLY)
    if any(w.method in ("PATCH", "MERGE", "PUT") and w.row_key.startswith("request:")
           for w in writes):
        steps.add(Step.SETTLE)
    if any(k.startswith("flight:inbox:") for k in created) and not any(
            w.row_key == "fence" for w in writes):
        steps.add(Step.SEND)
    return frozenset(steps)


def shard_of_partition(partition: str) -> int | None:
    """The shard of a ledger partition (``ledger`` is shard 0, ``ledger-k`` shard k)."""
    if partition == "ledger":
        return 0
    tail = partition.removeprefix("ledger-")
    return int(tail) if tail != partition and tail.isdigit() else None


@dataclass
class CrashSwitch:
    """Crash orders from the supervisor (chaos runs): kill this process at a protocol step.

    The supervisor writes ``order.json`` (``{"id": n, "step": "vote", "when": "after"}``,
    atomically by a rename) into ``directory``; the first process whose ledger request matches
    creates ``claim-{id}.json`` exclusively (one winner across every process), writes who it is
    and where it was, and SIGKILLs itself.
    """

    directory: Path
    index: int
    _seen: tuple[int, int] = (0, -1)
    _order: dict[str, Any] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def order(self) -> dict[str, Any] | None:
        """The armed order, if any (read again only when the file changed)."""
        try:
            stat = (self.directory / "order.json").stat()
        except FileNotFoundError:
            return None
        with self._lock:
            if (stat.st_mtime_ns, stat.st_size) != self._seen:
                try:
                    self._order = json.loads((self.directory / "order.json").read_text())
                except (OSError, ValueError):
                    return None
                self._seen = (stat.st_mtime_ns, stat.st_size)
            return self._order

    def wants(self, steps: frozenset[Step], when: When) -> bool:
        """The armed order names one of ``steps`` at ``when``."""
        order = self.order()
        return order is not None and order.get("when") == when and order.get("step") in steps

    def check(self, steps: frozenset[Step], when: When, writes: list[LedgerWrite],
              body: bytes | str | None) -> None:
        """Die here if the armed order names one of ``steps`` at ``when`` and we claim it."""
        order = self.order()
        if order is None or not self.wants(steps, when):
            return
        claim = self.directory / f"claim-{order['id']}.json"
        try:
            handle = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return  # another process (or thread) took it
        step = Step(order["step"])
        shard = None
        if step is Step.SEND:
            sender = _SENDER.search(_text(body))
            shard = int(sender.group(1)) if sender else None
        elif writes:
            shard = shard_of_partition(writes[0].partition)
        with os.fdopen(handle, "w") as out:
            json.dump({"id": order["id"], "index": self.index, "pid": os.getpid(),
                       "step": step.value, "when": str(when), "shard": shard,
                       "rows": [w.row_key for w in writes][:40]}, out)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Rule:
    """One fault: on which calls, how often, and what it does."""

    fault: Fault
    kinds: frozenset[str] = frozenset()  # empty: every kind
    probability: float = 1.0
    after: int = 0  # let this many matching calls through first
    times: int | None = None  # inject at most this many times (None: no limit)
    status: int = 503  # for STATUS
    seconds: float = 0.0  # LATENCY: the delay; TIMEOUT: how long a try hangs (<= its timeout)
    seen: int = 0
    injected: int = 0

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> Rule:
        """A rule from its JSON form (``kinds`` a list of ``CallKind`` values)."""
        kinds = frozenset(str(CallKind(k)) for k in spec.get("kinds", ()))
        return cls(Fault(spec["fault"]), kinds, float(spec.get("probability", 1.0)),
                   int(spec.get("after", 0)),
                   None if spec.get("times") is None else int(spec["times"]),
                   int(spec.get("status", 503)), float(spec.get("seconds", 0.0)))

    def matches(self, kind: CallKind) -> bool:
        return not self.kinds or str(kind) in self.kinds


@dataclass
class Decision:
    """What the plan does to one call."""

    kind: CallKind
    delay: float = 0.0
    fault: Fault | None = None
    status: int = 503
    hang: float = 0.0


@dataclass
class FaultPlan:
    """Rules plus a seeded RNG and counters; thread-safe; shared by every client of a process."""

    names: TableNames
    rules: list[Rule] = field(default_factory=list)
    seed: int = 0
    crash: CrashSwitch | None = None  # crash orders at protocol steps (chaos runs)
    steps: Counter[str] = field(default_factory=Counter)  # protocol steps seen, by request
    calls: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)  # "kind:fault" -> count
    enabled: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @classmethod
    def from_spec(cls, spec: str | Mapping[str, Any], names: TableNames,
                  salt: int = 0) -> FaultPlan:
        """A plan from its JSON spec (``{"seed": .., "rules": [..]}``), seed shifted by salt."""
        data = json.loads(spec) if isinstance(spec, str) else spec
        crash_dir = data.get("crash_dir")
        return cls(names, [Rule.of(r) for r in data.get("rules", ())],
                   int(data.get("seed", 0)) + salt,
                   CrashSwitch(Path(crash_dir), salt) if crash_dir else None)

    def add(self, fault: Fault | str, kinds: Iterable[CallKind | str] = (), **options: Any) -> Rule:
        """Add a rule now (tests add theirs after setting up, so setup is not faulted)."""
        rule = Rule(Fault(fault), frozenset(str(CallKind(k)) for k in kinds), **options)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule (counters stay)."""
        with self._lock:
            self.rules.clear()

    def decide(self, kind: CallKind) -> Decision:
        """Count the call and draw what happens to it."""
        decision = Decision(kind)
        with self._lock:
            self.calls[kind] += 1
            if not self.enabled:
                return decision
            for rule in self.rules:
                if not rule.matches(kind):
                    continue
                rule.seen += 1
                if rule.seen <= rule.after:
                    continue
                if rule.times is not None and rule.injected >= rule.times:
                    continue
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.injected += 1
                self.injected[f"{kind}:{rule.fault}"] += 1
                if rule.fault is Fault.LATENCY:
                    decision.delay += rule.seconds
                elif decision.fault is None:
                    decision.fault, decision.status, decision.hang = (rule.fault, rule.status,
                                                                      rule.seconds)
        return decision

    def count_steps(self, steps: Iterable[Step]) -> None:
        with self._lock:
            self.steps.update(str(step) for step in steps)

    def count(self, fault: Fault | str, kind: CallKind | str | None = None) -> int:
        """How many times ``fault`` was injected (on ``kind``, or on any kind)."""
        with self._lock:
            return sum(n for key, n in self.injected.items()
                       if key.endswith(f":{fault}") and (kind is None
                                                         or key.startswith(f"{kind}:")))

    def session(self) -> requests.Session:
        """A ``requests`` session whose every call goes through this plan."""
        session = requests.Session()
        adapter = FaultAdapter(self)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def transport(self, timeout_seconds: float) -> RequestsTransport:
        """An azure-core transport for one storage client (``shared.storage.clients`` factory)."""
        return RequestsTransport(session=self.session(), session_owner=True,
                                 connection_timeout=timeout_seconds,
                                 read_timeout=timeout_seconds)


_SERVER_BUSY_XML = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
                    b"<Message>Injected: the server is busy.</Message></Error>")
_SERVER_BUSY_JSON = json.dumps({"odata.error": {"code": "ServerBusy", "message": {
    "lang": "en-US", "value": "Injected: the server is busy."}}}).encode()


class FaultAdapter(HTTPAdapter):
    """The ``requests`` adapter that applies a ``FaultPlan`` to every request it sends."""

    def __init__(self, plan: FaultPlan) -> None:
        super().__init__()
        self.plan = plan

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> requests.Response:
        body = request.body if isinstance(request.body, bytes | str) else None
        headers = {str(k): str(v) for k, v in request.headers.items()}
        kind = classify(str(request.method), str(request.url), headers, body, self.plan.names)
        crash = self.plan.crash
        writes: list[LedgerWrite] = []
        steps: frozenset[Step] = frozenset()
        if kind in (CallKind.COMMIT, CallKind.DELIVER):
            writes = ledger_writes(str(request.method), str(request.url), body, self.plan.names)
            steps = protocol_steps(writes)
            self.plan.count_steps(steps)
        if crash is not None and steps:
            crash.check(steps, When.BEFORE, writes, body)
        decision = self.plan.decide(kind)
        if decision.delay:
            time.sleep(decision.delay)
        if decision.fault is Fault.TIMEOUT:  # hangs until the try's connect timeout at most
            connect = timeout[0] if isinstance(timeout, tuple) else timeout
            time.sleep(min(decision.hang, float(connect)) if connect else decision.hang)
            raise requests.exceptions.ConnectTimeout(
                f"injected: connect to storage timed out ({decision.kind}, nothing sent)")
        if decision.fault is Fault.STATUS:
            return self._busy(request, decision.status)
        response = super().send(request, stream=stream, timeout=timeout, verify=verify,
                                cert=cert, proxies=proxies)
        if crash is not None and steps and crash.wants(steps, When.AFTER) and _applied(response):
            crash.check(steps, When.AFTER, writes, body)
        if decision.fault is Fault.LOSE_RESPONSE:
            response.close()
            raise requests.exceptions.ConnectionError(ProtocolError(
                "Connection aborted.", ConnectionResetError(
                    104, f"injected: response to {decision.kind} lost after storage applied it")))
        return response

    def _busy(self, request: requests.PreparedRequest, status: int) -> requests.Response:
        table = "/$batch" in str(request.url) or "odata" in str(
            request.headers.get("Accept", "")) or "DataServiceVersion" in request.headers
        body = _SERVER_BUSY_JSON if table else _SERVER_BUSY_XML
        content_type = ("application/json;odata=minimalmetadata;charset=utf-8" if table
                        else "application/xml")
        raw = urllib3.HTTPResponse(
            body=io.BytesIO(body), status=status, preload_content=False,
            reason="Server Busy" if status == 503 else "Internal Server Error",
            headers={"Content-Type": content_type, "Content-Length": str(len(body)),
                     "x-ms-error-code": "ServerBusy" if status == 503 else "InternalError",
                     "x-ms-request-id": "injected-fault"})
        return self.build_response(request, raw)


def _applied(response: requests.Response) -> bool:
    """Storage applied the request: a 2xx, and for a ``$batch`` no refused operation inside."""
    if not 200 <= response.status_code < 300:
        return False
    if "/$batch" not in str(response.url):
        return True
    return re.search(r"^HTTP/1\.1 [45]\d\d", response.text, re.M) is None


def plan_from_environment(env: Mapping[str, str], config: AppConfig,
                          salt: int = 0) -> FaultPlan | None:
    """The plan ``SIM_FAULTS`` asks for, or ``None``; ``salt`` (an instance index) shifts
    the seed so that instances do not fail in lockstep."""
    spec = env.get(FAULTS_ENV, "").strip()
    if not spec:
        return None
    return FaultPlan.from_spec(spec, TableNames.of(config), salt)
