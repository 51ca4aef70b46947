"""Engines: the narrow seam between the gateway and whatever generates tokens."""

from servelm.engines.base import Engine, EngineStats

__all__ = ["Engine", "EngineStats"]
