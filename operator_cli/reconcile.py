"""``./dev cli reconcile`` and ``./dev cli archive``: check the ledger's invariants, run retention.

``reconcile`` reads every shard (``shared/leadership/reconcile.py``) and prints the findings
(severity, shard, row, what), the per-shard totals and the counts; ``--json`` prints the report
as a document (``ok``, ``counts``, ``totals``, ``shards``, ``findings``). Exit status 1 when it
found a problem (an error or a warning), 0 when the ledger is clean.

``archive`` runs one batch of the retention step (``shared/leadership/retention.py``): rows older
than ``RETENTION_DAYS`` to the archive container, then deleted; ``--dry-run`` says what it would
export and changes nothing.
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from operator_cli.output import Output, fields, preview, table
from shared.domain.reconciliation import PROBLEMS
from shared.leadership.instance import LedgerApp
from shared.leadership.reconcile import MAX_ROWS_PER_SHARD, reconcile_ledger
from shared.leadership.retention import MAX_PARKED_PER_RUN, MAX_REQUESTS_PER_RUN, archive

EXIT_OK = 0
EXIT_PROBLEMS = 1


def cmd_reconcile(app: LedgerApp, args: argparse.Namespace, output: Output,
                  stdin: TextIO) -> int:
    """Check every shard; exit 1 when a problem was found."""
    report = reconcile_ledger(app, max_rows=args.max_rows,
                              max_flight_seconds=args.max_flight_seconds)
    status = EXIT_OK if report.ok else EXIT_PROBLEMS
    if output.as_json:
        output.data(report.view())
        return status
    view = report.view()
    output.lines(table(
        ["SHARD", "ACCOUNTS", "BALANCE", "RESERVED", "ESCROW", "EXPECTED", "IN FLIGHT",
         "OLDEST (s)", "JUDGED"],
        [(s["shard"], s["accounts"], s["balance"], s["reserved"], s["escrow"], s["expected"],
          s["inFlight"], s["oldestInFlightSeconds"],
          "yes" if s["verified"] and not s["truncated"] else "no") for s in view["shards"]]))
    output.line("")
    grand = view["totals"]
    output.lines(fields([
        ("total", f"{grand['total']} (committed legs net {grand['expected']}"
                  f"{'' if grand['checked'] else ', not judged'})"),
        ("checked at", view["checkedAt"]),
        ("threshold", f"in flight longer than {view['maxFlightSeconds']:g} s"),
    ]))
    if report.findings:
        output.line("")
        output.lines(table(["SEVERITY", "KIND", "SHARD", "ROW", "WHAT"], [
            (f.severity.value, f.kind, "-" if f.shard is None else f.shard, f.row or "-",
             preview(f.what, 120)) for f in report.findings]))
    problems = [f for f in report.findings if f.severity in PROBLEMS]
    output.line("")
    output.line(f"{len(problems)} problem(s) found" if problems else "ledger reconciles: no "
                "problem found")
    return status


def cmd_archive(app: LedgerApp, args: argparse.Namespace, output: Output, stdin: TextIO) -> int:
    """One batch of the retention step (or, ``--dry-run``, what it would do)."""
    report = archive(app, dry_run=args.dry_run, max_requests=args.max_requests,
                     max_parked=args.max_parked)
    view: dict[str, Any] = report.view()
    if output.as_json:
        output.data({**view, "container": app.config.archive_container,
                     "retentionDays": app.config.retention_days})
        return EXIT_OK
    output.lines(fields([
        ("retention", f"{app.config.retention_days} days (rows last written before "
                      f"{view['cutoff']})"),
        ("selected", ", ".join(f"{n} {k}" for k, n in view["rows"].items()) or "nothing"),
        ("unsettled", f"{view['skippedUnsettled']} skipped"),
        ("blobs", ", ".join(view["blobs"]) or "-"),
        ("deleted", "nothing (dry run)" if args.dry_run else
         f"{view['deleted']} row(s); {view['keptChanged']} kept (changed since read)"),
        ("container", app.config.archive_container),
    ]))
    return EXIT_OK


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``reconcile`` and ``archive`` to the CLI's subcommands."""
    reconcile = commands.add_parser(
        "reconcile", parents=[common], help="check the ledger's invariants on every shard",
        description="Read every shard's ledger partition and check: no negative balance, "
                    "nothing in flight between shards longer than RECONCILE_MAX_FLIGHT_SECONDS, "
                    "escrow rows that sum to each account's reserved, and totals that add up "
                    "(balances + reserved = the net of the committed legs). Exit status 1 "
                    "when a problem is found.")
    reconcile.add_argument("--max-rows", type=int, default=MAX_ROWS_PER_SHARD, metavar="N",
                           help="read at most N rows of each kind per shard")
    reconcile.add_argument("--max-flight-seconds", type=float, default=None, metavar="S",
                           help="report work in flight older than S seconds (default: the "
                                "RECONCILE_MAX_FLIGHT_SECONDS setting)")
    reconcile.set_defaults(handler=cmd_reconcile)
    archive_parser = commands.add_parser(
        "archive", parents=[common], help="archive rows older than RETENTION_DAYS to a blob",
        description="Export settled outcome rows (with their claims, applied markers and "
                    "votes) and parked messages older than RETENTION_DAYS to the archive "
                    "container (ARCHIVE_CONTAINER_NAME, JSON lines), then delete them: one "
                    "bounded batch per run.")
    archive_parser.add_argument("--dry-run", action="store_true",
                                help="say what would be archived; change nothing")
    archive_parser.add_argument("--max-requests", type=int, default=MAX_REQUESTS_PER_RUN,
                                metavar="N", help="archive at most N requests")
    archive_parser.add_argument("--max-parked", type=int, default=MAX_PARKED_PER_RUN,
                                metavar="N", help="archive at most N parked messages")
    archive_parser.set_defaults(handler=cmd_archive)
