"""Test-control routes under ``/_sim/`` (no auth, loopback only): ledger, faults, knobs, internals."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from sim.vast.api import LIMITER, WORLD
from sim.vast.replies import json_reply


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text="body is not JSON") from None


async def health(request: web.Request) -> web.Response:
    return json_reply({"ok": True, "instances_live": len(request.app[WORLD].live())})


async def ledger(request: web.Request) -> web.Response:
    return json_reply(request.app[WORLD].ledger())


async def list_faults(request: web.Request) -> web.Response:
    return json_reply({"faults": [f.as_json() for f in request.app[WORLD].faults.all()]})


async def add_faults(request: web.Request) -> web.Response:
    body = await _json(request)
    specs = body if isinstance(body, list) else [body]
    world = request.app[WORLD]
    try:
        armed = [world.arm(spec) for spec in specs]
    except (ValueError, TypeError) as exc:
        return json_reply({"success": False, "error": str(exc)}, 400)
    return json_reply({"success": True, "faults": [f.as_json() for f in armed]})


async def clear_faults(request: web.Request) -> web.Response:
    request.app[WORLD].faults.clear()
    return json_reply({"success": True})


async def remove_fault(request: web.Request) -> web.Response:
    removed = request.app[WORLD].faults.remove(int(request.match_info["id"]))
    return json_reply({"success": removed}, 200 if removed else 404)


def _config(request: web.Request) -> dict[str, Any]:
    world, limiter = request.app[WORLD], request.app[LIMITER]
    return {
        "boot_scale": world.settings.boot_scale,
        "start_gpu_taken_probability": world.settings.start_gpu_taken_probability,
        "credit": world.settings.credit,
        "rate_limits": limiter.enabled,
        "rate_limit_overrides": limiter.overrides,
        "rate_limited_calls": limiter.refused,
        "profile": world.profile.model_dump(),
    }


async def get_config(request: web.Request) -> web.Response:
    return json_reply(_config(request))


async def set_config(request: web.Request) -> web.Response:
    """``{"boot_scale": 0.1, "start_gpu_taken_probability": 0.5, "credit": 5, "rate_limits": false,
    "rate_limit_overrides": {"create": 0}}`` — any subset."""
    body = await _json(request)
    if not isinstance(body, dict):
        return json_reply({"success": False, "error": "expected an object"}, 400)
    world, limiter = request.app[WORLD], request.app[LIMITER]
    try:
        if "boot_scale" in body:
            world.settings.boot_scale = max(0.0, float(body["boot_scale"]))
        if "start_gpu_taken_probability" in body:
            world.settings.start_gpu_taken_probability = min(1.0, max(0.0, float(body["start_gpu_taken_probability"])))
        if "credit" in body:
            world.settings.credit = float(body["credit"])
        if "rate_limits" in body:
            limiter.enabled = bool(body["rate_limits"])
        if "rate_limit_overrides" in body:
            limiter.overrides = {str(k): float(v) for k, v in dict(body["rate_limit_overrides"]).items()}
    except (TypeError, ValueError) as exc:
        return json_reply({"success": False, "error": str(exc)}, 400)
    return json_reply(_config(request))


async def instance_internals(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    inst = world.instances.get(int(request.match_info["id"]))
    if inst is None:
        return json_reply({"success": False, "error": "unknown instance"}, 404)
    row = next(r for r in world.ledger()["instances"] if r["id"] == inst.id)
    row["logs"] = inst.logs[-200:]
    row["authorized_keys"] = len(inst.authorized_keys)
    row["ssh_port"] = inst.ssh_port
    row["environment"] = inst.container_environment()
    return json_reply(row)


async def offer_internals(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    offer = world.offers.get(int(request.match_info["id"]))
    if offer is None:
        return json_reply({"success": False, "error": "unknown offer"}, 404)
    return json_reply({**offer.as_json(), "holder": offer.holder, "rented_elsewhere": offer.rented_elsewhere})


async def set_offer(request: web.Request) -> web.Response:
    """``{"rented_elsewhere": true}`` — another client takes (or frees) that machine's GPUs."""
    world = request.app[WORLD]
    offer = world.offers.get(int(request.match_info["id"]))
    if offer is None:
        return json_reply({"success": False, "error": "unknown offer"}, 404)
    body = await _json(request)
    if "rented_elsewhere" in body:
        offer.rented_elsewhere = bool(body["rented_elsewhere"])
    if "rentable" in body:
        offer.rentable = bool(body["rentable"])
    return json_reply({**offer.as_json(), "holder": offer.holder, "rented_elsewhere": offer.rented_elsewhere})


def add_admin_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/_sim/health", health)
    r.add_get("/_sim/ledger", ledger)
    r.add_get("/_sim/faults", list_faults)
    r.add_post("/_sim/faults", add_faults)
    r.add_delete("/_sim/faults", clear_faults)
    r.add_delete(r"/_sim/faults/{id:\d+}", remove_fault)
    r.add_get("/_sim/config", get_config)
    r.add_post("/_sim/config", set_config)
    r.add_get(r"/_sim/instances/{id:\d+}", instance_internals)
    r.add_get(r"/_sim/offers/{id:\d+}", offer_internals)
    r.add_post(r"/_sim/offers/{id:\d+}", set_offer)
