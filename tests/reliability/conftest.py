"""The reliability suite's count: every test here is a bad input (test_bad_*.py: a clear error
naming the culprit, nothing partial left) or a fault (test_faults.py: real servers failing
mid-work, nothing lost, a re-run completes). The summary line goes into the README."""

from __future__ import annotations

from pathlib import Path

import pytest

KINDS = {"test_bad_": "bad_input", "test_faults": "fault"}
_outcomes: dict[str, dict[str, int]] = {"bad_input": {}, "fault": {}}


def kind_of(path: Path) -> str | None:
    return next((kind for prefix, kind in KINDS.items() if path.name.startswith(prefix)), None)


def pytest_collection_modifyitems(items):
    for item in items:
        kind = kind_of(Path(str(item.fspath)))
        if kind:
            item.add_marker(getattr(pytest.mark, kind))


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    kind = kind_of(Path(report.fspath))
    if kind:
        counts = _outcomes[kind]
        counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    bad, faults = _outcomes["bad_input"], _outcomes["fault"]
    if not bad and not faults:
        return
    failed = bad.get("failed", 0) + faults.get("failed", 0)
    terminalreporter.write_line(
        f"reliability: {bad.get('passed', 0)} bad inputs refused clearly / "
        f"{faults.get('passed', 0)} faults survived / "
        + ("data lost: 0" if not failed else f"{failed} FAILED: see above")
    )
