"""How the Vast API answers: JSON with ``Content-Type: application/json`` exactly, and its error bodies.

vastai-api.md: the 1.9.1 CLI rejects a search reply whose Content-Type carries ``; charset=...``;
errors read ``{"success":false,"error":"invalid_args","msg":"error 400/...: ...","ask_id":N}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

JSON_TYPE = "application/json"


def json_reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Setting the header directly keeps aiohttp from appending "; charset=utf-8".
    return web.Response(body=orjson.dumps(data), status=status, headers={"Content-Type": JSON_TYPE, **(headers or {})})


def text_reply(text: str, status: int, content_type: str = "text/plain") -> web.Response:
    return web.Response(body=text.encode(), status=status, headers={"Content-Type": content_type})


class ApiError(Exception):
    """An error the real API answers with a JSON body."""

    def __init__(self, status: int, error: str, msg: str, **extra: Any) -> None:
        super().__init__(msg)
        self.status = status
        self.body: dict[str, Any] = {"success": False, "error": error, "msg": msg, **extra}

    def reply(self) -> web.Response:
        return json_reply(self.body, self.status)


def invalid_args(detail: str, code: int = 3101, **extra: Any) -> ApiError:
    return ApiError(400, "invalid_args", f"error 400/{code}: {detail}", **extra)


def no_such_ask(ask_id: int, *, gone: bool = False) -> ApiError:
    if gone:
        return ApiError(
            410,
            "no_such_ask",
            f"error 410/3603: no_such_ask Instance type by id {ask_id} is no longer available.",
            ask_id=ask_id,
        )
    return ApiError(
        404,
        "invalid_args",
        f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available.",
        ask_id=ask_id,
    )


def no_such_instance(instance_id: int) -> ApiError:
    return ApiError(404, "no_such_instance", f"error 404/3701: no_such_instance Instance {instance_id} not found.")


def auth_error(status: int = 401) -> ApiError:
    return ApiError(status, "auth_error", "Invalid user key")
