"""Every error is `{"error": {"type", "message"}}` (and `code` where OpenAI clients read one) with a 4xx/5xx
status; bad input never gets a 5xx."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from sluicegate.api.responses import JSON
from sluicegate.sessions.connect import UNAVAILABLE, store_refuses

log = logging.getLogger(__name__)

STATUS_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or STATUS_TYPES.get(status, "error")
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 429

    def response(self) -> JSON:
        """This error as the API answers it (the error handlers', and the response deadline's for a submit)."""
        return error_response(self.status, self.message, self.type, self.code, self.headers)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    message: str
    code: str | None = None  # where OpenAI clients read one (e.g. model_not_found)


class ErrorBody(BaseModel):
    """The one error shape, for the OpenAPI schema: without it FastAPI documents its own 422 body
    (`{"detail": [...]}`), which the API never sends, and no other error status at all."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


# Every route's documented errors (FastAPI(responses=...) reaches every route, included or not).
ERROR_RESPONSES: dict[int | str, dict] = {
    "4XX": {"model": ErrorBody, "description": "Bad input, auth, not found, conflict, limits"},
    503: {"model": ErrorBody, "description": "The queue store (Redis) is unavailable or refusing work: retry"},
}


def error_response(status: int, message: str, type_: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSON:
    error = {"type": type_ or STATUS_TYPES.get(status, "error"), "message": message}
    if code is not None:
        error["code"] = code
    return JSON({"error": error}, status_code=status, headers=headers)


def describe_json_invalid(err: dict) -> str:
    """A body that does not parse: the parser's reason and where. FastAPI's `loc` ends in the character offset
    (not a field), its `msg` says only "JSON decode error"; pydantic's (the chat route) says the line and column."""
    reason = str((err.get("ctx") or {}).get("error") or err.get("msg") or "invalid")
    loc = err.get("loc", ())
    at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
    return f"the body is not valid JSON: {reason}{at}"


def describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            parts.append(describe_json_invalid(err))
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "path", "query", "header"))
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


RETRY_AFTER = {"Retry-After": "1"}


def expected_error_response(exc: Exception) -> JSON | None:
    """The answer to an error the API expects (bad input, Redis unavailable or refusing work), or None."""
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, RequestValidationError):
        return error_response(422, describe_validation(exc))
    if isinstance(exc, UNAVAILABLE) or store_refuses(exc):
        log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
        return error_response(503, "the queue store (Redis) is unavailable; retry shortly", headers=RETRY_AFTER)
    return None


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """A 405's Allow: every method some route takes on this path (RFC 9110: the resource's methods). The
    router names only the first route whose path matched, and a path may have several (GET and DELETE
    /v1/requests/{id}, GET and POST /v1/admin/keys, GET and HEAD /healthz). Each method is asked of the
    routes as the router asks (`matches`, which sees into included routers), not read off their fields."""
    routes = request.app.router.routes
    allowed = (method for method in HTTP_METHODS
               if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes))
    return ", ".join(allowed)


def install_error_handlers(app: FastAPI) -> None:
    from sluicegate.api.services import check_keys  # here: services imports auth, which imports this module

    async def refusal(request: Request) -> JSON | None:
        """The route's key checks' answer (401, 403, or 503 for a store that is down), or None: they pass."""
        try:
            await check_keys(request)
        except Exception as exc:
            response = expected_error_response(exc)
            if response is None:
                raise
            return response
        return None

    async def _expected(_: Request, exc: Exception) -> JSON:
        response = expected_error_response(exc)
        assert response is not None
        return response

    for kind in (ApiError, *UNAVAILABLE):
        app.add_exception_handler(kind, _expected)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSON:
        # The key checks first: FastAPI decodes a JSON body before it solves the route's dependencies.
        return await refusal(request) or error_response(422, describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSON:
        if exc.status_code == 400 and (refused := await refusal(request)):  # a body FastAPI could not read
            return refused
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        headers = exc.headers
        if exc.status_code == 405 and (allowed := allowed_methods(request)):
            headers = {**(headers or {}), "Allow": allowed}
        return error_response(exc.status_code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSON:
        refused = expected_error_response(exc) if store_refuses(exc) else None
        if refused is not None:  # a ResponseError naming the store's refusal (OOM, MISCONF, BUSY, ...)
            return refused
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
