"""The Responses API's answers (``servelm.chat.responses`` has its requests): a chat
completion as a ``response`` object (``response_body``), and a chat stream as the
Responses stream events (``ResponseEvents``, ``stream_reply``): ``response.created``,
each output item added with its deltas and done, then ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it) with the usage, cost and
remaining credits the chat answer's last chunk carried."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from servelm.chat.calls import JsonReply, StreamReply
from servelm.chat.responses import ResponsesRequest


def _usage(chat: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat:
        return None
    cached = (chat.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    out: dict[str, Any] = {
        "input_tokens": chat["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat["total_tokens"],
    }
    for name in ("cost", "remaining_credits"):
        if name in chat:
            out[name] = chat[name]
    return out


def _response(
    r: ResponsesRequest,
    response_id: str,
    created: int,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    fmt = r.text.format if r.text is not None and r.text.format is not None else None
    incomplete = status == "incomplete"
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": r.instructions,
        "max_output_tokens": r.max_output_tokens,
        "model": r.model,
        "output": output,
        "parallel_tool_calls": r.parallel_tool_calls if r.parallel_tool_calls is not None else True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": r.temperature,
        "text": {
            "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
        },
        "tool_choice": r.tool_choice if r.tool_choice is not None else "auto",
        "tools": r.tools or [],
        "top_p": r.top_p,
        "truncation": "disabled",
        "usage": usage,
        "metadata": r.metadata or {},
    }


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _response_id(completion_id: str) -> str:
    return "resp_" + completion_id.removeprefix("chatcmpl-")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call(call: dict[str, Any], item_id: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    }


def response_body(r: ResponsesRequest, completion: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` as the ``response`` object it answers."""
    choice = completion["choices"][0]
    message = choice["message"]
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(
            {
                "type": "message",
                "id": _new_id("msg"),
                "status": _status(choice["finish_reason"]),
                "role": "assistant",
                "content": [_text_part(message["content"])],
            }
        )
    for call in message.get("tool_calls") or ():
        output.append(_function_call(call, _new_id("fc"), "completed"))
    return _response(
        r,
        _response_id(completion["id"]),
        completion["created"],
        status=_status(choice["finish_reason"]),
        output=output,
        usage=_usage(completion.get("usage")),
    )


class ResponseEvents:
    """``chat.completion.chunk`` dicts in, Responses stream events out: the response
    created, each output item added, its deltas, done, then ``response.completed``
    (``response.incomplete`` when ``max_output_tokens`` cut it) with the usage and
    cost the last chunk carried."""

    def __init__(self, r: ResponsesRequest, first: dict[str, Any]) -> None:
        self.r = r
        self.response_id = _response_id(first["id"])
        self.created = int(first["created"])
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.text: list[str] | None = None  # the open message item's text
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index → open item
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _snapshot(self, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return _response(
            self.r, self.response_id, self.created, status=status, output=self.output, usage=usage
        )

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._snapshot("in_progress")),
            self._event("response.in_progress", response=self._snapshot("in_progress")),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(delta["content"])
            for tc in delta.get("tool_calls") or ():
                events += self._call_delta(tc)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[dict[str, Any]]:
        events = self._close_text() + self._close_calls()
        status = _status(self.finish_reason)
        final = self._snapshot(status, _usage(self.usage))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*events, self._event(kind, response=final)]

    def _text_delta(self, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self.text is None:
            events += self._close_calls()
            self.text = []
            item = {
                "type": "message",
                "id": _new_id("msg"),
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.output.append(item)
            events.append(self._added(item))
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    part=_text_part(""),
                )
            )
        self.text.append(text)
        item = self.output[-1]
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=len(self.output) - 1,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _close_text(self) -> list[dict[str, Any]]:
        if self.text is None:
            return []
        index = next(
            i
            for i, o in enumerate(self.output)
            if o["type"] == "message" and o["status"] == "in_progress"
        )
        item = self.output[index]
        text, self.text = "".join(self.text), None
        part = _text_part(text)
        item.update(status="completed", content=[part])
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            self._event("response.output_text.done", **common, text=text, logprobs=[]),
            self._event("response.content_part.done", **common, part=part),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def _call_delta(self, tc: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = int(tc.get("index", 0))
        fn = tc.get("function") or {}
        item = self.calls.get(index)
        if item is None:
            events += self._close_text()
            call = {
                "id": tc.get("id") or _new_id("call"),
                "function": {"name": fn.get("name") or "", "arguments": ""},
            }
            item = _function_call(call, _new_id("fc"), "in_progress")
            self.calls[index] = item
            self.output.append(item)
            events.append(self._added(item))
        elif fn.get("name"):
            item["name"] += fn["name"]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.output.index(item),
                    delta=fn["arguments"],
                )
            )
        return events

    def _close_calls(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for item in self.calls.values():
            item["status"] = "completed"
            index = self.output.index(item)
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
            events.append(self._event("response.output_item.done", output_index=index, item=item))
        self.calls = {}
        return events

    def _added(self, item: dict[str, Any]) -> dict[str, Any]:
        return self._event(
            "response.output_item.added", output_index=len(self.output) - 1, item=dict(item)
        )


def reshape(r: ResponsesRequest, reply: JsonReply | StreamReply) -> JsonReply | StreamReply:
    """The walk's chat answer as the Responses API gives it."""
    if isinstance(reply, StreamReply):
        return stream_reply(r, reply)
    return JsonReply(reply.status, response_body(r, reply.body), reply.headers)


def stream_reply(r: ResponsesRequest, chat: StreamReply) -> StreamReply:
    """A chat stream as Responses events: ``response.created`` first, the rest as the
    chunks arrive. The chat stream is closed with it, started or not, so settlement
    always runs."""
    shaper = ResponseEvents(r, chat.first)
    created, in_progress = shaper.start()

    async def events() -> AsyncGenerator[dict[str, Any]]:
        yield in_progress
        for event in shaper.feed(chat.first):
            yield event
        async for chunk in chat.rest:
            for event in shaper.feed(chunk):
                yield event
        for event in shaper.finish():
            yield event

    return StreamReply(chat.headers, created, events(), inner=chat.rest)


def sse_event(event: dict[str, Any]) -> bytes:
    """A Responses stream event: named by its type, as OpenAI sends them."""
    payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {payload}\n\n".encode()
