"""``./dev``: the locked dependency set matches its input files, and the version checks speak.

Offline: the lock files are compared with the ``.in`` files they are compiled from (``./dev
lock`` needs the network; these tests do not), and the venv the tests run in is checked against
the pins, so a tool upgrade cannot slip into CI without a re-lock.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# Every Python minor the lock must serve: requires-python's floor up to the newest Functions has.
PYTHONS = ("3.11", "3.12", "3.13", "3.14")


def requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a requirements file (``-r``/``-c`` lines and comments skipped)."""
    found = []
    for line in path.read_text().splitlines():
        text = line.split(" #", 1)[0].strip()
        if text and not text.startswith(("#", "-")):
            found.append(Requirement(text))
    return found


def pins(path: Path) -> dict[str, list[Requirement]]:
    """A compiled file's pins by package name (a name has one pin per marker branch)."""
    by_name: dict[str, list[Requirement]] = {}
    for requirement in requirements(path):
        by_name.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    return by_name


def pinned_version(requirement: Requirement) -> str:
    [spec] = list(requirement.specifier)
    assert spec.operator == "==", f"{requirement} is not an exact pin"
    return spec.version


def applies(requirement: Requirement, python: str) -> bool:
    if requirement.marker is None:
        return True
    env = {key: str(value) for key, value in default_environment().items()}
    env.update(python_version=python, python_full_version=f"{python}.0")
    return requirement.marker.evaluate(env)


def via_inputs(path: Path) -> Iterator[tuple[str, set[str]]]:
    """(package, the files its ``# via`` annotation names) for each pin of a compiled file."""
    name = ""
    sources: set[str] = set()
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            if name:
                yield name, sources
            name, sources = canonicalize_name(Requirement(line).name), set()
        elif match := re.search(r"#\s+(?:via\s+)?-[rc] (\S+)", line):
            sources.add(match.group(1))
    if name:
        yield name, sources


@pytest.mark.parametrize(("source", "compiled"), [
    ("requirements.in", "requirements.txt"),
    ("requirements-dev.in", "requirements-dev.txt"),
])
def test_the_lock_pins_every_range_of_its_input_for_every_python(source: str,
                                                                 compiled: str) -> None:
    locked = pins(ROOT / compiled)
    wanted = requirements(ROOT / source)
    if source != "requirements.in":  # `-r requirements.in`: the dev set holds the app's too
        wanted += requirements(ROOT / "requirements.in")
    for requirement in wanted:
        for python in PYTHONS:
            if not applies(requirement, python):
                continue
            chosen = [pin for pin in locked.get(canonicalize_name(requirement.name), [])
                      if applies(pin, python)]
            assert len(chosen) == 1, (f"{compiled} has {len(chosen)} pins of {requirement.name} "
                                      f"for Python {python}: run ./dev lock")
            assert requirement.specifier.contains(pinned_version(chosen[0]), prereleases=True), (
                f"{compiled} pins {chosen[0]} but {source} asks for {requirement}: run ./dev lock")


@pytest.mark.parametrize("compiled", ["requirements.txt", "requirements-dev.txt"])
def test_every_pin_is_exact_and_still_wanted(compiled: str) -> None:
    direct = {canonicalize_name(r.name) for source in ("requirements.in", "requirements-dev.in")
              for r in requirements(ROOT / source)}
    for name, sources in via_inputs(ROOT / compiled):
        for requirement in pins(ROOT / compiled)[name]:
            pinned_version(requirement)
        named_in = {s for s in sources if s.endswith(".in")}
        assert not named_in or name in direct, (
            f"{compiled} pins {name} for {sorted(named_in)}, which no longer ask for it: "
            "run ./dev lock")


def test_the_dev_set_tests_exactly_what_azure_installs() -> None:
    app, dev = pins(ROOT / "requirements.txt"), pins(ROOT / "requirements-dev.txt")
    for name, app_pins in app.items():
        assert sorted(map(str, dev.get(name, []))) == sorted(map(str, app_pins)), (
            f"requirements-dev.txt and requirements.txt disagree on {name}: run ./dev lock")


def test_the_venv_holds_the_locked_versions() -> None:
    """What the tests run with is what the lock says (./dev bootstrap installed it)."""
    python = ".".join(map(str, sys.version_info[:2]))
    for name, branches in pins(ROOT / "requirements-dev.txt").items():
        for pin in branches:
            if applies(pin, python) and (pin.marker is None or pin.marker.evaluate()):
                assert metadata.version(name) == pinned_version(pin), (
                    f"{name} {metadata.version(name)} is installed, the lock says "
                    f"{pinned_version(pin)}: run ./dev bootstrap")


def test_python_and_node_floors_agree_with_the_readme_and_azure_functions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = re.fullmatch(r">=(\d+\.\d+)", project["requires-python"])
    assert floor, "requires-python is a plain floor, which ./dev reads"
    assert floor.group(1) == PYTHONS[0]
    readme = (ROOT / "README.md").read_text()
    assert f"Python >= {floor.group(1)}" in readme
    node_min = re.search(r"^NODE_MIN=(\d+)", (ROOT / "dev").read_text(), re.MULTILINE)
    assert node_min, "./dev states NODE_MIN"
    assert f"Node.js >= {node_min.group(1)}" in readme
    # azure-functions 1.x declares Requires-Python < 3.13: each supported Python gets a line.
    functions = [r for r in requirements(ROOT / "requirements.in") if r.name == "azure-functions"]
    for python in PYTHONS:
        [chosen] = [r for r in functions if applies(r, python)]
        major = 2 if python >= "3.13" else 1
        assert chosen.specifier.contains(f"{major}.99"), (python, str(chosen))


def fake_tool(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return directory


def run_dev(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "dev"), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_dev_names_the_node_version_it_needs(tmp_path: Path) -> None:
    old_node = fake_tool(tmp_path / "bin", "node", "echo v18.19.0\n")
    env = {**os.environ, "PATH": f"{old_node}:{os.environ['PATH']}"}
    result = run_dev("bootstrap", env=env)
    assert result.returncode == 2
    assert "error: Node.js >= 20 is required" in result.stderr
    assert "v18.19.0" in result.stderr


def test_dev_names_the_python_version_it_needs(tmp_path: Path) -> None:
    old_python = fake_tool(tmp_path / "bin", "python3.10",
                           '[ "$1" = -V ] && echo "Python 3.10.12"; exit 1\n')
    result = run_dev("bootstrap", env={**os.environ, "PYTHON": str(old_python / "python3.10")})
    assert result.returncode == 2
    assert "error: Python >= 3.11 is required" in result.stderr
    assert "Python 3.10.12" in result.stderr
