"""The public Vast.ai REST surface (vastai-api.md), as aiohttp routes over a :class:`VastWorld`.

Each request passes, in order: injected HTTP faults (5xx bursts, the gateway's HTML 502), the search quota,
Bearer auth (``?api_key=`` accepted; search, GPU names and log results need none), the per-endpoint rate
limit, then the handler. Replies are ``Content-Type: application/json`` exactly.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from sim.vast.faults import Fault
from sim.vast.ratelimits import RateLimiter
from sim.vast.replies import ApiError, auth_error, invalid_args, json_reply, text_reply
from sim.vast.world import VastWorld

WORLD: Final = web.AppKey("vast_world", VastWorld)
LIMITER: Final = web.AppKey("vast_limiter", RateLimiter)
API_KEY: Final = web.AppKey("vast_api_key", str)

# route name → (endpoint for rate limits and faults, needs auth)
_ENDPOINTS: Final[dict[str, tuple[str, bool]]] = {
    "search": ("search", False),
    "search_asks": ("search", False),
    "create": ("create", True),
    "show": ("show", True),
    "list": ("list", True),
    "list_v0": ("list", True),
    "bulk_destroy": ("destroy", True),
    "bulk_manage": ("manage", True),
    "destroy": ("destroy", True),
    "manage": ("manage", True),
    "reboot": ("manage", True),
    "logs": ("logs", True),
    "attach_ssh": ("ssh", True),
    "account_keys": ("keys", True),
    "add_account_key": ("keys", True),
    "user": ("user", True),
    "filters": ("filters", True),
    "gpu_names": ("gpu_names", False),
    "gpu_types": ("gpu_types", False),
}
# vastai-api.md: "A bad key: 401 ... (some routes answer 404 with the same body)".
_AUTH_404: Final = frozenset({"show"})

_GATEWAY_502: Final = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _fault_reply(fault: Fault) -> web.Response:
    status = fault.status or 500
    style = fault.body or ("html" if status in {502, 504} else "json")
    if style == "html":
        page = _GATEWAY_502 if status == 502 else f"<html><body><h1>{status}</h1></body></html>"
        return text_reply(page, status, "text/html")
    if style == "text":
        return text_reply(f"{status} server error", status)
    return json_reply({"success": False, "error": "server_error", "msg": "Internal server error"}, status)


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer ") :].strip()
    return request.query.get("api_key")


@web.middleware
async def vast_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.route
    # "show.bare" is the slash-less twin of "show" (see _both)
    name = (route.name or "").split(".")[0] if route is not None else ""
    if name not in _ENDPOINTS:
        return await handler(request)
    endpoint, needs_auth = _ENDPOINTS[name]
    world = request.app[WORLD]
    fault = world.faults.take("http_error", route=endpoint)
    if fault is not None:
        return _fault_reply(fault)
    if endpoint == "search" and world.faults.take("search_quota") is not None:
        reset = int(world.now() // 86400 + 1) * 86400
        return json_reply(
            {"success": False, "error": "search_quota_exceeded", "msg": "Daily search quota exceeded"},
            429,
            {"X-RateLimit-Reset": str(reset)},
        )
    key = _presented_key(request)
    if needs_auth and key != request.app[API_KEY]:
        return auth_error(404 if name in _AUTH_404 else 401).reply()
    identity = key or (request.remote or "anonymous")
    exempt = endpoint == "list" and bool(request.query.get("after_token"))
    if not exempt:
        refused = request.app[LIMITER].check(identity, endpoint, world.now())
        if refused is not None:
            return refused
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.reply()


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_args("request body is not valid JSON", 3001) from None
    if not isinstance(data, dict):
        raise invalid_args("request body must be a JSON object", 3001)
    return data


def _instance_id(request: web.Request) -> int:
    return int(request.match_info["id"])


def _json_param(request: web.Request, name: str, default: Any) -> Any:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_args(f"{name} is not valid JSON", 3002) from None


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"o": offset})).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = int(data["o"])
    except (binascii.Error, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        raise invalid_args("invalid after_token", 3003) from None
    if offset < 0:
        raise invalid_args("invalid after_token", 3003)
    return offset


# ---- handlers


async def search(request: web.Request) -> web.Response:
    body = await _body(request)
    return json_reply({"offers": request.app[WORLD].search(body)})


async def search_asks(request: web.Request) -> web.Response:
    body = await _body(request)
    query = body.get("q", {})
    if not isinstance(query, dict):
        raise invalid_args("q must be an object", 3004)
    return json_reply({"offers": request.app[WORLD].search(query)})


async def create(request: web.Request) -> web.Response:
    offer_id = int(request.match_info["id"])
    body = await _body(request)
    status, reply = request.app[WORLD].create(offer_id, body)
    return json_reply(reply, status)


async def show(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    inst = world.instances.get(_instance_id(request))
    if inst is None or inst.destroyed:
        return json_reply({"instances": None})
    return json_reply({"instances": inst.as_json(world.now())})


async def list_v1(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    filters = _json_param(request, "select_filters", {})
    if not isinstance(filters, dict):
        raise invalid_args("select_filters must be an object", 3005)
    order_by = _json_param(request, "order_by", None)
    select_cols = _json_param(request, "select_cols", None)
    if select_cols is not None and (
        not isinstance(select_cols, list) or not all(isinstance(c, str) for c in select_cols)
    ):
        raise invalid_args("select_cols must be a list of column names", 3006)
    try:
        limit = int(request.query.get("limit", "25"))
    except ValueError:
        raise invalid_args("limit must be an integer", 3007) from None
    if not 1 <= limit <= 25:
        raise invalid_args("limit must be between 1 and 25", 3007)
    token = request.query.get("after_token")
    offset = _decode_token(token) if token else 0
    page = world.list_instances(filters, order_by, limit, offset, select_cols)
    next_offset = page.pop("next_offset")
    page["next_token"] = _encode_token(next_offset) if next_offset is not None else None
    return json_reply(page)


async def list_v0(_: web.Request) -> web.Response:
    return json_reply(
        {
            "success": False,
            "error": "deprecated_endpoint",
            "msg": "The /api/v0/instances/ endpoint is deprecated. Use /api/v1/instances/ instead.",
        },
        410,
    )


async def destroy(request: web.Request) -> web.Response:
    await request.app[WORLD].destroy(_instance_id(request))
    return json_reply({"success": True})


async def bulk_destroy(request: web.Request) -> web.Response:
    body = await _body(request)
    ids = body.get("instance_ids")
    if not isinstance(ids, list) or not ids:
        raise invalid_args("instance_ids must be a non-empty list", 3008)
    world = request.app[WORLD]
    destroyed = []
    for raw in ids:
        try:
            await world.destroy(int(raw))
            destroyed.append(int(raw))
        except (ApiError, TypeError, ValueError):
            continue
    return json_reply({"success": True, "destroyed": destroyed})


def _apply_manage(world: VastWorld, instance_id: int, body: dict[str, Any]) -> dict[str, Any]:
    if "state" not in body and "label" not in body:
        raise invalid_args("nothing to change: give state or label", 3009)
    reply: dict[str, Any] = {"success": True}
    if "label" in body:
        world.set_label(instance_id, body["label"])
    if "state" in body:
        reply = world.set_state(instance_id, str(body["state"]))
    return reply


async def manage(request: web.Request) -> web.Response:
    body = await _body(request)
    return json_reply(_apply_manage(request.app[WORLD], _instance_id(request), body))


async def bulk_manage(request: web.Request) -> web.Response:
    body = await _body(request)
    ids = body.pop("ids", None)
    if not isinstance(ids, list) or not ids:
        raise invalid_args("ids must be a non-empty list", 3010)
    world = request.app[WORLD]
    for raw in ids:
        _apply_manage(world, int(raw), body)
    return json_reply({"success": True})


async def reboot(request: web.Request) -> web.Response:
    return json_reply(request.app[WORLD].reboot(_instance_id(request)))


async def request_logs(request: web.Request) -> web.Response:
    body = await _body(request)
    token = request.app[WORLD].request_logs(_instance_id(request), body.get("tail"), body.get("filter"))
    base = f"{request.scheme}://{request.host}"
    return json_reply({"success": True, "result_url": f"{base}/instance_logs/{token}.log", "msg": "working"})


async def log_result(request: web.Request) -> web.Response:
    world = request.app[WORLD]
    result = world.log_results.get(request.match_info["token"])
    if result is None or world.now() < result.ready_at:
        # The client polls result_url until it answers 200 (vastai-api.md "Other routes").
        return text_reply(
            "<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchKey</Code></Error>", 404, "application/xml"
        )
    return text_reply(result.text, 200)


async def attach_ssh(request: web.Request) -> web.Response:
    body = await _body(request)
    return json_reply(request.app[WORLD].attach_key(_instance_id(request), body.get("ssh_key")))


async def account_keys(request: web.Request) -> web.Response:
    return json_reply([k.as_json() for k in request.app[WORLD].account_keys])


async def add_account_key(request: web.Request) -> web.Response:
    body = await _body(request)
    key = request.app[WORLD].add_account_key(body.get("ssh_key"))
    return json_reply({"success": True, "key": key.as_json()})


async def user(request: web.Request) -> web.Response:
    return json_reply(request.app[WORLD].user_json(request.app[API_KEY]))


async def filters(request: web.Request) -> web.Response:
    return json_reply({"success": True, "filters": request.app[WORLD].instance_filters()})


async def gpu_names(request: web.Request) -> web.Response:
    return json_reply({"gpu_names": request.app[WORLD].gpu_names()})


async def gpu_types(request: web.Request) -> web.Response:
    return json_reply({"gpu_types": request.app[WORLD].gpu_types()})


def _both(router: web.UrlDispatcher, method: str, path: str, handler: Handler, name: str) -> None:
    """Register ``path`` (which ends in "/") and its slash-less twin under one name."""
    router.add_route(method, path, handler, name=name)
    router.add_route(method, path.rstrip("/"), handler, name=f"{name}.bare")


def add_routes(app: web.Application) -> None:
    r = app.router
    _both(r, "POST", "/api/v0/bundles/", search, "search")
    _both(r, "PUT", "/api/v0/search/asks/", search_asks, "search_asks")
    _both(r, "PUT", r"/api/v0/asks/{id:\d+}/", create, "create")
    _both(r, "GET", "/api/v0/instances/filters/", filters, "filters")
    _both(r, "PUT", r"/api/v0/instances/reboot/{id:\d+}/", reboot, "reboot")
    _both(r, "PUT", r"/api/v0/instances/request_logs/{id:\d+}/", request_logs, "logs")
    _both(r, "POST", r"/api/v0/instances/{id:\d+}/ssh/", attach_ssh, "attach_ssh")
    _both(r, "GET", r"/api/v0/instances/{id:\d+}/", show, "show")
    _both(r, "PUT", r"/api/v0/instances/{id:\d+}/", manage, "manage")
    _both(r, "DELETE", r"/api/v0/instances/{id:\d+}/", destroy, "destroy")
    _both(r, "GET", "/api/v0/instances/", list_v0, "list_v0")
    _both(r, "PUT", "/api/v0/instances/", bulk_manage, "bulk_manage")
    _both(r, "DELETE", "/api/v0/instances/", bulk_destroy, "bulk_destroy")
    _both(r, "GET", "/api/v1/instances/", list_v1, "list")
    _both(r, "GET", "/api/v0/ssh/", account_keys, "account_keys")
    _both(r, "POST", "/api/v0/ssh/", add_account_key, "add_account_key")
    _both(r, "GET", "/api/v0/users/current/", user, "user")
    _both(r, "GET", "/api/v0/gpu_names/unique/", gpu_names, "gpu_names")
    _both(r, "GET", "/api/v0/gpu_types/", gpu_types, "gpu_types")
    r.add_get("/instance_logs/{token}.log", log_result)
