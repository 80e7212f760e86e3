"""What can go wrong talking to Vast.ai, as exceptions that carry the API's own ``error`` and ``msg``."""

from __future__ import annotations

from typing import Any


class VastError(Exception):
    """An answer the API gave (or failed to give). ``error``/``msg`` are the API's fields when it sent JSON."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        msg: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.msg = msg
        self.body = body

    def __str__(self) -> str:
        parts = [super().__str__()]
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.error:
            parts.append(f"error={self.error}")
        if self.msg:
            parts.append(f"msg={self.msg}")
        return " | ".join(parts)


class VastRateLimited(VastError):
    """429 (plain text, no ``Retry-After``): the call was refused before it ran."""


class VastQuotaExceeded(VastError):
    """429 ``search_quota_exceeded``: a daily quota, not worth retrying today (vastai-api.md)."""


class VastUnavailable(VastError):
    """5xx or no answer after every retry."""


class VastAuthError(VastError):
    """401 (or 404 with ``auth_error``): the key is wrong."""


class OfferUnavailable(VastError):
    """404/410 ``no_such_ask``: the offer vanished between search and create."""


class InsufficientCredit(VastError):
    """402: the account cannot pay for another rental."""


class CreateOutcomeUnknown(VastError):
    """A create that may or may not have happened (5xx, timeout, connection lost): look the label up, never retry
    blindly (vastai-api.md "Never retry a create blindly")."""
