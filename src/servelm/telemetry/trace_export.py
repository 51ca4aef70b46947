"""Span exporters of our own (``servelm.telemetry.tracing``), imported only when
tracing is on."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class JSONLinesExporter(SpanExporter):
    """One JSON object per finished span, a line each, on stderr or appended to a file
    (one ``write`` per span on an ``O_APPEND`` descriptor: processes sharing the file
    do not interleave lines)."""

    def __init__(self, path: str | None) -> None:
        self._fd = (
            sys.stderr.fileno()
            if path is None
            else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        )
        self._own = path is not None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s)) + "\n" for s in spans)
        os.write(self._fd, lines.encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._own:
            os.close(self._fd)
            self._own = False

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
    }
