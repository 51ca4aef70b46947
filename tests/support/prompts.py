"""Long prompts of ordinary words for tests and benchmarks that fill a model's window:
random words from a small list, so a prompt's token count follows its length (numbered
text would not: SmolLM2 splits digits) and no two seeds share a cached prefix."""

from __future__ import annotations

import random

WORDS = [
    "river",
    "stone",
    "garden",
    "window",
    "paper",
    "light",
    "music",
    "bread",
    "water",
    "forest",
    "cloud",
    "table",
    "street",
    "morning",
    "winter",
    "summer",
    "market",
    "letter",
    "mountain",
    "silver",
    "orange",
    "yellow",
    "bridge",
    "castle",
    "pocket",
    "rabbit",
    "candle",
    "engine",
    "harbor",
    "island",
    "jacket",
    "kitten",
    "ladder",
    "meadow",
    "needle",
    "ocean",
    "pepper",
    "quiet",
    "rocket",
    "saddle",
    "thunder",
    "velvet",
    "wagon",
    "basket",
    "feather",
    "lantern",
    "marble",
    "pillow",
    "shadow",
    "spider",
    "tunnel",
    "valley",
    "whistle",
]


def word_prompt(seed: int, words: int) -> str:
    """``words`` words drawn with ``seed``."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))
