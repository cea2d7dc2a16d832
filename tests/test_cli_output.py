"""The operator CLI's output: a table for people, ``--json`` for scripts, one error style.

Run in-process (``operator_cli.cli.main``) against a real Azurite, as an operator would run it;
the refused calls are real 403s (Azurite checks a SAS's permissions as Azure does) and the
unreachable account is a loopback port nobody listens on.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.identity import CredentialUnavailableError
from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

from operator_cli import cli
from operator_cli.output import PREVIEW_CHARS
from operator_cli.storage_errors import explain
from shared.errors import StorageRefused
from shared.leadership.instance import LedgerApp
from shared.leadership.intake import handle_completion
from shared.storage.clients import AZURITE_ACCOUNT, AZURITE_KEY, clients_from_connection_string
from simulator.azurite import free_port
from tests.helpers import Namespace, deposit, record, send, step, transfer
from tests.test_parking_cli import Run

MALFORMED = step("bad-1", "bad-1-add", "add_funds", "alice", "12.505", 1)


@pytest.fixture
def app(ns: Namespace) -> LedgerApp:
    """An instance that has committed one deposit and parked one malformed message."""
    app = ns.app()
    send(app, *deposit("d1", "alice", "60.05"))
    assert handle_completion(app, MALFORMED, message_id="msg-1", dequeue_count=1).parked
    app.queue(app.config.poison_queue, raw=True).send("gave up on this one")
    return app


@pytest.fixture
def run(ns: Namespace, app: LedgerApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    """The CLI on this test's names (never falling back to a developer's local.settings.json)."""
    monkeypatch.setattr(cli, "LOCAL_SETTINGS", tmp_path / "absent.json")
    return Run(ns.env())


def cells(text: str) -> list[list[str]]:
    """A printed table's rows, split on the runs of 2+ spaces that separate columns."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# --- a table for people, JSON for scripts ------------------------------------------------------
@pytest.mark.parametrize(("argv", "table_has", "json_has"), [
    (["balance", "alice"], [["ACCOUNT", "BALANCE"], ["alice", "60.05"]],
     {"accountId": "alice", "balance": "60.05"}),
    (["request", "d1"], [["request", "d1"], ["status", "committed"], ["epoch", "1"]],
     {"requestId": "d1", "status": "committed", "epoch": 1}),
    (["status"], [["epoch", "1"], ["pending", "0 completion(s)"]],
     {"epoch": 1, "pendingCompletions": 0}),
    (["parked", "list"], [["ID", "PARKED AT", "ERROR", "BODY"]], None),
    (["parked", "show", "msg-1"], [["id", "msg-1"], ["dequeueCount", "1"]],
     {"id": "msg-1", "body": MALFORMED.decode(), "dequeueCount": 1}),
    (["poison", "list"], [["ID", "INSERTED ON", "DEQUEUES", "BODY"]], None),
])
def test_every_read_command_prints_a_table_and_json_on_request(
        run: Run, argv: list[str], table_has: list[list[str]],
        json_has: dict[str, object] | None) -> None:
    assert run(*argv) == 0, run.err
    assert not is_json(run.out), "people get a table, not JSON"
    for row in table_has:
        assert row in cells(run.out), f"{row} not in\n{run.out}"
    assert run.err == ""

    assert run("--json", *argv) == 0, run.err
    document = run.json()
    if json_has is not None:
        assert {key: document[key] for key in json_has} == json_has
    else:
        assert len(document) == 1


def test_list_tables_preview_long_bodies_to_one_line(run: Run, app: LedgerApp) -> None:
    long_body = step("bad-2", "bad-2-add", "add_funds", "a" * 100, "1.005", 1)
    assert handle_completion(app, long_body, message_id="msg-2", dequeue_count=1).parked
    assert run("parked", "list") == 0
    [row] = [line for line in run.out.splitlines() if line.startswith("msg-2")]
    body = cells(row)[0][-1]
    assert len(body) == PREVIEW_CHARS
    assert body.endswith("...")
    assert run("poison", "list") == 0
    assert [cells(line)[0][-1] for line in run.out.splitlines()
                                       if "gave up" in line] == ["gave up on this one"]


def test_a_pending_request_reads_as_pending(run: Run, app: LedgerApp) -> None:
    record(app, transfer("t1", "alice", "bob", "1.00")[0])
    assert run("request", "t1") == 0, run.err
    assert ["status", "pending"] in cells(run.out)
    assert ["reason", "1 of 2 steps arrived"] in cells(run.out)


def test_enqueue_prints_what_it_sent_as_a_table_or_json(run: Run) -> None:
    body = deposit("d2", "bob", "1.00")[0].decode()
    assert run("enqueue", "-", stdin=body) == 0, run.err
    assert cells(run.out)[0] == ["MESSAGE ID", "REQUEST", "STEP"]
    assert cells(run.out)[1][1:] == ["d2", "d2-add"]
    assert run("enqueue", "--json", "-", stdin=body) == 0, run.err
    [sent] = run.json()["sent"]
    assert (sent["requestId"], sent["valid"]) == ("d2", True)


# --- one error style -------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "code", "message"), [
    (["balance", "nobody"], 1, "error: account nobody has no committed balance"),
    (["--json", "balance", "nobody"], 1, "error: account nobody has no committed balance"),
    (["request", "nothing"], 1, "error: request nothing is unknown"),
    (["request", "bad id", "--json"], 2, "error: requestId must be 1-128 characters"),
    (["parked", "show", "nope"], 1, "error: no parked message 'nope'"),
    (["parked", "replay", "nope"], 1, "error: no parked message 'nope'"),
    (["enqueue", "--operation", "steal_funds"], 2, "error: argument --operation: invalid choice"),
    (["enqueue"], 2, "error: nothing to send"),
    (["parked"], 2, "error: the following arguments are required: ACTION"),
    (["frobnicate"], 2, "error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_errors_go_to_stderr_in_one_style_with_a_nonzero_exit(run: Run, argv: list[str],
                                                              code: int, message: str) -> None:
    assert run(*argv) == code
    assert run.out == "", "nothing on stdout: a script reading it sees no half answer"
    assert run.err.startswith(message), run.err
    assert len(run.err.strip().splitlines()) == 1


# --- storage that cannot be reached or refuses ------------------------------------------------
@pytest.mark.slow
def test_an_unreachable_account_names_the_endpoint_and_the_setting(ns: Namespace,
                                                                   run: Run) -> None:
    port = free_port()
    nowhere = ";".join(
        f"{part.split('=')[0]}=http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        if part.split("=")[0].endswith("Endpoint") else part
        for part in ns.connection_string.split(";") if part)
    run.env = ns.env(AzureWebJobsStorage=nowhere)
    assert run("status") == 1
    assert run.out == ""
    assert run.err.startswith("error: cannot reach the storage account")
    assert f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}" in run.err
    assert "Check AzureWebJobsStorage" in run.err
    assert "Traceback" not in run.err


def sas_connection_string(ns: Namespace, permission: AccountSasPermissions) -> str:
    """This Azurite's endpoints with an account SAS of only ``permission`` (no key)."""
    sas = generate_account_sas(AZURITE_ACCOUNT, AZURITE_KEY,
                               ResourceTypes(service=True, container=True, object=True),
                               permission, datetime.now(UTC) + timedelta(hours=1),
                               services="bqt")
    endpoints = [part for part in ns.connection_string.split(";")
                 if part.split("=")[0].endswith("Endpoint")]
    return ";".join([*endpoints, f"SharedAccessSignature={sas}"])


def test_a_refused_enqueue_names_the_queue_role_and_how_to_grant_it(ns: Namespace,
                                                                    run: Run) -> None:
    run.env = ns.env(AzureWebJobsStorage=sas_connection_string(
        ns, AccountSasPermissions(read=True, list=True)))
    assert run("enqueue", "-", stdin=deposit("d9", "bob", "1.00")[0].decode()) == 1
    assert run.out == ""
    assert run.err.startswith("error: the queue service of 'devstoreaccount1' refused the call")
    assert "(AuthorizationPermissionMismatch)" in run.err
    assert "'Storage Queue Data Contributor'" in run.err
    assert 'az role assignment create --role "Storage Queue Data Contributor"' in run.err
    assert "--name devstoreaccount1" in run.err
    assert "sig=" not in run.err, "a SAS token is a secret: never printed"


def test_a_refused_read_names_the_table_role(ns: Namespace, run: Run) -> None:
    run.env = ns.env(AzureWebJobsStorage=sas_connection_string(
        ns, AccountSasPermissions(add=True)))
    assert run("balance", "alice") == 1
    assert "(AuthorizationPermissionMismatch)" in run.err
    assert 'az role assignment create --role "Storage Table Data Contributor"' in run.err


def test_with_identity_settings_the_error_speaks_of_the_signed_in_identity(
        ns: Namespace) -> None:
    """The same real 403, explained for the identity-based settings (Azure's way)."""
    clients = clients_from_connection_string(sas_connection_string(
        ns, AccountSasPermissions(read=True, list=True)))
    queue = clients.open_queue(ns.env()["COMPLETIONS_QUEUE_NAME"])
    with pytest.raises(StorageRefused) as refused:
        queue.send("x")
    identity_env = {"AzureWebJobsStorage__queueServiceUri": clients.queue.url}
    text = explain(refused.value, clients, identity_env)
    assert "The identity the CLI signs in with" in text
    assert "'Storage Queue Data Contributor'" in text
    assert "Owner or Reader is not enough" in text
    assert text.splitlines()[1].strip().startswith("az role assignment create")


def test_no_credential_says_how_to_sign_in(ns: Namespace) -> None:
    clients = clients_from_connection_string(ns.connection_string)
    text = explain(CredentialUnavailableError("no az login"), clients, {})
    assert text.startswith("could not sign in to storage: no az login")
    assert "az login" in text
