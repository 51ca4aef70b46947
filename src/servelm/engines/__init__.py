"""Engines: the narrow seam between the gateway and whatever generates tokens, who
is admitted to them (``admission.py``), which are loaded (``pool.py``), and the
replicas of a remote one (``fleet/``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servelm.engines.base import Engine, EngineStats

__all__ = ["Engine", "EngineStats"]


def __getattr__(name: str) -> object:
    # Imported when first asked for: a model's process (``llamacpp_process``) lives in
    # this package and must not pay for the engine interface's imports (pydantic's
    # among them: 26 MB resident in every loaded model's process).
    if name in __all__:
        from servelm.engines import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
