"""Telemetry of the app: OpenTelemetry spans, metrics and structured log fields, in one place.

The rest of ``shared/`` calls only this module: ``invocation``/``span``/``traced`` for traces,
the context managers and ``record_*`` functions for metrics. They use the OpenTelemetry *API*,
which does nothing until a provider is installed, so the app runs unchanged (and costs nothing
extra) when telemetry is off. ``configure(env)`` installs the providers once per process:

- ``APPLICATIONINSIGHTS_CONNECTION_STRING`` set (Azure): the Azure Monitor distro exports
  traces, metrics and the ``shared`` loggers' records to Application Insights, authenticated
  with the app's managed identity (the component refuses instrumentation keys).
- otherwise, ``TELEMETRY_CONSOLE_EXPORTER=1``: spans and metrics are printed to stderr.
- otherwise: off.

Every span carries the invocation's ``instance``, ``trigger``, ``role`` (leader | follower, once
known), ``epoch`` (once claimed) and ``shard``; log records get the same fields as custom
dimensions. The span that records a completion stores its W3C ``traceparent`` in the completion
row, and the span of the transaction that commits the request links back to it.

**Shards.** Every metric carries a ``shard`` dimension (an int; 0 with ``LEDGER_SHARDS=1``, so
a one-shard deployment's queries only gain a constant column), and so do spans and log records:
the shard the code acts for when it records (``current_shard``). It is set, for the duration
of a call, by ``acting_for(k)``, and by the ``invocation`` and ``traced`` decorators from their
first argument when that is a ``LedgerApp`` (its ``current`` shard) or holds one as ``.app``
(``ReadyView``): ``run_election(app.on(k))`` and ``repair_scan(shard)`` record for their shard.
Queue-wide figures (the poison queue's depth, messages parked as malformed) are not a shard's:
they carry the shard the invocation acted for when it recorded them (0 for the sweeper's
depth). docs/operations.md has the KQL that splits by it.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from opentelemetry import metrics, trace
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from shared.config.settings import TELEMETRY_CONSOLE_EXPORTER, ConfigError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider


logger = logging.getLogger(__name__)

CONNECTION_STRING = "APPLICATIONINSIGHTS_CONNECTION_STRING"
# "ClientId=<client id>;Authorization=AAD" (infra/): the identity that sends telemetry.
AUTHENTICATION_STRING = "APPLICATIONINSIGHTS_AUTHENTICATION_STRING"
IDENTITY_CLIENT_ID = "AzureWebJobsStorage__clientId"  # the same user-assigned identity
LOGGER_NAME = "shared"  # the app's loggers: shared.* (the Azure SDKs' stay out)
TRACEPARENT = "traceparent"  # completion-row property: the span that recorded the step
# Application Insights keeps 8 KiB of a custom dimension: list the ids that fit, whole.
REQUEST_IDS_MAX_CHARS = 8000

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

_shard: ContextVar[int] = ContextVar("ledger_shard", default=0)

_tracer = trace.get_tracer("ledger")  # proxies: they follow the providers configure() installs
_meter = metrics.get_meter("ledger")
_propagator = TraceContextTextMapPropagator()

LEASE_ATTEMPTS = _meter.create_counter(
    "ledger.lease.attempts", "{attempt}", "Lease acquire attempts, by result.")
TERMS = _meter.create_counter(
    "ledger.leader.terms", "{term}", "Leadership terms started (an epoch claimed).")
EPOCH = _meter.create_gauge("ledger.leader.epoch", "{epoch}", "Epoch of the latest term.")
DRAIN_DURATION = _meter.create_histogram(
    "ledger.drain.duration", "s", "How long one term drained.")
DRAIN_REQUESTS = _meter.create_histogram(
    "ledger.drain.requests", "{request}", "Requests decided per term.")
OUTCOMES = _meter.create_counter("ledger.outcomes", "{request}", "Requests decided, by status.")
BATCH_SIZE = _meter.create_histogram(
    "ledger.commit.batch_size", "{request}", "Requests per commit transaction.")
COMMIT_LAG = _meter.create_histogram(
    "ledger.commit.lag", "s", "From a request's last step recorded to its outcome committed.")
LEASE_REMAINING = _meter.create_histogram(
    "ledger.commit.lease_remaining", "s", "Lease time left (before the margin) at each commit.")
PENDING = _meter.create_gauge(
    "ledger.completions.pending", "{completion}", "Completion rows waiting, at each scan.")
PENDING_REQUESTS = _meter.create_gauge(
    "ledger.requests.pending", "{request}", "Requests not decidable yet, at each scan.")
OLDEST_PENDING = _meter.create_gauge(
    "ledger.completions.oldest_age", "s", "Age of the oldest waiting completion, at each scan.")
DELIVERIES = _meter.create_counter(
    "ledger.completions.deliveries", "{message}", "Completions received, by record result.")
PARKED = _meter.create_counter("ledger.parked", "{message}", "Messages parked, by kind.")
IN_FLIGHT = _meter.create_gauge(
    "ledger.flight.coordinations", "{request}",
    "Cross-shard requests the shard coordinates (home), at each read of its work in flight.")
OLDEST_IN_FLIGHT = _meter.create_gauge(
    "ledger.flight.oldest_age", "s",
    "Time since the shard's oldest coordination last progressed, at each read of its work in "
    "flight (0 when none).")
POISON_DEPTH = _meter.create_gauge(
    "ledger.poison.depth", "{message}", "Approximate messages in the poison queue.")


# --- configuration ---------------------------------------------------------------------------

_configure_lock = threading.Lock()
_mode: str | None = None


def console_requested(env: Mapping[str, str]) -> bool:
    """Whether ``TELEMETRY_CONSOLE_EXPORTER`` asks for the console exporter (raises if unclear)."""
    raw = env.get(TELEMETRY_CONSOLE_EXPORTER.name, TELEMETRY_CONSOLE_EXPORTER.default)
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{TELEMETRY_CONSOLE_EXPORTER.name}={raw!r}: set 1 to print spans and "
                      "metrics to stderr, or 0 (the default) for none.")


def identity_client_id(env: Mapping[str, str]) -> str | None:
    """The client id of the managed identity that sends telemetry (``None``: system-assigned)."""
    for part in env.get(AUTHENTICATION_STRING, "").split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "clientid" and value.strip():
            return value.strip()
    return env.get(IDENTITY_CLIENT_ID, "").strip() or None


def configure(env: Mapping[str, str]) -> str:
    """Install the exporters the environment asks for, once per process; return the mode.

    ``"azure-monitor"``, ``"console"`` or ``"off"``. Later calls return the first mode.
    """
    global _mode
    with _configure_lock:
        if _mode is not None:
            return _mode
        console = console_requested(env)
        connection = env.get(CONNECTION_STRING, "").strip()
        if connection:
            _configure_azure_monitor(connection, identity_client_id(env))
            _mode = "azure-monitor"
        elif console:
            _configure_console()
            _mode = "console"
        else:
            _mode = "off"
        logger.debug("telemetry: %s", _mode)
        return _mode


def _configure_azure_monitor(connection: str, client_id: str | None) -> None:
    from azure.identity import ManagedIdentityCredential
    from azure.monitor.opentelemetry import configure_azure_monitor

    # Only the app's own spans: per-HTTP-call spans of the storage SDK would multiply the volume.
    off = {"enabled": False}
    configure_azure_monitor(
        connection_string=connection,
        credential=ManagedIdentityCredential(client_id=client_id),
        logger_name=LOGGER_NAME,
        # Every trace: the distro's default (5 traces/s) would drop the spans that a commit's
        # links point to. OTEL_TRACES_SAMPLER/_ARG still override it (docs/operations.md).
        sampling_ratio=1.0,
        instrumentation_options={name: off for name in (
            "azure_sdk", "django", "fastapi", "flask", "psycopg2", "requests", "urllib",
            "urllib3", "httpx", "httpx2")},
    )
    app_logger = logging.getLogger(LOGGER_NAME)
    if app_logger.level == logging.NOTSET:
        app_logger.setLevel(logging.INFO)  # INFO lines are per term, not per message
    add_log_fields(app_logger.handlers)


def _configure_console() -> None:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # stderr: stdout may be a channel (the simulator's instances report events on it).
    tracer_provider = SdkTracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr),
                                           export_interval_millis=10_000)
    install(tracer_provider, SdkMeterProvider(metric_readers=[reader]))


def install(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
    """Make these the process's providers (once per process: OpenTelemetry ignores a second)."""
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)


# --- invocation context and spans ------------------------------------------------------------

@dataclass
class _Invocation:
    span: Span
    fields: dict[str, AttributeValue] = field(default_factory=dict)


_current: ContextVar[_Invocation | None] = ContextVar("ledger_invocation", default=None)

P = ParamSpec("P")
R = TypeVar("R")


def _clean(attributes: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    return {key: value for key, value in attributes.items() if value is not None}


def fields() -> dict[str, AttributeValue]:
    """The current invocation's fields (instance, trigger, role, epoch, shard), for ``extra=``."""
    state = _current.get()
    return {**state.fields, "shard": _shard.get()} if state else {}


def current_shard() -> int:
    """The shard the running code acts for (0 outside of any: one shard, or queue-wide)."""
    return _shard.get()


def _dimensions(**attributes: AttributeValue) -> dict[str, AttributeValue]:
    """A metric's attributes: ``attributes`` and the shard (every metric has it)."""
    return {"shard": _shard.get(), **attributes}


def _shard_of(argument: Any) -> int | None:
    """The shard of a ``LedgerApp`` (duck-typed: ``current`` and ``shards``), or of an object
    that holds one as ``app``; ``None`` for anything else."""
    for candidate in (argument, getattr(argument, "app", None)):
        current = getattr(candidate, "current", None)
        if type(current) is int and hasattr(candidate, "shards"):
            return current
    return None


@contextmanager
def acting_for(shard: int | None) -> Iterator[None]:
    """Record metrics, spans and log fields for ``shard`` until the block ends (``None``: leave
    the current shard as it is)."""
    if shard is None:
        yield
        return
    token = _shard.set(shard)
    try:
        yield
    finally:
        _shard.reset(token)


def annotate(**attributes: AttributeValue | None) -> None:
    """Add fields to the current invocation: its span, every later span and log record."""
    state = _current.get()
    clean = _clean(attributes)
    if state is not None:
        state.fields.update(clean)
        state.span.set_attributes(clean)
    current = trace.get_current_span()
    if state is None or current is not state.span:
        current.set_attributes(clean)


@contextmanager
def span(name: str, **attributes: AttributeValue | None) -> Iterator[Span]:
    """A child span of the current one, with the invocation's fields and ``attributes``."""
    with _tracer.start_as_current_span(
            name, attributes={**fields(), **_clean(attributes)}) as current:
        yield current


def traced(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: run the function in a span called ``name`` (acting for the shard of its first
    argument, when that names one: see the module docstring)."""
    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with acting_for(_shard_of(args[0]) if args else None), span(name):
                return function(*args, **kwargs)
        return wrapper
    return decorate


def invocation(trigger: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator of a trigger's whole job (first argument: the ``LedgerApp``): one root span.

    Nested calls (``run_election`` inside ``handle_completion``) join the enclosing invocation;
    either way the call acts for the app's shard (``acting_for``).
    """
    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            shard = _shard_of(args[0]) if args else None
            if _current.get() is not None:
                with acting_for(shard):
                    return function(*args, **kwargs)
            config = getattr(args[0], "config", None) if args else None
            instance = str(getattr(config, "instance_id", ""))
            base: dict[str, AttributeValue] = {"instance": instance, "trigger": trigger}
            with acting_for(shard), _tracer.start_as_current_span(
                    "ledger.invocation", kind=SpanKind.CONSUMER,
                    attributes={**base, "shard": _shard.get()}) as root:
                token = _current.set(_Invocation(root, dict(base)))
                try:
                    return function(*args, **kwargs)
                finally:
                    _current.reset(token)
        return wrapper
    return decorate


# --- completions: record, scan, link ---------------------------------------------------------

def traceparent_field() -> dict[str, str]:
    """``{"traceparent": ...}`` of the current span, for a completion row (empty when off)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return {TRACEPARENT: carrier[TRACEPARENT]} if TRACEPARENT in carrier else {}


def record_delivery(result: str, request_id: str) -> None:
    """Count one completion received (``recorded``/``duplicate``/``conflict``).

    The message's ``requestId`` goes on the invocation span only: what the invocation does next
    as a leader concerns other requests too.
    """
    state = _current.get()
    if state is not None:
        state.span.set_attribute("requestId", request_id)
    DELIVERIES.add(1, _dimensions(result=result))


def record_parked(kind: str) -> None:
    """Count one message parked (``malformed`` or ``late-contradiction``)."""
    PARKED.add(1, _dimensions(kind=kind))


def record_scan(rows: int, pending: int, ready: int, oldest_age_seconds: float) -> None:
    """What one full scan saw: step rows and requests waiting, work announced and not yet
    committed (the ready index), the oldest waiting row's age."""
    PENDING.set(rows, _dimensions())
    PENDING_REQUESTS.set(pending, _dimensions())
    OLDEST_PENDING.set(oldest_age_seconds, _dimensions())
    trace.get_current_span().set_attributes(
        {"completions": rows, "requestsPending": pending, "requestsReady": ready,
         "oldestAgeSeconds": round(oldest_age_seconds, 3)})


def record_flight(coordinations: int, messages: int, oldest_age_seconds: float) -> None:
    """What one read of the shard's work in flight found: coordinations (requests it is home
    of, waiting for other shards), messages in its inbox, and how long the oldest coordination
    has gone without progress (storage's time since its row was last written)."""
    IN_FLIGHT.set(coordinations, _dimensions())
    OLDEST_IN_FLIGHT.set(oldest_age_seconds, _dimensions())
    trace.get_current_span().set_attributes(
        {"inFlight": coordinations, "inbox": messages,
         "oldestInFlightAgeSeconds": round(oldest_age_seconds, 3)})


def record_poison_depth(depth: int) -> None:
    """The poison queue's approximate length (the sweeper reads it every minute)."""
    POISON_DEPTH.set(depth, _dimensions())
    annotate(poisonDepth=depth)


def _links(traceparents: Iterable[tuple[str, str, str]]) -> list[Link]:
    """Span links to the spans that recorded steps: (traceparent, requestId, operationId)."""
    links: dict[tuple[int, int], Link] = {}
    for traceparent, request_id, operation_id in traceparents:
        if not traceparent:
            continue
        context = trace.get_current_span(
            _propagator.extract({TRACEPARENT: traceparent})).get_span_context()
        if context.is_valid:
            links.setdefault((context.trace_id, context.span_id),
                             Link(context, {"requestId": request_id,
                                            "operationId": operation_id}))
    return list(links.values())


# --- leadership ------------------------------------------------------------------------------

class LeaseAttempt:
    """One acquire attempt in progress: set ``result`` (acquired, refused, skipped) when known;
    it stays ``error`` when the attempt raised."""

    def __init__(self) -> None:
        self.result = "error"


@contextmanager
def lease_attempt() -> Iterator[LeaseAttempt]:
    """Span and count one acquire attempt; sets the invocation's role."""
    attempt = LeaseAttempt()
    with span("ledger.acquire") as current:
        try:
            yield attempt
        finally:
            current.set_attribute("result", attempt.result)
            LEASE_ATTEMPTS.add(1, _dimensions(result=attempt.result))
    if attempt.result == "acquired":
        annotate(role="leader")
    elif fields().get("role") != "leader":  # a leader that looks again stays a leader
        annotate(role="follower")


def record_term_started(epoch: int) -> None:
    """A term claimed ``epoch``: count it, set the epoch gauge and the invocation's field."""
    instance = str(fields().get("instance", ""))
    TERMS.add(1, _dimensions(instance=instance))
    EPOCH.set(epoch, _dimensions(instance=instance))
    annotate(epoch=epoch)


class TermSpan:
    """The span of one term: ``record(outcomes)`` before it closes (counts by status)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}

    def record(self, outcomes: Mapping[str, int]) -> None:
        """How many requests the term decided, by status."""
        self.outcomes = {str(status): count for status, count in outcomes.items()}


@contextmanager
def term() -> Iterator[TermSpan]:
    """Span one term's commits (span ``ledger.drain``); record its duration and decisions."""
    started = time.monotonic()
    recorded = TermSpan()
    with span("ledger.drain") as current:
        try:
            yield recorded
        finally:
            decided = sum(recorded.outcomes.values())
            current.set_attributes({"requestsDecided": decided,
                                    **{f"outcomes.{k}": v for k, v in recorded.outcomes.items()}})
            DRAIN_DURATION.record(time.monotonic() - started, _dimensions())
            DRAIN_REQUESTS.record(decided, _dimensions())


@contextmanager
def commit_transaction(request_ids: Sequence[str], statuses: Sequence[str],
                       lags_seconds: Sequence[float], step_spans: Iterable[tuple[str, str, str]],
                       lease_remaining: float) -> Iterator[Span]:
    """Span one fenced commit transaction, linked to the spans that recorded its steps.

    ``step_spans`` are (traceparent, requestId, operationId) of the steps. On success, count
    the outcomes by status, the batch size, and each request's lag (``lags_seconds``: from its
    last step recorded to the commit).
    """
    ids = list(request_ids)
    listed = _joined(ids, REQUEST_IDS_MAX_CHARS)  # a batch holds at most ~98 requests
    LEASE_REMAINING.record(lease_remaining, _dimensions())
    attributes: dict[str, AttributeValue | None] = {
        "requests": len(ids), "requestId": ids[0] if len(ids) == 1 else None,
        "requestIds": ",".join(listed), "requestIdsComplete": len(listed) == len(ids),
        "leaseRemainingSeconds": round(lease_remaining, 3),
        "lagMaxSeconds": round(max(lags_seconds, default=0.0), 3)}
    with _tracer.start_as_current_span(
            "ledger.commit", links=_links(step_spans),
            attributes={**fields(), **_clean(attributes)}) as current:
        yield current
    BATCH_SIZE.record(len(ids), _dimensions())
    for status in statuses:
        OUTCOMES.add(1, _dimensions(status=status))
    for lag in lags_seconds:
        COMMIT_LAG.record(lag, _dimensions())


def _joined(ids: Sequence[str], limit: int) -> list[str]:
    """The first ids that, joined by commas, fit in ``limit`` characters (ids have no comma)."""
    kept: list[str] = []
    size = 0
    for request_id in ids:
        size += len(request_id) + (1 if kept else 0)
        if size > limit:
            break
        kept.append(request_id)
    return kept


# --- logs ------------------------------------------------------------------------------------

class LogFields(logging.Filter):
    """Adds the invocation's fields to each record, as custom dimensions (never overwrites)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in fields().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def add_log_fields(handlers: Iterable[logging.Handler]) -> None:
    """Give these handlers' records the invocation's fields (once per handler)."""
    for handler in handlers:
        if not any(isinstance(existing, LogFields) for existing in handler.filters):
            handler.addFilter(LogFields())


def log_extra(**attributes: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the invocation's fields plus ``attributes``."""
    return {**fields(), **_clean(attributes)}
