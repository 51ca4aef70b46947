"""A real llama.cpp server's answers in the shape of another kind of upstream: a test
instrument for what the gateway pays on each ending (README, "Credits").

It relays ``/{shape}/v1/chat/completions`` to a llama.cpp server (``--engine``) and
reshapes what comes back, so the tokens are a real engine's and so are the counts:

- ``vllm``: as vLLM with ``stream_options.continuous_usage_stats``, every chunk after
  the first token carries ``usage`` so far (from llama.cpp's per-token timings), and
  no ``timings``;
- ``silent``: an upstream that never reports usage: no ``usage``, no ``timings``,
  streamed or plain.

``GET /health`` answers 200 for the gateway's probes.

    python -m tests.support.shaped_upstream --engine http://127.0.0.1:8101 --port 9300
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import httpx
import uvicorn

from tests.support.instant_upstream import lifespan, read_body

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def reshape(shape: str, data: dict[str, Any], continuous: bool) -> dict[str, Any]:
    """One llama.cpp answer or chunk as the shape's server would send it."""
    timings = data.pop("timings", None)
    if shape == "silent":
        data.pop("usage", None)
    elif continuous and timings and "usage" not in data and data.get("choices"):
        prompt = timings["prompt_n"] + timings.get("cache_n", 0)
        done = timings["predicted_n"]
        data["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": done,
            "total_tokens": prompt + done,
        }
    return data


def make_app(engine: str) -> Any:
    client = httpx.AsyncClient(base_url=engine, timeout=None)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        shape, _, rest = scope["path"].strip("/").partition("/")
        if scope["path"] == "/health" or rest != "v1/chat/completions":
            ok = scope["path"] == "/health"
            await send({"type": "http.response.start", "status": 200 if ok else 404})
            await send({"type": "http.response.body", "body": b'{"status":"ok"}' if ok else b""})
            return
        body = json.loads(await read_body(receive))
        options = body.get("stream_options") or {}
        continuous = bool(options.get("continuous_usage_stats"))
        body["timings_per_token"] = shape == "vllm" and continuous
        if not body.get("stream"):
            resp = await client.post("/v1/chat/completions", json=body)
            out = json.dumps(reshape(shape, resp.json(), continuous)).encode()
            await send(
                {"type": "http.response.start", "status": resp.status_code, "headers": _JSON}
            )
            await send({"type": "http.response.body", "body": out})
            return
        relay = asyncio.ensure_future(_relay(client, shape, body, continuous, send))
        gone = asyncio.ensure_future(_disconnected(receive))
        # A client that hangs up closes the engine's stream, which stops generation
        # (as vLLM does): it must not keep a slot, and its KV cache, busy.
        await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (relay, gone):
            task.cancel()
        await asyncio.gather(relay, gone, return_exceptions=True)

    return app


async def _relay(
    client: httpx.AsyncClient, shape: str, body: dict[str, Any], continuous: bool, send: Any
) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        await send({"type": "http.response.start", "status": resp.status_code, "headers": _SSE})
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                data = reshape(shape, json.loads(line[6:]), continuous)
                line = "data: " + json.dumps(data)
            chunk = (line + "\n").encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", required=True, help="the llama.cpp server's URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9300)
    args = parser.parse_args()
    uvicorn.run(make_app(args.engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
