"""``python -m simulator``: the demo, a single simulated instance, or the read API server."""

from __future__ import annotations

import argparse
import random
import sys

from simulator.chaos import ChaosOptions, run_chaos
from simulator.demo import DemoOptions, run_demo


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    parser = argparse.ArgumentParser(prog="python -m simulator",
                                     description="Scale-out simulator of the ledger app.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="generated workload through N instances, checked")
    demo.add_argument("--instances", type=int, default=8)
    demo.add_argument("--accounts", type=int, default=20)
    demo.add_argument("--transfers", type=int, default=200)
    demo.add_argument("--malformed", type=int, default=5)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--timeout", type=float, default=300, help="seconds before giving up")
    demo.add_argument("--sweep-seconds", type=float, default=5,
                      help="timer period of the sweeper (60 in Azure)")
    demo.add_argument("--connection-string", default=None,
                      help="use this storage instead of a private in-memory Azurite")
    demo.add_argument("--kill-leader", action="store_true",
                      help="SIGKILL the leading instance a third of the way in (15 s lease)")
    demo.add_argument("--serve", action="store_true",
                      help="keep serving the read API after the summary, until Ctrl-C")

    chaos = commands.add_parser("chaos", help="the chaos run: workload + injected faults, checked")
    defaults = ChaosOptions()
    chaos.add_argument("--seed", type=int, default=None,
                       help="replay a run (default: a new random seed, printed first)")
    chaos.add_argument("--minutes", type=float, default=defaults.minutes,
                       help="feed the requests over this many minutes (0: all at once)")
    chaos.add_argument("--instances", type=int, default=defaults.instances)
    chaos.add_argument("--accounts", type=int, default=defaults.accounts)
    chaos.add_argument("--requests", type=int, default=None,
                       help="requests under chaos (default 2000, or 700 per minute fed)")
    chaos.add_argument("--leader-kills", type=int, default=None,
                       help=f"default {defaults.leader_kills} per 4 minutes fed")
    chaos.add_argument("--random-kills", type=int, default=None,
                       help=f"default {defaults.random_kills} per 4 minutes fed")
    chaos.add_argument("--breaks", type=int, default=None,
                       help=f"default {defaults.breaks} per 4 minutes fed")
    chaos.add_argument("--pauses", type=int, default=None,
                       help=f"default {defaults.pauses} per 4 minutes fed")
    chaos.add_argument("--storage-restarts", type=int, default=None,
                       help=f"default {defaults.storage_restarts} per 4 minutes fed")
    chaos.add_argument("--wait-for-expiry", action="store_true",
                       help="let a paused leader's lease expire instead of breaking it")
    chaos.add_argument("--timeout", type=float, default=None, help="give up after (s)")

    instance = commands.add_parser("instance", help="one instance process (used by the demo)")
    instance.add_argument("--index", type=int, required=True)
    instance.add_argument("--threads", type=int, default=4)
    instance.add_argument("--lock-seconds", type=float, default=30,
                          help="visibility timeout while a message is being processed")
    instance.add_argument("--sweep-seconds", type=float, default=None)

    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(DemoOptions(
            instances=args.instances, accounts=args.accounts, transfers=args.transfers,
            malformed=args.malformed, seed=args.seed, timeout=args.timeout,
            sweep_seconds=args.sweep_seconds, connection_string=args.connection_string,
            serve_after=args.serve, kill_leader=args.kill_leader))
    if args.command == "chaos":
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
        requests = args.requests or max(2000, int(700 * args.minutes))
        scale = max(1.0, args.minutes / 4)

        def count(given: int | None, default: int) -> int:
            return given if given is not None else round(default * scale)

        return run_chaos(ChaosOptions(
            seed=seed, instances=args.instances, accounts=args.accounts, requests=requests,
            minutes=args.minutes, leader_kills=count(args.leader_kills, defaults.leader_kills),
            random_kills=count(args.random_kills, defaults.random_kills),
            breaks=count(args.breaks, defaults.breaks),
            pauses=count(args.pauses, defaults.pauses),
            storage_restarts=count(args.storage_restarts, defaults.storage_restarts),
            wait_for_expiry=args.wait_for_expiry,
            timeout=args.timeout or 900 + args.minutes * 90))
    from simulator.host import run_instance

    run_instance(args.index, args.threads, args.lock_seconds, args.sweep_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
