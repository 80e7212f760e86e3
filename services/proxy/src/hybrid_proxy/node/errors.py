"""Error answers in the two dialects the node speaks.

The OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}`` (what the ``openai`` SDK and the dapi parse);
the MLNode control routes answer FastAPI's ``{"detail": ...}`` like the real image (gonka-protocol.md §1).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

JSON = "application/json"

# Status → OpenAI error type, as the OpenAI API names them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_body(status: int, message: str, *, code: str | None = None, type_: str | None = None) -> bytes:
    kind = type_ or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def openai_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=openai_error_body(status, message, code=code, type_=type_),
        content_type=JSON,
        headers=headers,
    )


def detail(message: Any, status: int) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"detail": message}), content_type=JSON)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=JSON)


def too_large(limit: int) -> web.Response:
    return openai_error(413, f"request body larger than {limit} bytes", code="request_too_large")
