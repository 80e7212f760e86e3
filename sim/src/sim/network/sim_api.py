"""Test and demo control of the simulated network, under ``/_sim/`` on the public port.

(The routes are listed with their bodies in the :mod:`sim.network` docstring.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sim.network.report import build_report

if TYPE_CHECKING:
    from sim.network.dapi import Dapi


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(
            body=orjson.dumps({"error": f"bad JSON: {exc}"}), content_type="application/json"
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            body=orjson.dumps({"error": "expected a JSON object"}), content_type="application/json"
        )
    return body


class SimRoutes:
    def __init__(self, dapi: Dapi) -> None:
        self.dapi = dapi

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/_sim/params", self.get_params)
        r.add_post("/_sim/params", self.set_params)
        r.add_get("/_sim/report", self.report)
        r.add_get("/_sim/batches", self.batches)
        r.add_get("/_sim/clock", self.clock)
        r.add_post("/_sim/clock/pause", self.pause)
        r.add_post("/_sim/clock/resume", self.resume)
        r.add_post("/_sim/clock/jump", self.jump)
        r.add_post("/_sim/callback/stop", self.callback_stop)
        r.add_post("/_sim/callback/start", self.callback_start)
        r.add_post("/_sim/confirmation-poc", self.confirmation_poc)
        r.add_post("/_sim/inference", self.inference)

    async def get_params(self, request: web.Request) -> web.Response:
        return _json(self.dapi.params.as_dict())

    async def set_params(self, request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            changed = self.dapi.update_params(body)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        return _json({"changed": changed, "params": self.dapi.params.as_dict()})

    async def report(self, request: web.Request) -> web.Response:
        return _json(build_report(self.dapi))

    async def batches(self, request: web.Request) -> web.Response:
        q = request.query
        out = []
        for entry in self.dapi.chain.batches:
            if "epoch" in q and str(entry.epoch_index) != q["epoch"]:
                continue
            if "node_id" in q and entry.node_id != q["node_id"]:
                continue
            if "kind" in q and entry.kind != q["kind"]:
                continue
            out.append(entry.as_dict())
        return _json(out)

    async def clock(self, request: web.Request) -> web.Response:
        return _json(self.dapi.clock_info())

    async def pause(self, request: web.Request) -> web.Response:
        self.dapi.clock.pause()
        return _json(self.dapi.clock_info())

    async def resume(self, request: web.Request) -> web.Response:
        self.dapi.clock.resume()
        self.dapi.scheduler.wake()
        return _json(self.dapi.clock_info())

    async def jump(self, request: web.Request) -> web.Response:
        body = await _body(request)
        current = self.dapi.clock.height()
        if isinstance(body.get("height"), int) and not isinstance(body.get("height"), bool):
            target = int(body["height"])
        elif isinstance(body.get("blocks"), int) and not isinstance(body.get("blocks"), bool):
            target = current + int(body["blocks"])
        else:
            return _json({"error": "give an integer 'height' or 'blocks'"}, 400)
        if target < current:
            return _json({"error": f"the clock only moves forward (now {current}, asked {target})"}, 400)
        self.dapi.clock.jump_to(target)
        self.dapi.scheduler.wake()
        return _json(self.dapi.clock_info())

    async def callback_stop(self, request: web.Request) -> web.Response:
        self.dapi.callbacks.listener.shut()
        return _json({"callback_server": "stopped"})

    async def callback_start(self, request: web.Request) -> web.Response:
        self.dapi.callbacks.listener.open()
        return _json({"callback_server": "running"})

    async def confirmation_poc(self, request: web.Request) -> web.Response:
        chain = self.dapi.chain
        if chain.active_event is not None:
            return _json({"error": "a confirmation PoC is already active"}, 409)
        chain.pending_confirmation_trigger = True
        return _json({"scheduled": True, "after_height": chain.height})

    async def inference(self, request: web.Request) -> web.Response:
        body = await _body(request)
        request_body = body.get("body")
        result = await self.dapi.traffic.send_one(
            node_id=body.get("node_id"),
            body=request_body if isinstance(request_body, dict) else None,
            stream=body.get("stream") if isinstance(body.get("stream"), bool) else None,
            validate=body.get("validate") if isinstance(body.get("validate"), bool) else None,
        )
        return _json(result)
