"""``python -m simulator``: the demo, a single simulated instance, or the read API server."""

from __future__ import annotations

import argparse
import sys

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
    from simulator.host import run_instance

    run_instance(args.index, args.threads, args.lock_seconds, args.sweep_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
