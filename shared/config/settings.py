"""The app settings this app reads: one source of truth for their names and defaults.

Every other place that names a setting (``host.json`` binding expressions,
``local.settings.sample.json``, ``infra/``) is checked against ``SETTINGS`` by the tests.
``load_config`` turns the environment into a validated ``AppConfig``; an invalid value fails at
start-up with a ``ConfigError`` that says which setting to fix and how.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config.names import (
    MAX_INTAKE_QUEUES,
    MAX_QUEUE_NAME,
    MAX_SHARDS,
    MAX_TABLE_NAME,
    completions_table_name,
    intake_queue_names,
    poison_queue_name,
    queue_name_problem,
)
from shared.config.timings import LeaderElectionConfig
from shared.errors import ConfigError as ConfigError  # re-exported: callers import it from here

# The storage connection: a connection string locally, identity-based settings in Azure
# (AzureWebJobsStorage__blobServiceUri, __queueServiceUri, __tableServiceUri, __credential,
# __clientId). See shared/storage/clients.py.
STORAGE_CONNECTION = "AzureWebJobsStorage"
STORAGE_IDENTITY_SUFFIXES = (
    "blobServiceUri",
    "queueServiceUri",
    "tableServiceUri",
    "credential",
    "clientId",
)


@dataclass(frozen=True)
class Setting:
    """One app setting: its name, default (as the string an app setting would hold) and role."""

    name: str
    default: str
    description: str


COMPLETIONS_QUEUE_NAME = Setting(
    "COMPLETIONS_QUEUE_NAME", "completions", "Queue the upstream steps post completions to."
)
WAKEUP_QUEUE_NAME = Setting(
    "WAKEUP_QUEUE_NAME", "wakeups",
    "Queue of the leader's wake-up alarms: one comes due when a holder's lease would expire.",
)
COMPLETIONS_TABLE_NAME = Setting(
    "COMPLETIONS_TABLE_NAME", "completions", "Table where every completion is recorded."
)
LEDGER_TABLE_NAME = Setting(
    "LEDGER_TABLE_NAME", "ledger", "Table of balances, request outcomes and the fence."
)
PARKED_TABLE_NAME = Setting(
    "PARKED_TABLE_NAME", "parkedmessages", "Table where malformed messages are parked."
)
LEASE_CONTAINER_NAME = Setting(
    "LEASE_CONTAINER_NAME", "leader-election", "Blob container that holds the lease blob."
)
LEASE_BLOB_NAME = Setting("LEASE_BLOB_NAME", "ledger-leader", "Blob whose lease elects the leader.")
LEASE_SECONDS = Setting("LEASE_SECONDS", "60", "Lease duration, 15-60 s (Azure's limits).")
# Empty (the default) derives these two from the lease: see LeaderElectionConfig.build.
RENEW_INTERVAL_SECONDS = Setting(
    "RENEW_INTERVAL_SECONDS", "",
    "How often the leader renews its lease while it drains; empty: LEASE_SECONDS / 3.",
)
LEASE_SAFETY_MARGIN_SECONDS = Setting(
    "LEASE_SAFETY_MARGIN_SECONDS", "",
    "No commit starts later than last renew sent + lease - this margin; empty: LEASE_SECONDS / 6.",
)
DRAIN_BUDGET_SECONDS = Setting(
    "DRAIN_BUDGET_SECONDS", "240", "Longest a leader drains in one invocation (< functionTimeout)."
)
REQUEST_TIMEOUT_SECONDS = Setting(
    "REQUEST_TIMEOUT_SECONDS", "900",
    "An incomplete request expires this long after its first step.",
)
STORAGE_TIMEOUT_SECONDS = Setting(
    "STORAGE_TIMEOUT_SECONDS", "5", "Per-call network timeout of the ledger and lease clients."
)
LEDGER_SHARDS = Setting(
    "LEDGER_SHARDS", "1",
    "Shards of the ledger, 1-64: each has its own lease, ledger partition and completions table.",
)
OUTCOME_EVENTS = Setting(
    "OUTCOME_EVENTS", "true",
    "true: send one outcome event per decided request to OUTCOMES_QUEUE_NAME; false: none.",
)
OUTCOMES_QUEUE_NAME = Setting(
    "OUTCOMES_QUEUE_NAME", "outcomes",
    "Queue the leader sends outcome and contradiction events to (base64 JSON, version 1).",
)
RECONCILE_MAX_FLIGHT_SECONDS = Setting(
    "RECONCILE_MAX_FLIGHT_SECONDS", "300",
    "Reconciliation reports work in flight between shards (escrow, message, coordination) older "
    "than this, 10-604800 s.",
)
RETENTION_DAYS = Setting(
    "RETENTION_DAYS", "365",
    "Outcome, claim, applied and parked rows older than this are archived to a blob and deleted, "
    "7-3650 days: a step re-sent later is taken as new.",
)
ARCHIVE_CONTAINER_NAME = Setting(
    "ARCHIVE_CONTAINER_NAME", "ledger-archive",
    "Blob container the retention step exports archived rows to (JSON lines).",
)
INTAKE_QUEUES = Setting(
    "INTAKE_QUEUES", "1",
    "Intake queues, 1-16: COMPLETIONS_QUEUE_NAME, then its -1, -2, ... (one trigger each).",
)
TELEMETRY_CONSOLE_EXPORTER = Setting(
    "TELEMETRY_CONSOLE_EXPORTER", "0",
    "1: print spans and metrics to stderr when Application Insights is not configured.",
)

SETTINGS: tuple[Setting, ...] = (
    COMPLETIONS_QUEUE_NAME,
    WAKEUP_QUEUE_NAME,
    COMPLETIONS_TABLE_NAME,
    LEDGER_TABLE_NAME,
    PARKED_TABLE_NAME,
    LEASE_CONTAINER_NAME,
    LEASE_BLOB_NAME,
    LEASE_SECONDS,
    RENEW_INTERVAL_SECONDS,
    LEASE_SAFETY_MARGIN_SECONDS,
    DRAIN_BUDGET_SECONDS,
    REQUEST_TIMEOUT_SECONDS,
    STORAGE_TIMEOUT_SECONDS,
    LEDGER_SHARDS,
    OUTCOME_EVENTS,
    OUTCOMES_QUEUE_NAME,
    RECONCILE_MAX_FLIGHT_SECONDS,
    RETENTION_DAYS,
    ARCHIVE_CONTAINER_NAME,
    INTAKE_QUEUES,
    TELEMETRY_CONSOLE_EXPORTER,
)

# host.json's functionTimeout; the drain budget must stay below it (checked by the tests).
FUNCTION_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class AppConfig:
    """Validated configuration of one app instance."""

    completions_queue: str
    wakeup_queue: str
    completions_table: str
    ledger_table: str
    parked_table: str
    lease_container: str
    lease_blob: str
    election: LeaderElectionConfig
    drain_budget_seconds: float
    request_timeout_seconds: float
    storage_timeout_seconds: float
    instance_id: str
    shards: int = 1  # LEDGER_SHARDS
    outcome_events: bool = True  # OUTCOME_EVENTS
    outcomes_queue: str = OUTCOMES_QUEUE_NAME.default
    reconcile_max_flight_seconds: float = 300.0  # RECONCILE_MAX_FLIGHT_SECONDS
    retention_days: int = 365  # RETENTION_DAYS
    archive_container: str = "ledger-archive"  # ARCHIVE_CONTAINER_NAME
    intake_queues: int = 1  # INTAKE_QUEUES

    @property
    def poison_queue(self) -> str:
        """The queue the Functions host moves a message to after maxDequeueCount failures."""
        return poison_queue_name(self.completions_queue)

    @property
    def intake_queue_names(self) -> tuple[str, ...]:
        """Every intake queue: ``completions_queue``, then ``{completions_queue}-q``."""
        return intake_queue_names(self.completions_queue, self.intake_queues)


def _intake_queues(env: Mapping[str, str], completions_queue: str) -> int:
    """INTAKE_QUEUES, and every name it implies (poison queues included) valid in Azure."""
    count = _number(env, INTAKE_QUEUES, 1, MAX_INTAKE_QUEUES)
    if count != int(count):
        raise ConfigError(f"{INTAKE_QUEUES.name}={count:g}: set a whole number of queues "
                          f"between 1 and {MAX_INTAKE_QUEUES}.")
    for name in intake_queue_names(completions_queue, int(count)):
        for queue in (name, poison_queue_name(name)):
            # One queue keeps today's rule (the host lower-cases the name it is given): only the
            # poison queue's length is checked. More queues: every name is checked in full.
            problem = (queue_name_problem(queue) if count > 1 or len(queue) > MAX_QUEUE_NAME
                       else None)
            if problem:
                raise ConfigError(f"{COMPLETIONS_QUEUE_NAME.name}={completions_queue!r} makes "
                                  f"an invalid queue name with {INTAKE_QUEUES.name}={count:g}: "
                                  f"{problem}; shorten or fix {COMPLETIONS_QUEUE_NAME.name}.")
    return int(count)


def _text(env: Mapping[str, str], setting: Setting) -> str:
    value = env.get(setting.name, "").strip()
    return value or setting.default


def _number(env: Mapping[str, str], setting: Setting, low: float, high: float) -> float:
    value = _optional_number(env, setting, low, high)
    if value is None:  # only a setting whose default is blank can be blank
        raise ConfigError(f"{setting.name} is empty; set it between {low:g} and {high:g}.")
    return value


def _optional_number(env: Mapping[str, str], setting: Setting, low: float,
                     high: float) -> float | None:
    """The setting's number, or ``None`` when it is blank and its default is blank (derived)."""
    raw = _text(env, setting)
    if not raw:
        return None
    default = setting.default or "empty: derived"
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"{setting.name}={raw!r} is not a number; set it to a number of seconds between "
            f"{low:g} and {high:g} (default {default})."
        ) from None
    if not low <= value <= high:
        raise ConfigError(
            f"{setting.name}={raw} is out of range; set it between {low:g} and {high:g} "
            f"(default {default}). {setting.description}"
        )
    return value


def _flag(env: Mapping[str, str], setting: Setting) -> bool:
    raw = _text(env, setting).lower()
    if raw in ("true", "1", "yes", "on"):
        return True
    if raw in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{setting.name}={raw!r} is not true or false (default "
                      f"{setting.default}). {setting.description}")


def default_instance_id() -> str:
    """A name for this process: the Functions instance id in Azure, host:pid elsewhere."""
    site_instance = os.environ.get("WEBSITE_INSTANCE_ID", "")[:12]
    return f"{site_instance or socket.gethostname()}:{os.getpid()}"


def load_config(env: Mapping[str, str] | None = None, instance_id: str | None = None) -> AppConfig:
    """Read and validate every setting; raise ``ConfigError`` naming the first bad one."""
    env = os.environ if env is None else env
    lease = _number(env, LEASE_SECONDS, 15, 60)
    if lease != int(lease):
        raise ConfigError(f"{LEASE_SECONDS.name}={lease:g}: blob leases last whole seconds; "
                          "set an integer between 15 and 60.")
    storage_timeout = _number(env, STORAGE_TIMEOUT_SECONDS, 1, 60)
    # Raises ElectionConfigError, a ConfigError that names the setting to change.
    election = LeaderElectionConfig.build(
        lease_seconds=lease,
        renew_interval_seconds=_optional_number(env, RENEW_INTERVAL_SECONDS, 1, 59),
        safety_margin_seconds=_optional_number(env, LEASE_SAFETY_MARGIN_SECONDS, 1, 30),
        step_seconds=storage_timeout,
        setting_names=(LEASE_SECONDS.name, RENEW_INTERVAL_SECONDS.name,
                       LEASE_SAFETY_MARGIN_SECONDS.name, STORAGE_TIMEOUT_SECONDS.name),
    )
    drain = _number(env, DRAIN_BUDGET_SECONDS, 1, FUNCTION_TIMEOUT_SECONDS - 30)
    shards = _number(env, LEDGER_SHARDS, 1, MAX_SHARDS)
    if shards != int(shards):
        raise ConfigError(f"{LEDGER_SHARDS.name}={shards:g}: set a whole number of shards "
                          f"between 1 and {MAX_SHARDS}.")
    completions_table = _text(env, COMPLETIONS_TABLE_NAME)
    longest = completions_table_name(completions_table, MAX_SHARDS - 1)
    if int(shards) > 1 and len(longest) > MAX_TABLE_NAME:
        raise ConfigError(f"{COMPLETIONS_TABLE_NAME.name}={completions_table!r} is too long for "
                          f"{LEDGER_SHARDS.name}={shards:g}: shard tables are named like "
                          f"{longest!r}, at most {MAX_TABLE_NAME} characters.")
    retention = _number(env, RETENTION_DAYS, 7, 3650)
    if retention != int(retention):
        raise ConfigError(f"{RETENTION_DAYS.name}={retention:g}: set a whole number of days "
                          "between 7 and 3650.")
    completions_queue = _text(env, COMPLETIONS_QUEUE_NAME)
    intake_queues = _intake_queues(env, completions_queue)
    return AppConfig(
        completions_queue=completions_queue,
        wakeup_queue=_text(env, WAKEUP_QUEUE_NAME),
        completions_table=completions_table,
        ledger_table=_text(env, LEDGER_TABLE_NAME),
        parked_table=_text(env, PARKED_TABLE_NAME),
        lease_container=_text(env, LEASE_CONTAINER_NAME),
        lease_blob=_text(env, LEASE_BLOB_NAME),
        election=election,
        drain_budget_seconds=drain,
        request_timeout_seconds=_number(env, REQUEST_TIMEOUT_SECONDS, 1, 7 * 24 * 3600),
        storage_timeout_seconds=storage_timeout,
        instance_id=instance_id or default_instance_id(),
        shards=int(shards),
        outcome_events=_flag(env, OUTCOME_EVENTS),
        outcomes_queue=_text(env, OUTCOMES_QUEUE_NAME),
        reconcile_max_flight_seconds=_number(env, RECONCILE_MAX_FLIGHT_SECONDS, 10, 7 * 24 * 3600),
        retention_days=int(retention),
        archive_container=_text(env, ARCHIVE_CONTAINER_NAME),
        intake_queues=intake_queues,
    )
