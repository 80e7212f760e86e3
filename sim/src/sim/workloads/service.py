"""What every process running inside a simulated container offers its host: a way to stop it."""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    async def close(self) -> None: ...
