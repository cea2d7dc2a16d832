"""The operator CLI: enqueue completions, inspect and replay parked messages, read the ledger.

Run it as ``python -m operator_cli`` (or ``./dev cli``)::

    ./dev cli enqueue --request-id r1 --operation-id r1-add --operation add_funds \\
        --account alice --amount 10.00 --expected 1
    ./dev cli enqueue --file messages.jsonl        # JSON lines, a JSON array or one object
    ./dev cli enqueue - < messages.jsonl           # the same from stdin (round robin over
                                                   # the INTAKE_QUEUES queues)
    ./dev cli parked list | show ID | replay ID [--body-file fixed.json]
    ./dev cli poison list | replay                 # every intake queue's poison queue
    ./dev cli status | balance ACCOUNT | request REQUEST_ID
    ./dev cli --json status                        # any command: JSON for scripts
    ./dev cli reconcile | archive [--dry-run]      # invariants of every shard; retention
    ./dev cli reshard --to 4 [--resume]            # move the ledger to 4 shards

Every command prints a table for people, or JSON with ``--json``; problems go to stderr as
``error: ...``. A storage call refused for want of a role names the role and the ``az`` command
that grants it.

It reads the same settings as the function app (``shared.config.settings``): ``AzureWebJobsStorage``
(a connection string, or the identity-based ``AzureWebJobsStorage__*`` settings) and the names of
the queue, tables and lease. When no storage setting is in the environment it reads the
``Values`` of ``local.settings.json`` in the repo root, as ``func start`` does.

Exit codes: 0 ok, 1 not found or refused (or a storage error), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from azure.core.exceptions import AzureError, ResourceNotFoundError

from operator_cli import outcomes
from operator_cli import reconcile as reconcile_commands
from operator_cli import reshard as reshard_command
from operator_cli.output import Output, fields, preview, table
from operator_cli.shards import shard_lines
from operator_cli.storage_errors import explain, problem
from shared.config.settings import STORAGE_CONNECTION, ConfigError, default_instance_id, load_config
from shared.config.timings import ElectionConfigError
from shared.domain.contract import (
    MAX_EXPECTED_OPERATIONS,
    MalformedMessage,
    Operation,
    StepStatus,
    completion_message,
    parse_completion,
)
from shared.errors import NotFound, StorageError
from shared.leadership.instance import LedgerApp
from shared.leadership.outbox import outbox_view
from shared.storage.azure_queues import AzureQueue
from shared.storage.clients import clients_from_settings
from shared.storage.parking import QUEUE_BATCH_LIMIT, ParkedMessage
from shared.web import api

logger = logging.getLogger(__name__)

# Read from the current directory, as ``func start`` reads it (``./dev cli`` runs in the repo root).
LOCAL_SETTINGS = Path("local.settings.json")
PROG = "./dev cli"  # what a user types

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line or its input cannot be acted on (exit code 2)."""


class Refused(Exception):
    """The command was understood but refused, or its subject was not found (exit code 1)."""


# --- settings --------------------------------------------------------------------------------
def _has_storage_setting(env: Mapping[str, str]) -> bool:
    prefix = f"{STORAGE_CONNECTION}__"
    return bool(env.get(STORAGE_CONNECTION, "").strip()) or any(
        key.startswith(prefix) and value.strip() for key, value in env.items())


def settings_env(environ: Mapping[str, str], local_settings: Path | None = None) -> dict[str, str]:
    """The settings to run with: the environment, else ``Values`` of ``local.settings.json``.

    ``local.settings.json`` is read only when the environment names no storage connection;
    its values then fill in what the environment does not set.
    """
    env = dict(environ)
    path = LOCAL_SETTINGS if local_settings is None else local_settings
    if _has_storage_setting(env) or not path.is_file():
        return env
    try:
        values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a readable local.settings.json: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: 'Values' must be an object of setting names to strings")
    logger.info("storage settings read from %s", path)
    return {**{str(k): str(v) for k, v in values.items()}, **env}


def build_app(env: Mapping[str, str]) -> LedgerApp:
    """The app the CLI talks through (no storage call is made here)."""
    try:
        config = load_config(env, instance_id=f"cli-{default_instance_id()}")
    except ElectionConfigError as exc:  # the lease timings; a ConfigError by nature
        raise ConfigError(str(exc)) from None
    try:
        clients = clients_from_settings(env, config.storage_timeout_seconds)
    except ConfigError as exc:
        raise ConfigError(f"{exc} For a local run, copy local.settings.sample.json to "
                          f"local.settings.json ({LOCAL_SETTINGS}).") from None
    return LedgerApp.create(config, clients)


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


# --- enqueue ---------------------------------------------------------------------------------
# The enqueue flags: (flag, the ``Completion`` field it sets, help). Field names, not wire
# names: shared.domain.contract builds the v1 message from them.
FLAG_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("--request-id", "request_id", "requestId: the request this step belongs to"),
    ("--operation-id", "operation_id", "operationId: this step's id, unique in its request"),
    ("--operation", "operation", "operation: what the step did to the account"),
    ("--account", "account_id", "accountId: the account the step changed"),
    ("--amount", "amount", "amount: a decimal string > 0 with at most 2 decimals, e.g. 12.50"),
    ("--expected", "expected_operations",
     f"expectedOperations: how many steps the request has (1-{MAX_EXPECTED_OPERATIONS})"),
    ("--status", "status", "status: how the step ended upstream"),
    ("--completed-at", "completed_at", "completedAt: when it ended, ISO-8601 (optional)"),
)
FLAG_CHOICES: dict[str, list[str]] = {
    "operation": [o.value for o in Operation], "status": [s.value for s in StepStatus]}
FLAG_DEFAULTS: dict[str, str] = {"status": StepStatus.SUCCEEDED.value}


def bodies_from_text(text: str) -> list[str]:
    """Message bodies from a file's text: a JSON array, one JSON object, or JSON lines.

    JSON lines and a lone object are sent as written (so ``--raw`` can send text that is not
    JSON); the items of an array are serialised compactly.
    """
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, list):
        return [json.dumps(item, separators=(",", ":")) for item in document]
    if isinstance(document, dict):
        return [text.strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]


def bodies_from_flags(args: argparse.Namespace) -> list[str]:
    """One message body from the field flags (only the flags given become fields)."""
    given = {field: getattr(args, field) for _, field, _ in FLAG_FIELDS
             if getattr(args, field) is not None}
    return [completion_message(**given)]


def _read_source(source: str, stdin: TextIO) -> str:
    if source == "-":
        return stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None


def enqueue_bodies(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    """The bodies ``enqueue`` was asked to send, from exactly one source."""
    flags_given = any(getattr(args, field) is not None for _, field, _ in FLAG_FIELDS
                      if field not in FLAG_DEFAULTS)
    sources = [s for s in (args.file, args.source) if s is not None]
    if len(sources) > 1 or (sources and flags_given):
        raise UsageError("give the messages one way only: --file F, '-' (stdin) or the flags")
    if sources:
        bodies = bodies_from_text(_read_source(sources[0], stdin))
    elif flags_given:
        bodies = bodies_from_flags(args)
    else:
        raise UsageError("nothing to send: give --file F, '-' (stdin) or --request-id and the "
                         "other field flags")
    if not bodies:
        raise UsageError("the input holds no message")
    return bodies


def _summary(index: int, body: str) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index, "valid": True, "error": None}
    try:
        completion = parse_completion(body)
    except MalformedMessage as exc:
        item.update(valid=False, error=str(exc))
        return item
    item.update(requestId=completion.request_id, operationId=completion.operation_id)
    return item


def _azure_queue(app: LedgerApp, name: str, raw: bool = False) -> AzureQueue:
    """The queue on its Azure adapter (its URL for messages, a peek), as ``app.queue`` makes it."""
    return app.clients.open_queue(name, raw=raw,
                                  timeout_seconds=app.config.storage_timeout_seconds)


# --- parked messages ----------------------------------------------------------------------
def _parked_view(message: ParkedMessage, full: bool) -> dict[str, Any]:
    view: dict[str, Any] = {"id": message.parked_id, "parkedAt": message.parked_at,
                            "error": message.error}
    if full:
        view.update(body=_text(message.body), dequeueCount=message.dequeue_count,
                    instanceId=message.instance_id)
    else:
        view["bodyPreview"] = preview(_text(message.body))
    return view


def _parked_messages(app: LedgerApp, limit: int) -> list[ParkedMessage]:
    try:
        return app.parking.list(limit=limit)
    except NotFound:  # the table is made on first use: nothing was parked yet
        return []


def cmd_parked_list(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """List parked messages, oldest first."""
    views = [_parked_view(m, full=False) for m in _parked_messages(app, args.limit)]
    if output.as_json:
        output.data(views)
        return EXIT_OK
    if not views:
        output.line("no parked messages")
        return EXIT_OK
    output.lines(table(["ID", "PARKED AT", "ERROR", "BODY"], [
        (v["id"], v["parkedAt"], preview(v["error"]), v["bodyPreview"]) for v in views]))
    output.line(f"{len(views)} parked message(s); the whole body and error: "
                f"{PROG} parked show ID")
    return EXIT_OK


def _get_parked(app: LedgerApp, parked_id: str) -> ParkedMessage:
    try:
        message = app.parking.get(parked_id)
    except NotFound:
        message = None
    if message is None:
        raise Refused(f"no parked message {parked_id!r}; list them with '{PROG} parked list'")
    return message


def cmd_parked_show(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """Show one parked message: its full body and the validation error."""
    view = _parked_view(_get_parked(app, args.id), full=True)
    if output.as_json:
        output.data(view)
        return EXIT_OK
    output.lines(fields([(key, view[key]) for key in
                         ("id", "parkedAt", "dequeueCount", "instanceId", "error")]))
    output.line("body:")
    output.line(view["body"])
    return EXIT_OK


def cmd_parked_replay(app: LedgerApp, args: argparse.Namespace, output: Output,
                      stdin: TextIO) -> int:
    """Put a parked message (or a corrected body) back on the completions queue."""
    message = _get_parked(app, args.id)
    body = (_read_source(args.body_file, stdin).strip().encode("utf-8")
            if args.body_file is not None else None)
    to_send = message.body if body is None else body
    try:
        parse_completion(to_send)
    except MalformedMessage as exc:
        if not args.raw:
            raise Refused(f"the {'corrected' if body is not None else 'parked'} body still "
                          f"breaks the v1 contract ({exc}); fix it with --body-file F, or add "
                          "--raw to replay it anyway") from None
    try:
        app.parking.replay(args.id, app.queue(), body)
    except NotFound:
        raise Refused(f"queue {app.config.completions_queue!r} does not exist; check "
                      "COMPLETIONS_QUEUE_NAME") from None
    except UnicodeDecodeError:
        raise Refused("the body is not UTF-8 text and cannot go on a queue; give a corrected "
                      "one with --body-file F") from None
    if output.as_json:
        output.data({"replayed": args.id, "queue": app.config.completions_queue,
                     "corrected": body is not None})
    else:
        output.line(f"replayed {args.id} to queue {app.config.completions_queue!r}"
                    + (" with the corrected body" if body is not None else ""))
    return EXIT_OK


# --- the poison queue ----------------------------------------------------------------------
def _poison_text(text: str) -> str:
    """The message as the function would see it (base64-decoded when it decodes)."""
    try:
        return _text(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return text


# --- read API ------------------------------------------------------------------------------
def _answer(app: LedgerApp, call: Callable[[], api.Reply]) -> dict[str, Any]:
    """The body of a read-API answer; a 4xx answer becomes this CLI's error."""
    try:
        reply = call()
    except (NotFound, ResourceNotFoundError) as exc:  # the lease blob's read is the SDK's
        raise Refused(f"{problem(exc)}: the app creates its tables and lease blob on "
                      f"its first run (check the names: tables {app.config.completions_table!r}, "
                      f"{app.config.ledger_table!r})") from None
    if reply.status == 400:
        raise UsageError(str(reply.body.get("error", reply.body)))
    if reply.status != 200:
        raise Refused(str(reply.body.get("error", reply.body)))
    return reply.body


def cmd_status(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """The leader view of ``GET /api/leader``."""
    view = _answer(app, lambda: api.leader(app))
    view["outbox"] = outbox_view(app)  # outcome events not sent yet
    if output.as_json:
        output.data(view)
        return EXIT_OK
    lease = view.get("lease") or {}
    leader = (view["holder"] if view.get("holder") else
              f"none (lease {lease.get('state', 'unknown')}; last leader: "
              f"{view.get('lastHolder') or 'none yet'})")
    output.lines(fields([
        ("leader", leader),
        ("epoch", view.get("epoch")),
        ("lease", " ".join(str(lease[k]) if k == "state" else f"({k}: {lease[k]})"
                           for k in lease)),
        ("pending", f"{view.get('pendingCompletions')} completion(s)"),
        ("last commit", view.get("lastCommitAt") or "never"),
        ("outbox", f"{view['outbox']['events']} event(s) unsent, oldest "
                   f"{view['outbox']['oldestAgeSeconds']:g} s"),
    ]))
    if view.get("shards"):
        output.line("")
        output.lines(shard_lines(view["shards"]))
    return EXIT_OK


def cmd_balance(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """One account's committed balance, as ``GET /api/accounts/{id}``."""
    view = _answer(app, lambda: api.account(app, args.account))
    if output.as_json:
        output.data(view)
    else:
        output.lines(table(["ACCOUNT", "BALANCE"], [(view["accountId"], view["balance"])]))
    return EXIT_OK


def cmd_request(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """One request's status, as ``GET /api/requests/{id}``."""
    view = _answer(app, lambda: api.request(app, args.request_id))
    if output.as_json:
        output.data(view)
        return EXIT_OK
    pairs: list[tuple[str, object]] = [("request", view["requestId"]),
                                       ("status", view["status"]),
                                       ("reason", view.get("reason"))]
    if "decidedAt" in view:
        pairs += [("decided at", view.get("decidedAt")), ("epoch", view.get("epoch"))]
    output.lines(fields(pairs))
    return EXIT_OK


# --- command line ------------------------------------------------------------------------------
Handler = Callable[[LedgerApp, argparse.Namespace, Output, TextIO], int]


def _ignore_stdin(
        command: Callable[[LedgerApp, argparse.Namespace, Output], int]) -> Handler:
    def run(app: LedgerApp, args: argparse.Namespace, output: Output, stdin: TextIO) -> int:
        return command(app, args, output)
    return run


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None) or it is a switch."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with this CLI's error style: ``error: ...`` on stderr, exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _common_options(at_top: bool) -> Parser:
    """Options accepted before and after the subcommand (only the top level has defaults)."""
    options = Parser(add_help=False)
    options.add_argument("--json", action="store_true",
                         default=False if at_top else argparse.SUPPRESS,
                         help="print JSON (for scripts) instead of a table")
    options.add_argument("-v", "--verbose", action="count",
                         default=0 if at_top else argparse.SUPPRESS,
                         help="log more on stderr (-v: what is done, -vv: storage calls too)")
    return options


def _limit(parser: argparse.ArgumentParser, default: int, what: str) -> None:
    parser.add_argument("--limit", type=int, default=default, metavar="N",
                        help=f"at most N {what}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = _common_options(at_top=False)
    parser = Parser(
        prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Settings: AzureWebJobsStorage (or AzureWebJobsStorage__*) and the app's names, "
               "from the environment, else from ./local.settings.json. Exit codes: 0 ok, 1 not "
               "found or refused, 2 usage or configuration error.",
        parents=[_common_options(at_top=True)])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)

    from operator_cli import intake  # it builds on this module: imported once this one is

    enqueue = commands.add_parser(
        "enqueue", parents=[common], help="send completion messages to the intake queues",
        description="Validate completion messages (v1 contract), then send them base64-encoded "
                    "to the completions queue (spread round robin over the INTAKE_QUEUES "
                    "queues by default): from a file, stdin, or the field flags.")
    enqueue.add_argument("source", nargs="?", choices=["-"],
                         help="'-' reads the messages from stdin")
    enqueue.add_argument("--file", metavar="F",
                         help="JSON lines (one message a line), a JSON array, or one object")
    for flag, field, text in FLAG_FIELDS:
        choices = FLAG_CHOICES.get(field)
        enqueue.add_argument(flag, dest=field, help=text, choices=choices,
                             default=FLAG_DEFAULTS.get(field),
                             metavar=None if choices else flag[2:].upper().replace("-", "_"),
                             type=int if field == "expected_operations" else str)
    enqueue.add_argument("--raw", action="store_true",
                         help="send messages even if they break the contract (to test parking)")
    enqueue.add_argument("--create-queue", action="store_true",
                         help="create the queues first if they are missing (local Azurite)")
    intake.add_enqueue_options(enqueue)
    enqueue.set_defaults(handler=intake.cmd_enqueue)

    parked = commands.add_parser(
        "parked", help="malformed messages kept for an operator",
        description="Messages that broke the contract: kept with the raw body and the error, "
                    "for an operator to inspect and replay.")
    parked_commands = parked.add_subparsers(dest="parked_command", required=True,
                                            metavar="ACTION", parser_class=Parser)
    listing = parked_commands.add_parser("list", parents=[common],
                                         help="list parked messages, oldest first")
    _limit(listing, 1000, "messages")
    listing.set_defaults(handler=_ignore_stdin(cmd_parked_list))
    show = parked_commands.add_parser("show", parents=[common],
                                      help="one parked message: full body and error")
    show.add_argument("id", help="the parked message's id (from 'parked list')")
    show.set_defaults(handler=_ignore_stdin(cmd_parked_show))
    replay = parked_commands.add_parser("replay", parents=[common],
                                        help="put a parked message back on the queue")
    replay.add_argument("id", help="the parked message's id (from 'parked list')")
    replay.add_argument("--body-file", metavar="F",
                        help="a corrected body to send instead ('-': stdin)")
    replay.add_argument("--raw", action="store_true",
                        help="replay even if the body breaks the contract")
    replay.set_defaults(handler=cmd_parked_replay)

    poison = commands.add_parser(
        "poison", help="messages the host gave up on",
        description="The poison queues (one per intake queue): messages the Functions host "
                    "moved there after maxDequeueCount failed invocations.")
    poison_commands = poison.add_subparsers(dest="poison_command", required=True,
                                            metavar="ACTION", parser_class=Parser)
    poison_list = poison_commands.add_parser("list", parents=[common],
                                             help="peek at every intake queue's poison queue")
    _limit(poison_list, QUEUE_BATCH_LIMIT,
           f"messages (a peek shows {QUEUE_BATCH_LIMIT} at most)")
    poison_list.set_defaults(handler=_ignore_stdin(intake.cmd_poison_list))
    poison_replay = poison_commands.add_parser(
        "replay", parents=[common],
        help="move poisoned messages back, each to the intake queue it came from")
    _limit(poison_replay, 1000, "messages")
    poison_replay.set_defaults(handler=_ignore_stdin(intake.cmd_poison_replay))

    status = commands.add_parser("status", parents=[common],
                                 help="leader, epoch, lease, pending; a line per shard")
    status.set_defaults(handler=_ignore_stdin(cmd_status))
    balance = commands.add_parser("balance", parents=[common], help="an account's balance")
    balance.add_argument("account", help="the accountId")
    balance.set_defaults(handler=_ignore_stdin(cmd_balance))
    request = commands.add_parser("request", parents=[common],
                                  help="a request's status: pending or its outcome")
    request.add_argument("request_id", help="the requestId")
    request.set_defaults(handler=_ignore_stdin(cmd_request))
    outcomes.register(commands, common, Parser, _ignore_stdin)  # ./dev cli outcomes tail
    reconcile_commands.register(commands, common)  # reconcile, archive
    reshard_command.register(commands, common)
    return parser


def _configure_logging(verbosity: int, err: TextIO) -> None:
    """This entry point's logging, set once (not when an embedding process, e.g. pytest, did)."""
    if logging.getLogger().handlers:
        return
    level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    logging.basicConfig(level=level, stream=err, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)


def _parse(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> argparse.Namespace | int:
    """The parsed command line, or the exit code when argparse stopped (--help, a usage error)."""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None,
         stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run one command; return its exit code (0 ok, 1 not found or refused, 2 usage/config)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = _parse(argv, out, err)
    if isinstance(args, int):
        return args
    _configure_logging(args.verbose, err)
    output = Output(as_json=args.json, out=out, err=err)
    try:
        env = settings_env(os.environ if environ is None else environ)
        app = build_app(env)
    except ConfigError as exc:
        output.error(str(exc))
        return EXIT_USAGE
    try:
        handler: Handler = args.handler
        return handler(app, args, output, stdin or sys.stdin)
    except UsageError as exc:
        output.error(str(exc))
        return EXIT_USAGE
    except Refused as exc:
        output.error(str(exc))
        return EXIT_REFUSED
    except (StorageError, AzureError) as exc:
        output.error(explain(exc, app.clients, env))
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
