"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Every error body is built here, so no handler can leak a stack trace or a file path: unexpected
exceptions become a fixed 500 message and their traceback goes to the server log only. Every
4xx answered here is logged with its reason (the message names fields, never their values, so
no prompt reaches the log): a client that shows only "400 Bad Request" can be debugged from
the server's log.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Retry-After (seconds) sent with 429 and 503: the engine drains a full queue in well under this
# at the default sizes, and a fixed value keeps client back-off predictable.
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields.

    `reason` labels dspark_request_rejected_total; None means "not a rejection" (e.g. a 500).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.reason = reason
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def error_bytes(status: int, message: str, type_: str, code: str | None) -> bytes:
    return json.dumps(error_body(message, type_, None, code)).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code, reason="validation")


def overloaded(message: str, reason: str = "queue_full") -> APIError:
    return APIError(
        429,
        message,
        type_="rate_limit_error",
        code=reason,
        reason=reason,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def unavailable(message: str, code: str, reason: str) -> APIError:
    return APIError(
        503,
        message,
        type_="server_error",
        code=code,
        reason=reason,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def internal_error(message: str = "internal server error") -> APIError:
    return APIError(500, message, type_="server_error", code="internal_error")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # Pydantic adds the union member name ("str", "list[...]") to the location; drop it.
    parts = [p for p in parts if not (p.startswith(("list[", "function-")) or p in ("str", "int"))]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _loc_to_param(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if first.get("type") == "missing" and param is None:
        return "request body is required", None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unrecognized request argument"
    # Only the error text, never the offending input (it may be huge or a prompt).
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return text, param


_STATUS_TYPES = {404: ("not_found", "not found"), 405: ("method_not_allowed", "method not allowed")}


def log_client_error(request: Request, err: APIError) -> None:
    log_refusal(request.method, request.url.path, err)


def log_refusal(method: str, path: str, err: APIError) -> None:
    """One line per refused request: route, status, code and the reason we gave the client."""
    if 400 <= err.status < 500:
        log.info("%s %s -> %d %s: %s", method, path, err.status, err.code or err.type, err.message)


def install_error_handlers(app: FastAPI, on_reject: Any) -> None:
    """Map every exception to an OpenAI error body; `on_reject(reason)` counts rejections."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        if exc.reason:
            on_reject(exc.reason)
        log_client_error(request, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        on_reject("validation")
        message, param = _validation_message(exc)
        err = APIError(400, message, param=param)
        log_client_error(request, err)
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 413:
            on_reject("body_too_large")
            err = APIError(413, "request body too large", code="request_too_large")
        else:
            code, message = _STATUS_TYPES.get(exc.status_code, ("invalid_request", "bad request"))
            if exc.status_code == 400:
                on_reject("validation")
                message = "request body could not be parsed"
            err = APIError(exc.status_code, message, code=code)
        log_client_error(request, err)
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error while serving a request")
        return error_response(internal_error())
