"""Errors the gateway raises on purpose, and the one function that renders them.

Each class carries its HTTP status and Workers AI error code as class attributes::

    TollgateError                       500  5000  internal error
    ├── InvalidRequestError             400  5006  body fails the model's input schema (names the field)
    │   ├── MissingBodyError            400  3003  no body at all
    │   └── UnknownModelError           400  5007  no such model
    ├── ModelNotFoundError              404  5007  no such model, on the OpenAI routes (as OpenAI answers)
    ├── PayloadTooLargeError            413  3006  body over server.max_body_bytes
    ├── ContextLengthError              413  5021  prompt_tokens + max_tokens over the model's context window
    ├── AuthenticationError             401 10000  missing, malformed, wrong, expired or revoked key
    ├── ForbiddenError                  403 10000  a valid key without the scope the route needs
    ├── RouteNotFoundError              404  7003  no such route, or a key used on another account's path
    ├── MethodNotAllowedError           405  7001  wrong HTTP method on a known route
    ├── JsonModeError                   422  5022  JSON mode: the model's answer is not JSON
    ├── BudgetExceededError             429  3036  the tenant's or key's monthly budget would be passed
    ├── RateLimitedError                429  5429  the key's requests/tokens per minute or concurrent streams
    ├── CapacityExceededError           429  3040  every worker is full and the wait queue is full or timed out
    ├── InvalidQueryError               400  5006  a usage or admin query parameter is wrong (names it)
    ├── NotFoundError                   404  7003  no such key (admin routes)
    ├── KeyStoreUnavailableError        503  5530  Redis (keys) cannot be reached: retry later
    └── UpstreamError                   502  5502  a worker answered with an error or garbage
        ├── UpstreamTimeoutError        504  5504  no first token, a silent stream, or an answer over the total time
        └── UpstreamUnavailableError    503  5503  no worker of the pool could be reached
            └── ShuttingDownError       503  5503  this gateway is draining for shutdown: retry (another replica)

The 55xx codes are Tollgate's own (Workers AI documents none for upstream failures); the rest follow the
Workers AI contract (../shared/spec/workers-ai-api.md, section 6).
"""

from __future__ import annotations

import json
import math
import re
from typing import ClassVar, Final

from starlette.responses import Response

from billing import Usage
from gateway.meter import usage_headers

_LEADING_FIELD: Final = re.compile(r"'/([A-Za-z_]+)")


class TollgateError(Exception):
    """Base of every error the gateway raises on purpose."""

    status_code: ClassVar[int] = 500
    code: ClassVar[int] = 5000
    default_message: ClassVar[str] = "Internal server error"
    param: str | None = None  # the top-level request field at fault, for OpenAI's error shape

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        self.extra_headers: dict[str, str] = {}  # added where it is raised or passes (e.g. rate-limit state)
        super().__init__(self.message)

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers this kind of error calls for."""
        return {}


class InvalidRequestError(TollgateError):
    status_code = 400
    code = 5006
    default_message = "AiError: Bad input"

    def __init__(self, detail: str) -> None:
        super().__init__(f"AiError: Bad input: {detail}")
        field = _LEADING_FIELD.match(detail)  # details start with the JSON pointer of the field at fault, if any
        self.param = field.group(1) if field else None


class MissingBodyError(TollgateError):
    status_code = 400
    code = 3003
    default_message = "Request is missing headers or body: body"


class UnknownModelError(TollgateError):
    status_code = 400
    code = 5007

    def __init__(self, model: str) -> None:
        super().__init__(f"No such model `{model}` or task")


class ModelNotFoundError(TollgateError):
    status_code = 404
    code = 5007
    param = "model"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist; GET /v1/models lists the models served")


class PayloadTooLargeError(TollgateError):
    status_code = 413
    code = 3006
    default_message = "Request is too large"


class ContextLengthError(TollgateError):
    status_code = 413
    code = 5021
    param = "messages"  # as OpenAI names it for a context too long

    def __init__(self, requested_tokens: int, window_tokens: int) -> None:
        super().__init__(
            f"The estimated number of input and maximum output tokens ({requested_tokens}) exceeded this model "
            f"context window limit ({window_tokens})."
        )


class AuthenticationError(TollgateError):
    status_code = 401
    code = 10000
    default_message = "Authentication error"


class RouteNotFoundError(TollgateError):
    status_code = 404
    code = 7003

    def __init__(self, path: str) -> None:
        super().__init__(f"Could not route to {path}, perhaps your object identifier is invalid?")


class ForbiddenError(TollgateError):
    status_code = 403
    code = 10000
    default_message = "Authentication error"


class NotFoundError(TollgateError):
    status_code = 404
    code = 7003


class InvalidQueryError(TollgateError):
    status_code = 400
    code = 5006


class MethodNotAllowedError(TollgateError):
    status_code = 405
    code = 7001
    default_message = "Method not allowed"


class JsonModeError(TollgateError):
    status_code = 422
    code = 5022
    default_message = "JSON Mode couldn't be met"


class BudgetExceededError(TollgateError):
    """Workers AI answers 429 / 3036 ("Account limited") when an account's allocation is used up; a monthly budget
    is the same thing here. Retrying cannot help before the month ends, so SDKs are told not to."""

    status_code = 429
    code = 3036

    @property
    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "false"}


class RateLimitedError(TollgateError):
    """A key's requests, tokens or concurrent streams per its limits. Tollgate's own code: Workers AI's 3040 means the
    fleet is busy for everyone, 3036 a used-up allocation; this one is the caller's own pace, and passes with time."""

    status_code = 429
    code = 5429

    def __init__(self, message: str, retry_after_seconds: float | None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after_seconds is None:  # it can never pass as it is
            return {"x-should-retry": "false"}
        return {"retry-after": str(max(1, math.ceil(self.retry_after_seconds)))}


class CapacityExceededError(TollgateError):
    """Workers AI's answer when its fleet is busy (and at once with ``options.rejectIfBusy``)."""

    status_code = 429
    code = 3040
    default_message = "Capacity temporarily exceeded, please try again."

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": "1"}


class KeyStoreUnavailableError(TollgateError):
    status_code = 503
    code = 5530
    default_message = "Service temporarily unavailable, please try again."


class UpstreamError(TollgateError):
    status_code = 502
    code = 5502
    default_message = "The inference worker failed to answer"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    code = 5504
    default_message = "The inference worker timed out"


class UpstreamUnavailableError(UpstreamError):
    status_code = 503
    code = 5503
    default_message = "No inference worker is available for this model"


class ShuttingDownError(UpstreamUnavailableError):
    default_message = "This gateway is shutting down; please retry the request."

    @property
    def headers(self) -> dict[str, str]:
        return {"retry-after": "1", "connection": "close"}


def error_body(code: int, message: str) -> dict[str, object]:
    """The Workers AI error envelope, also used for the final event of a failed stream."""
    return {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def openai_error_body(exc: TollgateError) -> dict[str, object]:
    """The OpenAI error shape, used on the OpenAI-compatible routes: ``code`` is the Tollgate code of the Workers AI
    envelope, as a string (OpenAI's ``code`` is a string); ``type`` follows OpenAI's names for the status."""
    fallback = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    kind = _OPENAI_ERROR_TYPES.get(exc.status_code, fallback)
    if isinstance(exc, BudgetExceededError):
        kind = "insufficient_quota"
    return {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": str(exc.code)}}


_OPENAI_ERROR_TYPES: Final = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is (or is under) one of the OpenAI-compatible bases, whose errors take OpenAI's shape."""
    return _OPENAI_PATH.match(path) is not None


_OPENAI_PATH: Final = re.compile(r"(?:(?:/client/v4)?/accounts/[^/]+/ai)?/v1(?:/|$)")


def render_result(result: object, status: int = 200) -> Response:
    """A successful answer in the Workers AI envelope."""
    payload = {"result": result, "success": True, "errors": [], "messages": []}
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


def render_error(exc: TollgateError, headers: dict[str, str] | None = None, *, openai: bool = False) -> Response:
    """Render ``exc`` as an error response: the Workers AI envelope, or with ``openai`` OpenAI's error shape. The
    only code that knows the error responses' HTTP shape."""
    payload = openai_error_body(exc) if openai else error_body(exc.code, exc.message)
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    headers = {**usage_headers(Usage(), 0), **exc.headers, **exc.extra_headers, **(headers or {})}
    return Response(body, status_code=exc.status_code, headers=headers, media_type="application/json")
