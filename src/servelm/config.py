"""Settings: one immutable object built from the environment (and CLI flags), passed down.

Nothing reads ``os.environ`` after start-up; tests build their own ``Settings``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from servelm.media import MediaLimits


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


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)
    # Where models are kept; defaults to data_dir/models. Tests point data_dir at a temp
    # directory but keep sharing the one models directory.
    models_dir: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    models_file: Path | None = None
    admin_token: str | None = None

    host: str = "127.0.0.1"
    port: int = 8000

    # Request limits.
    max_body_bytes: int = 20 * 1024 * 1024
    # How many requests may wait for a slot, per model, before 503 + Retry-After.
    queue_size: int = 64

    # Embedded engine defaults (a catalog entry can override slots and context).
    threads: int = Field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)))
    slots: int = 4
    ctx_per_slot: int = 2048
    # Host memory for llama.cpp's cache of finished prompts (prefix reuse across
    # requests); None keeps llama.cpp's default (8 GiB), 0 turns it off.
    prompt_cache_mib: int | None = Field(default=None, ge=0)

    starter_credits: int = 10  # credits granted to the default account on first start
    # How long a key lookup is trusted; a revoked key stops working within this.
    key_cache_seconds: float = 5.0
    # A hold not refreshed for this long belongs to a dead process and is released.
    hold_ttl_seconds: float = 120.0
    log_level: str = "info"
    log_json: bool = False

    # Images in chat content (servelm.media).
    image_max_bytes: int = 10 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    image_max_side: int = 2048
    image_max_count: int = 8
    # Hosts, addresses or CIDR networks that image URLs may point at although private
    # (an internal image store, a test server); everything else must be public.
    image_allow_hosts: tuple[str, ...] = ()

    @field_validator("image_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(h.strip() for h in v.split(",") if h.strip())
        return v

    def media_limits(self) -> MediaLimits:
        return MediaLimits(
            max_image_bytes=self.image_max_bytes,
            max_pixels=self.image_max_pixels,
            max_side=self.image_max_side,
            max_images=self.image_max_count,
            allow_hosts=self.image_allow_hosts,
        )

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
        """Read SERVELM_* variables; explicit keyword overrides (CLI flags) win."""
        env: dict[str, object] = {}
        mapping = {
            "SERVELM_MODELS_DIR": "models_dir",
            "SERVELM_DATABASE_URL": "database_url",
            "SERVELM_REDIS_URL": "redis_url",
            "SERVELM_MODELS_FILE": "models_file",
            "SERVELM_ADMIN_TOKEN": "admin_token",
            "SERVELM_MAX_BODY_BYTES": "max_body_bytes",
            "SERVELM_QUEUE_SIZE": "queue_size",
            "SERVELM_THREADS": "threads",
            "SERVELM_SLOTS": "slots",
            "SERVELM_CTX_PER_SLOT": "ctx_per_slot",
            "SERVELM_PROMPT_CACHE_MIB": "prompt_cache_mib",
            "SERVELM_STARTER_CREDITS": "starter_credits",
            "SERVELM_KEY_CACHE_SECONDS": "key_cache_seconds",
            "SERVELM_HOLD_TTL_SECONDS": "hold_ttl_seconds",
            "SERVELM_IMAGE_MAX_BYTES": "image_max_bytes",
            "SERVELM_IMAGE_MAX_PIXELS": "image_max_pixels",
            "SERVELM_IMAGE_MAX_SIDE": "image_max_side",
            "SERVELM_IMAGE_MAX_COUNT": "image_max_count",
            "SERVELM_IMAGE_ALLOW_HOSTS": "image_allow_hosts",
            "SERVELM_LOG_LEVEL": "log_level",
            "SERVELM_LOG_JSON": "log_json",
        }
        for var, field in mapping.items():
            if var in os.environ:
                env[field] = os.environ[var]
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(env)
