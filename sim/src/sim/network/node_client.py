"""HTTP from the dapi to its ML nodes, with the URLs the real dapi builds (gonka-protocol.md §1):
``http://{host}:{poc_port}/{version}{poc_segment}/api/v1/...`` and
``http://{host}:{inference_port}/{version}{inference_segment}/v1/...``, ``version`` being the chain's
``mlnode_version``. The prefix is always there (only an empty version drops it), exactly like the
real network — an MLNode without a front that strips it answers 404.

Timeouts follow the reference (5 s for status polls, 15 min for commands), scaled by the profile but
never below 1 s, so a loaded test machine does not invent failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from hybrid_common import TimeProfile
from sim.network.nodes import NodeConfig
from sim.network.params import NetworkParams

TIMEOUT_FLOOR_SECONDS = 1.0


@dataclass
class CallResult:
    answered: bool  # an HTTP response came back (any status)
    status: int
    body: Any
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.answered and 200 <= self.status < 300

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.answered else self.error


class NodeClient:
    def __init__(self, session: aiohttp.ClientSession, params: NetworkParams, profile: TimeProfile) -> None:
        self._session = session
        self._params = params
        self._profile = profile

    @property
    def state_timeout(self) -> float:
        return max(TIMEOUT_FLOOR_SECONDS, self._profile.scale(self._params.state_timeout_seconds))

    @property
    def command_timeout(self) -> float:
        return max(TIMEOUT_FLOOR_SECONDS, self._profile.scale(self._params.command_timeout_seconds))

    def _prefix(self) -> str:
        version = self._params.mlnode_version
        return f"/{version}" if version else ""

    def poc_url(self, cfg: NodeConfig, path: str) -> str:
        return f"http://{cfg.host}:{cfg.poc_port}{self._prefix()}{cfg.poc_segment}{path}"

    def inference_url(self, cfg: NodeConfig, path: str) -> str:
        return f"http://{cfg.host}:{cfg.inference_port}{self._prefix()}{cfg.inference_segment}{path}"

    async def call(
        self, method: str, url: str, *, json: Any = None, timeout: float | None = None, command: bool = False
    ) -> CallResult:
        limit = timeout if timeout is not None else (self.command_timeout if command else self.state_timeout)
        data = orjson.dumps(json) if json is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._session.request(
                method, url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=limit)
            ) as resp:
                raw = await resp.read()
                try:
                    body: Any = orjson.loads(raw) if raw else None
                except orjson.JSONDecodeError:
                    body = raw.decode(errors="replace")
                return CallResult(answered=True, status=resp.status, body=body)
        except TimeoutError:
            return CallResult(answered=False, status=0, body=None, error=f"timeout after {limit:.1f}s")
        except (aiohttp.ClientError, OSError) as exc:
            return CallResult(answered=False, status=0, body=None, error=f"{type(exc).__name__}: {exc}")
