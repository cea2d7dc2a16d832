"""``python -m simulator`` (``./dev sim``, ``./dev demo``): the demo, or one simulated instance."""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys

from shared.config.names import MAX_INTAKE_QUEUES, MAX_SHARDS
from simulator.chaos import ChaosOptions, run_chaos
from simulator.demo import DemoOptions, run_demo

DEFAULTS = DemoOptions()
CHAOS = ChaosOptions()


def configure_logging(command: str, index: int | None = None) -> None:
    """Logging for this process, set once here (the entry point) and nowhere else.

    An instance logs to its stderr, which the supervisor sends to the run's log file; its level
    is ``SIM_LOG_LEVEL`` (WARNING by default). The demo itself logs warnings to stderr.
    """
    if command == "instance":
        logging.basicConfig(level=os.environ.get("SIM_LOG_LEVEL", "WARNING").upper(),
                            format=f"%(asctime)s i{index} %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    """The command line of the simulator (``instance`` is internal: not in the help)."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="./dev sim", formatter_class=formatter,
                                     description="Scale-out simulator of the ledger app.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", formatter_class=formatter,
                               help="generated workload through N instances, checked",
                               description="A generated workload through N simulated "
                                           "instances, then an independent check.")
    demo.add_argument("--instances", type=int, default=DEFAULTS.instances,
                      help="instance processes to run")
    demo.add_argument("--accounts", type=int, default=DEFAULTS.accounts,
                      help="accounts the workload funds and moves money between")
    demo.add_argument("--transfers", type=int, default=DEFAULTS.transfers,
                      help="two-leg transfer requests to send (after one deposit per account)")
    demo.add_argument("--malformed", type=int, default=DEFAULTS.malformed,
                      help="malformed messages mixed in (they must end parked)")
    demo.add_argument("--seed", type=int, default=DEFAULTS.seed,
                      help="random seed of the workload (same seed, same messages)")
    demo.add_argument("--timeout", type=float, default=DEFAULTS.timeout,
                      help="seconds before giving up")
    demo.add_argument("--sweep-seconds", type=float, default=DEFAULTS.sweep_seconds,
                      help="timer period of the sweeper (60 in Azure)")
    demo.add_argument("--connection-string", default=None,
                      help="use this storage instead of a private in-memory Azurite")
    demo.add_argument("--kill-leader", action="store_true",
                      help="SIGKILL the leading instance a third of the way in (15 s lease)")
    demo.add_argument("--serve", action="store_true",
                      help="keep serving the read API after the summary, until Ctrl-C")
    demo.add_argument("--shards", type=_shards, default=DEFAULTS.shards,
                      help="LEDGER_SHARDS of the app and its instances (1-64); with more than "
                           "one, transfers cross shards and the summary has a line per shard")
    demo.add_argument("--queues", type=_queues, default=DEFAULTS.queues,
                      help="INTAKE_QUEUES: spread the messages over this many intake queues "
                           "(1-16; message n to queue n mod Q)")

    chaos = commands.add_parser("chaos", formatter_class=formatter,
                                help="the chaos run: a workload under injected faults, checked",
                                description="A generated workload through N instances and K "
                                            "ledger shards while instances are killed and "
                                            "paused (leaders also at each step of the "
                                            "cross-shard protocol), leases are broken, storage "
                                            "restarts and storage calls fail; then independent "
                                            "checks (docs/reliability.md).")
    chaos.add_argument("--seed", type=int, default=None,
                       help="replay a run (default: a new random seed, printed first)")
    chaos.add_argument("--minutes", type=float, default=CHAOS.minutes,
                       help="feed the requests over this many minutes (0: all at once)")
    chaos.add_argument("--instances", type=int, default=CHAOS.instances,
                       help="instance processes to run")
    chaos.add_argument("--shards", type=int, default=CHAOS.shards,
                       help="LEDGER_SHARDS of every instance (1-64)")
    chaos.add_argument("--accounts", type=int, default=CHAOS.accounts,
                       help="funded accounts the requests move money between")
    chaos.add_argument("--requests", type=int, default=None,
                       help="requests under chaos (default 2000, or 700 per minute fed)")
    chaos.add_argument("--leader-kills", type=int, default=None,
                       help=f"SIGKILLs of the leader mid-drain ({CHAOS.leader_kills} per 4 "
                            "minutes fed)")
    chaos.add_argument("--step-kills", type=int, default=None,
                       help=f"leaders killed right before or after a cross-shard protocol step "
                            f"({CHAOS.step_kills} per 4 minutes: every step, before and after)")
    chaos.add_argument("--random-kills", type=int, default=None,
                       help=f"SIGKILLs of random instances ({CHAOS.random_kills} per 4 minutes)")
    chaos.add_argument("--breaks", type=int, default=None,
                       help=f"lease breaks while a leader holds it ({CHAOS.breaks} per 4 minutes)")
    chaos.add_argument("--pauses", type=int, default=None,
                       help=f"leaders SIGSTOPped past their lease ({CHAOS.pauses} per 4 minutes)")
    chaos.add_argument("--storage-restarts", type=int, default=None,
                       help=f"Azurite stops and restarts ({CHAOS.storage_restarts} per 4 minutes)")
    chaos.add_argument("--request-timeout", type=int, default=CHAOS.request_timeout,
                       help="REQUEST_TIMEOUT_SECONDS of the instances: late duplicates are "
                            "settled by then")
    chaos.add_argument("--duplicate-spread", type=int, default=CHAOS.duplicate_spread,
                       help="a duplicate step arrives up to this many messages after its original")
    chaos.add_argument("--wait-for-expiry", action="store_true",
                       help="let a killed or paused leader's lease expire instead of breaking it")
    chaos.add_argument("--timeout", type=float, default=None,
                       help="give up after this many seconds, the whole run (default 900 + 90 "
                            "per minute fed)")

    # Internal: the demo starts its instances with this; no help= keeps it out of --help.
    instance = commands.add_parser("instance", formatter_class=formatter)
    instance.add_argument("--index", type=int, required=True, help="instance number")
    instance.add_argument("--threads", type=int, default=4, help="concurrent invocations")
    instance.add_argument("--lock-seconds", type=float, default=30,
                          help="visibility timeout while a message is being processed")
    instance.add_argument("--sweep-seconds", type=float, default=None,
                          help="run the timer-triggered sweeper this often (none: never)")
    return parser


def _shards(text: str) -> int:
    value = _positive(text)
    if value > MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"a ledger has 1 to {MAX_SHARDS} shards")
    return value


def _queues(text: str) -> int:
    value = _positive(text)
    if value > MAX_INTAKE_QUEUES:
        raise argparse.ArgumentTypeError(f"INTAKE_QUEUES is 1 to {MAX_INTAKE_QUEUES}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return value


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _chaos_options(args: argparse.Namespace) -> ChaosOptions:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    scale = max(1.0, args.minutes / 4)

    def count(given: int | None, default: int) -> int:
        return given if given is not None else round(default * scale)

    return ChaosOptions(
        seed=seed, instances=args.instances, accounts=args.accounts, shards=args.shards,
        requests=args.requests or max(2000, int(700 * args.minutes)), minutes=args.minutes,
        leader_kills=count(args.leader_kills, CHAOS.leader_kills),
        step_kills=count(args.step_kills, CHAOS.step_kills),
        random_kills=count(args.random_kills, CHAOS.random_kills),
        breaks=count(args.breaks, CHAOS.breaks), pauses=count(args.pauses, CHAOS.pauses),
        storage_restarts=count(args.storage_restarts, CHAOS.storage_restarts),
        wait_for_expiry=args.wait_for_expiry, request_timeout=args.request_timeout,
        duplicate_spread=args.duplicate_spread,
        timeout=args.timeout or 900 + args.minutes * 90)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it."""
    args = build_parser().parse_args(argv)
    configure_logging(args.command, getattr(args, "index", None))
    if args.command == "demo":
        # SIGTERM unwinds like Ctrl-C, so the instances and the private Azurite are stopped.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return run_demo(DemoOptions(
                instances=args.instances, accounts=args.accounts, transfers=args.transfers,
                malformed=args.malformed, seed=args.seed, timeout=args.timeout,
                sweep_seconds=args.sweep_seconds, connection_string=args.connection_string,
                serve_after=args.serve, kill_leader=args.kill_leader, shards=args.shards,
                queues=args.queues))
        except KeyboardInterrupt:
            print("interrupted: instances and Azurite stopped", file=sys.stderr)
            return 130
    if args.command == "chaos":
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return run_chaos(_chaos_options(args))
        except KeyboardInterrupt:
            print("interrupted: instances and Azurite stopped", file=sys.stderr)
            return 130
    from simulator.host import run_instance

    run_instance(args.index, args.threads, args.lock_seconds, args.sweep_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
