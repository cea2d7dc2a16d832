"""The operator CLI's commands on the intake queues (``INTAKE_QUEUES`` = Q): enqueue, poison.

``enqueue`` spreads what it sends over the Q queues: round robin by default (message i of one
invocation goes to queue i mod Q, from queue 0), or ``--spread request-id``: the queue is
SHA-256(requestId) mod Q, so every step of a request goes to the same queue. Either is fine for
the app, which takes any message from any queue (the shard follows from the ids), and so is any
other spread an upstream system chooses (README, "Choosing an intake queue").

``poison list`` peeks at every intake queue's poison queue and says which queue each message
came from; ``poison replay`` moves each poisoned message back to the queue it came from,
unchanged. With Q = 1 the output is what it always was (no QUEUE column).

``operator_cli/cli.py`` registers these handlers and the options of ``add_enqueue_options``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Sequence
from typing import Any, TextIO

from operator_cli.cli import (
    EXIT_OK,
    EXIT_REFUSED,
    Refused,
    _azure_queue,
    _poison_text,
    _summary,
    enqueue_bodies,
)
from operator_cli.output import Output, preview, table
from shared.config.names import poison_queue_name
from shared.errors import NotFound
from shared.leadership.instance import LedgerApp
from shared.storage.clients import ensure_queues
from shared.storage.parking import QUEUE_BATCH_LIMIT, peek_poisoned, replay_poisoned

logger = logging.getLogger(__name__)

ROUND_ROBIN = "round-robin"
BY_REQUEST_ID = "request-id"
SPREADS = (ROUND_ROBIN, BY_REQUEST_ID)


def add_enqueue_options(enqueue: argparse.ArgumentParser) -> None:
    """The options of ``enqueue`` that choose among the intake queues."""
    enqueue.add_argument(
        "--spread", choices=SPREADS, default=ROUND_ROBIN,
        help="how messages are spread over the INTAKE_QUEUES queues (COMPLETIONS_QUEUE_NAME, "
             "then its -1, -2, ...): round-robin sends message i of this run to queue i mod Q "
             "(from queue 0); request-id sends it to queue SHA-256(requestId) mod Q")


def queue_index(spread: str, position: int, request_id: str | None, body: str,
                queues: int) -> int:
    """The intake queue (0..queues-1) of the ``position``-th message of one run."""
    if spread == BY_REQUEST_ID:
        key = request_id if request_id is not None else body  # a malformed (--raw) body
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % queues
    return position % queues


def cmd_enqueue(app: LedgerApp, args: argparse.Namespace, output: Output,
                stdin: TextIO) -> int:
    """Validate, then send, completion messages, spread over the intake queues."""
    names = app.config.intake_queue_names
    bodies = enqueue_bodies(args, stdin)
    checked = [_summary(index, body) for index, body in enumerate(bodies, start=1)]
    invalid = [item for item in checked if not item["valid"]]
    if invalid and not args.raw:
        for item in invalid:
            output.error(f"message {item['index']}: {item['error']}")
        output.error(f"{len(invalid)} of {len(bodies)} message(s) break the v1 contract; "
                     "nothing was sent (add --raw to send them anyway, e.g. to test parking)")
        if output.as_json:
            output.data({"queue": app.config.completions_queue, "queues": list(names),
                         "sent": [], "refused": invalid})
        return EXIT_REFUSED
    if args.create_queue:
        ensure_queues(app.clients, names)
    queues = [_azure_queue(app, name) for name in names]
    sent: list[dict[str, Any]] = []
    for position, (item, body) in enumerate(zip(checked, bodies, strict=True)):
        q = queue_index(args.spread, position, item.get("requestId"), body, len(names))
        try:
            receipt = queues[q].send(body)
        except NotFound:
            raise Refused(f"queue {names[q]!r} does not exist at {queues[q].client.url}; check "
                          "COMPLETIONS_QUEUE_NAME and INTAKE_QUEUES, or pass --create-queue "
                          f"(local Azurite); {len(sent)} message(s) were sent before") from None
        item["messageId"] = receipt.message_id
        item["queue"] = names[q]
        sent.append(item)
        logger.info("sent message %s to %s", receipt.message_id, names[q])
    if output.as_json:
        output.data({"queue": app.config.completions_queue, "queues": list(names),
                     "sent": sent})
        return EXIT_OK
    rows = [(item["messageId"], item["requestId"], item["operationId"]) if item["valid"]
            else (item["messageId"], "-", f"malformed (--raw): {preview(item['error'])}")
            for item in sent]
    if len(names) == 1:
        output.lines(table(["MESSAGE ID", "REQUEST", "STEP"], rows))
        output.line(f"sent {len(sent)} message(s) to queue {names[0]!r}")
        return EXIT_OK
    output.lines(table(["MESSAGE ID", "REQUEST", "STEP", "QUEUE"],
                       [(*row, item["queue"]) for row, item in zip(rows, sent, strict=True)]))
    used = sorted({item["queue"] for item in sent}, key=names.index)
    output.line(f"sent {len(sent)} message(s) to {len(used)} of {len(names)} queue(s) "
                f"({args.spread}): {', '.join(used)}")
    return EXIT_OK


def _poisoned_views(app: LedgerApp, names: Sequence[str], limit: int) -> list[dict[str, Any]]:
    views: list[dict[str, Any]] = []
    for name in names:
        if len(views) >= limit:
            break
        poison = poison_queue_name(name)
        try:
            found = peek_poisoned(_azure_queue(app, poison, raw=True), limit - len(views))
        except NotFound:  # the host creates a poison queue with its first message
            continue
        views += [{"id": m.message_id, "insertedOn": m.inserted_on,
                   "dequeueCount": m.dequeue_count, "body": _poison_text(m.text),
                   "queue": name, "poisonQueue": poison} for m in found]
    return views


def cmd_poison_list(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """Peek at every intake queue's poison queue (messages the host gave up on)."""
    names = app.config.intake_queue_names
    views = _poisoned_views(app, names, args.limit)
    if output.as_json:
        output.data(views)
        return EXIT_OK
    if views and len(names) == 1:
        output.lines(table(["ID", "INSERTED ON", "DEQUEUES", "BODY"], [
            (v["id"], v["insertedOn"], v["dequeueCount"], preview(v["body"])) for v in views]))
    elif views:
        output.lines(table(["QUEUE", "ID", "INSERTED ON", "DEQUEUES", "BODY"], [
            (v["queue"], v["id"], v["insertedOn"], v["dequeueCount"], preview(v["body"]))
            for v in views]))
    where = (repr(poison_queue_name(names[0])) if len(names) == 1
             else f"the {len(names)} poison queues")
    output.line(f"{len(views)} message(s) in {where} shown (a peek shows at most "
                f"{QUEUE_BATCH_LIMIT} a queue)")
    return EXIT_OK


def _exists(app: LedgerApp, name: str) -> bool:
    try:
        app.queue(name).approximate_count()
    except NotFound:
        return False
    return True


def total_so_far(moved: dict[str, int]) -> int:
    """How many messages a replay moved (over every queue so far)."""
    return sum(moved.values())


def cmd_poison_replay(app: LedgerApp, args: argparse.Namespace, output: Output) -> int:
    """Move poisoned messages back, unchanged, each to the intake queue it came from."""
    names = app.config.intake_queue_names
    moved: dict[str, int] = {}
    for name in names:
        left = args.limit - total_so_far(moved)
        if left <= 0:
            break
        try:
            moved[name] = replay_poisoned(app.queue(poison_queue_name(name), raw=True),
                                          app.queue(name, raw=True), left)
        except NotFound:
            if _exists(app, poison_queue_name(name)):
                raise Refused(f"queue {name!r} does not exist; check COMPLETIONS_QUEUE_NAME and "
                              f"INTAKE_QUEUES ({total_so_far(moved)} message(s) were replayed "
                              "before)") from None
            moved[name] = 0  # no poison queue yet: nothing was poisoned there
    total = total_so_far(moved)
    if output.as_json:
        output.data({"replayed": total, "queue": app.config.completions_queue,
                     "queues": moved})
    elif len(names) == 1:
        output.line(f"replayed {total} message(s) from {poison_queue_name(names[0])!r} to "
                    f"{names[0]!r}")
    else:
        output.line(f"replayed {total} message(s), each to its queue: "
                    + ", ".join(f"{n} to {name!r}" for name, n in moved.items()))
    return EXIT_OK
