"""The layers of ``shared/`` hold: import-linter's contracts are kept, and they would catch a
break; there is no import cycle, type-only imports included (docs/design.md, "Code map")."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from simulator import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120, check=False)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "shared", root / "shared",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_are_kept() -> None:
    run = _lint_imports(REPO_ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "broken" not in run.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("shared/domain/money.py", "import azure.core.exceptions", "The domain is pure"),
    ("shared/domain/rules.py", "from shared.storage import completions", "Layers"),
    ("shared/storage/bounded.py", "from shared.leadership import term", "Layers"),
    ("shared/leadership/view.py", "from azure.data.tables import TableClient",
     "Only shared.storage imports the Azure SDKs"),
    ("shared/observability/telemetry.py", "from shared.domain import model",
     "Telemetry takes plain values"),
], ids=["domain imports azure", "domain imports storage", "storage imports leadership",
        "leadership imports an SDK", "telemetry imports the domain"])
def test_a_break_fails_the_check(tmp_path: Path, module: str, line: str, broken: str) -> None:
    root = _copy(tmp_path)
    path = root / module
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "  # noqa\n" + rest)
    run = _lint_imports(root)
    assert run.returncode != 0, run.stdout
    assert broken in run.stdout, run.stdout
    assert "BROKEN" in run.stdout, run.stdout


def test_no_import_cycle_in_shared_type_only_imports_included() -> None:
    graph = grimp.build_graph("shared", exclude_type_checking_imports=False, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append((module, *chain))
    assert cycles == []
