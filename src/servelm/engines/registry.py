"""Engine types: one home for building an engine from its catalog entry.

An engine type is one module and one line in ``ENGINE_TYPES``. The module defines
``build(spec, settings) -> Engine``; a type whose engine holds the model in this
machine's memory (llama.cpp: in a process the engine starts) also defines
``footprint(spec, settings) -> int | None`` (bytes it will take once loaded), which
makes it *local*: the model pool (``engines.pool``) loads it on demand, counts it
against the memory budget and unloads it when idle. A type without ``footprint`` (a
remote server) is started once and kept.

Modules are imported when first used, so naming llama.cpp here costs nothing to a
process that never loads a local model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from servelm.catalog.specs import ModelSpec
    from servelm.config import Settings
    from servelm.engines.base import Engine

EngineFactory = Callable[["ModelSpec", "Settings"], "Engine"]

# engine = "<name>" in the models file → the module that builds it.
ENGINE_TYPES: dict[str, str] = {
    "llama.cpp": "servelm.engines.llamacpp",
    "openai": "servelm.engines.upstream",
}


def register(name: str, module: str) -> None:
    """Add an engine type (what a line in ``ENGINE_TYPES`` does, for plug-ins and tests)."""
    ENGINE_TYPES[name] = module


def engine_types() -> list[str]:
    return sorted(ENGINE_TYPES)


def _module(name: str) -> ModuleType:
    try:
        path = ENGINE_TYPES[name]
    except KeyError:
        known = ", ".join(engine_types())
        raise ValueError(f"unknown engine type {name!r} (known: {known})") from None
    return importlib.import_module(path)


def build_engine(spec: ModelSpec, settings: Settings) -> Engine:
    """The engine a catalog entry names, not yet started; ModelUnavailable when it
    cannot run here (e.g. its weights are not installed)."""
    engine: Engine = _module(spec.engine).build(spec, settings)
    return engine


def is_local(spec: ModelSpec) -> bool:
    """Whether the model's engine holds it in this machine's memory (a local model)."""
    return hasattr(_module(spec.engine), "footprint")


def footprint(spec: ModelSpec, settings: Settings) -> int | None:
    """Bytes a local model takes once loaded (an estimate), None when unknown."""
    estimate = getattr(_module(spec.engine), "footprint", None)
    return None if estimate is None else estimate(spec, settings)
