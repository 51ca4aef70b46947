"""The catalog's typed configuration: what the gateway must know about each model it
serves, and the rate-limit plans it sells.

A spec names the engine that runs the model and everything the gateway needs without
asking the engine: context window, output limits, prices, vision support, replicas.
The ``Catalog`` resolves a slug or alias to a spec and holds the plans. Built-in
entries are in ``builtins.py``; the operator's models file (``models_file.py``) is
read once into this shape and every part (engines, fleet, limiter) takes it from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servelm.billing.money import cost_micro, price_per_million_micro
from servelm.errors import ModelNotFound

DEFAULT_MODEL_SLUG = "smollm2-135m-instruct"

Routing = Literal["prefix", "least_load", "round_robin"]


# A replica URL with this in front names a DNS name whose every address is a replica,
# re-resolved while the gateway runs (``servelm.engines.fleet.discovery``).
DNS_SCHEME = "dns+"


class ReplicaSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # ``http://host:port/v1``, or ``dns+http://name:port/v1``: one replica per address.
    url: str
    api_key: str | None = None
    # Share of the traffic relative to the others (a GPU node next to a CPU one).
    weight: float = Field(default=1.0, gt=0)
    # Requests it runs at once, where it does not say so itself (vLLM: its
    # --max-num-seqs). servelm workers and llama.cpp servers report theirs.
    slots: int | None = Field(default=None, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(DNS_SCHEME):
            return v
        parts = urlsplit(v.removeprefix(DNS_SCHEME))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r}: dns+ takes an http:// or https:// URL with a host name")
        return v

    @property
    def discovered(self) -> bool:
        """Its addresses come from DNS, re-resolved while the gateway runs."""
        return self.url.startswith(DNS_SCHEME)


def coerce_replicas(value: object) -> object:
    """Bare URL strings are replicas without their own key or weight."""
    if isinstance(value, list | tuple):
        return tuple({"url": v} if isinstance(v, str) else v for v in value)
    return value


class Plan(BaseModel):
    """``[plans.<name>]``: requests and tokens per window, requests in flight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)
    concurrency: int | None = Field(default=None, ge=0)
    # Tokens per window of queued work (async requests and batch lines), counted apart
    # from ``tpm``: queued work never uses the interactive budget. None: not limited.
    batch_tpm: int | None = Field(default=None, ge=0)
    # Slots of one model an account may hold at once (servelm.engines.base.SlotShares);
    # None: all but one, so that one account never holds every slot.
    slots: int | None = Field(default=None, ge=1)
    # "per minute" unless the operator says otherwise (tests use a few seconds).
    window: float = Field(default=60.0, gt=0)


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    slug: str
    aliases: tuple[str, ...] = ()
    # An engine type of ``engines.registry`` (checked when the models file is read).
    engine: str = "llama.cpp"
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
    # Several replicas of the same remote engine (servelm.engines.fleet): how requests are
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
    # Batch tokens (OpenAI's Batch API, servelm.jobs) cost the prices times this.
    batch_discount: Decimal = Field(default=Decimal("1"), gt=0, le=1)
    vision: bool = False
    tools: bool = False
    # response_format json_object / json_schema: llama.cpp enforces them with a grammar
    # for any model; a remote entry whose upstream cannot sets this false.
    structured_output: bool = True
    slots: int | None = Field(default=None, gt=0)
    chat_template: str | None = None
    # How system/developer text reaches models whose template has no system role:
    # "native" keeps it, "first_user"/"last_user" merge it into that user turn
    # (Mistral's tokenizer v1 and v3 conventions).
    system_role: Literal["native", "first_user", "last_user"] = "native"
    # Mistral templates demand strict user/assistant alternation.
    merge_consecutive: bool = False
    owned_by: str = "servelm"
    # What the model page and /v1/models say of the model: a name for people, what it
    # is (Markdown), and what it is good at (one Markdown line each).
    display_name: str = ""
    description: str = ""
    features: tuple[str, ...] = ()
    # False leaves the entry out altogether: e.g. a gateway node that only fronts GPU
    # servers and should not load the built-in default model.
    enabled: bool = True
    # A local model (llama.cpp) loads at its first request and unloads after this many
    # seconds without one (``engines.pool``); None takes SERVELM_KEEP_ALIVE, "forever"
    # keeps it loaded from start-up on. ``preload`` loads it at start-up too.
    keep_alive: float | Literal["forever"] | None = None
    preload: bool = False

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: object) -> object:
        # "5m", "30s", "1h" as Ollama writes them; numbers are seconds.
        if isinstance(v, str) and v != "forever":
            units = {"s": 1, "m": 60, "h": 3600}
            if v[-1:] in units and v[:-1].replace(".", "", 1).isdigit():
                return float(v[:-1]) * units[v[-1]]
        return v

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_positive(cls, v: object) -> object:
        if isinstance(v, float) and v < 0:
            raise ValueError("keep_alive must not be negative")
        return v

    @property
    def pinned(self) -> bool:
        """Loaded at start-up and never unloaded for being idle."""
        return self.preload or self.keep_alive == "forever"

    @field_validator("replicas", mode="before")
    @classmethod
    def _replica_urls(cls, v: object) -> object:
        return coerce_replicas(v)

    @field_validator("input_price", "output_price", "batch_discount", mode="before")
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

    def batch_priced(self) -> ModelSpec:
        """This model at its batch prices (sub-micro prices round up, as always)."""
        if self.batch_discount == 1:
            return self
        return self.model_copy(
            update={
                "input_price": self.input_price * self.batch_discount,
                "output_price": self.output_price * self.batch_discount,
            }
        )

    @property
    def title(self) -> str:
        return self.display_name or self.slug

    def names(self) -> tuple[str, ...]:
        return (self.slug, *self.aliases)

    def capabilities(self) -> dict[str, bool | int]:
        """What a client may ask of this model, for ``/v1/models``: clients whose
        structured output goes through tools (pydantic-ai, LangChain's
        function_calling, instructor's TOOLS) can tell before a 400."""
        return {
            "tools": self.tools,
            "structured_output": self.structured_output,
            "vision": self.vision,
            "context_window": self.context_window,
            "max_output_tokens": self.max_output_tokens,
        }


def replica_specs(spec: ModelSpec) -> list[ReplicaSpec]:
    """The replicas of a remote model: its ``replicas``, or its ``base_url`` alone. A
    replica without its own key uses the entry's ``api_key``."""
    if spec.replicas:
        return [
            r if r.api_key or not spec.api_key else r.model_copy(update={"api_key": spec.api_key})
            for r in spec.replicas
        ]
    assert spec.base_url, "a remote model needs base_url or replicas"
    return [ReplicaSpec(url=spec.base_url, api_key=spec.api_key)]


class Catalog:
    """Slug/alias → spec, and the plans by name. Immutable once built."""

    def __init__(self, specs: list[ModelSpec], plans: dict[str, Plan] | None = None) -> None:
        self.plans: dict[str, Plan] = dict(plans or {})
        self._specs: dict[str, ModelSpec] = {}
        self._by_name: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.slug] = spec
            for name in spec.names():
                self._by_name[name] = spec

    def __iter__(self) -> Iterator[ModelSpec]:
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
