"""A bad setting stops the app when the host indexes it, with a message that says the fix; the
functions it registers are today's with one intake queue, one more queue trigger per extra queue
(``INTAKE_QUEUES``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulator import REPO_ROOT


@pytest.mark.parametrize(("name", "value", "says"), [
    ("LEASE_SECONDS", "90", "LEASE_SECONDS=90 is out of range; set it between 15 and 60"),
    ("RENEW_INTERVAL_SECONDS", "55", "must be greater than RENEW_INTERVAL_SECONDS"),
    ("DRAIN_BUDGET_SECONDS", "600", "DRAIN_BUDGET_SECONDS=600 is out of range"),
])
def test_indexing_the_app_fails_fast_on_a_bad_setting(name: str, value: str, says: str) -> None:
    env = {**os.environ, name: value}
    run = subprocess.run([sys.executable, "-c", "import function_app"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "ConfigError" in run.stderr
    assert says in run.stderr


def test_indexing_succeeds_with_the_defaults() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LEASE_SECONDS"}
    run = subprocess.run([sys.executable, "-c", "import function_app"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr


TODAYS_FUNCTIONS = {
    "record_completion": ("queueTrigger", "%COMPLETIONS_QUEUE_NAME%"),
    "wake_up": ("queueTrigger", "%WAKEUP_QUEUE_NAME%"),
    "sweep": ("timerTrigger", None),
    "reconcile": ("timerTrigger", None),
    "reshard": ("httpTrigger", None),
    "get_account": ("httpTrigger", None),
    "get_request": ("httpTrigger", None),
    "get_leader": ("httpTrigger", None),
    "get_status_page": ("httpTrigger", None),
    "get_metrics": ("httpTrigger", None),
}

# Prints each function as indexed: name, trigger type, queue binding expression.
_LIST_FUNCTIONS = (
    "import json, function_app\n"
    "print(json.dumps([(f.get_function_name(), f.get_trigger().type,\n"
    "                   getattr(f.get_trigger(), 'queue_name', None))\n"
    "                  for f in function_app.app.get_functions()]))\n"
)


def _indexed(python: str, **settings: str) -> dict[str, tuple[str, str | None]]:
    env = {**os.environ, **settings, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([python, "-c", _LIST_FUNCTIONS], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    return {name: (kind, queue) for name, kind, queue in json.loads(run.stdout)}


def test_one_intake_queue_registers_exactly_todays_functions() -> None:
    assert _indexed(sys.executable) == TODAYS_FUNCTIONS
    assert _indexed(sys.executable, INTAKE_QUEUES="1") == TODAYS_FUNCTIONS


def test_three_intake_queues_add_one_trigger_per_extra_queue() -> None:
    assert _indexed(sys.executable, INTAKE_QUEUES="3") == {
        **TODAYS_FUNCTIONS,
        "record_completion_1": ("queueTrigger", "%COMPLETIONS_QUEUE_NAME%-1"),
        "record_completion_2": ("queueTrigger", "%COMPLETIONS_QUEUE_NAME%-2"),
    }


def test_a_base_name_too_long_for_the_queues_stops_indexing() -> None:
    env = {**os.environ, "COMPLETIONS_QUEUE_NAME": "c" * 55, "INTAKE_QUEUES": "3"}
    run = subprocess.run([sys.executable, "-c", "import function_app"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "ConfigError" in run.stderr
    assert "shorten or fix COMPLETIONS_QUEUE_NAME" in run.stderr


# The Python worker's own indexer (azure-functions-runtime, Python 3.13), where it is installed:
# the function metadata the host receives at start-up, each function's parameters checked
# against its bindings as the worker checks them.
RUNTIME_PYTHON = Path("/tmp/rt313/bin/python")
_RUNTIME_INDEX = (
    "import json\n"
    "from types import SimpleNamespace\n"
    "from azure_functions_runtime.bindings.meta import load_binding_registry\n"
    "from azure_functions_runtime.functions import Registry\n"
    "from azure_functions_runtime.loader import index_function_app\n"
    "load_binding_registry()\n"
    "protos = SimpleNamespace(BindingInfo=SimpleNamespace(in_=0, out=1, inout=2,\n"
    "                                                     undefined=None))\n"
    "registry, found = Registry(), []\n"
    "for fn in index_function_app('function_app.py'):\n"
    "    info = registry.add_indexed_function(function=fn, protos=protos)\n"
    "    raw = [json.loads(b) for b in fn.get_raw_bindings()]\n"
    "    trigger = next(b for b in raw if b['type'].endswith('Trigger'))\n"
    "    found.append((info.name, trigger['type'], trigger.get('queueName'),\n"
    "                  {k: v.pytype.__name__ for k, v in info.input_types.items()}))\n"
    "print(json.dumps(found))\n"
)


@pytest.mark.skipif(not RUNTIME_PYTHON.is_file(), reason="azure-functions-runtime venv absent")
def test_the_worker_indexes_one_trigger_per_intake_queue() -> None:
    env = {**os.environ, "INTAKE_QUEUES": "3", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([str(RUNTIME_PYTHON), "-c", _RUNTIME_INDEX], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    queues = {name: (queue, params) for name, kind, queue, params in json.loads(run.stdout)
              if kind == "queueTrigger"}
    assert queues == {
        "record_completion": ("%COMPLETIONS_QUEUE_NAME%", {"msg": "QueueMessage"}),
        "record_completion_1": ("%COMPLETIONS_QUEUE_NAME%-1", {"msg": "QueueMessage"}),
        "record_completion_2": ("%COMPLETIONS_QUEUE_NAME%-2", {"msg": "QueueMessage"}),
        "wake_up": ("%WAKEUP_QUEUE_NAME%", {"msg": "QueueMessage"}),
    }
