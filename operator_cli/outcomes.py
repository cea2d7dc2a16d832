"""``./dev cli outcomes tail``: print outcome events as they arrive on the outcomes queue.

By default it *peeks* (``Peek Messages``): it never takes a message, so the upstream systems
that consume the queue are not disturbed, and it sees the 32 oldest visible messages at each
poll (events that stay queued longer than that are shown once they reach the head). With
``--take`` it receives and deletes them instead (a local run where nothing else consumes the
queue). Each event is printed once per process (by message id); ``--json`` prints one JSON
object per line, the event as sent, for scripts; ``--once`` polls once and exits, ``--limit N``
exits after N events.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, TextIO

from operator_cli.output import Output, table
from shared.errors import NotFound
from shared.leadership.instance import LedgerApp
from shared.storage.ports import MAX_RECEIVE

EXIT_OK = 0


def _poll(app: LedgerApp, take: bool) -> list[tuple[str, str]]:
    """(message id, body) of the messages seen by one poll."""
    if take:
        queue = app.queue(app.config.outcomes_queue)
        found = queue.receive(max_messages=MAX_RECEIVE, visibility_timeout=30)
        for message in found:
            queue.delete(message.handle)
        return [(m.handle.message_id, m.text) for m in found]
    peekable = app.clients.open_queue(app.config.outcomes_queue,
                                      timeout_seconds=app.config.storage_timeout_seconds)
    return [(p.message_id, p.text) for p in peekable.peek(max_messages=MAX_RECEIVE)]


def _row(event: dict[str, Any]) -> list[object]:
    detail = event.get("reason") or ""
    if event.get("type") == "contradiction":
        detail = f"{event.get('parkedId')}: {detail}"
    elif event.get("legs"):
        detail = ", ".join(f"{leg['accountId']} {leg['amount']}" for leg in event["legs"])
    return [event.get("decidedAt", ""), event.get("type", ""), event.get("requestId", ""),
            event.get("status", ""), event.get("epoch", ""), detail]


def cmd_tail(app: LedgerApp, args: argparse.Namespace, output: Output,
             sleep: Callable[[float], None] = time.sleep) -> int:
    """Print events as they arrive (see the module docstring)."""
    seen: set[str] = set()
    printed = 0
    header = not output.as_json
    while True:
        try:
            found = _poll(app, args.take)
        except NotFound:  # no event was ever sent: the queue is not there yet
            found = []
        for message_id, body in found:
            if message_id in seen:
                continue
            seen.add(message_id)
            try:
                event = json.loads(body)
            except ValueError:
                event = {"type": "not an event", "reason": body[:200]}
            if output.as_json:
                print(json.dumps(event, separators=(",", ":")), file=output.out, flush=True)
            else:
                lines = table(["DECIDED AT", "TYPE", "REQUEST", "STATUS", "EPOCH", "DETAIL"],
                              [_row(event)])
                output.lines(lines if header else lines[1:])
                header = False
            printed += 1
            if args.limit and printed >= args.limit:
                return EXIT_OK
        if args.once:
            return EXIT_OK
        sleep(args.interval)


def register(commands: Any, common: argparse.ArgumentParser, parser_class: type,
             wrap: Callable[[Callable[[LedgerApp, argparse.Namespace, Output], int]],
                            Callable[[LedgerApp, argparse.Namespace, Output, TextIO], int]],
             ) -> None:
    """Add ``outcomes tail`` to the CLI's subcommands."""
    outcomes = commands.add_parser(
        "outcomes", help="outcome events sent to upstream",
        description="The events on the outcomes queue (OUTCOMES_QUEUE_NAME): one per decided "
                    "request, and one per parked late contradiction.")
    actions = outcomes.add_subparsers(dest="outcomes_command", required=True,
                                      metavar="ACTION", parser_class=parser_class)
    tail = actions.add_parser("tail", parents=[common],
                              help="print events as they arrive (peeks: takes nothing)")
    tail.add_argument("--take", action="store_true",
                      help="receive and delete the events instead of peeking (no other "
                           "consumer: a local run)")
    tail.add_argument("--once", action="store_true", help="poll once, then exit")
    tail.add_argument("--limit", type=int, default=0, metavar="N",
                      help="exit after N events (0: never)")
    tail.add_argument("--interval", type=float, default=1.0, metavar="S",
                      help="seconds between polls")
    tail.set_defaults(handler=wrap(cmd_tail))
