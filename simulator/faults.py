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
"""

from __future__ import annotations

import io
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import requests
import urllib3
from azure.core.pipeline.transport import RequestsTransport
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ProtocolError

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
    OTHER = "other"  # creating tables, queues, containers and blobs; properties


WRITE_KINDS = frozenset({CallKind.RECORD, CallKind.ANNOUNCE, CallKind.DELETE, CallKind.CLAIM,
                         CallKind.COMMIT, CallKind.PARK, CallKind.ACQUIRE, CallKind.RENEW,
                         CallKind.RELEASE,
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


_ENTITY = re.compile(r"^/[^/]+/([A-Za-z0-9]+)\((.*)\)$")
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
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
        if f"/{names.ledger}(" in text:
            return CallKind.COMMIT
        return CallKind.DELETE if "DELETE " in text else CallKind.RECORD
    entity = _ENTITY.match(path)
    if entity and entity.group(2):
        table, keys = entity.group(1), entity.group(2)
        found = _ROW_KEY.search(keys)
        row_key = found.group(1) if found else ""
        if table == names.ledger:
            if row_key == "fence":
                return CallKind.FENCE_READ if method == "GET" else CallKind.CLAIM
            if method == "GET":
                return (CallKind.ACCOUNT_READ if row_key.startswith("account:")
                        else CallKind.OUTCOME_READ)
        elif table == names.completions:
            if method == "GET":
                return CallKind.RECORD_READ
            if method == "DELETE":
                return CallKind.DELETE
            return CallKind.ANNOUNCE if "PartitionKey='~ready'" in keys else CallKind.RECORD
        elif table == names.parked:
            return CallKind.PARKED_READ if method == "GET" else CallKind.PARK
        return CallKind.OTHER
    table_match = _TABLE.match(path)
    if table_match and method == "GET" and table_match.group(1) == names.completions:
        where = query.get("$filter", [""])[0]
        if "'~ready'" in where:
            return CallKind.READY_READ
        return CallKind.REQUEST_READ if "RowKey ge" in where and " or " not in where \
            else CallKind.SCAN
    if table_match and method in ("GET", "POST") and not {"comp", "restype"} & set(query):
        kinds = {names.completions: (CallKind.SCAN, CallKind.RECORD),
                 names.ledger: (CallKind.LEDGER_SCAN, CallKind.CLAIM),
                 names.parked: (CallKind.PARKED_READ, CallKind.PARK)}.get(table_match.group(1))
        if kinds:
            return kinds[0] if method == "GET" else kinds[1]
    return CallKind.OTHER


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
        return cls(names, [Rule.of(r) for r in data.get("rules", ())],
                   int(data.get("seed", 0)) + salt)

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
        decision = self.plan.decide(classify(str(request.method), str(request.url), headers,
                                             body, self.plan.names))
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


def plan_from_environment(env: Mapping[str, str], config: AppConfig,
                          salt: int = 0) -> FaultPlan | None:
    """The plan ``SIM_FAULTS`` asks for, or ``None``; ``salt`` (an instance index) shifts
    the seed so that instances do not fail in lockstep."""
    spec = env.get(FAULTS_ENV, "").strip()
    if not spec:
        return None
    return FaultPlan.from_spec(spec, TableNames.of(config), salt)
