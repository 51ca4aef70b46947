"""One exception tree for everything a request can fail with.

Each error knows its HTTP status and the OpenAI ``type``/``code``/``param`` it maps to;
``servelm.api.errors`` renders it in the dialect of the route that raised it (Segmind's
``{"error": "..."}`` or OpenAI's ``{"error": {...}}``), for JSON and SSE alike.

    ServelmError
    ├── InvalidRequest          400  (param names the offending field)
    │   └── ContextWindowExceeded
    ├── RequestTimeout          408  (the body did not arrive in time)
    ├── PayloadTooLarge         413
    ├── HeadersTooLarge         431  (request head past the cap, before any route)
    ├── AuthenticationError     401
    ├── PermissionDenied        403
    │   └── CsrfFailed          (a console form without its token; browsers get a page)
    ├── NotFound                404
    │   ├── ModelNotFound
    │   └── ModelNotInstalled   (listed, but its weights are missing or failed to load)
    ├── MethodNotAllowed        405
    ├── Conflict                409
    ├── InsufficientCredits     406 on the Segmind route, 402 on the OpenAI route
    ├── RateLimited             429
    ├── EngineError             500  (the engine failed; never caused by user input)
    ├── UpstreamError           502
    ├── Overloaded              503  (admission queue full; carries Retry-After)
    │   └── ModelUnavailable    503  (every replica down; a model at start-up)
    └── UpstreamTimeout         504
"""

from __future__ import annotations

from typing import Any


class ServelmError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def status_for(self, dialect: str) -> int:
        """The HTTP status in a given dialect ("segmind" or "openai")."""
        return self.status_code

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def segmind_body(self) -> dict[str, Any]:
        return {"error": self.message}


class InvalidRequest(ServelmError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextWindowExceeded(InvalidRequest):
    code = "context_length_exceeded"


class RequestTimeout(ServelmError):
    status_code = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(ServelmError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class HeadersTooLarge(ServelmError):
    status_code = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class AuthenticationError(ServelmError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(ServelmError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class CsrfFailed(PermissionDenied):
    """A console form posted without its CSRF token (a stale page, a cookie that
    expired, or another site's forgery). A browser gets an HTML page saying so with a
    way back (``console.web.csrf_page``); an API client this JSON."""

    code = "csrf_failed"


class NotFound(ServelmError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ModelNotInstalled(NotFound):
    """A catalog entry this server cannot serve until its operator acts (weights not
    installed, a load that failed). Permanent from the client's side, so no
    Retry-After and not a 503: SDKs retry a 503 (the openai SDK twice, about two
    minutes with Retry-After: 60) for an answer that cannot change."""

    code = "model_not_installed"


class MethodNotAllowed(ServelmError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ServelmError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class InsufficientCredits(ServelmError):
    """Segmind answers 406 when the balance cannot pay; OpenAI clients expect 402."""

    status_code = 402
    error_type = "insufficient_quota"
    code = "insufficient_credits"

    def status_for(self, dialect: str) -> int:
        return 406 if dialect == "segmind" else 402


class NotEnoughCredits(InsufficientCredits):
    """InsufficientCredits that also carries the balance, for ``x-remaining-credits``
    (``billing.money.not_enough`` words the message)."""

    def __init__(self, message: str, *, balance: int, needed: int) -> None:
        super().__init__(message)
        self.balance = balance
        self.needed = needed


class RateLimited(ServelmError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class EngineError(ServelmError):
    status_code = 500
    error_type = "server_error"
    code = "engine_error"


class UpstreamError(ServelmError):
    status_code = 502
    error_type = "server_error"
    code = "upstream_error"


class StreamCut(UpstreamError):
    """An engine's SSE body that ended before ``[DONE]``."""


class ModelOutputError(UpstreamError):
    """The model wrote something its own format cannot parse (a malformed tool call).
    Nothing the client sent was wrong and nothing in servelm broke: like a bad answer
    from an upstream server, it is a 502, and retrying may well succeed."""

    code = "invalid_model_output"


class Overloaded(ServelmError):
    status_code = 503
    error_type = "server_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: int = 1, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.headers.setdefault("Retry-After", str(retry_after))


class ModelUnavailable(Overloaded):
    code = "model_unavailable"


class UpstreamTimeout(ServelmError):
    status_code = 504
    error_type = "server_error"
    code = "upstream_timeout"
