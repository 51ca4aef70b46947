"""The fleet tests' one hook: the combination matrix's table, printed at the end."""

from __future__ import annotations

import pytest

# test_matrix.py puts its table's lines here when its module is done.
MATRIX_TABLE = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in terminalreporter.config.stash.get(MATRIX_TABLE, []):
        terminalreporter.write_line(line)
