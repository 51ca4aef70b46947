"""The models file (``servelm.toml``): models and plans, read once into the catalog.

Each ``[models.<slug>]`` table is one model; its keys are ``ModelSpec`` fields. An
entry whose slug is built in overrides only the fields it names, so serving the real
Llama 3.1 8B is one line: its ``path``. Example::

    [models.llama-v3p1-8b-instruct]
    path = "/srv/models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"

    [models.my-vllm]
    engine = "openai"
    base_url = "http://10.0.0.7:8000/v1"
    upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
    context_window = 131072
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from servelm.catalog.builtins import builtin_specs
from servelm.catalog.specs import Catalog, ModelSpec, Plan
from servelm.engines.registry import ENGINE_TYPES, engine_types


class ConfigError(Exception):
    """A bad models file; the message names the file, the entry and the field."""


def _resolve_paths(spec: ModelSpec, models_dir: Path, base: Path) -> ModelSpec:
    """Relative weights paths resolve against the models dir; a pulled model's default
    path is its first file there."""
    updates: dict[str, Any] = {}
    if spec.engine == "llama.cpp" and spec.path is None and spec.hf_files:
        updates["path"] = models_dir / spec.hf_files[0]
    elif spec.path is not None and not spec.path.is_absolute():
        updates["path"] = (base / spec.path).resolve()
    if spec.mmproj is not None and not spec.mmproj.is_absolute():
        updates["mmproj"] = (base / spec.mmproj).resolve()
    if spec.mmproj is not None and not spec.vision:
        updates["vision"] = True  # a projector is what lets a llama.cpp model see
    return spec.model_copy(update=updates) if updates else spec


def _check_engine_fields(where: str, spec: ModelSpec) -> None:
    if spec.engine not in ENGINE_TYPES:
        known = ", ".join(engine_types())
        raise ConfigError(f"{where}.engine: unknown engine type {spec.engine!r} (known: {known})")
    if spec.engine == "openai" and not (spec.base_url or spec.replicas):
        raise ConfigError(f'{where}.base_url: required when engine = "openai" (or replicas)')
    if spec.engine == "llama.cpp" and spec.path is None:
        raise ConfigError(f"{where}.path: a llama.cpp model needs path or hf_repo + hf_files")
    if spec.engine == "llama.cpp" and spec.vision and spec.mmproj is None:
        raise ConfigError(f"{where}.vision: a llama.cpp model sees images through an mmproj file")
    if spec.default_max_tokens > spec.max_output_tokens:
        raise ConfigError(f"{where}.default_max_tokens: above max_output_tokens")
    if spec.max_output_tokens > spec.context_window:
        raise ConfigError(f"{where}.max_output_tokens: above context_window")


def load_catalog(models_dir: Path, models_file: Path | None = None) -> Catalog:
    """Built-in entries, overlaid with the models file's; raises ConfigError."""
    specs = {s.slug: _resolve_paths(s, models_dir, models_dir) for s in builtin_specs(models_dir)}
    plans: dict[str, Plan] = {}
    if models_file is not None:
        data = _read_toml(models_file)
        for spec in _model_specs(data, models_file, specs, models_dir):
            specs[spec.slug] = spec
        plans = _plans(data, models_file)
    catalog_specs = [s for s in specs.values() if s.enabled]
    _check_unique_names(catalog_specs, models_file)
    return Catalog(catalog_specs, plans)


def load_plans(models_file: Path | None) -> dict[str, Plan]:
    """Only the ``[plans.*]`` tables (for commands that need no model)."""
    if models_file is None or not models_file.is_file():
        return {}
    return _plans(_read_toml(models_file), models_file)


def _plans(data: dict[str, Any], path: Path) -> dict[str, Plan]:
    tables = data.get("plans", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: 'plans' must be a table of [plans.<name>] tables")
    plans: dict[str, Plan] = {}
    for name, entry in tables.items():
        try:
            plans[name] = Plan.model_validate(entry)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or "?"
            raise ConfigError(f"{path}: plans.{name}.{field}: {err['msg']}") from None
    return plans


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such models file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"models", "plans"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{sorted(unknown)[0]}'")
    return data


def _model_specs(
    data: dict[str, Any], path: Path, builtins: dict[str, ModelSpec], models_dir: Path
) -> list[ModelSpec]:
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: 'models' must be a table of [models.<slug>] tables")
    out: list[ModelSpec] = []
    for slug, entry in tables.items():
        where = f"{path}: models.{slug}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a table")
        dotted = _dotted_slug(slug, entry)
        if dotted is not None:
            raise ConfigError(
                f"{path}: models.{dotted}: TOML reads the dots as nested tables; quote the "
                f'model name: [models."{dotted}"]'
            )
        if "slug" in entry:
            raise ConfigError(f"{where}.slug: the slug is the table name; remove this key")
        base = builtins[slug].model_dump(exclude_unset=True) if slug in builtins else {}
        if slug in builtins and {"path", "engine", "hf_files"} & set(entry):
            # A new location replaces the built-in download source.
            base.pop("path", None)
        _derive_limits(base, entry)
        fields = {**base, **entry, "slug": slug}
        try:
            spec = ModelSpec.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or "?"
            raise ConfigError(f"{where}.{field}: {err['msg']}") from None
        spec = _resolve_paths(spec, models_dir, path.parent)
        if spec.enabled:
            _check_engine_fields(where, spec)
        out.append(spec)
    return out


def _dotted_slug(slug: str, entry: dict[str, Any]) -> str | None:
    """``[models.qwen2.5-7b]`` is the table ``models.qwen2`` holding ``5-7b``: an entry
    with no field of its own and only tables inside is such a name; return it whole."""
    if not entry or set(entry) & set(ModelSpec.model_fields):
        return None
    if len(entry) != 1 or not all(isinstance(v, dict) for v in entry.values()):
        return None
    ((inner, value),) = entry.items()
    deeper = _dotted_slug(inner, value)
    return f"{slug}.{deeper or inner}"


def _derive_limits(base: dict[str, Any], entry: dict[str, Any]) -> None:
    """A built-in's output limits follow an override of the window (or of the output
    limit) unless the entry sets them too: ``context_window = 4096`` alone must not
    fail on a max_output_tokens of 8192 the user never wrote."""
    if "context_window" in entry and "max_output_tokens" not in entry:
        window = entry["context_window"]
        if isinstance(window, int) and "max_output_tokens" in base:
            base["max_output_tokens"] = min(base["max_output_tokens"], window)
    if "default_max_tokens" not in entry and "default_max_tokens" in base:
        limit = entry.get("max_output_tokens", base.get("max_output_tokens"))
        if isinstance(limit, int):
            base["default_max_tokens"] = min(base["default_max_tokens"], limit)


def _check_unique_names(specs: list[ModelSpec], models_file: Path | None) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        for name in spec.names():
            if name in seen and seen[name] != spec.slug:
                raise ConfigError(
                    f"{models_file or 'catalog'}: models.{spec.slug}.aliases: '{name}' "
                    f"is already a name of models.{seen[name]}"
                )
            seen[name] = spec.slug
