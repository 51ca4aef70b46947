"""A scripted engine for the fast test lane, plugged in through the real engine seam
(``create_app(engine_factory=scripted_factory)``), the way httpx tests plug in a
``MockTransport``: the whole walk (keys, credit holds, settlement, dialects, SSE) runs
for real; only the generation is a script.

A ``Script`` says what the next generation does: which tokens, whether the engine
reports usage, when it fails, how long it waits between tokens, and whether it hangs
(until cancelled) after some tokens. Push scripts with ``engine.push(...)``; without
one, ``engine.default`` runs. Token counts are deterministic: one token per
whitespace-separated word of each message, plus ``PER_MESSAGE`` per message.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from servelm.catalog.specs import ModelSpec
from servelm.config import Settings
from servelm.engines.admission import Admission, PromptSize
from servelm.engines.base import Engine
from servelm.errors import ServelmError

PER_MESSAGE = 3


@dataclass(frozen=True)
class Script:
    tokens: tuple[str, ...] = ("Hello", " there", ",", " friend", ".")
    finish_reason: str = "stop"
    # Report usage in the last chunk (as llama.cpp and vLLM do); False makes the
    # gateway count content chunks instead.
    report_usage: bool = True
    # Raise this before the first token, or after ``fail_after`` tokens.
    error: ServelmError | None = None
    fail_after: int | None = None
    # Seconds between tokens; ``hang_after`` tokens, then wait until cancelled.
    delay: float = 0.0
    hang_after: int | None = None


class ScriptedEngine(Engine):
    def __init__(self, spec: ModelSpec, *, slots: int = 4, queue_size: int = 64) -> None:
        super().__init__(spec)
        self.default = Script()
        # What each generation received, for tests that check the engine's input.
        self.bodies: list[dict[str, Any]] = []
        # Prompts counted, for tests that check what a refusal spared the engine.
        self.counted = 0
        self._scripts: deque[Script] = deque()
        self._admission: Admission = Admission(slots, queue_size, self.stats)

    def push(self, *scripts: Script) -> None:
        self._scripts.extend(scripts)

    def clear(self) -> None:
        self._scripts.clear()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def count_prompt_tokens(self, body: dict[str, Any]) -> int:
        self.counted += 1
        return sum(PER_MESSAGE + len(_text(m).split()) for m in body["messages"])

    async def stream(
        self,
        body: dict[str, Any],
        *,
        client_streams: bool = True,
        prompt: PromptSize | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        script = self._scripts.popleft() if self._scripts else self.default
        self.bodies.append(body)
        async with self._admission.enter():
            self.stats.requests_total += 1
            if script.error is not None and script.fail_after is None:
                raise script.error
            limit = body.get("max_tokens") or len(script.tokens)
            tokens = script.tokens[:limit]
            finish = script.finish_reason if len(tokens) == len(script.tokens) else "length"
            sent = 0
            try:
                for token in tokens:
                    if script.error is not None and sent == script.fail_after:
                        raise script.error
                    if script.hang_after is not None and sent == script.hang_after:
                        await asyncio.Event().wait()
                    if script.delay:
                        await asyncio.sleep(script.delay)
                    self.stats.chunks_total += 1
                    yield {"choices": [{"index": 0, "delta": {"content": token}}]}
                    sent += 1
            except (asyncio.CancelledError, GeneratorExit):
                self.stats.cancelled_total += 1
                raise
            last: dict[str, Any] = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
            if script.report_usage:
                counted = await self.count_prompt_tokens(body)
                last["usage"] = {"prompt_tokens": counted, "completion_tokens": sent}
            yield last


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def scripted_factory(spec: ModelSpec, settings: Settings) -> ScriptedEngine:
    """An ``EngineFactory``: every catalog entry becomes a scripted engine."""
    return ScriptedEngine(spec, slots=settings.slots, queue_size=settings.queue_size)


# The registry's builder: ``registry.register("scripted", "tests.support.scripted_engine")``
# makes ``engine = "scripted"`` an engine type (issue 27.5).
build = scripted_factory
