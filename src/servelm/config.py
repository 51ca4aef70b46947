"""Settings: one immutable object built from the environment (and CLI flags), passed down.

Every field is read from ``SERVELM_<NAME>`` (pydantic-settings); explicit keyword
arguments (CLI flags, tests) win over the environment. Nothing reads ``os.environ``
after start-up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from servelm.chat.media import MediaLimits, split_allow_entry


def default_data_dir() -> Path:
    """Where models, the SQLite database and first-start state live.

    Shared between checkouts on purpose: the default model is 92 MB and every fresh
    clone (CI included) should not fetch it again.
    """
    env = os.environ.get("SERVELM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "servelm"


# Prompts this long run in their model's long-prompt lane (``engines.llamacpp``): at
# about 1,000 tokens a prefill takes a second or more on a CPU, which is what a short
# request beside it must not wait for.
DEFAULT_LONG_PROMPT_TOKENS = 1024
# The placeholders deploy/ and docs/ show in place of secrets: "change-me..." and the
# docs' example worker keys.
_PLACEHOLDER = re.compile(r"change[-_ ]?me.*|worker-key|other-key", re.IGNORECASE)


def is_placeholder(secret: str | None) -> bool:
    return secret is not None and _PLACEHOLDER.fullmatch(secret.strip()) is not None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SERVELM_", frozen=True, extra="forbid", env_ignore_empty=True
    )

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="database and models (default: `$XDG_DATA_HOME/servelm`, "
        "i.e. `~/.local/share/servelm`)",
    )
    # Tests point data_dir at a temp directory but keep sharing one models directory.
    models_dir: Path | None = Field(
        default=None, description="where model weights live (default: DATA_DIR/models)"
    )
    database_url: str | None = Field(
        default=None,
        description="`postgresql://…` to share one database between gateways "
        "(default: a SQLite file in the data dir)",
    )
    models_file: Path | None = Field(
        default=None, description="the models file (default: ./servelm.toml if present)"
    )
    admin_token: str | None = Field(
        default=None, description="enables `/admin/` with this bearer token (default: off)"
    )
    session_secret: str | None = Field(
        default=None,
        description="signs the web console's session cookies (default: a random secret "
        "kept in the data dir; gateways behind one load balancer set the same value)",
    )
    metrics_token: str | None = Field(
        default=None,
        description="`/metrics` asks for this bearer token (default: open, for a "
        "scraper on a private network)",
    )
    cookie_secure: bool | None = Field(
        default=None,
        description="`Secure` on console cookies (default: when the request came over TLS, "
        "directly or as a trusted proxy's `X-Forwarded-Proto: https` says)",
    )
    session_ttl_seconds: int = Field(
        default=8 * 3600, gt=0, description="how long a console sign-in lasts"
    )

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")

    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="request body limit (413 above)"
    )
    body_read_timeout_seconds: float = Field(
        default=30.0, gt=0, description="how long a client may take to send its whole body"
    )
    queue_size: int = Field(
        default=64, ge=0, description="requests waiting per model before 503 + Retry-After"
    )

    # Embedded engine defaults (a catalog entry can override slots).
    threads: int = Field(
        default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)),
        gt=0,
        description="CPU threads for llama.cpp (default: cores, at most 8)",
    )
    slots: int = Field(default=4, gt=0, description="parallel generations per model")
    long_prompt_tokens: int = Field(
        default=DEFAULT_LONG_PROMPT_TOKENS,
        ge=0,
        description="prompts of at least this many tokens run in a second process of "
        "their model at a lower CPU priority, so that their prefill cannot stall short "
        "requests (models whose window is larger only; 0 turns it off)",
    )
    prompt_cache_mib: int | None = Field(
        default=None,
        ge=0,
        description="host memory for llama.cpp's cache of finished prompts, for prefix "
        "reuse across requests (default: llama.cpp's, 8 GiB; 0 turns it off)",
    )
    # Serverless local models (servelm.engines.pool).
    keep_alive: float = Field(
        default=300.0,
        ge=0,
        description="seconds a local model stays loaded after its last request (a "
        "model's own `keep_alive` in the models file wins; `preload = true` or "
        '`keep_alive = "forever"` keep it loaded from start-up)',
    )
    model_memory: str | None = Field(
        default=None,
        description='memory local models may take, in bytes or a share of RAM ("70%"); '
        "past it the least recently used idle model is unloaded first (no limit)",
    )
    max_loaded_models: int | None = Field(
        default=None, gt=0, description="local models loaded at once (no limit)"
    )
    prompt_count: Literal["auto", "exact", "bound"] = Field(
        default="auto",
        description="how an embedded model's prompt is counted for the credit hold: "
        "`exact` (llama.cpp's template and tokenizer, before admission), `bound` (an "
        "upper bound from its bytes, settled from the engine's usage, or counted after a "
        "stream cut short) or `auto` (the bound where it decides nothing: a plain text "
        "conversation that fits the window, a balance that covers many such holds, no "
        "token budget; otherwise the exact count). The same charges; measured in "
        "docs/benchmarks.md",
    )
    workers: int = Field(
        default=1,
        gt=0,
        description="gateway processes on one port (servelm.processes.multiproc); more than one "
        "needs `SERVELM_REDIS_URL`, through which they share rate limits and revocations",
    )

    starter_credits: int = Field(
        default=10, ge=0, description="credits of the account made on first start"
    )
    key_cache_seconds: float = Field(
        default=5.0, ge=0, description="how long a key lookup is trusted (revocation delay)"
    )
    hold_ttl_seconds: float = Field(
        default=120.0, gt=0, description="when a dead process's credit holds are released"
    )
    log_level: str = Field(default="info", description="debug, info, warning or error")
    log_json: bool = Field(default=False, description="one JSON object per log line")
    log_format: Literal["text", "json"] = Field(
        default="text", description="`json` is the same as SERVELM_LOG_JSON=1"
    )
    # OpenTelemetry (servelm.telemetry.tracing): off unless set, or unset with
    # OTEL_EXPORTER_OTLP_ENDPOINT in the environment (then otlp).
    trace_exporter: Literal["off", "otlp", "console", "file"] | None = Field(
        default=None,
        description="where a span per chat request goes: `otlp` (OTEL_EXPORTER_OTLP_* say "
        "where), `console` (stderr), `file` (SERVELM_TRACE_FILE) or `off` (default: `off`, "
        "or `otlp` when OTEL_EXPORTER_OTLP_ENDPOINT is set)",
    )
    trace_file: Path | None = Field(
        default=None, description="with `--trace-exporter file`: spans appended, one JSON a line"
    )

    # Rate limits (servelm.access.limits).
    redis_url: str | None = Field(
        default=None,
        description="`redis://…`: rate limits and key revocations shared by every gateway "
        "(default: limits per process)",
    )
    redis_prefix: str = Field(default="servelm", description="prefix of servelm's Redis keys")
    ratelimit_fail: Literal["open", "closed"] = Field(
        default="open",
        description="Redis unreachable: `open` limits per process, `closed` answers 503",
    )
    ratelimit_redis_timeout: float = Field(
        default=0.1, gt=0, description="seconds a rate-limit check waits for Redis"
    )
    ratelimit_lease_seconds: float = Field(
        default=6.0,
        ge=1,
        description="a request's place in the concurrency count lasts this long, renewed "
        "while it runs: one whose end was lost (a dead process, a Redis stall) leaves "
        "the count within it",
    )

    secret_failures_allowed: int = Field(
        default=10,
        ge=1,
        description="wrong admin tokens or sign-ins one address may send per window "
        "before 429 (shared through Redis when set)",
    )
    secret_failure_window_seconds: float = Field(
        default=300.0, gt=0, description="the window of `secret_failures_allowed`"
    )

    fair_slots: bool = Field(
        default=True,
        description="one account holds at most all but one of a model's slots (a plan's "
        "`slots` sets its share); its other requests wait for its own to end",
    )

    # Overload and shutdown (servelm.processes.lifecycle).
    max_connections: int = Field(
        default=4096,
        gt=0,
        description="open connections per process; past it a new one gets 503 and is closed",
    )
    max_connections_per_ip: int = Field(
        default=256,
        gt=0,
        description="open connections from one address per process (429 past it); behind "
        "a proxy, every client is the proxy's address: raise it to `max_connections`",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="a request's head (request line and headers) must arrive within this "
        "of the connection's start or of its first byte (408 and closed otherwise)",
    )
    max_header_bytes: int = Field(
        default=64 * 1024, gt=0, description="largest request head (431 and closed above)"
    )
    max_header_count: int = Field(
        default=100, gt=0, description="most header fields in a request (431 above)"
    )
    keep_alive_timeout_seconds: float = Field(
        default=5.0, gt=0, description="an idle kept-alive connection is closed after this"
    )
    max_inflight: int | None = Field(
        default=None, gt=0, description="chat requests in flight before a quick 503 (no cap)"
    )
    discovery_interval: float = Field(
        default=10.0,
        gt=0,
        description="seconds between resolutions of a `dns+http://` replica name "
        "(addresses that appear join, those that vanish leave)",
    )
    hosts_file: Path | None = Field(
        default=None,
        description="an `/etc/hosts`-style file read before the system resolver for "
        "`dns+` replica names (default: the system resolver alone)",
    )
    drain_seconds: float = Field(
        default=30.0, ge=0, description="after SIGTERM, how long running requests may finish"
    )
    request_timeout: float = Field(
        default=600.0,
        gt=0,
        description="one deadline per chat request (images, queue, generation); a client "
        "may ask for less with `x-request-timeout`",
    )
    send_timeout: float = Field(
        default=30.0, gt=0, description="how long one write may wait on a slow reader"
    )

    # Images in chat content (servelm.chat.media).
    image_max_bytes: int = Field(
        default=10 * 1024 * 1024, gt=0, description="largest image accepted (413 above)"
    )
    image_max_pixels: int = Field(
        default=40_000_000, gt=0, description="most pixels an image may have"
    )
    image_max_side: int = Field(
        default=2048, gt=0, description="longer images are scaled down to this"
    )
    image_max_count: int = Field(default=8, ge=0, description="images per request")
    image_fetch_deadline_seconds: float = Field(
        default=30.0, gt=0, description="one image URL fetch, redirects and body included"
    )
    image_decode_workers: int = Field(
        default=2, gt=0, description="threads decoding images off the event loop"
    )
    # Everything else must be public: see servelm.chat.media.
    image_allow_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="comma-separated hosts, addresses or CIDR networks image URLs may "
        "reach although private; bare: ports 80/443, host:port: that port, host:*: any",
    )

    # Queued work (servelm.jobs): async requests, batches, webhooks.
    jobs_concurrency: int = Field(
        default=0,
        ge=0,
        description="queued lines run at once by this process; 0: half the slots (at "
        "least 1), so live requests keep the rest",
    )
    jobs_lease_seconds: float = Field(
        default=60.0, gt=0, description="how soon a dead process's running lines run again"
    )
    jobs_poll_seconds: float = Field(
        default=0.5, gt=0, description="how often an idle runner looks for queued work"
    )
    jobs_retention_hours: float = Field(
        default=72.0, gt=0, description="how long finished jobs' results and files are kept"
    )
    webhook_retry_seconds: float = Field(
        default=10.0, gt=0, description="first webhook retry delay, doubled after each failure"
    )
    webhook_max_attempts: int = Field(default=8, gt=0, description="webhook deliveries tried")
    webhook_allow_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="as image_allow_hosts, for webhook URLs (private addresses are "
        "refused otherwise)",
    )

    @field_validator("image_allow_hosts", "webhook_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        if isinstance(v, str):
            v = tuple(h.strip() for h in v.split(",") if h.strip())
        if isinstance(v, (tuple, list)):
            for entry in v:
                split_allow_entry(str(entry))  # a typo in a port fails at start-up
        return v

    @field_validator("model_memory")
    @classmethod
    def _memory_budget(cls, v: str | None) -> str | None:
        if v is not None:
            memory_budget_bytes(v)  # a typo fails at start-up
        return v

    def model_memory_bytes(self) -> int | None:
        return None if self.model_memory is None else memory_budget_bytes(self.model_memory)

    def media_limits(self) -> MediaLimits:
        return MediaLimits(
            max_image_bytes=self.image_max_bytes,
            max_pixels=self.image_max_pixels,
            max_side=self.image_max_side,
            max_images=self.image_max_count,
            fetch_deadline=self.image_fetch_deadline_seconds,
            decode_workers=self.image_decode_workers,
            allow_hosts=self.image_allow_hosts,
        )

    def placeholder_secrets(self) -> list[str]:
        """The settings holding a placeholder from the deploy files or docs: a gateway
        started with one would run with a publicly known secret."""
        named = {
            "SERVELM_ADMIN_TOKEN": self.admin_token,
            "SERVELM_SESSION_SECRET": self.session_secret,
            "SERVELM_METRICS_TOKEN": self.metrics_token,
        }
        found = [name for name, value in named.items() if is_placeholder(value)]
        password = urlsplit(self.database_url or "").password
        if is_placeholder(password):
            found.append("SERVELM_DATABASE_URL (its password)")
        return found

    @property
    def json_logs(self) -> bool:
        return self.log_json or self.log_format == "json"

    @property
    def model_dir(self) -> Path:
        return self.models_dir or (self.data_dir / "models")

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'servelm.db'}"

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """The environment, with explicit values (CLI flags) winning; None means unset."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]


def default_text(name: str) -> str | None:
    """A field's default as the README and ``--help`` show it; None where the
    description says what happens by default (computed or unset)."""
    field = Settings.model_fields[name]
    if field.default_factory is not None or field.default is None:
        return None
    if isinstance(field.default, tuple):
        return ",".join(field.default) or None
    if isinstance(field.default, bool):
        return str(field.default).lower()
    return str(field.default)


def settings_table() -> str:
    """The README's configuration table: every field, its environment variable and
    its ``servelm serve`` flag, from this class (a test keeps the README in sync)."""
    rows = [
        "| variable | `servelm serve` flag | meaning | default |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = default_text(name)
        rows.append(
            f"| `SERVELM_{name.upper()}` | `--{name.replace('_', '-')}` | "
            f"{field.description or ''} | {'' if default is None else f'`{default}`'} |"
        )
    return "\n".join(rows)


def memory_budget_bytes(value: str) -> int:
    """``SERVELM_MODEL_MEMORY``: bytes ("8000000000", "8G") or a share of RAM ("70%")."""
    text = value.strip()
    if text.endswith("%"):
        share = float(text[:-1])
        if not 0 < share <= 100:
            raise ValueError(f"model_memory {value!r}: a share of RAM is above 0% and at most 100%")
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total * share / 100)
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"model_memory {value!r}: bytes (8000000000, 8G) or a share of RAM (70%)")
    return int(number) * scale
