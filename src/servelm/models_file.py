"""The models file (``servelm.toml``) and the built-in catalog entries.

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
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from servelm.catalog import Catalog, ModelSpec, default_spec


class ConfigError(Exception):
    """A bad models file; the message names the file, the entry and the field."""


def builtin_specs(models_dir: Path) -> list[ModelSpec]:
    """The default model and the three models the Segmind pages sell.

    The seed models' weights are tens of GB and are not fetched by default; until an
    operator pulls them (or points ``path`` at a copy), they are listed as unavailable.
    Prices are credits per million tokens, and an operator's to change.
    """
    return [
        default_spec(models_dir),
        ModelSpec(
            slug="llama-v3p1-8b-instruct",
            aliases=("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
            hf_repo="bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
            hf_files=("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",),
            context_window=131072,
            default_max_tokens=1024,
            max_output_tokens=8192,
            input_price=Decimal("0.2"),
            output_price=Decimal("0.2"),
            tools=True,
            owned_by="meta-llama",
            display_name="Llama 3.1 8B Instruct",
            description=(
                "Meta's **Llama 3.1** in its 8-billion-parameter instruction-tuned version: a "
                "dense transformer tuned for dialogue, with a 128K-token context and native "
                "tool calling. A strong general model that fits one consumer GPU "
                "(4-bit `Q4_K_M` weights, 4.9 GB)."
            ),
            features=(
                "131,072-token context window",
                "Tool calls (function calling)",
                "Multilingual: English, German, French, Italian, Portuguese, Hindi, Spanish "
                "and Thai",
                "Open weights (Llama 3.1 Community License)",
            ),
        ),
        ModelSpec(
            slug="mixtral-8x7b-instruct",
            aliases=("mistralai/Mixtral-8x7B-Instruct-v0.1",),
            hf_repo="TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF",
            hf_files=("mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf",),
            context_window=32768,
            default_max_tokens=1024,
            max_output_tokens=8192,
            input_price=Decimal("0.6"),
            output_price=Decimal("0.6"),
            system_role="first_user",
            merge_consecutive=True,
            owned_by="mistralai",
            display_name="Mixtral 8x7B Instruct",
            description=(
                "Mistral AI's **sparse mixture of experts**: each layer has 8 expert "
                "networks and a router sends every token through 2 of them, so of its 46.7B "
                "parameters only about 12.9B work on each token. It answers like a much "
                "larger dense model at the speed and cost of a small one."
            ),
            features=(
                "Sparse mixture of experts (8 experts, 2 active per token)",
                "32,768-token context window",
                "English, French, Italian, German and Spanish; strong at code",
                "Open weights (Apache 2.0)",
            ),
        ),
        ModelSpec(
            slug="mixtral-8x22b-instruct",
            aliases=("mistralai/Mixtral-8x22B-Instruct-v0.1",),
            hf_repo="MaziyarPanahi/Mixtral-8x22B-Instruct-v0.1-GGUF",
            hf_files=tuple(
                f"Mixtral-8x22B-Instruct-v0.1.Q4_K_M-0000{i}-of-00005.gguf" for i in range(1, 6)
            ),
            context_window=65536,
            default_max_tokens=1024,
            max_output_tokens=8192,
            input_price=Decimal("1.2"),
            output_price=Decimal("1.2"),
            system_role="last_user",
            merge_consecutive=True,
            owned_by="mistralai",
            display_name="Mixtral 8x22B Instruct",
            description=(
                "The larger **sparse mixture of experts** from Mistral AI: 141B parameters, "
                "of which about 39B are active for each token (2 of 8 experts per layer). "
                "Fluent in five languages and strong at mathematics and code, with a "
                "64K-token context."
            ),
            features=(
                "Sparse mixture of experts (8 experts, 2 active per token)",
                "65,536-token context window",
                "English, French, Italian, German and Spanish",
                "Strong at mathematics and coding",
                "Open weights (Apache 2.0)",
            ),
        ),
    ]


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
    if models_file is not None:
        for spec in _read_file(models_file, specs, models_dir):
            specs[spec.slug] = spec
    catalog_specs = [s for s in specs.values() if s.enabled]
    _check_unique_names(catalog_specs, models_file)
    return Catalog(catalog_specs)


def _read_file(path: Path, builtins: dict[str, ModelSpec], models_dir: Path) -> list[ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such models file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    # [plans.*] belong to servelm.ratelimit.policy.
    unknown = set(data) - {"models", "plans"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{sorted(unknown)[0]}'")
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
