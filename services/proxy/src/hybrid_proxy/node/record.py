"""The node's own view in Redis (``proxy:node``, one writer: this service) and its MLNode state.

The view is what ``hybridctl status`` shows for the proxy node: the state the dapi last commanded, the model it
loaded, the registration as the dapi echoed it, and the dapi's status for it. It also lets a restarted proxy come
back in the state the dapi left it in (``PROXY_RESTORE_STATE``), instead of answering STOPPED until the next
reconcile. Redis being down never stops the node: the view is best effort.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import orjson
from redis.asyncio import Redis

from hybrid_proxy.node import metrics

log = logging.getLogger("hybrid.proxy.record")

MLNodeState = Literal["STOPPED", "INFERENCE", "POW"]
STATES: tuple[MLNodeState, ...] = ("STOPPED", "INFERENCE", "POW")


class NodeRecord:
    def __init__(self, redis: Redis | None, key: str, node_id: str) -> None:
        self.redis = redis
        self.key = key
        self.state: MLNodeState = "STOPPED"
        self.loaded_model: str | None = None
        self.state_since = time.time()
        self.view: dict[str, Any] = {"node_id": node_id, "registration": None, "dapi": None, "last_error": None}
        self._redis_ok = True
        self._show_state()

    def _show_state(self) -> None:
        for s in STATES:
            metrics.NODE_STATE.labels(s).set(1 if s == self.state else 0)

    async def restore(self) -> bool:
        """Take the state and model from the stored view; True when it was INFERENCE with a model."""
        if self.redis is None:
            return False
        try:
            raw = await self.redis.get(self.key)
        except Exception as exc:
            log.warning("cannot read %s to restore the node state: %r", self.key, exc)
            return False
        if not raw:
            return False
        try:
            stored = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return False
        if stored.get("state") == "INFERENCE" and isinstance(stored.get("loaded_model"), str):
            self.state = "INFERENCE"
            self.loaded_model = stored["loaded_model"]
            self._show_state()
            return True
        return False

    def set_state(self, state: MLNodeState, loaded_model: str | None = None) -> bool:
        """Change the state (and the loaded model); True when something changed."""
        if state == self.state and loaded_model == self.loaded_model:
            return False
        log.info("node state %s -> %s%s", self.state, state, f" ({loaded_model})" if loaded_model else "")
        self.state = state
        self.loaded_model = loaded_model
        self.state_since = time.time()
        self._show_state()
        return True

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.view,
            "state": self.state,
            "loaded_model": self.loaded_model,
            "state_since": self.state_since,
            "updated_at": time.time(),
        }

    async def save(self) -> None:
        if self.redis is None:
            return
        try:
            await self.redis.set(self.key, orjson.dumps(self.snapshot()))
        except Exception as exc:
            if self._redis_ok:
                log.warning("cannot write %s (the status view goes stale, serving continues): %r", self.key, exc)
            self._redis_ok = False
            return
        if not self._redis_ok:
            log.info("writing %s again", self.key)
        self._redis_ok = True
