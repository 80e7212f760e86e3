"""The MLNode's control API (container port 8080), as the image serves it (gonka-protocol.md §1, §7).

FastAPI conventions are kept: errors are ``{"detail": ...}``, a missing or mistyped body field is a 422
with pydantic's error list, an unknown path is ``404 {"detail": "Not Found"}`` — including every path
with the dapi's ``/{version}`` prefix, because the image does not strip it (the official deployment
puts nginx in front). 3.0.11 ("v1") has no ``/api/v1/inference/pow/*`` routes; 3.0.12+ ("v2") adds
them and the extra ``state`` fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sim.mlnode.pow_v1 import PowInit
from sim.mlnode.pow_v2 import PocV2Error
from sim.mlnode.vllm import VllmStartInterrupted

if TYPE_CHECKING:
    from sim.mlnode.node import MLNode

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "dict": (dict,),
    "list": (list,),
    "bool": (bool,),
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def detail(message: Any, status: int) -> web.Response:
    return _json({"detail": message}, status)


class BodyError(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__("invalid body")
        self.response = response


async def read_body(request: web.Request, spec: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    """Parse a JSON body and check field types the way FastAPI/pydantic would (422 on failure)."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise BodyError(
            detail(
                [
                    {
                        "type": "json_invalid",
                        "loc": ["body", 0],
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": str(exc)},
                    }
                ],
                422,
            )
        ) from None
    if not isinstance(body, dict):
        raise BodyError(
            detail(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": ["body"],
                        "msg": "Input should be a valid dictionary or object to extract fields from",
                        "input": body,
                    }
                ],
                422,
            )
        )
    errors: list[dict[str, Any]] = []
    for name, (kind, required) in spec.items():
        if name not in body or body[name] is None:
            if required:
                errors.append({"type": "missing", "loc": ["body", name], "msg": "Field required", "input": body})
            continue
        value = body[name]
        ok = isinstance(value, _TYPES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
        if not ok:
            errors.append(
                {
                    "type": f"{kind}_type",
                    "loc": ["body", name],
                    "msg": f"Input should be a valid {kind}",
                    "input": value,
                }
            )
    if errors:
        raise BodyError(detail(errors, 422))
    return body


_POW_INIT_SPEC = {
    "node_id": ("int", True),
    "node_count": ("int", True),
    "block_hash": ("str", True),
    "block_height": ("int", True),
    "public_key": ("str", True),
    "batch_size": ("int", False),
    "r_target": ("float", False),
    "fraud_threshold": ("float", False),
    "params": ("dict", False),
    "url": ("str", True),
}
_V2_INIT_SPEC = {
    "block_hash": ("str", True),
    "block_height": ("int", True),
    "public_key": ("str", True),
    "node_id": ("int", True),
    "node_count": ("int", True),
    "batch_size": ("int", False),
    "params": ("dict", True),
    "url": ("str", False),
}
_V2_GENERATE_SPEC = {**_V2_INIT_SPEC, "nonces": ("list", True), "wait": ("bool", False), "validation": ("dict", False)}


class ControlRoutes:
    def __init__(self, node: MLNode) -> None:
        self.node = node

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024**2, middlewares=[self._errors])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/livez", self.health)
        r.add_get("/api/v1/state", self.state)
        r.add_post("/api/v1/stop", self.stop)
        r.add_post("/api/v1/pow/init/generate", self.pow_init_generate)
        r.add_post("/api/v1/pow/init/validate", self.pow_init_validate)
        r.add_post("/api/v1/pow/phase/generate", self.pow_phase_generate)
        r.add_post("/api/v1/pow/phase/validate", self.pow_phase_validate)
        r.add_post("/api/v1/pow/validate", self.pow_validate)
        r.add_get("/api/v1/pow/status", self.pow_status)
        r.add_post("/api/v1/pow/stop", self.pow_stop)
        r.add_post("/api/v1/inference/up", self.inference_up)
        r.add_post("/api/v1/inference/down", self.inference_down)
        r.add_get("/api/v1/gpu/devices", self.gpu_devices)
        r.add_post("/api/v1/models/status", self.models_status)
        r.add_post("/api/v1/models/download", self.models_download)
        r.add_get("/api/v1/models/list", self.models_list)
        r.add_get("/api/v1/models/space", self.models_space)
        r.add_delete("/api/v1/models", self.models_delete)
        if self.node.generation == "v2":
            r.add_post("/api/v1/inference/pow/init/generate", self.v2_init_generate)
            r.add_post("/api/v1/inference/pow/generate", self.v2_generate)
            r.add_get("/api/v1/inference/pow/status", self.v2_status)
            r.add_post("/api/v1/inference/pow/stop", self.v2_stop)
        r.add_get("/_sim/stats", self.sim_stats)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BodyError as exc:
            return exc.response
        except web.HTTPNotFound:
            return detail("Not Found", 404)
        except web.HTTPMethodNotAllowed:
            return detail("Method Not Allowed", 405)

    # --- state -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        node = self.node
        gpu_ok = node.gpu_count > 0
        inference_running = node.vllm.is_running
        inference_healthy = node.vllm.is_up
        healthy = gpu_ok and not (inference_running and not inference_healthy)
        body = {
            "status": "healthy" if healthy else "unhealthy",
            "service_state": node.service_state,
            "gpu": {"available": gpu_ok, "count": node.gpu_count, "devices": node.gpu_devices()},
            "managers": {
                "inference": {"running": inference_running, "healthy": inference_healthy},
                "train": {"running": False, "healthy": True},
            },
        }
        return _json(body, 200 if healthy else 503)

    async def state(self, request: web.Request) -> web.Response:
        node = self.node
        state = node.service_state
        if node.generation == "v1":
            return _json({"state": state})
        body: dict[str, Any] = {
            "state": state,
            "version": node.version,
            "poc_status": None,
            "inference_healthy": None,
            "loaded_model": None,
        }
        if state == "INFERENCE":
            if not node.vllm.is_up:
                body.update(poc_status="NO_BACKENDS", inference_healthy=False)
            else:
                body.update(
                    poc_status="GENERATING" if node.pow_v2.generating else "IDLE",
                    inference_healthy=True,
                    loaded_model=node.vllm.model,
                )
        return _json(body)

    async def stop(self, request: web.Request) -> web.Response:
        self.node.stop_all()
        return _json({"status": "OK"})

    # --- PoC v1 ----------------------------------------------------------------------------

    def _pow_conflict(self) -> web.Response | None:
        if self.node.gpu_count <= 0:
            return detail("CUDA is not available on this MLNode", 500)
        if self.node.vllm.is_running:
            return detail("Cannot run POW because MLNode is currently in INFERENCE mode", 409)
        return None

    async def _pow_init(self, request: web.Request) -> PowInit | web.Response:
        body = await read_body(request, _POW_INIT_SPEC)
        if (conflict := self._pow_conflict()) is not None:
            return conflict
        if body["node_id"] == -1 or body["node_count"] == -1:
            return detail("node_id and node_count must be set (got -1)", 400)
        return PowInit(
            node_id=int(body["node_id"]),
            node_count=int(body["node_count"]),
            block_hash=str(body["block_hash"]),
            block_height=int(body["block_height"]),
            public_key=str(body["public_key"]),
            batch_size=int(body.get("batch_size") or 100),
            r_target=float(body.get("r_target") or 1.398),
            fraud_threshold=float(body.get("fraud_threshold") or 1e-7),
            params=dict(body.get("params") or {}),
            url=str(body["url"]).rstrip("/"),
        )

    async def pow_init_generate(self, request: web.Request) -> web.Response:
        init = await self._pow_init(request)
        if isinstance(init, web.Response):
            return init
        self.node.pow_v1.start_generate(init)
        return _json({"status": "OK", "pow_status": self.node.pow_v1.describe()})

    async def pow_init_validate(self, request: web.Request) -> web.Response:
        init = await self._pow_init(request)
        if isinstance(init, web.Response):
            return init
        self.node.pow_v1.start_validate(init)
        return _json({"status": "OK", "pow_status": self.node.pow_v1.describe()})

    async def pow_phase_generate(self, request: web.Request) -> web.Response:
        if not self.node.pow_v1.is_running:
            return detail("PoW is not running", 400)
        self.node.pow_v1.phase_generate()
        return _json({"status": "OK", "pow_status": self.node.pow_v1.describe()})

    async def pow_phase_validate(self, request: web.Request) -> web.Response:
        if not self.node.pow_v1.is_running:
            return detail("PoW is not running", 400)
        self.node.pow_v1.phase_validate()
        return _json({"status": "OK", "pow_status": self.node.pow_v1.describe()})

    async def pow_validate(self, request: web.Request) -> web.Response:
        body = await read_body(
            request,
            {
                "public_key": ("str", True),
                "block_hash": ("str", True),
                "block_height": ("int", True),
                "nonces": ("list", True),
                "dist": ("list", True),
                "node_id": ("int", False),
            },
        )
        if not self.node.pow_v1.is_running:
            return detail("PoW is not running", 400)
        self.node.pow_v1.validate(body)
        return _json(None)

    async def pow_status(self, request: web.Request) -> web.Response:
        return _json(self.node.pow_v1.describe())

    async def pow_stop(self, request: web.Request) -> web.Response:
        self.node.pow_v1.stop()
        return _json({"status": "OK", "pow_status": self.node.pow_v1.describe()})

    # --- inference -------------------------------------------------------------------------

    async def inference_up(self, request: web.Request) -> web.Response:
        body = await read_body(
            request, {"model": ("str", True), "dtype": ("str", False), "additional_args": ("list", False)}
        )
        node = self.node
        if node.pow_v1.is_running:
            return detail("Cannot run INFERENCE because MLNode is currently in POW mode", 409)
        if node.generation == "v1" and node.vllm.is_running:
            return detail("Cannot run INFERENCE because MLNode is currently in INFERENCE mode", 409)
        if node.gpu_count <= 0:
            return detail("vLLM failed to start: no CUDA devices", 500)
        try:
            await node.vllm.up(
                body["model"], str(body.get("dtype") or "auto"), [str(a) for a in body.get("additional_args") or []]
            )
        except VllmStartInterrupted as exc:
            return detail(str(exc), 500)
        return _json({"status": "OK"})

    async def inference_down(self, request: web.Request) -> web.Response:
        self.node.vllm.down()
        return _json({"status": "OK"})

    async def gpu_devices(self, request: web.Request) -> web.Response:
        devices = self.node.gpu_devices()
        return _json({"devices": devices, "count": len(devices)})

    # --- model cache -----------------------------------------------------------------------

    async def models_status(self, request: web.Request) -> web.Response:
        body = await read_body(request, {"hf_repo": ("str", True), "hf_commit": ("str", False)})
        return _json(self.node.cache.status(body["hf_repo"], body.get("hf_commit")))

    async def models_download(self, request: web.Request) -> web.Response:
        body = await read_body(request, {"hf_repo": ("str", True), "hf_commit": ("str", False)})
        repo, commit = body["hf_repo"], body.get("hf_commit")
        try:
            task_id = self.node.cache.start(repo, commit)
        except ValueError as exc:
            return detail(str(exc), 409 if "already downloading" in str(exc) else 429)
        status = self.node.cache.status(repo, commit)["status"]
        return _json({"task_id": task_id, "status": status, "model": {"hf_repo": repo, "hf_commit": commit}}, 202)

    async def models_list(self, request: web.Request) -> web.Response:
        return _json({"models": self.node.cache.list()})

    async def models_space(self, request: web.Request) -> web.Response:
        cached = sum(1 for m in self.node.cache.list() if m["status"] == "DOWNLOADED")
        return _json(
            {"cache_size_gb": round(15.2 * cached, 2), "available_gb": 465.66, "cache_path": "/root/.cache/hub"}
        )

    async def models_delete(self, request: web.Request) -> web.Response:
        body = await read_body(request, {"hf_repo": ("str", True), "hf_commit": ("str", False)})
        try:
            result = self.node.cache.delete(body["hf_repo"])
        except ValueError as exc:
            return detail(str(exc), 404)
        return _json({"status": result, "model": {"hf_repo": body["hf_repo"], "hf_commit": body.get("hf_commit")}})

    # --- PoC v2 (3.0.12+) -----------------------------------------------------------------

    async def v2_init_generate(self, request: web.Request) -> web.Response:
        body = await read_body(request, _V2_INIT_SPEC)
        if not isinstance(body["params"].get("model"), str) or not isinstance(body["params"].get("seq_len"), int):
            return detail(
                [
                    {
                        "type": "missing",
                        "loc": ["body", "params", "model|seq_len"],
                        "msg": "Field required",
                        "input": body["params"],
                    }
                ],
                422,
            )
        try:
            return _json(self.node.pow_v2.init_generate(body))
        except PocV2Error as exc:
            return detail(exc.detail, exc.status)

    async def v2_generate(self, request: web.Request) -> web.Response:
        body = await read_body(request, _V2_GENERATE_SPEC)
        if not isinstance(body["params"].get("model"), str):
            return detail(
                [
                    {
                        "type": "missing",
                        "loc": ["body", "params", "model"],
                        "msg": "Field required",
                        "input": body["params"],
                    }
                ],
                422,
            )
        try:
            return _json(self.node.pow_v2.generate(body))
        except PocV2Error as exc:
            return detail(exc.detail, exc.status)

    async def v2_status(self, request: web.Request) -> web.Response:
        return _json({"status": self.node.pow_v2.status, "backends": self.node.pow_v2.backends()})

    async def v2_stop(self, request: web.Request) -> web.Response:
        return _json(self.node.pow_v2.stop())

    # --- simulator introspection --------------------------------------------------------------

    async def sim_stats(self, request: web.Request) -> web.Response:
        return _json(self.node.stats())
