"""Settings: one immutable object built from the environment (and CLI flags), passed down.

Every field is read from ``SERVELM_<NAME>`` (pydantic-settings); explicit keyword
arguments (CLI flags, tests) win over the environment. Nothing reads ``os.environ``
after start-up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SERVELM_", frozen=True, extra="forbid", env_ignore_empty=True
    )

    data_dir: Path = Field(default_factory=default_data_dir, description="database and models")
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
        default=None, description="enables `/admin/` with this bearer token"
    )

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")

    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="request body limit (413 above)"
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
    workers: int = Field(
        default=1, gt=0, description="gateway processes on one port (servelm.multiproc)"
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

    # Images in chat content (servelm.media).
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
    # Everything else must be public: see servelm.media.
    image_allow_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="comma-separated hosts, addresses or CIDR networks image URLs may "
        "reach although private",
    )

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
        """The environment, with explicit values (CLI flags) winning; None means unset."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
