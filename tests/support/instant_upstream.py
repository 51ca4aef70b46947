"""An OpenAI-compatible chat server that answers at once: a benchmark instrument.

It spends no time generating, so whatever latency a gateway in front of it shows is
the gateway's own. It answers ``max_tokens`` one-word chunks (16 without), with
usage, streaming or not; ``--chunk-delay`` spaces the chunks out, to hold many
streams open at once (the memory benchmark). A last message starting with
``echo:`` is answered with its own text as one chunk: one large event, for the
cost-growth benchmark.

    python -m tests.support.instant_upstream --port 9100 [--chunk-delay 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn

Scope = dict[str, Any]
Receive = Any
Send = Any

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def make_app(chunk_delay: float = 0.0) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["path"] == "/v1/models":
            await _send(send, 200, _JSON, b'{"object":"list","data":[{"id":"instant"}]}')
            return
        if scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await _send(send, 404, _JSON, b'{"error":{"message":"not found"}}')
            return
        body = json.loads(await read_body(receive))
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        last = body["messages"][-1].get("content")
        echo = last if isinstance(last, str) and last.startswith("echo:") else None
        pieces = [echo] if echo is not None else [" tok"] * n
        prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"]) + 8
        usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
        model = body.get("model", "instant")
        created = int(time.time())
        if not body.get("stream"):
            reply = {
                "id": "chatcmpl-instant",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "finish_reason": "length",
                    }
                ],
                "usage": usage,
            }
            await _send(send, 200, _JSON, json.dumps(reply).encode())
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        head = f'{{"id":"chatcmpl-instant","object":"chat.completion.chunk","created":{created},"model":{json.dumps(model)},'  # noqa: E501

        async def event(rest: str) -> None:
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {head}{rest}\n\n".encode(),
                    "more_body": True,
                }
            )

        await event(
            '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
        )
        for piece in pieces:
            if chunk_delay:
                await asyncio.sleep(chunk_delay)
            delta = json.dumps({"content": piece})
            await event(f'"choices":[{{"index":0,"delta":{delta},"finish_reason":null}}]}}')
        await event('"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}')
        await event(f'"choices":[],"usage":{json.dumps(usage)}}}')
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan: nothing to start or stop."""
    while True:
        kind = (await receive())["type"].removeprefix("lifespan.")
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def read_body(receive: Receive) -> bytes:
    """A request's whole body, however many messages it came in."""
    parts: list[bytes] = []  # joined once: += would copy a large body over and over
    while True:
        message = await receive()
        parts.append(bytes(message.get("body", b"")))
        if not message.get("more_body"):
            return b"".join(parts)


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.chunk_delay),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
