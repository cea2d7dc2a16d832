"""The CLIs' help: every option explains itself and its default, choices come from the contract,
``prog`` is what a user types, internal commands stay out of sight."""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterator

import pytest

from operator_cli import cli
from shared.domain.contract import Operation, StepStatus
from simulator import __main__ as sim
from simulator.demo import DemoOptions, run_log_path


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """A parser and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from parsers(child)


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            yield action


ALL = [*parsers(cli.build_parser()), *parsers(sim.build_parser())]


@pytest.mark.parametrize("parser", ALL, ids=lambda p: p.prog)
def test_every_option_explains_itself_and_shows_its_default(
        parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    for action in options(parser):
        assert action.help, f"{parser.prog} {action.dest} has no help"
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in " ".join(text.split()), (
                f"{parser.prog} {action.option_strings[0]} hides its default")


def test_prog_is_the_command_a_user_types() -> None:
    progs = {p.prog for p in parsers(cli.build_parser())}
    assert {"./dev cli", "./dev cli enqueue", "./dev cli parked list",
            "./dev cli poison replay", "./dev cli balance"} <= progs
    assert sim.build_parser().prog == "./dev sim"


def test_choices_come_from_the_contract() -> None:
    [enqueue] = [p for p in parsers(cli.build_parser()) if p.prog == "./dev cli enqueue"]
    by_dest = {action.dest: action for action in enqueue._actions}
    assert by_dest["operation"].choices == [o.value for o in Operation]
    assert by_dest["status"].choices == [s.value for s in StepStatus]
    assert by_dest["status"].default == StepStatus.SUCCEEDED.value
    assert set(by_dest) >= {field for _, field, _ in cli.FLAG_FIELDS}


def test_help_goes_to_stdout_and_exits_0() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["enqueue", "--help"], environ={}, stdout=out, stderr=err) == 0
    assert out.getvalue().startswith("usage: ./dev cli enqueue")
    assert "{add_funds,withdraw_funds}" in out.getvalue()
    assert err.getvalue() == ""


def test_the_internal_instance_command_is_not_in_the_public_help() -> None:
    parser = sim.build_parser()
    assert not re.search(r"\binstance\b", parser.format_help())
    args = parser.parse_args(["instance", "--index", "3"])  # still there for the demo
    assert (args.command, args.index, args.threads) == ("instance", 3, 4)


def test_demo_defaults_are_the_demo_options_defaults() -> None:
    demo = sim.build_parser().parse_args(["demo"])
    defaults = DemoOptions()
    assert (demo.instances, demo.transfers, demo.seed) == (
        defaults.instances, defaults.transfers, defaults.seed)


def test_each_demo_run_logs_to_a_file_of_its_own() -> None:
    first, second = run_log_path(), run_log_path()
    assert first != second
    assert first.parent != second.parent
    assert first.parent.name.startswith("ledger-demo-")
    assert first.parent.is_dir()
    assert not first.exists(), "nothing of an earlier run is in it"
    for path in (first, second):
        path.parent.rmdir()
