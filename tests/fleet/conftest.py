"""The fleet tests' hooks: the combination matrix's table, printed at the end.

The matrix runs in whichever process runs its module (``make test`` runs the suite in
several): the table travels to the process that prints the summary on the module's
last report, as a user property, which pytest-xdist carries across.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

# test_matrix.py puts its table's lines here when its module is done.
MATRIX_TABLE = pytest.StashKey[list[str]]()
# tests/conftest.py prints what arrives under this name (the summary is written by the
# first process, which loads only the top conftest).
MATRIX_PROPERTY = "servelm_matrix_table"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    lines = item.config.stash.get(MATRIX_TABLE, None)
    if report.when == "teardown" and lines:
        report.user_properties.append((MATRIX_PROPERTY, "\n".join(lines)))
        item.config.stash[MATRIX_TABLE] = []
    return report
