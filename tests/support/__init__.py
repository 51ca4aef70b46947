"""Test instruments that ship with servelm: tiny model generators, a standalone engine."""
