"""The operator CLI (``python -m operator_cli``), run in-process against a real Azurite."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import QueueClient

from operator_cli import cli
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import handle_completion
from tests.helpers import Namespace, deposit, send, step

Queued = Callable[[], list[str]]

VALID = step("r1", "r1-add", "add_funds", "alice", "12.50", 1).decode()


class Run:
    """Runs ``cli.main`` with this test's settings and keeps what it printed."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.out = ""
        self.err = ""

    def __call__(self, *argv: str, stdin: str = "") -> int:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(list(argv), environ=self.env, stdin=io.StringIO(stdin), stdout=out,
                        stderr=err)
        self.out, self.err = out.getvalue(), err.getvalue()
        return code

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def app(ns: Namespace) -> LedgerApp:
    """An instance on this test's names, with its tables and queues created."""
    return ns.app()


@pytest.fixture
def run(ns: Namespace, app: LedgerApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """The CLI on this test's names (never falling back to a developer's local.settings.json)."""
    monkeypatch.setattr(cli, "LOCAL_SETTINGS", tmp_path / "absent.json")
    return Run(ns.env())


def read_queue(connection_string: str, queue_name: str) -> list[str]:
    """The texts on a queue, base64-decoded as the Functions host decodes them."""
    plain = QueueClient.from_connection_string(connection_string, queue_name)
    return [base64.b64decode(m.content).decode("utf-8")
            for m in plain.receive_messages(messages_per_page=32, visibility_timeout=30)]


@pytest.fixture
def queued(ns: Namespace, app: LedgerApp) -> Queued:
    """Takes what is on the completions queue (hidden for 30 s after)."""
    return lambda: read_queue(ns.connection_string, app.config.completions_queue)


# --- enqueue ---------------------------------------------------------------------------------
def test_enqueue_from_flags_puts_base64_json_on_the_queue(run: Run, queued: Queued) -> None:
    code = run("enqueue", "--request-id", "r1", "--operation-id", "r1-add", "--operation",
               "add_funds", "--account", "alice", "--amount", "12.50", "--expected", "1")
    assert code == 0, run.err
    assert "sent 1 message(s)" in run.out
    header, row = run.out.splitlines()[:2]
    assert header.split() == ["MESSAGE", "ID", "REQUEST", "STEP"]
    assert row.split()[1:] == ["r1", "r1-add"]
    [text] = queued()
    assert json.loads(text) == {"requestId": "r1", "operationId": "r1-add",
                                "operation": "add_funds", "accountId": "alice",
                                "amount": "12.50", "expectedOperations": 1,
                                "status": "succeeded"}


def test_enqueue_json_lines_file_sends_each_line(run: Run, queued: Queued,
                                                 tmp_path: Path) -> None:
    lines = [b.decode() for b in (*deposit("d1", "alice", "5.00"), *deposit("d2", "bob", "1.00"))]
    source = tmp_path / "messages.jsonl"
    source.write_text("\n".join(lines) + "\n\n")
    assert run("--json", "enqueue", "--file", str(source)) == 0, run.err
    report = run.json()
    assert [item["requestId"] for item in report["sent"]] == ["d1", "d2"]
    assert all(item["messageId"] for item in report["sent"])
    assert sorted(queued()) == sorted(lines)


def test_enqueue_json_array_from_stdin(run: Run, queued: Queued) -> None:
    messages = [json.loads(b) for b in deposit("d1", "alice", "5.00") + deposit("d2", "b", "1")]
    assert run("enqueue", "-", stdin=json.dumps(messages, indent=2)) == 0, run.err
    assert sorted(json.loads(text)["requestId"] for text in queued()) == ["d1", "d2"]


@pytest.mark.parametrize("bad", [
    '{"requestId": "r1", "amount": ',  # not JSON
    step("r1", "o1", "add_funds", "alice", "1.005", 1).decode(),  # 3 decimals
])
def test_enqueue_refuses_an_invalid_message_and_sends_nothing(run: Run, queued: Queued,
                                                              tmp_path: Path, bad: str) -> None:
    source = tmp_path / "messages.jsonl"
    source.write_text(VALID + "\n" + bad + "\n")
    assert run("enqueue", "--file", str(source)) in (1, 2)
    assert "message 2" in run.err
    assert "nothing was sent" in run.err
    assert queued() == [], "one invalid message refuses the whole file"


def test_enqueue_raw_sends_an_invalid_message_as_written(run: Run, queued: Queued,
                                                         tmp_path: Path) -> None:
    bad = '{"requestId": "r1", "amount": 12.5}'
    source = tmp_path / "bad.jsonl"
    source.write_text(bad + "\n")
    assert run("enqueue", "--raw", "--file", str(source)) == 0, run.err
    assert "malformed" in run.out
    assert queued() == [bad]


def test_enqueue_usage_errors_exit_2(run: Run, queued: Queued, tmp_path: Path) -> None:
    assert run("enqueue") == 2
    assert "nothing to send" in run.err
    assert run("enqueue", "--file", str(tmp_path / "missing.jsonl")) == 2
    assert run("enqueue", "-", "--request-id", "r1", stdin=VALID) == 2
    assert run("enqueue", "-", stdin="  \n") == 2
    assert run("enqueue", "--expected", "two") == 2  # refused by argparse
    assert queued() == []


def test_enqueue_to_a_missing_queue_says_so(ns: Namespace, run: Run) -> None:
    run.env = ns.env(COMPLETIONS_QUEUE_NAME=f"{ns.prefix}-nowhere")
    assert run("enqueue", "-", stdin=VALID) == 1
    assert "does not exist" in run.err
    assert "COMPLETIONS_QUEUE_NAME" in run.err
    assert run("enqueue", "--create-queue", "-", stdin=VALID) == 0, run.err
    assert len(read_queue(ns.connection_string, f"{ns.prefix}-nowhere")) == 1


# --- parked messages -------------------------------------------------------------------------
def park(app: LedgerApp, message_id: str, body: bytes) -> None:
    """Park a message the way the queue trigger does."""
    assert handle_completion(app, body, message_id=message_id, dequeue_count=1).parked


def test_parked_list_show_and_replay_with_a_corrected_body(run: Run, app: LedgerApp,
                                                           queued: Queued,
                                                           tmp_path: Path) -> None:
    malformed = step("r1", "r1-add", "add_funds", "alice", "12.505", 1)
    park(app, "msg-1", malformed)

    assert run("parked", "list") == 0, run.err
    assert "msg-1" in run.out
    assert "more than 2 decimals" in run.out
    assert run("--json", "parked", "list") == 0
    [listed] = run.json()
    assert listed["id"] == "msg-1"
    assert "amount" in listed["error"]
    assert listed["bodyPreview"] == malformed.decode()[:77] + "..."

    assert run("parked", "show", "msg-1", "--json") == 0
    shown = run.json()
    assert shown["body"] == malformed.decode()
    assert "more than 2 decimals" in shown["error"]

    fixed = tmp_path / "fixed.json"
    fixed.write_text(VALID + "\n")
    assert run("parked", "replay", "msg-1", "--body-file", str(fixed)) == 0, run.err
    assert queued() == [VALID]
    assert run("--json", "parked", "list") == 0
    assert run.json() == []
    assert run("parked", "show", "msg-1") == 1
    assert "no parked message" in run.err


def test_replaying_a_still_malformed_body_is_refused_unless_raw(run: Run, app: LedgerApp,
                                                                queued: Queued) -> None:
    park(app, "msg-2", b"not json at all")
    assert run("parked", "replay", "msg-2") == 1
    assert "still breaks the v1 contract" in run.err
    assert queued() == []
    assert run("parked", "show", "msg-2") == 0, "a refused replay leaves the message parked"
    assert run("parked", "replay", "msg-2", "--raw") == 0, run.err
    assert queued() == ["not json at all"]


def test_replaying_an_unknown_id_exits_1(run: Run) -> None:
    assert run("parked", "replay", "nope") == 1
    assert "no parked message 'nope'" in run.err


def test_parked_list_before_anything_was_parked(ns: Namespace, run: Run) -> None:
    run.env = ns.env(PARKED_TABLE_NAME=f"{ns.prefix}neverparked")
    assert run("parked", "list") == 0
    assert "no parked messages" in run.out


# --- read API --------------------------------------------------------------------------------
def test_status_balance_and_request_print_the_read_api_as_json(run: Run,
                                                               app: LedgerApp) -> None:
    send(app, *deposit("d1", "alice", "60.05"))
    assert run("--json", "balance", "alice") == 0
    assert run.json() == {"accountId": "alice", "balance": "60.05"}
    assert run("request", "d1", "--json") == 0
    assert run.json()["status"] == "committed"
    assert run("--json", "status") == 0
    leader = run.json()
    assert leader["epoch"] >= 1
    assert leader["pendingCompletions"] == 0


def test_reading_before_the_app_made_its_tables_says_so(ns: Namespace, run: Run) -> None:
    run.env = ns.env(COMPLETIONS_TABLE_NAME=f"{ns.prefix}nothing",
                     LEDGER_TABLE_NAME=f"{ns.prefix}nothingeither")
    assert run("status") == 1
    assert "TableNotFound" in run.err
    assert "first run" in run.err
    assert len(run.err.strip().splitlines()) == 1, "one line, not the whole HTTP response"


# --- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "named"), [
    ({"LEASE_SECONDS": "5"}, "LEASE_SECONDS"),
    ({"RENEW_INTERVAL_SECONDS": "55"}, "RENEW_INTERVAL_SECONDS"),
    ({"AzureWebJobsStorage": ""}, "AzureWebJobsStorage"),
])
def test_config_errors_exit_2_without_traceback(ns: Namespace, run: Run,
                                                overrides: dict[str, str], named: str) -> None:
    run.env = ns.env(**overrides)
    assert run("status") == 2
    assert named in run.err
    assert "Traceback" not in run.err


def test_missing_storage_settings_say_what_to_set(run: Run) -> None:
    run.env = {}
    assert run("parked", "list") == 2
    assert "AzureWebJobsStorage__blobServiceUri" in run.err
    assert "local.settings.json" in run.err


def test_local_settings_json_is_read_when_no_storage_setting_is_set(ns: Namespace,
                                                                    tmp_path: Path) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"IsEncrypted": False, "Values": ns.env(LEASE_SECONDS="30")}))
    env = cli.settings_env({"LEASE_SECONDS": "45"}, path)
    assert env["AzureWebJobsStorage"] == ns.connection_string
    assert env["LEASE_SECONDS"] == "45", "the environment wins over the file"
    assert cli.settings_env({"AzureWebJobsStorage": "x"}, path) == {"AzureWebJobsStorage": "x"}
    identity = {"AzureWebJobsStorage__blobServiceUri": "https://a.blob.core.windows.net"}
    assert cli.settings_env(identity, path) == identity
    assert cli.settings_env({}, tmp_path / "absent.json") == {}


def test_the_cli_finds_storage_through_local_settings_json(ns: Namespace, run: Run,
                                                           app: LedgerApp, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": ns.env()}))
    monkeypatch.setattr(cli, "LOCAL_SETTINGS", path)
    send(app, *deposit("d1", "alice", "1.00"))
    run.env = {}
    assert run("--json", "balance", "alice") == 0, run.err
    assert run.json()["balance"] == "1.00"


def test_poison_list_and_replay_move_the_messages_back_unchanged(ns: Namespace, run: Run,
                                                                 app: LedgerApp) -> None:
    # What the host does after maxDequeueCount failures: the message text, as received, goes
    # to <queue>-poison.
    poison = QueueClient.from_connection_string(ns.connection_string, app.config.poison_queue)
    encoded = base64.b64encode(VALID.encode()).decode()
    poison.send_message(encoded)
    assert run("--json", "poison", "list") == 0
    assert [m["body"] for m in run.json()] == [VALID]
    assert run("poison", "replay") == 0
    assert "replayed 1 message(s)" in run.out
    main_queue = QueueClient.from_connection_string(ns.connection_string,
                                                    app.config.completions_queue)
    assert [m.content for m in main_queue.peek_messages()] == [encoded], "moved as it was"
    assert poison.peek_messages() == []
    # and the replayed message is then processed like any other
    message = next(iter(main_queue.receive_messages()))
    handle_completion(app, base64.b64decode(message.content), message_id=message.id)
    assert app.ledger.read_account("alice").balance == Decimal("12.50")
