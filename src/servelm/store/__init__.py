"""Persistence: tables, the database handle, migrations."""

from servelm.store.db import Database

__all__ = ["Database"]
