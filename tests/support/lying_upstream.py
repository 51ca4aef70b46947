"""An OpenAI-compatible upstream that lies on request: a test instrument.

The last user message picks the lie (``lie:<mode>``); anything else gets an honest
answer of three tokens with exact usage. The ``CLAIMS`` modes answer ``LONG`` (one word
a streamed chunk) with usage that contradicts it. Streamed or plain follows the request's
``stream``. Each mode is one way a real upstream was seen (or could be) broken or
hostile: token counts that are negative, absurd, missing or not numbers, answers and
events of the wrong shape, a body that trickles. ``GET /seen`` returns the ``stream``
flag of every chat request so far, so tests can see which kind of call was made.

    python -m tests.support.lying_upstream --port 9200
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import uvicorn

from tests.support.instant_upstream import lifespan, read_body

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
WORDS: tuple[str, ...] = ("a", "b", "c")
HONEST = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}

# Modes that replace ``usage`` (in the plain answer and in the stream's last event).
USAGE_LIES: dict[str, Any] = {
    "usage-negative": {"prompt_tokens": -5, "completion_tokens": -3, "total_tokens": -8},
    "usage-huge": {"prompt_tokens": 10**400, "completion_tokens": 3},
    "usage-int4": {"prompt_tokens": 10**12, "completion_tokens": 3},
    "usage-no-prompt": {"completion_tokens": 3},
    "usage-abc": {"prompt_tokens": 11, "completion_tokens": "abc"},
    "usage-nan": {"prompt_tokens": 11, "completion_tokens": float("nan")},
    "usage-float": {"prompt_tokens": 11.5, "completion_tokens": 3},
    "usage-list": [11, 3],
    "usage-string": "lots",
}

# Counts that contradict the text (issue 25, point 5): these modes answer LONG, one
# word a chunk when streamed (as engines stream one token a chunk), so what was
# delivered is len(LONG) tokens, and the usage says otherwise.
_LONG_TEXT = (
    "Servers that relay a model's answer must count what they send, because the engine"
    " behind them may claim any number of tokens it likes; a gateway that believes it"
    " bills its users for words nobody received, or for nothing at all"
)
LONG = tuple(w if i == 0 else " " + w for i, w in enumerate(_LONG_TEXT.split(" ")))
CLAIMS: dict[str, Any] = {
    "claims-huge": {"prompt_tokens": 11, "completion_tokens": 100_000, "total_tokens": 100_011},
    "claims-zero": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    # Usage only with the first word, none at the end.
    "usage-early": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12},
    "no-usage": None,
}

# Plain answers of the wrong shape.
PLAIN_LIES: dict[str, Any] = {
    "plain-content-int": {"choices": [{"message": {"role": "assistant", "content": 5}}]},
    "plain-list": [1, 2],
    "plain-null": None,
    "plain-number": 5,
    "plain-string": "hello",
    "plain-choices-null": {"choices": None},
    "plain-choices-string": {"choices": "abc"},
    "plain-choices-empty": {"choices": []},
    "plain-choice-string": {"choices": ["abc"]},
    "plain-message-string": {"choices": [{"message": "abc"}]},
    "plain-tool-calls-string": {
        "choices": [{"message": {"role": "assistant", "content": None, "tool_calls": "x"}}]
    },
    "plain-tool-call-args-int": {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": 5}}],
                }
            }
        ]
    },
    "plain-finish-int": {
        "choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason": 7}]
    },
}

# Streamed events of the wrong shape, sent after one good content event.
STREAM_LIES: dict[str, Any] = {
    "event-list": [1, 2],
    "event-null": None,
    "event-number": 5,
    "event-string": "hello",
    "event-choices-null": {"choices": None},
    "event-choices-string": {"choices": "abc"},
    "event-choice-string": {"choices": ["abc"]},
    "event-delta-string": {"choices": [{"index": 0, "delta": "abc"}]},
    "event-content-int": {"choices": [{"index": 0, "delta": {"content": 5}}]},
    "event-tool-calls-string": {"choices": [{"index": 0, "delta": {"tool_calls": "x"}}]},
    "event-tool-call-index-str": {
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": "0", "function": {}}]}}]
    },
    "event-logprobs-string": {"choices": [{"index": 0, "delta": {}, "logprobs": "x"}]},
}


# Bytes no client may ever read back (issue 25 point 7): the leak-* modes put them in
# a body that is not JSON, a 5xx's error text, an error event.
SECRET = "SECRET-UPSTREAM-BYTES 10.0.0.7"
# leak-500 last: a 5xx ejects the only replica for a while (the fleet's issue 25 point 6).
LEAKS = ("leak-not-json", "leak-error-event", "leak-500")


def _mode(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str):
            return content.removeprefix("lie:") if content.startswith("lie:") else ""
    return ""


def make_app() -> Any:
    seen: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["path"] == "/seen":
            await _send(send, 200, _JSON, json.dumps(seen).encode())
            return
        if scope["path"] == "/health":  # what a gateway's health probe asks
            await _send(send, 200, _JSON, b'{"status":"ok"}')
            return
        body = json.loads(await read_body(receive))
        seen.append(bool(body.get("stream")))
        mode = _mode(body)
        usage = USAGE_LIES.get(mode, HONEST)
        if mode == "leak-500":
            error = {"error": {"message": f"internal failure at {SECRET}", "code": 500}}
            await _send(send, 500, _JSON, _dumps(error))
            return
        if mode == "leak-not-json" and not body.get("stream"):
            await _send(send, 200, _JSON, f"<html>{SECRET}</html>".encode())
            return
        if mode == "leak-error-event" and not body.get("stream"):
            await _send(send, 200, _JSON, _dumps({"error": {"message": SECRET}}))
            return
        words: tuple[str, ...] = WORDS
        if mode in CLAIMS:
            words, usage = LONG, CLAIMS[mode]
        if not body.get("stream"):
            if mode == "trickle":
                # Headers, then a byte of JSON whitespace a second, forever.
                await send({"type": "http.response.start", "status": 200, "headers": _JSON})
                while True:
                    await asyncio.sleep(1.0)
                    await send({"type": "http.response.body", "body": b" ", "more_body": True})
            if mode in PLAIN_LIES:
                answer: Any = PLAIN_LIES[mode]
            else:
                answer = {
                    "id": "chatcmpl-lying",
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                }
                if usage is not None:
                    answer["usage"] = usage
            await _send(send, 200, _JSON, _dumps(answer))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})

        async def event(data: Any) -> None:
            chunk = b"data: " + _dumps(data) + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        await event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, word in enumerate(words):
            data: dict[str, Any] = {"choices": [{"index": 0, "delta": {"content": word}}]}
            if mode == "usage-early" and i == 0:
                data["usage"] = usage
            await event(data)
            if mode == "leak-not-json":
                chunk = f"data: {{not json {SECRET}\n\n".encode()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if mode == "leak-error-event":
                await event({"error": {"message": SECRET, "type": "server_error"}})
            if mode in STREAM_LIES:
                await event(STREAM_LIES[mode])
        if mode == "trickle":
            # One byte of an SSE comment a second, forever: no read ever times out.
            while True:
                await asyncio.sleep(1.0)
                await send({"type": "http.response.body", "body": b":", "more_body": True})
        await event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if usage is not None and mode != "usage-early":
            await event({"choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def _dumps(data: Any) -> bytes:
    # allow_nan: NaN is one of the lies (Python's json writes it, as some servers do).
    return json.dumps(data, allow_nan=True).encode()


async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    args = parser.parse_args()
    uvicorn.run(make_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
