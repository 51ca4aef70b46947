"""An OpenAI-compatible upstream that fails on purpose, one way per path prefix.

A replica URL ``http://127.0.0.1:PORT/<mode>/v1`` answers chats in that mode (so do
``/<mode>/<anything>/v1``: two replicas of one mode);
``GET /health`` always answers 200, so every mode stays in a gateway's rotation
until a request fails there. Modes:

- ``ok``: three one-word chunks and usage (prompt 7, completion 3); but a chat
  whose messages say ``POISON`` gets HTTP 500, as an engine that one prompt crashes.
- ``status500``: HTTP 500 with an OpenAI error body.
- ``hang``: reads the request and never answers.
- ``stall``: two chunks, then nothing (the timeout strikes mid-stream).
- ``close``: two chunks, then the connection is dropped without ending the body.
- ``garbage``: one chunk, then an event that is not JSON.
- ``garbage_first``: an event that is not JSON before any chunk.

``GET /stats`` returns how many chats each mode received (``poison``: how many said
POISON; ``probes``: how many ``GET /health``).

    python -m tests.support.fault_upstream --port 9200
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
from typing import Any

import uvicorn

from tests.support.instant_upstream import lifespan, read_body

_SSE = [(b"content-type", b"text/event-stream")]
_JSON = [(b"content-type", b"application/json")]
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _event(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-fault",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


def make_app() -> Any:
    seen: collections.Counter[str] = collections.Counter()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        path = scope["path"]
        if path in ("/health", "/stats"):
            seen["probes"] += path == "/health"
            answer = b'{"status":"ok"}' if path == "/health" else json.dumps(seen).encode()
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": answer})
            return
        mode = path.strip("/").split("/")[0]
        request = json.loads(await read_body(receive))
        seen[mode] += 1

        async def body(data: bytes, more: bool = True) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": more})

        if mode == "ok" and "POISON" in json.dumps(request.get("messages")):
            seen["poison"] += 1
            await send({"type": "http.response.start", "status": 500, "headers": _JSON})
            await body(b'{"error":{"message":"engine crashed on this prompt"}}', more=False)
            return
        if mode == "status500":
            await send({"type": "http.response.start", "status": 500, "headers": _JSON})
            await body(b'{"error":{"message":"engine crashed","code":500}}', more=False)
            return
        if mode == "hang":
            await asyncio.Event().wait()
        if not request.get("stream"):
            if mode != "ok":
                await send({"type": "http.response.start", "status": 500, "headers": _JSON})
                await body(b'{"error":{"message":"no plain answers here"}}', more=False)
                return
            reply = {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "one two three"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": USAGE,
            }
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await body(json.dumps(reply).encode(), more=False)
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        if mode == "garbage_first":
            await body(b"data: {not json\n\n", more=False)
            return
        await body(_event({"role": "assistant", "content": ""}))
        words = {"garbage": 1, "stall": 2, "close": 2}.get(mode, 3)
        for word in ("one", " two", " three")[:words]:
            await body(_event({"content": word}))
        if mode == "garbage":
            await body(b"data: {not json\n\n", more=False)
            return
        if mode == "stall":
            await asyncio.Event().wait()
        if mode == "close":
            # Leaving without the closing message drops the connection mid-body.
            raise ConnectionAbortedError("dropped on purpose")
        await body(_event({}, "stop"))
        await body(f'data: {{"choices":[],"usage":{json.dumps(USAGE)}}}\n\n'.encode())
        await body(b"data: [DONE]\n\n", more=False)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    args = parser.parse_args()
    uvicorn.run(make_app(), host=args.host, port=args.port, log_level="critical")


if __name__ == "__main__":
    main()
