"""``./dev cli reshard --to K [--resume] [--json]``: move the ledger to K shards.

The logic is ``shared.leadership.reshard.reshard`` (the same function an operator can run from
an admin-level HTTP function in Azure); this module only parses, prints and maps errors to exit
codes: 0 done (or nothing to do), 1 refused or failed (the journal says where it stopped:
run it again, or with ``--resume``), 2 usage.
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from operator_cli.output import Output, fields
from shared.leadership.instance import LedgerApp
from shared.leadership.reshard import ReshardError, ReshardRefused, reshard

EXIT_OK, EXIT_REFUSED = 0, 1


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``reshard`` subcommand to the CLI's ``commands``."""
    parser = commands.add_parser(
        "reshard", parents=[common], help="move the ledger to K shards (pauses leaders)",
        description="Move every account, fence and piece of work in flight to the shards of "
                    "a new shard map, then publish it. Leaders pause while it runs "
                    "(docs/design.md 5.12); recorders keep recording. A run that stopped "
                    "is resumed by running it again (or with --resume).")
    parser.add_argument("--to", type=int, required=True, metavar="K",
                        help="the number of shards to move to (1-64)")
    parser.add_argument("--resume", action="store_true",
                        help="only resume the open reshard (refused when none is open)")
    parser.set_defaults(handler=cmd_reshard)


def cmd_reshard(app: LedgerApp, args: argparse.Namespace, output: Output,
                stdin: TextIO | None = None) -> int:
    try:
        report = reshard(app, args.to, resume=args.resume)
    except ReshardRefused as exc:
        output.error(str(exc))
        return EXIT_REFUSED
    except ReshardError as exc:
        output.error(f"{exc} (the journal keeps where it stopped: run the command again)")
        return EXIT_REFUSED
    view = report.as_json()
    if output.as_json:
        output.data(view)
        return EXIT_OK
    if report.nothing_to_do:
        output.line(f"the ledger has {args.to} shard(s) already: nothing to do")
        return EXIT_OK
    output.lines(fields([
        ("shards", f"{view['from']} -> {view['to']} (map generation {view['generation']})"),
        ("accounts", f"{view['accounts']} ({view['accountsMoved']} moved)"),
        ("steps moved", view["stepsMoved"]),
        ("total", f"{view['totalBefore']} before, {view['totalAfter']} after "
                  f"({view['verified']})"),
        ("pause", f"{view['pauseSeconds']} s"),
        ("phases", ", ".join(f"{k} {v} s" for k, v in view["phases"].items())),
        ("resumed", "yes" if view["resumed"] else "no"),
    ]))
    return EXIT_OK
