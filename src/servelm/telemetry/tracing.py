"""OpenTelemetry traces: one span per chat request, in every process it crosses.

Off unless ``SERVELM_TRACE_EXPORTER`` names an exporter (or, left unset,
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set: then OTLP). The gateway's span (a ``SERVER``
span in ``RequestContextMiddleware``) is the parent; a hop to a replica, a ``servelm
worker`` or ``serve --workers``' engine process, carries W3C ``traceparent`` with the
request id (``hop_headers``), and the process at the other end opens its span as the
child. Off, the cost per request is one ``None`` check and the request id header.

Exporters: ``otlp`` (OTLP over HTTP; the standard ``OTEL_EXPORTER_OTLP_*`` variables
say where; needs the ``otlp`` extra), ``console`` (one JSON span a line on stderr) and
``file`` (one JSON span a line appended to ``SERVELM_TRACE_FILE``; several processes
may share it).

The provider is this module's own, not OpenTelemetry's global one: a library in the
same process that traces through the global API is untouched, and tests can install
an exporter of their own (``setup(exporter=...)``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from servelm.telemetry.logs import request_id_var

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from servelm.config import Settings

log = logging.getLogger(__name__)

# What a hop may carry as the request id: ours (``req_`` + hex) or a caller's of the
# same restrained alphabet; never a header break or a log line of someone's choosing.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def enabled() -> bool:
    return _tracer is not None


def exporter_name(settings: Settings) -> str:
    if settings.trace_exporter is not None:
        return settings.trace_exporter
    return "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "off"


def setup(settings: Settings | None, service: str, *, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on in this process as ``settings`` say (or with ``exporter``);
    True if it is on. Called once per process, next to ``logs.setup``."""
    global _provider, _tracer
    if exporter is None:
        name = "off" if settings is None else exporter_name(settings)
        if name == "off":
            return False
        assert settings is not None
        exporter = _build_exporter(name, settings)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    # OTLP batches (a network call per span would cost every request); the local
    # exporters write at once, so a file is complete when the request is.
    batch = type(exporter).__name__ == "OTLPSpanExporter"
    provider.add_span_processor(
        BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    )
    _provider, _tracer = provider, provider.get_tracer("servelm")
    log.info("tracing on: %s spans as %s", type(exporter).__name__, service)
    return True


def shutdown() -> None:
    """Flush and stop (at a process's end): batched spans are sent before it exits."""
    global _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider = _tracer = None


def flush(seconds: float = 30.0) -> None:
    """Send what is batched now: a process ``serve --workers`` spawned ends without
    running ``atexit``, where the provider would flush on its own."""
    if _provider is not None:
        _provider.force_flush(int(seconds * 1000))


def _build_exporter(name: str, settings: Settings) -> SpanExporter:
    from servelm.telemetry.trace_export import JSONLinesExporter

    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError(
                "SERVELM_TRACE_EXPORTER=otlp needs the OTLP exporter: pip install 'servelm[otlp]'"
            ) from exc
        return OTLPSpanExporter()
    if name == "file":
        if settings.trace_file is None:
            raise RuntimeError("SERVELM_TRACE_EXPORTER=file needs SERVELM_TRACE_FILE")
        return JSONLinesExporter(str(settings.trace_file))
    return JSONLinesExporter(None)


def start_server_span(name: str, headers: Sequence[tuple[bytes, bytes]]) -> Span | None:
    """The span of one incoming request, the child of the caller's ``traceparent`` if
    it sent one; ``None`` when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in headers
        if k in (b"traceparent", b"tracestate")
    }
    parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
    span: Span = _tracer.start_span(name, context=parent, kind=SpanKind.SERVER)  # type: ignore[assignment]
    return span


def activate(span: Span) -> object:
    """Make ``span`` current for this request's task (the hop reads it); returns the
    token ``deactivate`` takes."""
    from opentelemetry import context, trace

    return context.attach(trace.set_span_in_context(span))


def deactivate(token: object) -> None:
    from opentelemetry import context

    context.detach(token)  # type: ignore[arg-type]


def end_span(span: Span, status: int, fields: dict[str, object]) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    span.set_attribute("servelm.request_id", request_id_var.get())
    for key in ("model", "replica", "key_id", "prompt_tokens", "completion_tokens"):
        value = fields.get(key)
        if isinstance(value, str | int | float | bool):
            span.set_attribute(f"servelm.{key}", value)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def hop_headers() -> dict[str, str]:
    """What a call to another servelm process carries of this request: its id (the
    other end's access line uses it as its own) and, traced, ``traceparent``."""
    headers: dict[str, str] = {}
    request_id = request_id_var.get()
    if request_id != "-" and REQUEST_ID.fullmatch(request_id):
        headers["x-request-id"] = request_id
    if _tracer is not None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        TraceContextTextMapPropagator().inject(headers)
    return headers
