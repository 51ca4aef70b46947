"""The README's generated tables: settings (from ``config.Settings``) and the request
conformance table (from ``request_fields``). Each sits between two markers;
``python -m servelm.cli.docs_tables README.md`` (``make readme``) rewrites them, and a
test fails while the README differs from what this would write."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from servelm.chat.request_fields import conformance_table
from servelm.config import settings_table

TABLES: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "conformance": conformance_table,
}


def render(readme: str) -> str:
    """``readme`` with every generated table brought up to date."""
    for name, make in TABLES.items():
        pattern = re.compile(
            rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.DOTALL
        )
        if not pattern.search(readme):
            raise ValueError(f"README has no <!-- table:{name} --> markers")
        readme = pattern.sub(_filler(make()), readme)
    return readme


def _filler(table: str) -> Callable[[re.Match[str]], str]:
    def fill(m: re.Match[str]) -> str:
        return m.group(1) + table + "\n" + m.group(2)

    return fill


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "README.md")
    path.write_text(render(path.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
