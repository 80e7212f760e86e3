"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

inference-proxy.md: Hyperbolic is OpenAI-compatible; its 429 body shape is undocumented and
``Retry-After`` is not promised, so the simulator sends the OpenAI shape and no ``Retry-After`` on
rate limiting (a proxy must not depend on either).
"""

from __future__ import annotations

import orjson


class ApiError(Exception):
    """A request the upstream refuses; rendered as an OpenAI-style JSON error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        )


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "Incorrect API key provided. You can find your API key in your account settings.",
        code="invalid_api_key",
    )


def rate_limited(limit_per_min: int) -> ApiError:
    return ApiError(
        429,
        f"Rate limit reached: {limit_per_min} requests per minute. Please try again later.",
        type_="rate_limit_error",
        code="rate_limit_exceeded",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def server_error(status: int, message: str | None = None) -> ApiError:
    default = {
        500: "The server had an error while processing your request.",
        502: "Bad gateway.",
        503: "The engine is currently overloaded, please try again later.",
        504: "Gateway timeout.",
    }.get(status, "Upstream error.")
    kind = "rate_limit_error" if status == 429 else "server_error"
    return ApiError(status, message or default, type_=kind, code=None)
