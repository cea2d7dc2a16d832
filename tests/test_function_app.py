"""The decorated functions of ``function_app.py``, called through the programming model only.

Each function is found by name in ``app.get_functions()`` and its user function is called with
the real ``azure.functions`` trigger objects, against a real Azurite, with the settings in the
environment as the Functions host would provide them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import azure.functions as func
import pytest
from azure.data.tables import TableClient
from azure.functions.queue import QueueMessage
from azure.functions.timer import TimerRequest

from shared import wiring as runtime
from shared.domain.contract import parse_completion
from shared.errors import StorageError
from shared.leadership.instance import LedgerApp
from shared.storage.azure_tables import AzureTable
from shared.storage.clients import azurite_connection_string
from shared.storage.completions import CompletionStore
from simulator.azurite import free_port
from simulator.functions import indexed
from tests.helpers import Namespace, deposit, step, transfer

# Indexed once per process, as the worker does (a second get_functions() call fails).
FUNCTIONS = indexed().by_name


def user_function(name: str) -> Callable[..., Any]:
    """The Python function the host would invoke for the function called ``name``."""
    function: Callable[..., Any] = FUNCTIONS[name].get_user_function()
    return function


def bindings(name: str) -> list[dict[str, Any]]:
    """The function's bindings as the host reads them (function.json equivalent)."""
    described: list[dict[str, Any]] = FUNCTIONS[name].get_bindings_dict()["bindings"]
    return described


@pytest.fixture
def env(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This test's settings in the environment, and a fresh process-wide app around the test."""
    settings = ns.env()
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    yield settings
    runtime.reset()


def deliver(body: bytes | str, dequeue_count: int = 1, message_id: str | None = None) -> None:
    """One queue-triggered invocation, as the host makes it."""
    message = QueueMessage(  # type: ignore[no-untyped-call]  # azure-functions leaves it untyped
        id=message_id or uuid.uuid4().hex, body=body, dequeue_count=dequeue_count)
    user_function("record_completion")(message)


def get(name: str, path: str, **route_params: str) -> tuple[int, Any]:
    """One HTTP-triggered invocation: (status code, decoded JSON body)."""
    request = func.HttpRequest(method="GET", url=f"http://localhost/api/{path}",
                               route_params=route_params, body=b"")
    response: func.HttpResponse = user_function(name)(request)
    assert response.mimetype == "application/json"
    return response.status_code, json.loads(response.get_body())


def account(account_id: str) -> tuple[int, Any]:
    return get("get_account", f"accounts/{account_id}", accountId=account_id)


def request(request_id: str) -> tuple[int, Any]:
    return get("get_request", f"requests/{request_id}", requestId=request_id)


def leader() -> dict[str, Any]:
    status, body = get("get_leader", "leader")
    assert status == 200
    return dict(body)


# --- the function index --------------------------------------------------------------------
def test_the_app_declares_the_eight_documented_functions() -> None:
    assert set(FUNCTIONS) == {"record_completion", "wake_up", "sweep", "get_account",
                              "get_request", "get_leader", "get_status_page", "get_metrics",
                              "reconcile", "reshard"}


def test_the_wake_up_trigger_binds_the_wakeup_queue_setting() -> None:
    [trigger] = bindings("wake_up")
    assert trigger["type"] == "queueTrigger"
    assert trigger["queueName"] == "%WAKEUP_QUEUE_NAME%"
    assert trigger["connection"] == "AzureWebJobsStorage"


def test_queue_trigger_binds_the_completions_queue_setting() -> None:
    [trigger] = bindings("record_completion")
    assert trigger["type"] == "queueTrigger"
    assert trigger["queueName"] == "%COMPLETIONS_QUEUE_NAME%"
    assert trigger["connection"] == "AzureWebJobsStorage"
    assert trigger["name"] == "msg"


def test_reshard_is_a_post_route_for_the_master_key_only() -> None:
    trigger = next(b for b in bindings("reshard") if b["type"] == "httpTrigger")
    assert trigger["route"] == "reshard"
    assert [getattr(m, "value", m) for m in trigger["methods"]] == ["POST"]
    assert trigger["authLevel"] == func.AuthLevel.ADMIN


def post_reshard(**params: str) -> tuple[int, Any]:
    request = func.HttpRequest(method="POST", url="http://localhost/api/reshard", params=params,
                               body=b"")
    response: func.HttpResponse = user_function("reshard")(request)
    return response.status_code, json.loads(response.get_body())


def test_the_reshard_route_moves_the_ledger_and_refuses_a_bad_target(
        env: dict[str, str]) -> None:
    deliver(deposit("d1", "alice", "12.34")[0])
    deliver(deposit("d2", "bob", "1.00")[0])
    assert post_reshard(to="0")[0] == 400
    assert post_reshard(to="four")[0] == 400
    assert post_reshard(to="2", resume="true")[0] == 409, "no reshard is open to resume"
    code, report = post_reshard(to="2")
    assert code == 200, report
    assert (report["from"], report["to"]) == (1, 2)
    assert report["totalBefore"] == report["totalAfter"] == "13.34"
    assert account("alice") == (200, {"accountId": "alice", "balance": "12.34"})
    assert leader()["reshard"] == {"needed": True, "setting": 1, "stored": 2, "generation": 2}


def test_sweeper_runs_every_minute_and_not_on_startup() -> None:
    [trigger] = bindings("sweep")
    assert trigger["type"] == "timerTrigger"
    assert trigger["schedule"] == "0 * * * * *"
    assert trigger["runOnStartup"] is False


@pytest.mark.parametrize(("name", "route"), [
    ("get_account", "accounts/{accountId}"),
    ("get_request", "requests/{requestId}"),
    ("get_leader", "leader"),
    ("get_status_page", "status"),
    ("get_metrics", "metrics"),
])
def test_http_routes_are_get_only_with_function_keys(name: str, route: str) -> None:
    trigger = next(b for b in bindings(name) if b["type"] == "httpTrigger")
    assert trigger["route"] == route
    assert [getattr(m, "value", m) for m in trigger["methods"]] == ["GET"]
    assert trigger["authLevel"] == func.AuthLevel.FUNCTION
    assert not any(b["type"] not in ("httpTrigger", "http") for b in bindings(name)), \
        "no output bindings: writes go through the SDK clients"


# --- queue trigger ---------------------------------------------------------------------------
@pytest.mark.usefixtures("env")
def test_a_transfer_delivered_as_queue_messages_is_committed() -> None:
    for body in (*deposit("d1", "alice", "100.10"), *transfer("t1", "alice", "bob", "40.05")):
        deliver(body)
    assert account("alice") == (200, {"accountId": "alice", "balance": "60.05"})
    assert account("bob") == (200, {"accountId": "bob", "balance": "40.05"})
    status, body = request("t1")
    assert status == 200
    assert body["status"] == "committed"
    assert body["reason"] is None


@pytest.mark.usefixtures("env")
def test_request_route_shows_pending_then_committed_and_404_for_unknown() -> None:
    withdraw, add = transfer("t1", "alice", "bob", "1.00")
    deliver(add)
    assert request("t1") == (200, {"requestId": "t1", "status": "pending",
                                   "reason": "1 of 2 steps arrived"})
    for body in deposit("d1", "alice", "1.00"):
        deliver(body)
    deliver(withdraw)
    assert request("t1")[1]["status"] == "committed"
    assert request("never-sent")[0] == 404
    assert account("nobody")[0] == 404
    assert account("not valid!")[0] == 400


@pytest.mark.usefixtures("env")
def test_leader_route_reports_epoch_lease_and_pending_work() -> None:
    for body in deposit("d1", "alice", "5.00"):
        deliver(body)
    withdraw, _ = transfer("t1", "alice", "bob", "1.00")
    deliver(withdraw)  # one step of two: stays pending
    view = leader()
    assert view["epoch"] >= 1
    assert view["lease"]["state"] == "available", "the leader released the lease after draining"
    assert view["holder"] is None
    assert view["lastHolder"]
    assert view["pendingCompletions"] == 1
    assert view["lastCommitAt"]


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize(("body", "error"), [
    (b'{"requestId": "r1", "operationId": ', "not JSON"),
    (step("r1", "o1", "add_funds", "alice", "1", 1).replace(b'"1"', b"1"), "amount"),
    (step("r1", "o1", "add_funds", "alice", "1.005", 1), "more than 2 decimals"),
])
def test_a_malformed_message_is_parked_raw_and_changes_nothing(body: bytes, error: str) -> None:
    deliver(body, dequeue_count=3, message_id="bad-1")  # must not raise
    parked = runtime.get_app().parking.get("bad-1")
    assert parked is not None
    assert parked.body == body
    assert error in parked.error
    assert parked.dequeue_count == 3
    assert account("alice")[0] == 404
    assert request("r1")[0] == 404
    assert leader()["pendingCompletions"] == 0


# --- timer trigger ---------------------------------------------------------------------------
def test_sweeper_commits_work_recorded_without_an_election(env: dict[str, str],
                                                           ns: Namespace) -> None:
    other = ns.app(instance_id="crashed-before-electing")
    for body in deposit("d1", "carol", "7.77"):
        other.completions.record(parse_completion(body), other.config.instance_id,
                                 other.clock.now())
    assert request("d1")[1]["status"] == "pending"
    user_function("sweep")(TimerRequest(past_due=False))
    assert request("d1")[1]["status"] == "committed"
    assert account("carol") == (200, {"accountId": "carol", "balance": "7.77"})
    assert leader()["pendingCompletions"] == 0


# --- transient storage errors ------------------------------------------------------------------
def test_a_storage_error_while_recording_raises_for_a_host_retry(
        env: dict[str, str], ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    broken: LedgerApp = ns.app(STORAGE_TIMEOUT_SECONDS="1")
    dead = free_port()  # nothing listens there
    broken.completions = CompletionStore(AzureTable(TableClient.from_connection_string(
        azurite_connection_string(blob_port=dead, queue_port=dead, table_port=dead),
        broken.config.completions_table, connection_timeout=1, read_timeout=1)))
    monkeypatch.setattr(runtime, "_app", broken)  # the worker's app, as get_app() returns it
    [body] = deposit("d1", "alice", "1.00")
    with pytest.raises(StorageError):
        deliver(body, message_id="retry-me")
    assert broken.parking.get("retry-me") is None, "a transient error is not a malformed message"
    assert account("alice")[0] == 404
