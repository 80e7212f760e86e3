"""One status view of the account's instances per replica, refreshed by the v1 list.

vastai-api.md rate limits are per endpoint and per key (show 2 s, list 1 s): many jobs polling ``show`` each would
collide, so a replica lists once per interval for all its jobs and falls back to ``show`` only for an instance the
list does not carry (just created, or gone).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hybrid_provisioner.vast import VastClient


class InstanceWatcher:
    def __init__(self, vast: VastClient) -> None:
        self.vast = vast
        self._rows: dict[int, dict[str, Any]] = {}
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self, max_age: float) -> None:
        async with self._lock:
            if time.monotonic() - self._at < max_age:
                return
            rows = await self.vast.list_instances()
            self._rows = {int(r["id"]): r for r in rows if isinstance(r.get("id"), int)}
            self._at = time.monotonic()

    async def get(self, instance_id: int, max_age: float) -> dict[str, Any] | None:
        """The instance as last listed (at most ``max_age`` old), or ``None`` when it is gone."""
        await self.refresh(max_age)
        row = self._rows.get(instance_id)
        if row is not None:
            return None if row.get("actual_status") == "destroyed" else row
        return await self.vast.show_instance(instance_id)

    async def by_label(self, label: str) -> list[dict[str, Any]]:
        """Instances carrying ``label`` right now (a fresh, filtered list)."""
        rows = await self.vast.list_instances({"label": {"eq": label}})
        return [r for r in rows if r.get("label") == label and r.get("actual_status") != "destroyed"]
