"""Intake past one queue (``INTAKE_QUEUES`` = Q) against Azurite, through the real functions.

``function_app.py`` is loaded afresh with Q = 3 (and K = 2 shards) in the environment, as the
worker would index it, and its queue triggers are served by the simulated host's listeners
(``simulator.host.QueueListener``: receive, base64-decode, invoke, delete, retry, poison):

- the legs of one request, sent to different queues, all commit exactly;
- a message that fails past ``maxDequeueCount`` on queue 2 ends in ``<queue>-2-poison``;
  ``./dev cli poison list`` says so, and ``poison replay`` sends it back to queue 2, where it
  commits;
- ``./dev cli enqueue`` spreads round robin (or by requestId);
- a base name too long for Q is refused at start-up, naming the setting to shorten.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from types import SimpleNamespace

import pytest
from azure.storage.queue import QueueClient

from operator_cli import cli
from shared import wiring as runtime
from shared.config.names import completions_table_name, poison_queue_name
from shared.config.settings import SETTINGS, ConfigError, load_config
from shared.domain.contract import parse_completion
from shared.leadership.instance import LedgerApp
from shared.storage.clients import ensure_queues, ensure_tables
from shared.storage.parking import queue_depth
from shared.web import api
from simulator import REPO_ROOT
from simulator.functions import IndexedApp, index, resolve_setting
from simulator.host import QueueListener, QueueOptions
from tests.helpers import Namespace, deposit, transfer, wait_until

QUEUES = 3
SHARDS = 2
MAX_DEQUEUE_COUNT = 2  # the listeners' maxDequeueCount: a failing message is poisoned quickly


def load_functions() -> IndexedApp:
    """``function_app.py`` imported anew (its own ``FunctionApp``) with the current environment,
    and indexed as the worker indexes it."""
    spec = importlib.util.spec_from_file_location(f"function_app_{uuid.uuid4().hex}",
                                                  REPO_ROOT / "function_app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return index(module.app)


@dataclass
class Host:
    """The simulated host's listeners on every queue trigger of one indexed app."""

    app: LedgerApp
    env: dict[str, str]
    functions: IndexedApp
    listeners: list[QueueListener]
    threads: list[threading.Thread]
    host: SimpleNamespace

    def queue_of(self, function_name: str) -> str:
        trigger = next(t for t in self.functions.queues if t.name == function_name)
        return resolve_setting(trigger.queue_name_setting, self.env,
                               {s.name: s.default for s in SETTINGS})

    def send(self, queue: str, body: bytes) -> None:
        """What upstream does: the body base64-encoded, on one intake queue."""
        self.app.queue(queue, raw=True).send(base64.b64encode(body).decode())

    def idle(self) -> bool:
        return all(not listener.in_flight for listener in self.listeners)


@pytest.fixture
def host(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """Q = 3 intake queues and K = 2 shards: the app, its functions and a listener per queue."""
    env = ns.env(INTAKE_QUEUES=str(QUEUES), LEDGER_SHARDS=str(SHARDS))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    app = ns.app(INTAKE_QUEUES=str(QUEUES), LEDGER_SHARDS=str(SHARDS))
    ensure_queues(app.clients, app.config.intake_queue_names)  # Bicep creates them in Azure
    functions = load_functions()
    options = QueueOptions(batch_size=8, new_batch_threshold=4,
                           max_dequeue_count=MAX_DEQUEUE_COUNT, max_polling_interval=0.2)
    shell = SimpleNamespace(options=options, index=0, lock_seconds=30,
                            stopping=threading.Event(), pool=ThreadPoolExecutor(max_workers=4))
    defaults = {s.name: s.default for s in SETTINGS}
    listeners = []
    for trigger in functions.queues:
        name = resolve_setting(trigger.queue_name_setting, env, defaults)
        listeners.append(QueueListener(shell, trigger, app.queue(name, raw=True),  # type: ignore[arg-type]
                                       app.queue(poison_queue_name(name), raw=True)))
    threads = [threading.Thread(target=listener.run, name=f"listen-{listener.trigger.name}")
               for listener in listeners]
    running = Host(app, env, functions, listeners, threads, shell)
    for thread in threads:
        thread.start()
    try:
        yield running
    finally:
        shell.stopping.set()
        for thread in threads:
            thread.join()
        shell.pool.shutdown(wait=True)
        runtime.reset()


def status(app: LedgerApp, request_id: str) -> str:
    return str(api.request(app, request_id).body.get("status"))


def balance(app: LedgerApp, account_id: str) -> Decimal:
    reply = api.account(app, account_id)
    assert reply.status == 200, reply.body
    return Decimal(reply.body["balance"])


def test_q3_registers_one_trigger_per_queue_each_on_its_own_queue(host: Host) -> None:
    names = host.app.config.intake_queue_names
    assert [host.queue_of(f) for f in ("record_completion", "record_completion_1",
                                       "record_completion_2")] == list(names)
    assert [t.name for t in host.functions.intake] == [
        "record_completion", "record_completion_1", "record_completion_2"]
    listened = {listener.queue.name: listener.poison.name for listener in host.listeners}
    assert {name: listened[name] for name in names} == {
        name: f"{name}-poison" for name in names}


def test_legs_spread_over_the_queues_all_commit_exactly(host: Host) -> None:
    app, names = host.app, host.app.config.intake_queue_names
    accounts = [f"acct-{n}" for n in range(6)]
    shards = {app.shard_map.account_shard(a) for a in accounts}
    assert shards == set(range(SHARDS)), "the accounts live on both shards"
    deposits = [(f"d{n}", account) for n, account in enumerate(accounts)]
    for n, (request_id, account) in enumerate(deposits):
        [body] = deposit(request_id, account, "100.00")
        host.send(names[n % QUEUES], body)
    wait_until(lambda: all(status(app, r) == "committed" for r, _ in deposits), 60,
               "every deposit committed")
    # Each transfer's two legs on two different queues (its withdraw on queue n mod 3, its add
    # on the next queue), between accounts on the same and on different shards.
    transfers = [(f"t{n}", accounts[n], accounts[(n + 1 + n // 3) % 6], f"{n + 1}.25")
                 for n in range(6)]
    expected = {account: Decimal("100.00") for account in accounts}
    legs_on: dict[str, set[str]] = {}
    for n, (request_id, source, target, amount) in enumerate(transfers):
        withdraw, add = transfer(request_id, source, target, amount)
        host.send(names[n % QUEUES], withdraw)
        host.send(names[(n + 1) % QUEUES], add)
        legs_on[request_id] = {names[n % QUEUES], names[(n + 1) % QUEUES]}
        expected[source] -= Decimal(amount)
        expected[target] += Decimal(amount)
    assert all(len(queues) == 2 for queues in legs_on.values())
    assert any(app.shard_map.account_shard(s) != app.shard_map.account_shard(t)
               for _, s, t, _ in transfers), "some transfer crosses shards"
    wait_until(lambda: all(status(app, r) == "committed" for r, *_ in transfers), 90,
               "every transfer committed")
    assert {account: balance(app, account) for account in accounts} == expected
    assert sum(expected.values()) == Decimal("600.00")
    assert [queue_depth(app.queue(poison_queue_name(name))) for name in names] == [0, 0, 0]


def _cli(env: dict[str, str], *argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), environ=env, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_a_message_failing_on_queue_2_is_poisoned_there_and_replayed_there(
        host: Host) -> None:
    app, names = host.app, host.app.config.intake_queue_names
    [body] = deposit("p1", "poor-acct", "7.50")
    home = app.home_of(parse_completion(body))
    table = completions_table_name(app.config.completions_table, int(home.shard.name))
    # An outage of the home shard's completions table: recording fails on every delivery (the
    # functions' app is made first: it would create the table).
    runtime.get_app()
    app.clients.table.delete_table(table)
    host.send(names[2], body)
    poison = QueueClient.from_connection_string(host.env["AzureWebJobsStorage"],
                                                poison_queue_name(names[2]))
    wait_until(lambda: queue_depth(app.queue(poison.queue_name)) == 1, 60,
               f"the failing message in {poison.queue_name}")
    assert [queue_depth(app.queue(poison_queue_name(name))) for name in names] == [0, 0, 1]
    code, out, err = _cli(host.env, "--json", "poison", "list")
    assert code == 0, err
    [listed] = json.loads(out)
    assert (listed["queue"], listed["poisonQueue"]) == (names[2], poison.queue_name)
    assert json.loads(listed["body"])["requestId"] == "p1"
    assert api.account(app, "poor-acct").status == 404, "nothing committed yet"

    ensure_tables(app.clients, [table])  # the outage ends; the operator replays
    wait_until(host.idle, 10, "the listeners idle")
    code, out, err = _cli(host.env, "--json", "poison", "replay")
    assert code == 0, err
    assert json.loads(out)["queues"] == {names[0]: 0, names[1]: 0, names[2]: 1}
    wait_until(lambda: status(app, "p1") == "committed", 60, "the replayed deposit committed")
    assert balance(app, "poor-acct") == Decimal("7.50")
    assert queue_depth(app.queue(poison.queue_name)) == 0


def test_cli_enqueue_spreads_round_robin_or_by_request_id(ns: Namespace) -> None:
    env = ns.env(INTAKE_QUEUES=str(QUEUES))
    names = load_config(env, instance_id="t").intake_queue_names
    bodies = [deposit(f"e{n}", f"acct-{n}", "1.00")[0].decode() for n in range(7)]
    code, out, err = _cli(env, "--json", "enqueue", "--create-queue", "-",
                          stdin="\n".join(bodies))
    assert code == 0, err
    sent = json.loads(out)["sent"]
    assert [item["queue"] for item in sent] == [names[n % QUEUES] for n in range(7)]
    queued = {name: [base64.b64decode(m.content).decode() for m in QueueClient
                     .from_connection_string(ns.connection_string, name)
                     .peek_messages(max_messages=32)] for name in names}
    assert queued == {name: [bodies[n] for n in range(7) if n % QUEUES == q]
                      for q, name in enumerate(names)}
    # By requestId: both legs of a transfer on the same queue, the same queue every time.
    legs = [leg.decode() for r in range(6) for leg in transfer(f"x{r}", "a", "b", "1.00")]
    code, out, err = _cli(env, "--json", "enqueue", "--spread", "request-id", "-",
                          stdin="\n".join(legs))
    assert code == 0, err
    by_request: dict[str, set[str]] = {}
    for item in json.loads(out)["sent"]:
        by_request.setdefault(item["requestId"], set()).add(item["queue"])
    assert all(len(queues) == 1 for queues in by_request.values())
    assert len({q for queues in by_request.values() for q in queues}) > 1, "spread, not one"
    code, out, _ = _cli(env, "enqueue", "--help")
    assert "round-robin" in " ".join(out.split())


@pytest.mark.parametrize(("overrides", "says"), [
    ({"COMPLETIONS_QUEUE_NAME": "q" * 55, "INTAKE_QUEUES": "3"},
     ["COMPLETIONS_QUEUE_NAME", "INTAKE_QUEUES=3", "64 characters", "shorten"]),
    ({"COMPLETIONS_QUEUE_NAME": "q" * 57}, ["q" * 57 + "-poison", "shorten"]),
    ({"COMPLETIONS_QUEUE_NAME": "Completions", "INTAKE_QUEUES": "2"},
     ["not a valid queue name"]),
    ({"COMPLETIONS_QUEUE_NAME": "c--q", "INTAKE_QUEUES": "2"}, ["single hyphens"]),
    ({"INTAKE_QUEUES": "17"}, ["INTAKE_QUEUES=17 is out of range", "between 1 and 16"]),
    ({"INTAKE_QUEUES": "0"}, ["INTAKE_QUEUES=0 is out of range"]),
    ({"INTAKE_QUEUES": "1.5"}, ["whole number of queues"]),
])
def test_queue_names_are_validated_at_start_up(overrides: dict[str, str],
                                               says: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(overrides, instance_id="t")
    for text in says:
        assert text in str(refused.value)


def test_the_longest_names_that_fit_are_accepted() -> None:
    # 53 + len("-15-poison") = 63: the last queue's poison queue just fits.
    config = load_config({"COMPLETIONS_QUEUE_NAME": "q" * 53, "INTAKE_QUEUES": "16"},
                         instance_id="t")
    assert len(poison_queue_name(config.intake_queue_names[-1])) == 63
    assert config.intake_queue_names[:2] == ("q" * 53, "q" * 53 + "-1")
