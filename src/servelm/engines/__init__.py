"""Engines: the narrow seam between the gateway and whatever generates tokens, who
is admitted to them (``admission.py``), which are loaded (``pool.py``), and the
replicas of a remote one (``fleet/``)."""

from servelm.engines.base import Engine, EngineStats

__all__ = ["Engine", "EngineStats"]
