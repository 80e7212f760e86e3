"""The MLNode control surface of a node that cannot do PoC (gonka-protocol.md §1, §9, §10).

What the dapi sees:
- ``GET /api/v1/state``: the mode it last commanded — ``INFERENCE`` after ``inference/up``, ``STOPPED`` after
  ``stop``/``inference/down``, ``POW`` after a v1 ``pow/init/*`` — plus the 3.0.12+ fields. Mirroring the commanded
  mode keeps the dapi's view calm during a v1 PoC (it reads ``POW`` as POC); the PoC status routes say what really
  happens: ``IDLE``, nothing generated.
- ``inference/up``: accepted when the upstream serves the model (through the model map); a clear error otherwise.
  It does not widen ``/v1/models``, which answers what the operator configured: a dapi expecting another model sees
  the mismatch and marks the node FAILED, which is what should happen to a misconfigured node (§9.4).
- The PoC routes of v1 and v2 answer below 400 and produce nothing (§9.6): a v2 ``inference/pow/init/generate``
  answered ≥ 400 would mark the node FAILED (§10). The PoC statuses report ``IDLE``.
- ``GET /api/v1/gpu/devices``: honest, no GPU.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from hybrid_proxy.node.errors import detail, json_response
from hybrid_proxy.node.health import UpstreamHealth
from hybrid_proxy.node.model_map import ModelMap
from hybrid_proxy.node.record import NodeRecord
from hybrid_proxy.node.upstream import UpstreamClient, UpstreamFailure

log = logging.getLogger("hybrid.proxy.control")

# 3.0.12 is the first image with the extra state fields and the v2 PoC routes (gonka-protocol.md §7, §9).
REPORTED_VERSION = "3.0.12"
_V1_POW_IDLE = {"status": "IDLE", "is_model_initialized": False}
_STATUS_OK = {"status": "OK"}


class BodyError(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__("invalid body")
        self.response = response


def _missing(name: str, body: Any) -> dict[str, Any]:
    return {"type": "missing", "loc": ["body", name], "msg": "Field required", "input": body}


async def read_json(request: web.Request, *, required: bool) -> Any:
    """The JSON body, or a FastAPI-style 422 (the image's framework) / 413 (over the size limit)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyError(detail(f"request body too large: {exc.text}", 413)) from None
    if not raw:
        if required:
            raise BodyError(detail([_missing("body", None)], 422))
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(
            detail(
                [{"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error", "ctx": {"error": str(exc)}}],
                422,
            )
        ) from None


async def _drain(request: web.Request) -> web.Response | None:
    """Read (and ignore) a PoC body: what it says changes nothing on a node without a GPU, so even a body the
    image would refuse gets its OK — only an oversized one is turned away."""
    try:
        await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        return detail(f"request body too large: {exc.text}", 413)
    return None


class ControlRoutes:
    def __init__(
        self,
        *,
        record: NodeRecord,
        upstream: UpstreamClient,
        health: UpstreamHealth,
        model_map: ModelMap,
        configured_models: list[str],
        on_change: Callable[[], Awaitable[None]],
        models_timeout: float,
    ) -> None:
        self.record = record
        self.upstream = upstream
        self.health = health
        self.model_map = model_map
        self.configured_models = configured_models
        self.on_change = on_change
        self.models_timeout = models_timeout

    def routes(self) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
        return [
            ("GET", "/health", self.health_route),
            ("GET", "/livez", self.livez),
            ("GET", "/api/v1/state", self.state),
            ("POST", "/api/v1/stop", self.stop),
            ("POST", "/api/v1/inference/up", self.inference_up),
            ("POST", "/api/v1/inference/down", self.inference_down),
            ("GET", "/api/v1/gpu/devices", self.gpu_devices),
            # PoC v1 (image 3.0.11)
            ("POST", "/api/v1/pow/init/generate", self.pow_init),
            ("POST", "/api/v1/pow/init/validate", self.pow_init),
            ("POST", "/api/v1/pow/phase/generate", self.pow_phase),
            ("POST", "/api/v1/pow/phase/validate", self.pow_phase),
            ("POST", "/api/v1/pow/validate", self.pow_validate),
            ("GET", "/api/v1/pow/status", self.pow_status),
            ("POST", "/api/v1/pow/stop", self.pow_stop),
            # PoC v2 (3.0.12+, inside vLLM)
            ("POST", "/api/v1/inference/pow/init/generate", self.v2_init_generate),
            ("POST", "/api/v1/inference/pow/generate", self.v2_generate),
            ("GET", "/api/v1/inference/pow/status", self.v2_status),
            ("POST", "/api/v1/inference/pow/stop", self.v2_stop),
        ]

    async def _changed(self, changed: bool) -> None:
        if changed:
            await self.on_change()

    # --- health and state -----------------------------------------------------------------------------------

    async def health_route(self, request: web.Request) -> web.Response:
        result = await self.health.check()
        state = self.record.state
        body = {
            "status": "healthy" if result.healthy else "unhealthy",
            "service_state": state,
            "gpu": {"available": False, "count": 0, "devices": []},
            "managers": {"inference": {"running": state == "INFERENCE", "healthy": result.healthy}},
            "upstream": {
                "healthy": result.healthy,
                "reason": result.reason,
                "status": result.status,
                "latency_ms": result.latency_ms,
                "checked_at": result.checked_at,
                "source": result.source,
            },
        }
        return json_response(body, 200 if result.healthy else 503)

    async def livez(self, request: web.Request) -> web.Response:
        return json_response({"status": "alive"})

    async def state(self, request: web.Request) -> web.Response:
        rec = self.record
        body: dict[str, Any] = {
            "state": rec.state,
            "version": REPORTED_VERSION,
            "poc_status": None,
            "inference_healthy": None,
            "loaded_model": None,
            # Inference during PoC validation is an ability of a GPU build; claim nothing we do not do.
            "poc_validation_inference": False,
        }
        if rec.state == "INFERENCE":
            known = self.health.known()
            body.update(
                poc_status="IDLE",
                inference_healthy=None if known is None else known.healthy,
                loaded_model=rec.loaded_model,
            )
        return json_response(body)

    async def stop(self, request: web.Request) -> web.Response:
        await self._changed(self.record.set_state("STOPPED"))
        return json_response(_STATUS_OK)

    async def inference_down(self, request: web.Request) -> web.Response:
        await self._changed(self.record.set_state("STOPPED"))
        return json_response(_STATUS_OK)

    async def gpu_devices(self, request: web.Request) -> web.Response:
        return json_response({"devices": [], "count": 0})

    # --- inference/up ---------------------------------------------------------------------------------------

    async def inference_up(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request, required=True)
        except BodyError as exc:
            return exc.response
        if not isinstance(body, dict):
            return detail(
                [{"type": "model_attributes_type", "loc": ["body"], "msg": "Input should be a valid dictionary"}], 422
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return detail([_missing("model", body)], 422)
        upstream_name = self.model_map.upstream_name(model)
        try:
            status, served = await self.upstream.list_models(self.models_timeout)
        except UpstreamFailure as exc:
            log.warning("inference/up %s: %s", model, exc.message)
            return detail(f"cannot bring inference up: {exc.message}", 503)
        if status == 200:
            if upstream_name not in served:
                shown = ", ".join(served[:10]) or "none"
                log.error("inference/up refused: the upstream does not serve %s (it serves: %s)", upstream_name, shown)
                return detail(
                    f"model {model!r} is not served by the upstream as {upstream_name!r} (it serves: {shown}); "
                    "set PROXY_MODEL_MAP if the provider names it differently",
                    400,
                )
        elif status in (404, 405) and model in self.configured_models:
            # inference-proxy.md: Hyperbolic does not document GET /v1/models; trust the configuration then.
            log.warning("upstream has no model list (HTTP %d): accepting configured model %s", status, model)
        else:
            return detail(f"cannot confirm that the upstream serves {model!r}: GET /models answered HTTP {status}", 503)
        if model not in self.configured_models:
            log.warning(
                "inference/up %s: not in PROXY_MODELS %s; /v1/models keeps answering the configured ids",
                model,
                self.configured_models,
            )
        await self._changed(self.record.set_state("INFERENCE", model))
        return json_response(_STATUS_OK)

    # --- PoC v1: answered, nothing produced -----------------------------------------------------------------

    async def pow_init(self, request: web.Request) -> web.Response:
        if (refused := await _drain(request)) is not None:
            return refused
        log.info("PoC v1 %s: this node has no GPU, producing nothing (status IDLE)", request.path)
        await self._changed(self.record.set_state("POW"))
        return json_response({"status": "OK", "pow_status": _V1_POW_IDLE})

    async def pow_phase(self, request: web.Request) -> web.Response:
        return json_response({"status": "OK", "pow_status": _V1_POW_IDLE})

    async def pow_validate(self, request: web.Request) -> web.Response:
        if (refused := await _drain(request)) is not None:
            return refused
        return json_response(None)

    async def pow_status(self, request: web.Request) -> web.Response:
        return json_response(_V1_POW_IDLE)

    async def pow_stop(self, request: web.Request) -> web.Response:
        if self.record.state == "POW":
            await self._changed(self.record.set_state("STOPPED"))
        return json_response({"status": "OK", "pow_status": _V1_POW_IDLE})

    # --- PoC v2: answered, nothing produced -----------------------------------------------------------------

    async def v2_init_generate(self, request: web.Request) -> web.Response:
        if (refused := await _drain(request)) is not None:
            return refused
        log.info("PoC v2 init/generate: this node has no GPU, producing nothing (status IDLE)")
        return json_response({"status": "OK", "backends": 0, "n_groups": 0, "results": [], "errors": None})

    async def v2_generate(self, request: web.Request) -> web.Response:
        if (refused := await _drain(request)) is not None:
            return refused
        # Validation work for other participants: accepted and not done; nothing will be called back.
        return json_response({"status": "queued", "request_id": f"proxy:{uuid.uuid4()}", "queued_count": 0})

    async def v2_status(self, request: web.Request) -> web.Response:
        return json_response({"status": "IDLE", "backends": []})

    async def v2_stop(self, request: web.Request) -> web.Response:
        return json_response({"status": "OK", "results": [], "errors": None})
