"""The operator CLI: enqueue completions, inspect and replay parked messages, read the ledger.

Run it as ``python -m operator_cli`` (or ``./dev cli``)::

    ./dev cli enqueue --request-id r1 --operation-id r1-add --operation add_funds \\
        --account alice --amount 10.00 --expected 1
    ./dev cli enqueue --file messages.jsonl        # JSON lines, a JSON array or one object
    ./dev cli enqueue - < messages.jsonl           # the same from stdin
    ./dev cli parked list | show ID | replay ID [--body-file fixed.json]
    ./dev cli status | balance ACCOUNT | request REQUEST_ID

It reads the same settings as the function app (``shared.settings``): ``AzureWebJobsStorage``
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

from shared import api
from shared.app import LedgerApp
from shared.clients import clients_from_settings
from shared.contract import MalformedMessage, parse_completion
from shared.election import ElectionConfigError
from shared.parking import ParkedMessage, peek_poisoned, replay_poisoned
from shared.settings import STORAGE_CONNECTION, ConfigError, default_instance_id, load_config

logger = logging.getLogger(__name__)

# Read from the current directory, as ``func start`` reads it (``./dev cli`` runs in the repo root).
LOCAL_SETTINGS = Path("local.settings.json")
PREVIEW_CHARS = 80

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


# --- output ----------------------------------------------------------------------------------
@dataclass
class Output:
    """Where and how results are printed."""

    as_json: bool
    out: TextIO
    err: TextIO

    def data(self, value: Any) -> None:
        """Print a JSON document."""
        print(json.dumps(value, indent=2, default=str), file=self.out)

    def line(self, text: str) -> None:
        """Print one line of human-readable output."""
        print(text, file=self.out)

    def error(self, text: str) -> None:
        """Print a problem on stderr."""
        print(f"error: {text}", file=self.err)


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


def _preview(body: bytes) -> str:
    flat = " ".join(_text(body).split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[:PREVIEW_CHARS - 3] + "..."


# --- enqueue ---------------------------------------------------------------------------------
FLAG_FIELDS: tuple[tuple[str, str], ...] = (
    ("request_id", "requestId"),
    ("operation_id", "operationId"),
    ("operation", "operation"),
    ("account", "accountId"),
    ("amount", "amount"),
    ("expected", "expectedOperations"),
    ("status", "status"),
    ("completed_at", "completedAt"),
)


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
    body = {field: getattr(args, dest) for dest, field in FLAG_FIELDS
            if getattr(args, dest) is not None}
    body.setdefault("status", "succeeded")
    return [json.dumps(body, separators=(",", ":"))]


def _read_source(source: str, stdin: TextIO) -> str:
    if source == "-":
        return stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None


def enqueue_bodies(args: argparse.Namespace, stdin: TextIO) -> list[str]:
    """The bodies ``enqueue`` was asked to send, from exactly one source."""
    flags_given = any(getattr(args, dest) is not None for dest, _ in FLAG_FIELDS
                      if dest != "status")
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


def cmd_enqueue(app: LedgerApp, args: argparse.Namespace, output: Output,
                stdin: TextIO) -> int:
    """Validate, then send, completion messages to the completions queue."""
    bodies = enqueue_bodies(args, stdin)
    checked = [_summary(index, body) for index, body in enumerate(bodies, start=1)]
    invalid = [item for item in checked if not item["valid"]]
    if invalid and not args.raw:
        for item in invalid:
            output.error(f"message {item['index']}: {item['error']}")
        output.error(f"{len(invalid)} of {len(bodies)} message(s) break the v1 contract; "
                     "nothing was sent (add --raw to send them anyway, e.g. to test parking)")
        if output.as_json:
            output.data({"queue": app.config.completions_queue, "sent": [],
                         "refused": invalid})
        return EXIT_REFUSED
    queue = app.queue_client()
    if args.create_queue:
        _create_queue(app)
    sent: list[dict[str, Any]] = []
    for item, body in zip(checked, bodies, strict=True):
        try:
            receipt = queue.send_message(body)
        except ResourceNotFoundError:
            raise Refused(f"queue {app.config.completions_queue!r} does not exist at "
                          f"{queue.url}; check COMPLETIONS_QUEUE_NAME, or pass --create-queue "
                          f"(local Azurite); {len(sent)} message(s) were sent before") from None
        item["messageId"] = receipt.id
        sent.append(item)
        logger.info("sent message %s", receipt.id)
    if output.as_json:
        output.data({"queue": app.config.completions_queue, "sent": sent})
        return EXIT_OK
    output.line(f"sent {len(sent)} message(s) to queue {app.config.completions_queue!r}")
    for item in sent:
        what = (f"{item['requestId']}/{item['operationId']}" if item["valid"]
                else f"raw, malformed: {item['error']}")
        output.line(f"  {item['messageId']}  {what}")
    return EXIT_OK


def _create_queue(app: LedgerApp) -> None:
    with contextlib.suppress(ResourceExistsError):
        app.clients.queue.create_queue(app.config.completions_queue)


# --- parked messages ----------------------------------------------------------------------
def _parked_view(message: ParkedMessage, full: bool) -> dict[str, Any]:
    view: dict[str, Any] = {"id": message.parked_id, "parkedAt": message.parked_at,
                            "error": message.error}
    if full:
        view.update(body=_text(message.body), dequeueCount=message.dequeue_count,
                    instanceId=message.instance_id)
    else:
        view["bodyPreview"] = _preview(message.body)
    return view


def _parked_messages(app: LedgerApp, limit: int) -> list[ParkedMessage]:
    try:
        return app.parking.list(limit=limit)
    except ResourceNotFoundError:  # the table is made on first use: nothing was parked yet
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
    for view in views:
        output.line(f"{view['id']}  {view['parkedAt']}  {view['error']}")
        output.line(f"    {view['bodyPreview']}")
    output.line(f"{len(views)} parked message(s)")
    return EXIT_OK


def _get_parked(app: LedgerApp, parked_id: str) -> ParkedMessage:
    try:
        message = app.parking.get(parked_id)
    except ResourceNotFoundError:
        message = None
    if message is None:
        raise Refused(f"no parked message {parked_id!r}; list them with 'parked list'")
    return message


def cmd_parked_show(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """Show one parked message: its full body and the validation error."""
    view = _parked_view(_get_parked(app, args.id), full=True)
    if output.as_json:
        output.data(view)
        return EXIT_OK
    for key in ("id", "parkedAt", "dequeueCount", "instanceId", "error"):
        output.line(f"{key}: {view[key]}")
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
        app.parking.replay(args.id, app.queue_client(), body)
    except ResourceNotFoundError:
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


def cmd_poison_list(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """Peek at the poison queue (messages the host gave up on after maxDequeueCount)."""
    try:
        found = peek_poisoned(app.raw_queue_client(app.config.poison_queue), args.limit)
    except ResourceNotFoundError:
        found = []
    views: list[dict[str, Any]] = [
        {"id": m.message_id, "insertedOn": m.inserted_on, "dequeueCount": m.dequeue_count,
         "body": _poison_text(m.text)} for m in found]
    if output.as_json:
        output.data(views)
        return EXIT_OK
    for view in views:
        output.line(f"{view['id']}  {view['insertedOn']}  {view['body'][:80]}")
    output.line(f"{len(views)} poisoned message(s) shown (at most 32 are peeked)")
    return EXIT_OK


def cmd_poison_replay(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """Move poisoned messages back to the completions queue, unchanged."""
    try:
        moved = replay_poisoned(app.raw_queue_client(app.config.poison_queue),
                                app.raw_queue_client(app.config.completions_queue), args.limit)
    except ResourceNotFoundError:
        raise Refused(f"queue {app.config.poison_queue!r} or {app.config.completions_queue!r} "
                      "does not exist; check COMPLETIONS_QUEUE_NAME") from None
    if output.as_json:
        output.data({"replayed": moved, "queue": app.config.completions_queue})
    else:
        output.line(f"replayed {moved} message(s) from {app.config.poison_queue!r} to "
                    f"{app.config.completions_queue!r}")
    return EXIT_OK


# --- read API ------------------------------------------------------------------------------
def _reply(reply: api.Reply, output: Output) -> int:
    output.data(reply.body)
    if reply.status == 200:
        return EXIT_OK
    return EXIT_USAGE if reply.status == 400 else EXIT_REFUSED


def _read(app: LedgerApp, call: Callable[[], api.Reply]) -> api.Reply:
    try:
        return call()
    except ResourceNotFoundError as exc:
        raise Refused(f"{_storage_problem(exc)}: the app creates its tables and lease blob on "
                      f"its first run (check the names: tables {app.config.completions_table!r}, "
                      f"{app.config.ledger_table!r})") from None


def cmd_status(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """The leader view of ``GET /api/leader``."""
    return _reply(_read(app, lambda: api.leader(app)), output)


def cmd_balance(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """One account's committed balance, as ``GET /api/accounts/{id}``."""
    return _reply(_read(app, lambda: api.account(app, args.account)), output)


def cmd_request(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """One request's status, as ``GET /api/requests/{id}``."""
    return _reply(_read(app, lambda: api.request(app, args.request_id)), output)


def _storage_problem(exc: AzureError) -> str:
    """One line about a storage error (the SDK's text repeats the whole response)."""
    first = (str(exc.message or exc).strip().splitlines() or [type(exc).__name__])[0]
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # the SDKs give an enum or a str
    return f"{first} ({code})" if code else first


# --- command line ------------------------------------------------------------------------------
Handler = Callable[[LedgerApp, argparse.Namespace, Output, TextIO], int]


def _ignore_stdin(
        command: Callable[[LedgerApp, argparse.Namespace, Output], int]) -> Handler:
    def run(app: LedgerApp, args: argparse.Namespace, output: Output, stdin: TextIO) -> int:
        return command(app, args, output)
    return run


def _common_options(at_top: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand (only the top level has defaults)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--json", action="store_true",
                         default=False if at_top else argparse.SUPPRESS,
                         help="print JSON instead of text")
    options.add_argument("-v", "--verbose", action="count",
                         default=0 if at_top else argparse.SUPPRESS,
                         help="log more (-vv: storage calls too)")
    return options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = _common_options(at_top=False)
    parser = argparse.ArgumentParser(
        prog="python -m operator_cli", description=__doc__.split("\n\n")[0] if __doc__ else None,
        parents=[_common_options(at_top=True)])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enqueue = commands.add_parser("enqueue", parents=[common],
                                  help="send completion messages to the completions queue")
    enqueue.add_argument("source", nargs="?", choices=["-"],
                         help="'-' reads the messages from stdin")
    enqueue.add_argument("--file", metavar="F",
                         help="JSON lines (one message a line), a JSON array, or one object")
    enqueue.add_argument("--request-id")
    enqueue.add_argument("--operation-id")
    enqueue.add_argument("--operation", help="add_funds or withdraw_funds")
    enqueue.add_argument("--account", help="the accountId")
    enqueue.add_argument("--amount", help="a decimal string, e.g. 12.50")
    enqueue.add_argument("--expected", type=int, help="expectedOperations (1-50)")
    enqueue.add_argument("--status", help="succeeded (default when flags are used) or failed")
    enqueue.add_argument("--completed-at", help="optional ISO-8601 timestamp")
    enqueue.add_argument("--raw", action="store_true",
                         help="send messages even if they break the contract (to test parking)")
    enqueue.add_argument("--create-queue", action="store_true",
                         help="create the queue first if it is missing (local Azurite)")
    enqueue.set_defaults(handler=cmd_enqueue)

    parked = commands.add_parser("parked", help="malformed messages kept for an operator")
    parked_commands = parked.add_subparsers(dest="parked_command", required=True,
                                            metavar="ACTION")
    listing = parked_commands.add_parser("list", parents=[common], help="list parked messages")
    listing.add_argument("--limit", type=int, default=1000)
    listing.set_defaults(handler=_ignore_stdin(cmd_parked_list))
    show = parked_commands.add_parser("show", parents=[common],
                                      help="one parked message: full body and error")
    show.add_argument("id")
    show.set_defaults(handler=_ignore_stdin(cmd_parked_show))
    replay = parked_commands.add_parser("replay", parents=[common],
                                        help="put a parked message back on the queue")
    replay.add_argument("id")
    replay.add_argument("--body-file", metavar="F",
                        help="a corrected body to send instead ('-': stdin)")
    replay.add_argument("--raw", action="store_true",
                        help="replay even if the body breaks the contract")
    replay.set_defaults(handler=cmd_parked_replay)

    poison = commands.add_parser("poison", help="messages the host gave up on")
    poison_commands = poison.add_subparsers(dest="poison_command", required=True,
                                            metavar="ACTION")
    poison_list = poison_commands.add_parser("list", parents=[common],
                                             help="peek at the poison queue")
    poison_list.add_argument("--limit", type=int, default=32)
    poison_list.set_defaults(handler=_ignore_stdin(cmd_poison_list))
    poison_replay = poison_commands.add_parser(
        "replay", parents=[common], help="move poisoned messages back to the completions queue")
    poison_replay.add_argument("--limit", type=int, default=1000)
    poison_replay.set_defaults(handler=_ignore_stdin(cmd_poison_replay))

    status = commands.add_parser("status", parents=[common],
                                 help="leader, epoch, lease state, pending completions")
    status.set_defaults(handler=_ignore_stdin(cmd_status))
    balance = commands.add_parser("balance", parents=[common], help="an account's balance")
    balance.add_argument("account")
    balance.set_defaults(handler=_ignore_stdin(cmd_balance))
    request = commands.add_parser("request", parents=[common], help="a request's status")
    request.add_argument("request_id")
    request.set_defaults(handler=_ignore_stdin(cmd_request))
    return parser


def _configure_logging(verbosity: int, err: TextIO) -> None:
    if logging.getLogger().handlers:  # the embedding process (e.g. pytest) configured logging
        return
    level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING
    logging.basicConfig(level=level, stream=err, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None,
         stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run one command; return its exit code (0 ok, 1 not found or refused, 2 usage/config)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.verbose, err)
    output = Output(as_json=args.json, out=out, err=err)
    try:
        app = build_app(settings_env(os.environ if environ is None else environ))
        handler: Handler = args.handler
        return handler(app, args, output, stdin or sys.stdin)
    except ConfigError as exc:
        output.error(str(exc))
        return EXIT_USAGE
    except UsageError as exc:
        output.error(str(exc))
        return EXIT_USAGE
    except Refused as exc:
        output.error(str(exc))
        return EXIT_REFUSED
    except AzureError as exc:
        output.error(f"storage call failed: {_storage_problem(exc)}")
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
