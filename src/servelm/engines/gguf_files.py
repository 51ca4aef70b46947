"""What a GGUF file says before llama.cpp loads it: header fields read without
parsing the whole file, the memory a model will take (the pool's budget decides on
it before every load), and how many tokens an image costs a fixed-grid projector."""

from __future__ import annotations

import logging
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

if TYPE_CHECKING:
    from servelm.catalog.specs import ModelSpec
    from servelm.config import Settings

log = logging.getLogger(__name__)

# Projectors that turn every image into the same fixed grid of tokens.
_FIXED_GRID = {"mlp", "mlp_norm", "ldp", "ldpv2"}


def projector_image_tokens(mmproj: Path) -> int | None:
    """Tokens per image of a fixed-grid projector ((image size / patch size)²), read
    from the mmproj GGUF; None for projectors whose count depends on the image."""
    reader = gguf.GGUFReader(mmproj)

    def value(key: str) -> Any:
        f = reader.get_field(key)
        return f.contents() if f is not None else None

    kind = value("clip.projector_type") or value("clip.vision.projector_type")
    size, patch = value("clip.vision.image_size"), value("clip.vision.patch_size")
    if kind not in _FIXED_GRID or not size or not patch:
        return None
    return int(size // patch) ** 2


def footprint(spec: ModelSpec, settings: Settings | None = None) -> int | None:
    """What loading the model costs: its weights (every shard), its projector and the
    f16 KV cache for its context window (the slots share one window:
    ``llamacpp_lane.server_params``). None while its weights are not installed."""
    if spec.path is None or not spec.path.is_file():
        return None
    total = weights_bytes(spec.path)
    try:
        total += kv_cache_bytes(spec.path, spec.context_window)
    except (OSError, ValueError, KeyError, AssertionError, struct.error) as exc:
        # Weights llama.cpp may not load either: the load says why, in its own words.
        log.warning("model %s: no KV cache estimate from %s (%r)", spec.slug, spec.path, exc)
    if spec.mmproj is not None and spec.mmproj.is_file():
        total += spec.mmproj.stat().st_size
    return total


def weights_bytes(path: Path) -> int:
    """Size of a GGUF, all shards of a split one included."""
    m = re.match(r"(.*)-\d{5}-of-(\d{5})\.gguf$", path.name)
    if not m:
        return path.stat().st_size
    shards = path.parent.glob(f"{m.group(1)}-*-of-{m.group(2)}.gguf")
    return sum(p.stat().st_size for p in shards)


def kv_cache_bytes(path: Path, n_ctx: int) -> int:
    meta = gguf_header(path)
    arch = str(meta["general.architecture"])

    def field(key: str) -> int:
        value = meta[f"{arch}.{key}"]
        assert isinstance(value, int), f"{path}: {arch}.{key} is not an integer"
        return value

    heads = field("attention.head_count")
    kv_heads = (
        field("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in meta else heads
    )
    head_dim = field("embedding_length") // heads
    # K and V, f16 (2 bytes) each, per layer per position.
    return field("block_count") * n_ctx * kv_heads * head_dim * 2 * 2


# GGUF metadata value types with a fixed size: type → struct format.
_GGUF_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header(path: Path) -> dict[str, object]:
    """A GGUF's metadata scalars and strings (arrays skipped), read from its header
    alone: the pool estimates a footprint before every load, and gguf's reader parses
    the whole file (seconds for a 49k-token vocabulary)."""
    out: dict[str, object] = {}
    with path.open("rb") as f:

        def read(fmt: str) -> Any:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == _GGUF_STRING:
                f.seek(read("Q"), 1)
            elif kind == _GGUF_ARRAY:
                inner, count = read("I"), read("Q")
                if inner in _GGUF_SCALARS:
                    f.seek(struct.calcsize("<" + _GGUF_SCALARS[inner]) * count, 1)
                else:
                    for _ in range(count):
                        skip(inner)
            else:
                f.seek(struct.calcsize("<" + _GGUF_SCALARS[kind]), 1)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("I")  # version
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key, kind = string(), read("I")
            if kind in _GGUF_SCALARS:
                out[key] = read(_GGUF_SCALARS[kind])
            elif kind == _GGUF_STRING:
                out[key] = string()
            else:
                skip(kind)
    return out
