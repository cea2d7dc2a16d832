"""checkov over infra/ (one run for the whole folder): no parsing error, no failed check, the
custom checks of infra/checkov/ loaded and passing, and every suppression justified, used and
written down in docs/deploy.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from simulator import REPO_ROOT
from tests.infra.bicep_model import INFRA, bicep_files

CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
EXTERNAL_CHECKS = INFRA / "checkov"
CUSTOM_CHECK_IDS = {f"CKV_LEDGER_{n}" for n in range(1, 8)}
DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"
SKIP_COMMENT = re.compile(r"checkov:skip=([A-Z0-9_]+)\s*:\s*(\S.*)")


@dataclass(frozen=True)
class CheckovRun:
    """The JSON report of checkov's Bicep framework."""

    summary: dict[str, Any]
    results: dict[str, list[dict[str, Any]]]
    exit_code: int
    stderr: str

    def ids(self, outcome: str) -> set[str]:
        return {check["check_id"] for check in self.results[f"{outcome}_checks"]}


@pytest.fixture(scope="module")
def checkov() -> CheckovRun:
    if not CHECKOV.is_file():
        pytest.fail(f"{CHECKOV.relative_to(REPO_ROOT)} is missing: run ./dev bootstrap "
                    "(it installs requirements-checkov.txt into .venv-checkov/)")
    command = [str(CHECKOV), "--skip-download", "--framework", "bicep",
               "--directory", str(INFRA.relative_to(REPO_ROOT)),
               "--external-checks-dir", str(EXTERNAL_CHECKS.relative_to(REPO_ROOT)),
               "--output", "json"]
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                          env=env, check=False)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov gave no JSON report (exit {done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    reports = report if isinstance(report, list) else [report]
    bicep = [r for r in reports if r.get("check_type") == "bicep"]
    if len(bicep) != 1:
        pytest.fail(f"no Bicep report from checkov (exit {done.returncode}): {done.stdout[:2000]}"
                    f"\n{done.stderr[-2000:]}")
    return CheckovRun(bicep[0]["summary"], bicep[0]["results"], done.returncode, done.stderr)


def test_checkov_parses_every_bicep_file(checkov: CheckovRun) -> None:
    assert checkov.summary["parsing_errors"] == 0, checkov.results.get("parsing_errors")
    assert not checkov.results.get("parsing_errors")
    scanned = {check["file_path"].lstrip("/") for outcome in ("passed", "failed", "skipped")
               for check in checkov.results[f"{outcome}_checks"]}
    # Every module but identity.bicep (no check applies to a bare user-assigned identity).
    checked = {str(path.relative_to(INFRA)) for path in bicep_files()
               if path.parent != INFRA and path.name != "identity.bicep"}
    assert checked <= scanned, f"checkov checked nothing in {sorted(checked - scanned)}"


def test_checkov_has_no_failed_check(checkov: CheckovRun) -> None:
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
              for c in checkov.results["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert checkov.summary["failed"] == 0
    assert checkov.exit_code == 0, f"checkov exited {checkov.exit_code}: {checkov.stderr[-2000:]}"


def test_custom_checks_ran_and_passed(checkov: CheckovRun) -> None:
    missing = sorted(CUSTOM_CHECK_IDS - checkov.ids("passed"))
    assert not missing, f"custom checks that did not run or pass: {missing}"


def _suppressions() -> list[tuple[str, str, str]]:
    """(file, check id, reason) of every checkov:skip comment in infra/."""
    found = []
    for path in bicep_files():
        for line in path.read_text().splitlines():
            if "checkov:skip" in line:
                match = SKIP_COMMENT.search(line)
                assert match, f"{path.name}: a suppression needs `checkov:skip=ID: reason`: {line}"
                found.append((str(path.relative_to(INFRA)), match.group(1), match.group(2)))
    return found


def test_every_skip_has_a_reason_and_is_used(checkov: CheckovRun) -> None:
    for skipped in checkov.results["skipped_checks"]:
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) > 10, f"{skipped['check_id']}: no reason given"
    used = {(c["file_path"].lstrip("/"), c["check_id"]) for c in checkov.results["skipped_checks"]}
    written = {(file, check_id) for file, check_id, _ in _suppressions()}
    assert written == used, f"unused suppressions: {sorted(written - used)}"


def _validation_section() -> str:
    text = DEPLOY_DOC.read_text()
    match = re.search(r"^## Validation\b(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, "docs/deploy.md needs a `## Validation` section"
    return match.group(1)


def test_deploy_doc_states_the_figures_and_suppressions(checkov: CheckovRun) -> None:
    section = _validation_section()
    figures = re.search(r"(\d+) passed, (\d+) failed, (\d+) skipped", section)
    assert figures, "state checkov's figures as `N passed, N failed, N skipped`"
    stated = tuple(int(n) for n in figures.groups())
    actual = (checkov.summary["passed"], checkov.summary["failed"], checkov.summary["skipped"])
    assert stated == actual, f"docs/deploy.md says {stated}, checkov says {actual}"
    for _, check_id, _ in _suppressions():
        assert check_id in section, f"docs/deploy.md does not list the suppression {check_id}"
