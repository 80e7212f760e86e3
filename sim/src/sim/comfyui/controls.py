"""``/_sim/...``: test controls of the ComfyUI simulator (not part of ComfyUI).

Served by the auth proxy (port 8188 of the container, no auth needed, never forwarded) and by ComfyUI's
own port; the proxy's copy keeps answering while ComfyUI is down.

- ``GET  /_sim/state``    → boots, readiness, queue/history sizes, armed faults
- ``POST /_sim/oom``      ``{"count": 1}`` → the next N prompts fail with a CUDA out-of-memory error
- ``POST /_sim/restart``  ``{"when": "now" | "mid_job", "after_progress": 1, "downtime_s": 20}`` → ComfyUI
  restarts (queue, history, sockets lost); ``mid_job`` waits for the next job to report ``after_progress``
  sampling steps (or restarts at once if a job is running). ``downtime_s`` is real seconds, profile-scaled.
- ``POST /_sim/models``   ``{"folder": "checkpoints", "name": "x.safetensors"}`` → a model appears on disk;
  ``DELETE`` with the same body removes it.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from aiohttp import web


class ComfyControls(Protocol):
    def describe(self) -> dict[str, Any]: ...
    def inject_oom(self, count: int = 1) -> None: ...
    def restart_soon(self, downtime_s: float | None = None) -> None: ...
    def restart_mid_job(self, after_progress: int = 1, downtime_s: float | None = None) -> bool: ...
    def add_model(self, folder: str, name: str) -> None: ...
    def remove_model(self, folder: str, name: str) -> None: ...


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    data = orjson.loads(raw) if raw else {}
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return data


def control_routes(comfy: ComfyControls) -> list[web.RouteDef]:
    async def state(request: web.Request) -> web.Response:
        return _json(comfy.describe())

    async def oom(request: web.Request) -> web.Response:
        data = await _body(request)
        comfy.inject_oom(int(data.get("count", 1)))
        return _json(comfy.describe())

    async def restart(request: web.Request) -> web.Response:
        data = await _body(request)
        downtime = data.get("downtime_s")
        downtime_s = None if downtime is None else float(downtime)
        when = data.get("when", "now")
        if when == "now":
            comfy.restart_soon(downtime_s)
            return _json({"restarting": True})
        if when == "mid_job":
            now = comfy.restart_mid_job(int(data.get("after_progress", 1)), downtime_s)
            return _json({"restarting": now, "armed": not now})
        return _json({"error": "when must be 'now' or 'mid_job'"}, status=400)

    async def models(request: web.Request) -> web.Response:
        data = await _body(request)
        folder, name = str(data["folder"]), str(data["name"])
        if request.method == "DELETE":
            comfy.remove_model(folder, name)
        else:
            comfy.add_model(folder, name)
        return _json(comfy.describe()["models"])

    return [
        web.get("/_sim/state", state),
        web.post("/_sim/oom", oom),
        web.post("/_sim/restart", restart),
        web.post("/_sim/models", models),
        web.delete("/_sim/models", models),
    ]
